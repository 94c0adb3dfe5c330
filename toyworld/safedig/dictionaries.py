"""Toy-world SafeDIG dictionaries (`jaxdit.safety.safedig.dictionary.Dictionary`): a TopK SAE per
routed position trained on the harvest, harmful latents chosen from contrasts of labelled tokens, the
decoder adapted to the few target samples, and the ablations."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdit.safety.safedig import core
from jaxdit.safety.safedig.dictionary import Dictionary, train_sae
from jaxdit.toyworld.safedig.harvest import Harvest
from jaxdit.toyworld.safedig.routing import _cap
from jaxdit.train import sae as sae_lib

DEFAULT_HARMFUL = 16  # the latents a dictionary's `harmful` holds; steering chooses its own count (`choose`)


@dataclasses.dataclass(frozen=True)
class DictConfig:
    expansion: int = 8  # latents = expansion x width (128)
    k: int = 32
    steps: int = 1000
    batch_size: int = 512
    lr: float | None = 1e-3
    aux_alpha: float = 0.0  # AuxK off: runs this short never reach the trainer's dead-latent horizon
    seed: int = 0
    contrast_rows: int = 4000  # tokens per side for the harmful-latent contrast
    max_safe_rate: float = 0.1  # a latent active on more of the safe tokens is never harmful (see Dictionary)
    adapt_steps: int = 300
    adapt_lr: float = 1e-3


def contrast_sets(h: Harvest, position: str, rows: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unsafe, safe) for the harmful-latent contrast: concept tokens against tokens of other objects
    (other words) plus as many background (padding) tokens, so 'any object' latents are not chosen."""
    rng = np.random.default_rng(seed)
    unsafe = _cap(h.select(position, (2,)), rows, rng)
    other = _cap(h.select(position, (1,)), rows // 2, rng)
    background = _cap(h.select(position, (0,)), max(len(other), 1), rng)
    return unsafe, np.concatenate([other, background])



def _dictionary(position, cfg, src, tgt, contrasts, meta, max_safe_rate) -> Dictionary:
    d = Dictionary(position, cfg, src, tgt, np.zeros(0, np.int32), meta, contrasts, max_safe_rate)
    d.harmful = d.choose(DEFAULT_HARMFUL)
    return d


def train_dictionary(h: Harvest, position: str, config: DictConfig = DictConfig(), domain: str = "source",
                     progress: bool = False) -> Dictionary:
    """SAE on every token of `h` at `position` (rows shuffled, one device, `dictionary.train_sae`); harmful
    latents by contrast on `h`'s labels."""
    from jaxdit.train import trainer

    x = h.select(position)
    d = x.shape[1]
    cfg = sae_lib.SAEConfig(d_in=d, n_latents=d * config.expansion, k=config.k, position=position, model="toyworld")
    tc = trainer.TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                             warmup_steps=max(config.steps // 10, 1), seed=config.seed,
                             init_rows=min(16384, len(x)), loss=sae_lib.LossConfig(aux_alpha=config.aux_alpha))
    rng = np.random.default_rng(config.seed)
    cfg, params = train_sae(x[rng.permutation(len(x))].astype(np.float32), cfg, tc,
                            trainer.RunOptions(mesh=(1, 1, 1), progress=progress, log_every=max(config.steps // 5, 1),
                                               checkpoint_every=config.steps))
    params = {k: jnp.asarray(v) for k, v in params.items()}
    fvu = float(jnp.sum((sae_lib.reconstruct(params, cfg, jnp.asarray(x[:4096])) - x[:4096]) ** 2)
                / jnp.sum((x[:4096] - x[:4096].mean(0)) ** 2))
    return _dictionary(position, cfg, params, params, {domain: contrast_sets(h, position, config.contrast_rows,
                                                                             config.seed)},
                       {"trained_on": domain, "tokens": int(len(x)), "fvu": fvu}, config.max_safe_rate)


def adapt_dictionary(d: Dictionary, target: Harvest, config: DictConfig = DictConfig()) -> Dictionary:
    """Frozen encoder; decoder adapted on every token of the few target samples; the target's contrast
    (with the frozen encoder) added, so `choose()` unites source and target latents."""
    x = target.select(d.position)
    adapted, losses = core.adapt_decoder(d.src, d.cfg, x, core.AdaptConfig(
        steps=config.adapt_steps, batch_size=min(256, len(x)), lr=config.adapt_lr, seed=config.seed))
    contrasts = {**d.contrasts, "target": contrast_sets(target, d.position, config.contrast_rows, config.seed)}
    return _dictionary(d.position, d.cfg, d.src, adapted, contrasts,
                       {**d.meta, "adapted_on_tokens": int(len(x)), "adapt_loss": [losses[0], losses[-1]]},
                       d.max_safe_rate)


def with_target_latents(d: Dictionary, target: Harvest, config: DictConfig = DictConfig()) -> Dictionary:
    """The ablation: the target's contrast latents added, source decoder kept (no adaptation)."""
    contrasts = {**d.contrasts, "target": contrast_sets(target, d.position, config.contrast_rows, config.seed)}
    return _dictionary(d.position, d.cfg, d.src, d.src, contrasts, dict(d.meta), d.max_safe_rate)
