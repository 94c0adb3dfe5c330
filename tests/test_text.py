"""Text encoders: parity with transformers CLIP / T5 twins, loading, tokenizers, sharding, bad input."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdit import sharding
from jaxdit.convert import CheckpointError, UnsafeFormatError, load_text_encoder
from jaxdit.text import CLIP_G, CLIP_L, T5_XXL, clip, clip_encode, load_tokenizer, t5, t5_encode
from text_twins import (clip_ids, clip_twin, t5_twin, torch_clip, torch_t5, train_clip_tokenizer,
                        train_t5_tokenizer)
from twins import rel_err

FP32_TOL = 1e-5
BF16_TOL = 5e-2
VOCAB = 64

_clip_fwd = jax.jit(clip.forward, static_argnums=1)
_t5_fwd = jax.jit(t5.forward, static_argnums=1)

# (projection, hidden_act, config eos_token_id, eos token in the ids, pad token)
CLIP_CASES = {
    # openai CLIP-L: legacy eos_token_id 2 -> pooled at argmax(ids); padded with <|endoftext|>
    "clip-l-legacy": (False, "quick_gelu", 2, VOCAB - 1, VOCAB - 1),
    # current configs: first position equal to eos_token_id; eos not the largest id, so argmax(ids)
    # would pick <bos> instead and the two conventions cannot be confused
    "clip-l-eos": (False, "quick_gelu", 5, 5, 5),
    # bigG layout: projection, exact gelu, padded with id 0 ("!")
    "bigg": (True, "gelu", 5, 5, 0),
}
CLIP_IDS = (4, 12)  # shorter than the 16 positions: the position table is sliced
T5_IDS = (3, 40)  # past max_distance 20: the clamped buckets are used too


@pytest.fixture(scope="module", params=sorted(CLIP_CASES))
def clip_case(request, tmp_path_factory):
    """(twin, folder, loaded config, loaded params, ids, mask) of one CLIP variant."""
    projection, act, eos_id, eos, pad = CLIP_CASES[request.param]
    path = tmp_path_factory.mktemp(f"clip_{request.param}")
    model = clip_twin(path, projection=projection, hidden_act=act, eos_token_id=eos_id, vocab_size=VOCAB,
                      seed=len(request.param))
    cfg, params = load_text_encoder(path)
    ids, mask = _clip_inputs(eos, pad)
    return model, path, cfg, params, ids, mask


def _clip_inputs(eos, pad, seed=0):
    """Token ids and an attention mask: rows 0-1 unmasked (as pipelines run), rows 2-3 with padding masked.

    One (ids, mask) signature per variant keeps it to one compile: an all-ones row equals no mask."""
    ids = clip_ids(np.random.default_rng(seed), *CLIP_IDS, VOCAB, eos, pad)
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    mask[3, 3:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    model = t5_twin(path, vocab_size=VOCAB, seed=3)
    cfg, params = load_text_encoder(path)
    return model, path, cfg, params


def _check_clip(cfg, params, model, ids, mask=None, tol=FP32_TOL):
    ref = torch_clip(model, ids, mask)
    out = _clip_fwd(params, cfg, ids, mask)
    assert out.hidden_states.shape[0] == len(ref["hidden_states"]) == cfg.num_hidden_layers + 1
    errs = {"last_hidden_state": rel_err(out.last_hidden_state, ref["last_hidden_state"]),
            "hidden_states[-2]": rel_err(out.hidden_states[-2], ref["hidden_states"][-2]),
            "hidden_states": max(rel_err(a, b) for a, b in zip(out.hidden_states, ref["hidden_states"])),
            "pooler_output": rel_err(out.pooler_output, ref["pooler_output"])}
    if cfg.with_projection:
        errs["text_embeds"] = rel_err(out.text_embeds, ref["text_embeds"])
    else:
        assert out.text_embeds is None and "text_embeds" not in ref
    assert max(errs.values()) <= tol, errs
    return errs


# --- CLIP -------------------------------------------------------------------------------------------

def test_clip_parity(clip_case):
    model, _, cfg, params, ids, mask = clip_case
    assert cfg.with_projection == hasattr(model, "text_projection")
    assert cfg.hidden_act == model.config.hidden_act and cfg.eos_token_id == model.config.eos_token_id
    _check_clip(cfg, params, model, ids, mask)


def test_clip_v4_layout_with_position_ids(tmp_path):
    """Published diffusers text_encoder/ files: `text_model.` prefix and a persisted position_ids buffer."""
    model = clip_twin(tmp_path / "v5", projection=False, hidden_act="quick_gelu", eos_token_id=2, vocab_size=VOCAB)
    tensors = load_file(tmp_path / "v5" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in tensors)  # transformers 5 drops the prefix
    v4 = {"text_model." + k: v for k, v in tensors.items()}
    v4["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    (tmp_path / "v4").mkdir()
    save_file(v4, tmp_path / "v4" / "model.safetensors")
    (tmp_path / "v4" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    cfg, params = load_text_encoder(tmp_path / "v4")
    _check_clip(cfg, params, model, *_clip_inputs(VOCAB - 1, VOCAB - 1, seed=2))


# --- T5 ---------------------------------------------------------------------------------------------

def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for length, buckets, distance in ((512, 32, 128), (300, 8, 20), (64, 16, 32)):
        pos = torch.arange(length)
        ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], True, buckets, distance)
        np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, distance), ref.numpy())


def _t5_inputs(seed=0):
    ids = np.random.default_rng(seed).integers(2, VOCAB, T5_IDS)
    mask = np.ones_like(ids)
    for row, n in enumerate((40, 17, 5)):  # right padding, as the tokenizer pads
        ids[row, n:], mask[row, n:] = 0, 0
    return ids, mask


def test_t5_parity(t5_folder):
    model, _, cfg, params = t5_folder
    assert (cfg.d_model, cfg.num_layers, cfg.dense_act_fn) == (32, 3, "gelu_new")
    assert set(params) == {"shared", "relative_attention_bias", "block", "final_layer_norm"}
    ids, mask = _t5_inputs()
    unmasked = _t5_fwd(params, cfg, ids)  # as FLUX / SD3 run it: padding attended
    err = rel_err(unmasked, torch_t5(model, ids))
    assert err <= FP32_TOL, err
    masked = _t5_fwd(params, cfg, ids, mask)
    err = rel_err(masked, torch_t5(model, ids, mask))
    assert err <= FP32_TOL, err
    assert rel_err(masked, unmasked) > 1e-3  # the mask does change the result


def test_t5_sharded_index_and_tied_embedding_names(tmp_path, t5_folder):
    model, path, _, _ = t5_folder
    ids, _ = _t5_inputs(seed=2)
    ref = torch_t5(model, ids)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert list((tmp_path / "sharded").glob("*.safetensors.index.json"))
    cfg, params = load_text_encoder(tmp_path / "sharded")
    assert rel_err(_t5_fwd(params, cfg, ids), ref) <= FP32_TOL
    # Checkpoints that store the tied table as encoder.embed_tokens.weight, alone or beside shared.weight.
    tensors = load_file(path / "model.safetensors")
    for name, extra in (("embed_only", {}), ("both", {"shared.weight": tensors["shared.weight"]})):
        variant = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()}
        (tmp_path / name).mkdir()
        save_file({**variant, **extra}, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text((path / "config.json").read_text())
        cfg, params = load_text_encoder(tmp_path / name)
        assert rel_err(_t5_fwd(params, cfg, ids), ref) <= FP32_TOL, name


def test_t5_sharded_forward_on_8_devices(t5_folder):
    model, path, cfg, single = t5_folder
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    _, params = load_text_encoder(path, mesh=mesh)
    wi_0 = params["block"]["layer"]["1"]["DenseReluDense"]["wi_0"]["kernel"]  # [L, d_model, d_ff]
    assert wi_0.sharding.spec == P(None, "fsdp", "tensor")
    assert wi_0.sharding.shard_shape(wi_0.shape) == (3, 8, 24)
    assert len({s.device for s in wi_0.addressable_shards}) == 8
    o = params["block"]["layer"]["0"]["SelfAttention"]["o"]["kernel"]  # row-parallel: [L, heads*d_kv, d_model]
    assert o.sharding.spec == P(None, "tensor", "fsdp")
    assert params["shared"]["embedding"].sharding.spec == P(None, "fsdp")

    ids, _ = _t5_inputs(seed=3)
    sharded_out = _t5_fwd(params, cfg, ids)
    assert rel_err(sharded_out, _t5_fwd(single, cfg, ids)) <= FP32_TOL  # reduction order only
    assert rel_err(sharded_out, torch_t5(model, ids)) <= FP32_TOL


def test_t5_xxl_specs_split_every_matrix():
    """The real T5-XXL tree (abstract) on an 8-device mesh: every weight matrix is split 8 ways."""
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    abstract = t5.abstract_params(T5_XXL)
    specs = sharding.param_specs(abstract, mesh, t5.logical_axes(T5_XXL))
    total = per_device = 0
    for leaf, spec in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(
            specs, is_leaf=lambda x: isinstance(x, P))):
        ways = int(np.prod([mesh.shape[a] for a in jax.tree_util.tree_leaves(tuple(spec))]))
        nbytes = int(np.prod(leaf.shape)) * 2  # bf16
        total, per_device = total + nbytes, per_device + nbytes // ways
        if len(leaf.shape) == 3:  # stacked [L, in, out] matrices
            assert ways == 8, (leaf.shape, spec)
    assert total > 9e9 and per_device < total / 7.5, (total, per_device)

    g = sharding.param_specs(clip.abstract_params(CLIP_G), mesh, clip.logical_axes(CLIP_G))["layers"]  # Megatron too
    assert g["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert g["self_attn"]["q_proj"]["bias"] == P(None, "tensor")
    assert g["self_attn"]["out_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert g["mlp"]["fc2"]["kernel"] == P(None, "tensor", "fsdp")
    assert g["layer_norm1"]["scale"] == P(None, None)


def test_configs_from_transformers():
    # google/t5-v1_1-xxl's original config.json: no dense_act_fn, no relative_attention_max_distance.
    old = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
           "feed_forward_proj": "gated-gelu", "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
           "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-06}
    assert t5.T5EncoderConfig.from_transformers(old) == T5_XXL
    with pytest.raises(ValueError, match="d_model"):
        t5.T5EncoderConfig.from_transformers({k: v for k, v in old.items() if k != "d_model"})
    openai = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
              "eos_token_id": 2, "projection_dim": 768}
    assert clip.ClipTextConfig.from_transformers(openai, with_projection=False) == CLIP_L
    assert clip.ClipTextConfig.from_transformers(openai, with_projection=True).projection_dim == 768


# --- tokenizers and the encode helpers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A diffusers-style layout: tokenizer/, text_encoder/ (CLIP-L), tokenizer_3/, text_encoder_3/ (T5)."""
    root = tmp_path_factory.mktemp("pipeline")
    clip_tok = train_clip_tokenizer(root / "tokenizer", max_length=16)
    t5_tok, spm_model = train_t5_tokenizer(root / "tokenizer_3")
    clip_model = clip_twin(root / "text_encoder", projection=False, hidden_act="quick_gelu", eos_token_id=2,
                           vocab_size=len(clip_tok), max_positions=16, seed=5)
    t5_model = t5_twin(root / "text_encoder_3", vocab_size=len(t5_tok), seed=6)
    return root, clip_model, t5_model, spm_model


PROMPTS = ["a photo of a cat riding a horse", "two dogs", "an astronaut painting mountains at dawn on the moon"
           " with a spoon and a red chair near a lake"]


def test_t5_tokenizer_and_encode(pipeline_folder):
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    root, _, model, spm_model = pipeline_folder
    tokenizer = load_tokenizer(root / "tokenizer_3")
    # The saved tokenizer is the trained SentencePiece model (+ </s>), not something near it.
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    assert tokenizer("two dogs playing")["input_ids"] == sp.encode("two dogs playing") + [1]

    direct = T5TokenizerFast.from_pretrained(str(root / "tokenizer_3"), local_files_only=True)
    ref_ids = direct(PROMPTS, padding="max_length", max_length=20, truncation=True, return_tensors="pt").input_ids
    cfg, params = load_text_encoder(root / "text_encoder_3")
    out = t5_encode(params, cfg, tokenizer, PROMPTS, max_length=20)
    np.testing.assert_array_equal(out.input_ids, ref_ids.numpy())
    assert out.input_ids[2, -1] == 1 and (out.input_ids[1] == 0).any()  # truncated + </s>; padded
    with torch.no_grad():
        ref = model(ref_ids).last_hidden_state.numpy()
    assert rel_err(out.last_hidden_state, ref) <= FP32_TOL
    np.testing.assert_array_equal(out.attention_mask, (ref_ids != 0).numpy())  # the tokenizer's own mask


def test_clip_tokenizer_and_encode(pipeline_folder):
    from transformers import CLIPTokenizerFast

    root, model, _, _ = pipeline_folder
    tokenizer = load_tokenizer(root / "tokenizer")
    direct = CLIPTokenizerFast.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    ref_ids = direct(PROMPTS, padding="max_length", max_length=direct.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
    cfg, params = load_text_encoder(root / "text_encoder")
    out = clip_encode(params, cfg, tokenizer, PROMPTS)
    np.testing.assert_array_equal(out.input_ids, ref_ids.numpy())
    assert out.input_ids.shape == (3, 16) and out.input_ids[2, -1] == direct.eos_token_id
    with torch.no_grad():
        ref = model(ref_ids, output_hidden_states=True)
    assert rel_err(out.pooled, ref.pooler_output.numpy()) <= FP32_TOL  # FLUX's CLIP conditioning
    assert rel_err(out.hidden_state, ref.hidden_states[-2].numpy()) <= FP32_TOL  # SD3's
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) <= FP32_TOL
    with pytest.raises(ValueError, match="clip_skip"):
        clip_encode(params, cfg, tokenizer, PROMPTS, clip_skip=cfg.num_hidden_layers)


# --- reduced precision ---------------------------------------------------------------------------------

def test_bf16_error_against_torch_fp32(t5_folder, tmp_path):
    """bf16 parameters and compute vs the float32 torch twin, beside torch's own bf16 error on the same input.

    Tiny random T5s are sensitive (unscaled logits of random q, k make sharp softmaxes), so the bound is
    relative to what torch itself loses in bf16."""
    model, path, _, _ = t5_folder
    cfg, params = load_text_encoder(path, dtype="bfloat16")
    assert params["block"]["layer"]["0"]["SelfAttention"]["q"]["kernel"].dtype == jnp.bfloat16
    cfg = cfg.replace(dtype="bfloat16")
    ids, _ = _t5_inputs(seed=4)
    with jax.default_matmul_precision("default"):
        out = _t5_fwd(params, cfg, ids)
    assert out.dtype == jnp.bfloat16
    ref = torch_t5(model, ids)
    errs = {"T5 last_hidden_state": (rel_err(np.asarray(out, np.float32), ref),
                                     rel_err(torch_t5(copy.deepcopy(model).to(torch.bfloat16), ids), ref))}

    clip_model = clip_twin(tmp_path, projection=True, hidden_act="gelu", eos_token_id=5, vocab_size=VOCAB)
    ccfg, cparams = load_text_encoder(tmp_path, dtype="bfloat16")
    ccfg = ccfg.replace(dtype="bfloat16")
    cids, cmask = _clip_inputs(5, 0, seed=5)
    ref = torch_clip(clip_model, cids, cmask)
    ref_bf16 = torch_clip(copy.deepcopy(clip_model).to(torch.bfloat16), cids, cmask)
    with jax.default_matmul_precision("default"):
        cout = _clip_fwd(cparams, ccfg, cids, cmask)
    for name, ours, key in (("CLIP-G last_hidden_state", cout.last_hidden_state, "last_hidden_state"),
                            ("CLIP-G hidden_states[-2]", cout.hidden_states[-2], "hidden_states"),
                            ("CLIP-G text_embeds", cout.text_embeds, "text_embeds")):
        r, rb = (ref[key][-2], ref_bf16[key][-2]) if key == "hidden_states" else (ref[key], ref_bf16[key])
        errs[name] = (rel_err(np.asarray(ours, np.float32), r), rel_err(rb, r))
    print("\nbf16 vs torch fp32, rel err (jaxdit bf16 | torch bf16):")
    for name, (ours, theirs) in errs.items():
        print(f"  {name:<26} {ours:.3e} | {theirs:.3e}")
    for name, (ours, theirs) in errs.items():
        assert ours <= max(BF16_TOL, 1.5 * theirs), (name, ours, theirs)


# --- bad input ------------------------------------------------------------------------------------------

def _copy_folder(src, dst, edit):
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    save_file(edit(tensors), dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_tensor_is_named(t5_folder, tmp_path):
    _, path, _, _ = t5_folder
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    bad = _copy_folder(path, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=f"missing tensors.*{key}"):
        load_text_encoder(bad)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    bad = _copy_folder(path, tmp_path / "b", lambda t: {k: v for k, v in t.items() if k != bias})
    with pytest.raises(CheckpointError, match=bias):
        load_text_encoder(bad)


def test_clip_missing_tensor_uses_checkpoint_names(tmp_path):
    clip_twin(tmp_path / "ok", projection=True, hidden_act="gelu", eos_token_id=5, vocab_size=VOCAB)
    for key in ("text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.2.mlp.fc2.bias",
                "text_projection.weight"):
        bad = _copy_folder(tmp_path / "ok", tmp_path / key, lambda t: {k: v for k, v in t.items() if k != key})
        with pytest.raises(CheckpointError, match=f"missing tensors.*{key.replace('.', '[.]')}"):
            load_text_encoder(bad)


def test_wrong_shape_and_unexpected_tensor(t5_folder, tmp_path):
    _, path, _, _ = t5_folder
    key = "encoder.block.2.layer.0.SelfAttention.q.weight"
    bad = _copy_folder(path, tmp_path / "s", lambda t: {**t, key: np.zeros((32, 31), np.float32)})
    with pytest.raises(CheckpointError, match=rf"shape mismatch.*{key}.*\(32, 31\).*\(32, 32\)"):
        load_text_encoder(bad)
    bad = _copy_folder(path, tmp_path / "u", lambda t: {**t, "encoder.block.0.layer.0.SelfAttention.q.bias":
                                                          np.zeros(32, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor.*SelfAttention.q.bias"):
        load_text_encoder(bad)


def test_refused_and_unsupported_folders(t5_folder, tmp_path):
    _, path, _, _ = t5_folder
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UnsafeFormatError):
        load_text_encoder(tmp_path / "pickle")

    cfg = json.loads((path / "config.json").read_text())
    for name, change, match in (("bert", {"architectures": ["BertModel"], "model_type": "bert"}, "BertModel"),
                                ("ffn", {"feed_forward_proj": "gelu-gated"}, "gated-"),
                                ("umt5", {"architectures": ["UMT5EncoderModel"]}, "UMT5EncoderModel")):
        folder = _copy_folder(path, tmp_path / name, lambda t: t)
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=match):
            load_text_encoder(folder)

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="text_encoder"):
        load_text_encoder(tmp_path / "pipe")
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(tmp_path / "pipe")


def test_bad_token_inputs(t5_folder):
    # Checked while tracing, before any computation: abstract parameters suffice.
    cfg = clip.ClipTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=16)
    abstract = clip.abstract_params(cfg)
    with pytest.raises(ValueError, match="17 tokens but the model has 16 positions"):
        jax.eval_shape(lambda p: clip.forward(p, cfg, np.zeros((1, 17), np.int32)), abstract)
    with pytest.raises(ValueError, match="integers"):
        jax.eval_shape(lambda p: clip.forward(p, cfg, np.zeros((1, 4), np.float32)), abstract)
    _, _, tcfg, tparams = t5_folder
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        jax.eval_shape(lambda p: t5.forward(p, tcfg, np.zeros((4,), np.int32)), tparams)
    with pytest.raises(ValueError, match="attention_mask shape"):
        jax.eval_shape(lambda p: t5.forward(p, tcfg, np.zeros((2, 4), np.int32), np.ones((2, 5), np.int32)), tparams)
    with pytest.raises(ValueError, match="hidden_act"):
        clip.ClipTextConfig(hidden_act="prelu")
