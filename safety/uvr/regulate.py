"""UVR restriction: masks -> attention transformations and edits, and the sampling-loop controller.

The unified modulation (uvr.md section 5) as pure functions returning `jaxdit.hooks` values:

- `context_restriction`: post-softmax, un-renormalised scaling of the weights from text and generated-
  image queries to the *context*-image keys at core (x0.2) and ring (x0.4) patches, and of generated-image
  queries to text and generated keys (x1.05). Exact on every attention backend (kernels scale the values
  per query group). With `renormalise=True` it becomes the additive bias log(scale) before the softmax:
  a *different* method (the output is divided by r = sum_k s_k p_k per query), offered as an option.
- `noise_replacement`: for text-to-image, the unsafe generated rows of every block's per-head attention
  output become 0.001 x + 0.999 N(0, 1) (an `edit`; it cannot be written as an attention bias).

`UVRController` runs the method inside the compiled sampling loop: at each step it captures the per-head
attention output at the localization block (default single-stream block 10), scores it against the
anchor bank and localizes (`localize.py`), and the masks drive the restriction while the timestep is in
the start-up window (t >= 850). Design difference from the reference code: the mask found at step s acts
from step s + 1 (the reference also uses it for the blocks after the localization block within step s),
because a forward pass has no state flowing between blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdit import hooks as hk
from jaxdit.pipeline import Geometry
from jaxdit.safety.uvr import localize as loc

# Token groups of the restriction (context labels: 0 other, 1 core, 2 ring).
TEXT, GEN, CTX, CTX_CORE, CTX_RING = range(5)


@dataclasses.dataclass(frozen=True)
class RegulateConfig:
    core_scale: float = 0.2
    ring_scale: float = 0.4
    amplify: float = 1.05  # generated queries -> text and generated keys
    renormalise: bool = False  # additive-bias variant (a different method, see module docstring)
    noise_keep: float = 0.001  # text-to-image: x' = keep * x + (1 - keep) * N(0, 1)
    window_t: float = 850.0  # start-up window: scheduler timestep (sigma * 1000) >= window_t
    blocks: str = "*"  # which blocks are modulated: "*", "double.*", "single.10", ...
    localize_at: str = "single.10.img.attn_heads"


def restriction_scale(config: RegulateConfig) -> np.ndarray:
    """The [5, 5] (query group, key group) post-softmax scale of the editing restriction."""
    s = np.ones((5, 5), np.float32)
    s[[TEXT, GEN], CTX_CORE] = config.core_scale
    s[[TEXT, GEN], CTX_RING] = config.ring_scale
    s[GEN, [TEXT, GEN]] = config.amplify
    return s


def context_restriction(layout: hk.TokenLayout, core_ctx: jax.Array, ring_ctx: jax.Array,
                        config: RegulateConfig = RegulateConfig(), active=True) -> hk.AttentionMask:
    """AttentionMask restricting the flow from unsafe context patches (core/ring: [B, n_ctx] bool).

    `active` (a traced bool) switches the whole transformation off outside the start-up window; an image
    with empty masks is left exactly as it is (no amplification either).
    """
    labels = jnp.where(core_ctx, 1, jnp.where(ring_ctx, 2, 0)).astype(jnp.int32)
    groups = hk.token_groups(layout, ctx_labels=labels, num_img_labels=1, num_ctx_labels=3)
    on = jnp.logical_and(active, jnp.any(core_ctx | ring_ctx, axis=-1))[:, None, None, None]  # [B, 1, 1, 1]
    scale = jnp.where(on, jnp.asarray(restriction_scale(config)), 1.0)
    if config.renormalise:
        return hk.AttentionMask(groups, bias=jnp.log(scale), layers=config.blocks)
    return hk.AttentionMask(groups, scale=scale, layers=config.blocks)


def _noise_rows(params, x, ctx: hk.HookContext):
    """Replace the masked generated rows of a per-head attention output [B, T_img, H, D] with noise."""
    n = ctx.layout.n_img  # generated rows first; context rows (Kontext) untouched
    keep = params["keep"]
    noise = jax.random.normal(ctx.key, x[:, :n].shape, jnp.float32)
    rows = params["mask"][:, :, None, None] & params["active"]
    gen = jnp.where(rows, keep * x[:, :n].astype(jnp.float32) + (1 - keep) * noise, x[:, :n])
    return x.at[:, :n].set(gen.astype(x.dtype))


def noise_replacement(mask_gen: jax.Array, config: RegulateConfig = RegulateConfig(), active=True,
                      stacks=("double", "single")) -> tuple[hk.Edit, ...]:
    """Edits replacing the unsafe generated rows (mask_gen: [B, n_img] bool) of every block's per-head
    attention output with mostly noise. Needs `Hooks.rng` (noise is a function of rng, step, block)."""
    params = {"mask": mask_gen, "active": jnp.asarray(active), "keep": jnp.float32(config.noise_keep)}
    if config.blocks == "*":
        return tuple(hk.Edit(f"{s}.*.img.attn_heads", _noise_rows, params) for s in stacks)
    stack, layer = config.blocks.split(".")
    return (hk.Edit(f"{stack}.{layer}.img.attn_heads", _noise_rows, params),)


@struct.dataclass
class UVRController:
    """UVR inside the compiled sampling loop. anchors: [H, K, D] anchor bank of the concept."""

    anchors: jax.Array
    rng: jax.Array
    mode: str = struct.field(pytree_node=False, default="t2i")  # "t2i" (noise) or "edit" (restriction)
    localize: loc.LocalizeConfig = struct.field(pytree_node=False, default=loc.T2I)
    regulate: RegulateConfig = struct.field(pytree_node=False, default=RegulateConfig())

    def init(self, batch: int, geometry: Geometry):
        gh, gw = geometry.grid
        return {"core": jnp.zeros((batch, gh, gw), bool), "ring": jnp.zeros((batch, gh, gw), bool)}

    def hooks(self, state, step, t, geometry: Geometry) -> hk.Hooks:
        active = t >= self.regulate.window_t
        b = state["core"].shape[0]
        if self.mode == "t2i":
            edits = noise_replacement(state["core"].reshape(b, -1), self.regulate, active, geometry.stacks)
            return hk.Hooks(capture=(self.regulate.localize_at,), edits=edits, rng=self.rng)
        ch, cw = geometry.ctx_grid
        core = loc.resize_mask(state["core"], ch, cw).reshape(b, -1)
        ring = loc.resize_mask(state["ring"], ch, cw).reshape(b, -1)
        mask = context_restriction(geometry.layout, core, ring, self.regulate, active)
        return hk.Hooks(capture=(self.regulate.localize_at,), attention=(mask,))

    def update(self, state, captures, step, t, geometry: Geometry):
        gh, gw = geometry.grid
        heads = captures[self.regulate.localize_at][:, :gh * gw]
        scores = loc.score_patches(heads, self.anchors).reshape(-1, gh, gw)
        core, ring = loc.localize(scores, self.localize)
        # text-to-image refreshes the mask at every window step; editing localizes once, at the first step
        refresh = (t >= self.regulate.window_t) if self.mode == "t2i" else (step == 0)
        return {"core": jnp.where(refresh, core, state["core"]), "ring": jnp.where(refresh, ring, state["ring"])}
