"""The SafeDIG safety dictionary as a value: what `jaxdit safedig train|adapt` write and `generate` reads,
and what the toy world's measurement builds in memory.

A `Dictionary` is one SAE at one hook position: its config, the source params (encoder and the decoder
it was trained with), the steering params (the same encoder, the decoder adapted to the target domain;
the very same dict when not adapted), the harmful latents steering zeroes or repels, and a metadata dict
(provenance, losses). Optionally it keeps, per domain, the (unsafe, safe) activations its harmful
latents are scored on (`contrasts`), so another latent count can be chosen (`choose`) without touching
the model again; contrasts live in memory only.

On disk a dictionary is a directory, written atomically (`Dictionary.save`, a temporary directory
renamed into place):

    DIR/sae.json, DIR/params.safetensors    the SAE with the steering params (`jaxdit.train.interop` layout)
    DIR/safedig.json                        {"harmful_latents": [...], "position": ..., metadata ...}
    DIR/source_decoder.safetensors          W_dec, b_dec of the source decoder (adapted dictionaries only)

`Dictionary.load` reads safetensors and JSON only (never pickle) and fails in one line naming the file
and key. `steering_edit` / `steering_hooks` turn dictionaries into `jaxdit.hooks` values through
`core.steering_edit`; `train_sae` trains the SAE of a dictionary from rows in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxdit import hooks as hk
from jaxdit.safety.safedig import core
from jaxdit.train import sae as sae_lib

META = "safedig.json"
SOURCE_DECODER = "source_decoder.safetensors"
DECODER_KEYS = ("W_dec", "b_dec")


class DictionaryError(ValueError):
    """A SafeDIG dictionary directory that cannot be used; the message names the file and key."""


@dataclasses.dataclass
class Dictionary:
    """A safety dictionary at one position (see the module docstring).

    Harmful latents from contrasts (`ranked`, `choose`): `core.harmful_latents` ranks every latent with a
    positive contrast score; latents active on more than `max_safe_rate` of the domain's safe tokens are
    skipped. The normalised-mean score favours latents carrying much mass everywhere (position and
    noise-level latents active on nearly every token); gating on such a latent would steer every token,
    so with a rate below 1 they are not candidates.
    """

    position: str
    cfg: sae_lib.SAEConfig
    src: dict
    tgt: dict
    harmful: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)
    contrasts: dict = dataclasses.field(default_factory=dict)  # domain -> (unsafe, safe) activations
    max_safe_rate: float = 1.0
    # caches, fresh in every copy (`dataclasses.replace` included)
    _ranked: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _edits: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.harmful = np.asarray(self.harmful, np.int32).reshape(-1)

    @property
    def adapted(self) -> bool:
        """Whether the steering decoder differs from the source decoder."""
        return any(self.src[k] is not self.tgt[k] and not np.array_equal(np.asarray(self.src[k]),
                                                                         np.asarray(self.tgt[k]))
                   for k in DECODER_KEYS)

    # --- harmful latents from contrasts ---

    def ranked(self, domain: str) -> np.ndarray:
        """The domain's harmful candidates, best first (positive score, selective on safe tokens)."""
        if domain not in self._ranked:
            if domain not in self.contrasts:
                raise KeyError(f"dictionary at {self.position}: no contrast activations for domain {domain!r} "
                               f"(has {sorted(self.contrasts)})")
            u, s = (jnp.asarray(a) for a in self.contrasts[domain])
            order = core.harmful_latents(self.src, self.cfg, u, s, self.cfg.n_latents)
            rate = np.asarray(jnp.mean(sae_lib.encode_dense(self.src, self.cfg, s) > 0, axis=0))
            self._ranked[domain] = order[rate[order] <= self.max_safe_rate]
        return self._ranked[domain]

    def choose(self, num: int, domains: Sequence[str] | None = None) -> np.ndarray:
        """The union over `domains` (default: all contrasts) of each domain's first `num` harmful
        candidates, in order."""
        out: list[int] = []
        for name in (domains or list(self.contrasts)):
            for i in self.ranked(name)[:num].tolist():
                if i not in out:
                    out.append(i)
        return np.asarray(out, np.int32)

    # --- files ---

    def save(self, path, overwrite: bool = False) -> Path:
        """Write the dictionary directory atomically (a temporary directory renamed onto `path`)."""
        from jaxdit.io import atomic_directory
        from jaxdit.safety.evaluate import write_json
        from jaxdit.train.interop import save_sae, write_safetensors

        with atomic_directory(path, overwrite) as tmp:
            save_sae(tmp, self.cfg, self.tgt, overwrite=True)
            write_json({"harmful_latents": [int(i) for i in self.harmful], "position": self.position,
                        **{k: v for k, v in self.meta.items() if k not in ("harmful_latents", "position")}},
                       tmp / META)
            if self.adapted:
                write_safetensors(tmp / SOURCE_DECODER, {k: np.asarray(self.src[k], np.float32) for k in DECODER_KEYS})
        return Path(path)

    @classmethod
    def load(cls, path) -> "Dictionary":
        """A dictionary directory written by `save` (or `jaxdit safedig train|adapt`)."""
        from jaxdit.io import CheckpointError, SafetensorsFile
        from jaxdit.train.interop import SAEFormatError, load_sae

        path = Path(path)
        meta_file = path / META
        if not path.is_dir():
            raise FileNotFoundError(f"SafeDIG dictionary {path} does not exist" if not path.exists() else
                                    f"{path}: not a SafeDIG dictionary (not a directory)")
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a SafeDIG dictionary (no {META})")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DictionaryError(f"{meta_file}: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DictionaryError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
        for key in ("harmful_latents", "position"):
            if key not in meta:
                raise DictionaryError(f"{meta_file}: missing key {key!r}")
        try:
            cfg, params = load_sae(path)
        except (SAEFormatError, CheckpointError, ValueError) as e:
            raise DictionaryError(f"{path}: SAE unreadable: {e}") from None
        harmful = meta.pop("harmful_latents")
        if not (isinstance(harmful, list) and all(isinstance(i, int) and 0 <= i < cfg.n_latents for i in harmful)):
            raise DictionaryError(f"{meta_file}: 'harmful_latents' must be a list of latent indices in "
                                  f"[0, {cfg.n_latents})")
        position = meta.pop("position")
        try:
            hk.Position.parse(position)
        except (ValueError, TypeError, AttributeError) as e:
            raise DictionaryError(f"{meta_file}: 'position' {position!r} is not a hook position ({e})") from None
        source = dict(params)
        decoder_file = path / SOURCE_DECODER
        if decoder_file.is_file():
            try:
                f = SafetensorsFile(decoder_file)
                for k in DECODER_KEYS:
                    if k not in f.keys():
                        raise DictionaryError(f"{decoder_file}: missing tensor {k!r}")
                    a = np.asarray(f.get(k), np.float32)
                    if a.shape != params[k].shape:
                        raise DictionaryError(f"{decoder_file}: tensor {k!r} has shape {a.shape}, expected "
                                              f"{params[k].shape}")
                    source[k] = a
            except CheckpointError as e:
                raise DictionaryError(str(e)) from None
        return cls(position, cfg, source, params, np.asarray(harmful, np.int32), meta)


# --- steering -----------------------------------------------------------------------------------------------

def _as_jax(params: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in params.items()}


def steering_edit(d: Dictionary, config: core.SteerConfig = core.SteerConfig(), harmful=None) -> hk.Edit:
    """`core.steering_edit` at the dictionary's position with its harmful latents (or `harmful`). Built
    once per (config, latents) and kept on the dictionary: the same Edit value means the same compiled
    sampler, so re-measuring a setting does not recompile."""
    harmful = d.harmful if harmful is None else np.asarray(harmful, np.int32).reshape(-1)
    key = (config, tuple(harmful.tolist()))
    if key not in d._edits:
        src = _as_jax(d.src)
        tgt = src if d.tgt is d.src else _as_jax(d.tgt)
        d._edits[key] = core.steering_edit(d.position, src, tgt, d.cfg, harmful, config)
    return d._edits[key]


def steering_hooks(dictionaries: Sequence["Dictionary | str | os.PathLike"],
                   config: "core.SteerConfig | Sequence[core.SteerConfig]" = core.SteerConfig(),
                   harmful: Sequence | None = None) -> hk.Hooks:
    """`Hooks` with one Blend/Repel edit per dictionary (a `Dictionary` or a directory to load).

    config: one `core.SteerConfig` for all, or one per dictionary (e.g. a gate per dictionary);
    harmful: None (each dictionary's own latents) or one latent list per dictionary."""
    ds = [d if isinstance(d, Dictionary) else Dictionary.load(d) for d in dictionaries]
    configs = [config] * len(ds) if isinstance(config, core.SteerConfig) else list(config)
    chosen = [None] * len(ds) if harmful is None else list(harmful)
    if len(configs) != len(ds) or len(chosen) != len(ds):
        raise ValueError(f"{len(ds)} dictionaries, {len(configs)} steering configs, {len(chosen)} latent sets")
    return hk.Hooks(edits=tuple(steering_edit(d, c, h) for d, c, h in zip(ds, configs, chosen)))


# --- training ------------------------------------------------------------------------------------------------

def train_sae(x: np.ndarray, cfg: sae_lib.SAEConfig, tc, opts=None) -> tuple[sae_lib.SAEConfig, dict]:
    """An SAE on rows x [N, d] with `jaxdit.train.trainer.train_array` (run folder in a temporary
    directory, removed afterwards); returns (config with its input scale, float32 numpy params)."""
    from jaxdit.train import trainer

    opts = trainer.RunOptions() if opts is None else opts
    with tempfile.TemporaryDirectory() as tmp:
        return trainer.train_array(x, Path(tmp) / "run", cfg, tc, opts)
