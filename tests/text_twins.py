"""PyTorch (transformers) twins of the text encoders and tiny tokenizers trained offline."""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from jaxdit.parity import randomize_weights

CORPUS = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon",
          "a watercolor painting of mountains at dawn", "two dogs playing in the snow near a lake",
          "a bowl of soup with a spoon, studio lighting", "portrait of an old sailor, oil on canvas"] * 10


def clip_twin(path, *, projection: bool, hidden_act: str, eos_token_id: int, vocab_size: int = 64,
              max_positions: int = 16, seed: int = 0):
    """A tiny CLIPTextModel(WithProjection), random weights, written with `save_pretrained(path)`."""
    import transformers as tf

    config = tf.CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=max_positions, projection_dim=24,
                               hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=vocab_size - 2,
                               pad_token_id=0)
    cls = tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel
    model = randomize_weights(cls(config).eval(), seed)
    model.save_pretrained(path)
    return model


def t5_twin(path, *, vocab_size: int = 64, seed: int = 0, feed_forward_proj: str = "gated-gelu",
            num_layers: int = 3, **save_kw):
    """A tiny T5EncoderModel (default v1.1: gated-gelu, no biases) with few buckets so the log range is
    exercised."""
    import transformers as tf

    config = tf.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=num_layers, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         feed_forward_proj=feed_forward_proj, is_encoder_decoder=False, use_cache=False)
    model = randomize_weights(tf.T5EncoderModel(config).eval(), seed)
    model.save_pretrained(path, **save_kw)
    return model


def clip_ids(rng, batch: int, length: int, vocab_size: int, eos: int, pad: int) -> np.ndarray:
    """Token ids like a CLIP tokenizer's: <bos> text <eos> <pad>..., eos at a random position per row."""
    bos = vocab_size - 2
    ids = np.full((batch, length), pad, np.int64)
    for row in ids:
        n = int(rng.integers(1, length - 1))
        row[0] = bos
        row[1:n + 1] = rng.integers(3, vocab_size - 3, n)
        row[n + 1] = eos
    return ids


def torch_clip(model, ids, attention_mask=None) -> dict[str, np.ndarray]:
    """last_hidden_state, penultimate hidden state, all hidden states, pooler_output, text_embeds."""
    with torch.no_grad():
        t_ids = torch.from_numpy(ids)
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        out = model(t_ids, attention_mask=mask, output_hidden_states=True)
        text = getattr(model, "text_model", model)  # WithProjection wraps a CLIPTextModel
        pooled = text(t_ids, attention_mask=mask).pooler_output
    res = {"last_hidden_state": out.last_hidden_state, "hidden_states": out.hidden_states, "pooler_output": pooled}
    if hasattr(out, "text_embeds"):
        res["text_embeds"] = out.text_embeds
    return {k: [h.float().numpy() for h in v] if k == "hidden_states" else v.float().numpy() for k, v in res.items()}


def torch_t5(model, ids, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return model(torch.from_numpy(ids), attention_mask=mask).last_hidden_state.float().numpy()


def train_clip_tokenizer(path, max_length: int = 16):
    """A CLIP-style byte-level BPE (`</w>` word suffix) trained on CORPUS, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for special in ("<|startoftext|>", "<|endoftext|>"):  # last ids, as in openai's vocabulary
        vocab[special] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tok = CLIPTokenizerFast(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.save_pretrained(path)
    return tok


def train_t5_tokenizer(path, extra_ids: int = 8):
    """A SentencePiece unigram model (T5 ids: pad 0, eos 1, unk 2) saved as a transformers T5 tokenizer.

    Returns (tokenizer, sentencepiece model bytes)."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=60,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2, num_threads=1)
    spm_dir = path.parent / (path.name + "_spm")
    spm_dir.mkdir(parents=True)
    (spm_dir / "spiece.model").write_bytes(proto.getvalue())
    tok = T5TokenizerFast.from_pretrained(str(spm_dir), extra_ids=extra_ids, local_files_only=True)
    tok.save_pretrained(path)
    return tok, proto.getvalue()
