"""Prompt -> embeddings, tokenized and encoded the way the diffusers FLUX and SD3 pipelines do it.

Both tokenizers pad to `max_length` with truncation (a warning says how many tokens a longer prompt
loses). CLIP: max_length = the tokenizer's `model_max_length` (77). T5: 512 for FLUX dev / Kontext, 256
for schnell and SD3. Neither pipeline passes an attention mask to the encoders, so padding tokens are
attended (and their embeddings used).

    embeds = clip_encode(params, config, tokenizer, ["a cat"])            # FLUX: embeds.pooled
    embeds = clip_encode(params_g, config_g, tokenizer_2, prompts)        # SD3: embeds.hidden_state, .pooled
    t5_out = t5_encode(params, config, tokenizer_2, prompts, max_length=512)
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple, Sequence

import jax
import numpy as np

from jaxdit.text import clip, t5


class CLIPPromptEmbeds(NamedTuple):
    input_ids: np.ndarray  # [B, L] int32
    hidden_state: jax.Array  # [B, L, D] hidden_states[-(clip_skip + 2)]: SD3's per-token conditioning
    pooled: jax.Array  # [B, P] text_embeds with a projection (SD3), pooler_output without one (FLUX)
    last_hidden_state: jax.Array  # [B, L, D] after the final LayerNorm


class T5PromptEmbeds(NamedTuple):
    input_ids: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L] int32, 1 = token; returned even when not applied
    last_hidden_state: jax.Array  # [B, L, d_model]


def _warn_truncation(tokenizer, prompts: list[str], max_length: int, encoder: str) -> None:
    """One warning per call naming how many tokens the prompts longer than `max_length` lose."""
    distinct = list(dict.fromkeys(prompts))
    lengths = [len(ids) for ids in tokenizer(distinct, truncation=False, verbose=False)["input_ids"]]
    dropped = [(n - max_length, p) for n, p in zip(lengths, distinct) if n > max_length]
    if dropped:
        most, prompt = max(dropped)
        short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        warnings.warn(f"{encoder} keeps {max_length} tokens: {len(dropped)} prompt(s) truncated, "
                      f"{sum(n for n, _ in dropped)} token(s) dropped ({most} from {short!r})")


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int,
             encoder: str = "the text encoder") -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each [B, max_length] int32: padding="max_length", truncation (warned
    about, naming `encoder` and the dropped-token count)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _warn_truncation(tokenizer, prompts, max_length, encoder)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


@partial(jax.jit, static_argnames=("config", "index"))
def _clip_embeds(params, config: clip.ClipTextConfig, input_ids, index: int):
    out = clip.forward(params, config, input_ids)
    pooled = out.text_embeds if config.with_projection else out.pooler_output
    return out.hidden_states[index], pooled, out.last_hidden_state


_t5_forward = jax.jit(t5.forward, static_argnames=("config",))


def clip_encode(params, config: clip.ClipTextConfig, tokenizer, prompts: str | Sequence[str], *,
                max_length: int | None = None, clip_skip: int | None = None) -> CLIPPromptEmbeds:
    """Tokenize and run a CLIP text encoder like diffusers' `_get_clip_prompt_embeds`.

    clip_skip: None selects hidden_states[-2] (SD3's penultimate layer), k selects hidden_states[-(k + 2)].
    """
    if max_length is None:
        # diffusers uses tokenizer.model_max_length (77); a tokenizer without one reports a huge value.
        max_length = min(tokenizer.model_max_length, config.max_position_embeddings)
    skip = 0 if clip_skip is None else clip_skip
    if not 0 <= skip < config.num_hidden_layers:
        raise ValueError(f"clip_skip={clip_skip}: expected 0 <= clip_skip < {config.num_hidden_layers} "
                         "(number of layers)")
    ids, _ = tokenize(tokenizer, prompts, max_length, "CLIP")
    hidden, pooled, last = _clip_embeds(params, config, ids, -(skip + 2))
    return CLIPPromptEmbeds(ids, hidden, pooled, last)


def t5_encode(params, config: t5.T5EncoderConfig, tokenizer, prompts: str | Sequence[str], *,
              max_length: int = 512, use_attention_mask: bool = False) -> T5PromptEmbeds:
    """Tokenize and run a T5 encoder like diffusers' `_get_t5_prompt_embeds`.

    max_length: 512 (FLUX dev / Kontext), 256 (FLUX schnell, SD3). use_attention_mask: mask the padding
    keys (the pipelines do not; the result then differs at every position).
    """
    ids, mask = tokenize(tokenizer, prompts, max_length, "T5")
    hidden = _t5_forward(params, config, ids, mask if use_attention_mask else None)
    return T5PromptEmbeds(ids, mask, hidden)
