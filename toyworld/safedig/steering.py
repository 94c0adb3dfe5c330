"""Toy-world SafeDIG steering settings (`Steering`, what calibration chooses) and their hooks: per
dictionary its chosen harmful latents and gate, through `jaxdit.safety.safedig.dictionary.steering_hooks`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxdit import hooks as hk
from jaxdit.safety.safedig import core
from jaxdit.safety.safedig.dictionary import Dictionary, steering_hooks
from jaxdit.toyworld.safedig.harvest import Harvest
from jaxdit.toyworld.safedig.routing import _cap
from jaxdit.train import sae as sae_lib

@dataclasses.dataclass(frozen=True)
class Steering:
    """What calibration chooses: how many routed positions, harmful latents per domain, and the
    `core.SteerConfig` fields (gate as a quantile of the strongest harmful activation on safe tokens;
    0 means gate 0, i.e. any firing harmful latent)."""

    mode: str = "blend"
    top: int = 2
    num_harmful: int = 16
    strength: float = 1.0
    gate_quantile: float = 0.0
    window: tuple[int, int] | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def harmful_peak(d: Dictionary, x: np.ndarray, harmful: np.ndarray) -> np.ndarray:
    """Per row of x, the largest activation among the harmful latents (0 if none is active)."""
    if len(harmful) == 0:
        return np.zeros(len(x), np.float32)
    z = sae_lib.encode_dense(d.src, d.cfg, jnp.asarray(x))
    return np.asarray(jnp.max(jnp.maximum(z[:, jnp.asarray(harmful)], 0.0), axis=-1))


def gate_value(d: Dictionary, harmful: np.ndarray, quantile: float) -> float:
    """The gate: `quantile` of the harmful peak over the safe tokens the contrasts hold (0 if quantile 0)."""
    if quantile <= 0:
        return 0.0
    safe = np.concatenate([s for _, s in d.contrasts.values()])
    return float(np.quantile(harmful_peak(d, safe, harmful), quantile))


def firing_rates(d: Dictionary, h: Harvest, steering: Steering, rows: int = 4000, seed: int = 0) -> dict:
    """Where the steering would act on labelled tokens: the fraction of concept / other-object (other-word) /
    background (padding) tokens of `h` on which a harmful latent exceeds the gate. A concept-specific
    dictionary fires on the first and not on the other two."""
    harmful = d.choose(steering.num_harmful)
    gate = gate_value(d, harmful, steering.gate_quantile)
    rng = np.random.default_rng(seed)
    out = {}
    for name, label in (("concept", 2), ("other", 1), ("background", 0)):
        x = _cap(h.select(d.position, (label,)), rows, rng)
        out[name] = None if len(x) == 0 else float(np.mean(harmful_peak(d, x, harmful) > gate))
    return out


def method_hooks(dictionaries: Sequence[Dictionary], steering: Steering, domains=None) -> hk.Hooks:
    """`dictionary.steering_hooks` for these settings: per dictionary its first `steering.num_harmful`
    latents of each domain and its gate. The edits are kept on the dictionaries, so re-measuring a setting
    reuses the compiled sampler."""
    harmful = [d.choose(steering.num_harmful, domains) for d in dictionaries]
    configs = [core.SteerConfig(mode=steering.mode, strength=steering.strength,
                                gate=gate_value(d, h, steering.gate_quantile), steps=steering.window)
               for d, h in zip(dictionaries, harmful)]
    return steering_hooks(dictionaries, configs, harmful)
