"""SafeDIG core: robustness-aware routing, harmful-latent contrast, decoder adaptation, Blend and Repel.

Only the abstract of SafeDIG is public; every formula here is jaxdit's design (docs/safedig.md), each
choice a config field. Notation: x an activation at a routed position, SAE z = E(x) (frozen encoder),
D_src / D_tgt the source / adapted decoders, H the harmful latents, err = x - D_src(E(x)).

- Routing score of a position = stability x separability, where separability is the Fisher ratio of the
  unsafe-vs-safe projection on the difference-of-means direction, and stability is the mean cosine
  between that direction estimated on the source domain and on every shifted group (target domain,
  seeds, paraphrases, timesteps); a position whose unsafe direction moves under shift scores low.
- Harmful latents: contrast of normalised mean activations on unsafe vs safe activations (SAeUron's
  score), the top `num_harmful` with a positive score.
- Decoder adaptation: with E frozen, minimise ||D(E(x)) - x||^2 over (W_dec, b_dec) on target-domain
  activations, decoder rows kept at unit norm.
- Blend: x' = (1 - a) x + a (D_tgt(z_safe) + err), z_safe = z with H zeroed.
- Repel: x' = x - b sum_{i in H} z_i d_i, d_i the (adapted) decoder row of latent i.
  Both apply only on tokens where some harmful latent fires (z_i > gate for i in H), elsewhere x' = x
  exactly, and keep the reconstruction error so untouched content is preserved.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdit import hooks as hk
from jaxdit.train import sae as sae_lib


# --- routing ------------------------------------------------------------------------------------------

def _direction(unsafe: np.ndarray, safe: np.ndarray) -> np.ndarray:
    d = unsafe.mean(0) - safe.mean(0)
    return d / (np.linalg.norm(d) + 1e-12)


def separability(unsafe: np.ndarray, safe: np.ndarray) -> float:
    """Fisher ratio of the projections on the difference-of-means direction."""
    d = _direction(unsafe, safe)
    pu, ps = unsafe @ d, safe @ d
    return float((pu.mean() - ps.mean()) ** 2 / (pu.var() + ps.var() + 1e-12))


def route(candidates: dict[str, dict], weights: tuple[float, float] = (1.0, 1.0), top: int = 3) -> list[dict]:
    """Score candidate positions and rank them.

    candidates: position -> {"source": (unsafe [N, d], safe [M, d]), "shifts": [(unsafe, safe), ...]}
    where shifts are the same position under target domain / seeds / paraphrases / timesteps.
    Returns rows sorted by score: {position, separability, stability, score, chosen}.
    """
    rows = []
    for position, data in candidates.items():
        su, ss = (np.asarray(a, np.float64) for a in data["source"])
        if not data.get("shifts"):
            raise ValueError(f"routing {position}: needs at least one shifted group (target domain, seeds, ...)")
        d_src = _direction(su, ss)
        cos = [float(_direction(np.asarray(u, np.float64), np.asarray(s, np.float64)) @ d_src)
               for u, s in data["shifts"]]
        sep = np.mean([separability(su, ss)] + [separability(np.asarray(u), np.asarray(s))
                                                 for u, s in data["shifts"]])
        stability = float(np.mean(cos))
        score = max(stability, 0.0) ** weights[0] * float(sep) ** weights[1]
        rows.append({"position": position, "separability": float(sep), "stability": stability, "score": score})
    rows.sort(key=lambda r: -r["score"])
    for i, r in enumerate(rows):
        r["chosen"] = i < top
    return rows


# --- harmful latents --------------------------------------------------------------------------------

def harmful_latents(params, cfg: sae_lib.SAEConfig, unsafe: jax.Array, safe: jax.Array, num_harmful: int) -> np.ndarray:
    """Latents most specific to unsafe activations: mu_u / sum(mu_u) - mu_s / sum(mu_s), top ones > 0."""
    mu_u = np.asarray(sae_lib.encode_dense(params, cfg, unsafe)).mean(0)
    mu_s = np.asarray(sae_lib.encode_dense(params, cfg, safe)).mean(0)
    score = mu_u / max(mu_u.sum(), 1e-12) - mu_s / max(mu_s.sum(), 1e-12)
    order = np.argsort(-score, kind="stable")[:num_harmful]
    return order[score[order] > 0].astype(np.int32)


# --- decoder adaptation -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    steps: int = 500
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    unit_norm_rows: bool = True


def adapt_decoder(params, cfg: sae_lib.SAEConfig, target: jax.Array, config: AdaptConfig = AdaptConfig()):
    """Fit only (W_dec, b_dec) to target-domain activations [N, d]; the encoder is returned untouched.

    Latents of the frozen encoder are computed once per batch outside the gradient, so the encoder
    cannot change (the returned W_enc/b_enc are the very input arrays).
    """
    target = jnp.asarray(target, jnp.float32)
    if target.ndim != 2 or target.shape[1] != cfg.d_in:
        raise ValueError(f"target activations must be [N, {cfg.d_in}], got {tuple(target.shape)}")
    decoder = {"W_dec": params["W_dec"], "b_dec": params["b_dec"]}
    opt = optax.adam(config.lr)
    state = opt.init(decoder)

    def loss(dec, x, z):
        full = {**params, **dec}
        return jnp.mean(jnp.sum((sae_lib.decode(full, cfg, z) - x) ** 2, -1))

    @jax.jit
    def step(dec, state, x):
        z = jax.lax.stop_gradient(sae_lib.encode(params, cfg, x))
        value, grads = jax.value_and_grad(loss)(dec, x, z)
        if config.unit_norm_rows:
            grads = {**grads, **sae_lib.project_decoder_grad({"W_dec": grads["W_dec"]}, dec)}
        updates, state = opt.update(grads, state, dec)
        dec = optax.apply_updates(dec, updates)
        if config.unit_norm_rows:
            dec = {**dec, **sae_lib.normalize_decoder({"W_dec": dec["W_dec"]})}
        return dec, state, value

    key = jax.random.key(config.seed)
    losses = []
    for i in range(config.steps):
        idx = jax.random.randint(jax.random.fold_in(key, i), (min(config.batch_size, target.shape[0]),), 0,
                                 target.shape[0])
        decoder, state, value = step(decoder, state, target[idx])
        losses.append(float(value))
    return {**params, **decoder}, losses


# --- Blend and Repel ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SteerConfig:
    mode: str = "blend"  # "blend" or "repel"
    strength: float = 1.0  # alpha (blend) or beta (repel)
    gate: float = 0.0  # a token is steered when some harmful latent exceeds this
    steps: tuple[int, int] | None = None  # [first, last) sampling steps; None: every step

    def __post_init__(self):
        if self.mode not in ("blend", "repel"):
            raise ValueError(f"SteerConfig.mode={self.mode!r}: expected 'blend' or 'repel'")


def steer(x: jax.Array, src, tgt, cfg: sae_lib.SAEConfig, harmful: jax.Array, config: SteerConfig,
          step=None) -> jax.Array:
    """Blend or Repel on activations x [..., d]; identity where no harmful latent fires."""
    shape, dtype = x.shape, x.dtype
    flat = x.reshape(-1, cfg.d_in).astype(jnp.float32)
    z = sae_lib.encode_dense(src, cfg, flat)
    z_h = z[:, harmful]
    fires = jnp.any(z_h > config.gate, axis=-1, keepdims=True)
    if config.mode == "blend":
        err = flat - sae_lib.decode(src, cfg, z)
        z_safe = z.at[:, harmful].set(0.0)
        target = sae_lib.decode(tgt, cfg, z_safe) + err
        new = (1 - config.strength) * flat + config.strength * target
    else:
        rows = tgt["W_dec"][harmful] / cfg.input_scale  # decoder rows in model units
        new = flat - config.strength * (z_h @ rows)
    on = fires
    if config.steps is not None and step is not None:
        on = on & (step >= config.steps[0]) & (step < config.steps[1])
    return jnp.where(on, new, flat).astype(dtype).reshape(shape)


def steering_edit(position: str, src, tgt, cfg: sae_lib.SAEConfig, harmful: Sequence[int],
                  config: SteerConfig) -> hk.Edit:
    """A `jaxdit.hooks.Edit` applying Blend/Repel at `position` (composable with UVR via hooks.merge)."""
    params = {"src": src, "tgt": tgt, "harmful": jnp.asarray(np.asarray(harmful, np.int32))}

    def fn(p, x, ctx):
        return steer(x, p["src"], p["tgt"], cfg, p["harmful"], config, ctx.step)

    return hk.Edit(position, fn, params)
