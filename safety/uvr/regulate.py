"""UVR restriction: masks -> attention transformations and edits, and the sampling-loop controller.

The unified modulation (uvr.md section 5) as pure functions returning `jaxdit.hooks` values:

- `context_restriction`: post-softmax, un-renormalised scaling of the weights from text and generated-
  image queries to the *context*-image keys at core (x0.2) and ring (x0.4) patches, and of generated-image
  queries to text and generated keys (x1.05). Exact on every attention backend (kernels scale the values
  per query group). With `renormalise=True` it becomes the additive bias log(scale) before the softmax:
  a *different* method (the output is divided by r = sum_k s_k p_k per query), offered as an option.
- `noise_replacement`: for text-to-image, the unsafe generated rows of every block's per-head attention
  output become 0.001 x + 0.999 N(0, 1) (an `edit`; it cannot be written as an attention bias). This is
  the reference code's text-to-image regulation.
- `text_restriction`: for text-to-image, the same post-softmax scaling as `context_restriction`, on the
  flow from the *text* keys into the unsafe generated patches (core x`core_scale`, ring x`ring_scale`):
  the restriction of the editing mode applied to the flow that carries the concept in generation, so both
  modes are one attention transformation. `RegulateConfig.t2i` chooses "noise", "restrict" or both.

`UVRController` runs the method inside the compiled sampling loop: at each step it captures the per-head
attention output at the localization block (default single-stream block 10), scores it against the
anchor bank and localizes (`localize.py`), and the masks drive the restriction while the timestep is in
the start-up window (t >= 850). Design difference from the reference code: the mask found at step s acts
from step s + 1 (the reference also uses it for the blocks after the localization block within step s),
because a forward pass has no state flowing between blocks.

`RegulateConfig.reference()` (with `LocalizeConfig.reference(mode)`, or `UVRController.reference`) switches
on the reference code's timing rules, each also a field of its own: `amplify_first_step`,
`max_noise_patches`, `relocalize_above` and `bf16_timestep` (docs/uvr.md, "Reference-exact setting and
the jaxdit default").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdit import hooks as hk
from jaxdit.hooks import Geometry
from jaxdit.safety.uvr import localize as loc

# Token groups of the restriction (context labels: 0 other, 1 core, 2 ring).
TEXT, GEN, CTX, CTX_CORE, CTX_RING = range(5)
# Token groups of the text-to-image restriction (generated labels: 0 other, 1 core, 2 ring; no context).
GEN_CORE, GEN_RING = 2, 3
T2I_REGULATIONS = ("noise", "restrict", "restrict+noise")


@dataclasses.dataclass(frozen=True)
class RegulateConfig:
    core_scale: float = 0.2
    ring_scale: float = 0.4
    amplify: float = 1.05  # generated queries -> text and generated keys
    renormalise: bool = False  # additive-bias variant (a different method, see module docstring)
    noise_keep: float = 0.001  # text-to-image: x' = keep * x + (1 - keep) * N(0, 1)
    window_t: float = 850.0  # start-up window: scheduler timestep (sigma * 1000) >= window_t
    # Text-to-image: re-localize only while t >= localize_t, then keep that mask for the rest of the window
    # (None: while regulating). A mask read in the start-up stage holds when the regulation runs longer.
    localize_t: float | None = None
    blocks: str = "*"  # which blocks are modulated: "*", "double.*", "single.10", ...
    localize_at: str = "single.10.img.attn_heads"
    t2i: str = "noise"  # text-to-image regulation: "noise", "restrict" (text_restriction) or "restrict+noise"
    # Reference timing rules (all off: jaxdit's default). See `reference()`.
    amplify_first_step: bool = False  # editing: x1.05 at timestep 1000 even when no mask exists yet
    max_noise_patches: int | None = None  # text-to-image: noise on the first n masked patches (raster order)
    relocalize_above: bool = False  # text-to-image: re-localize while floor(t) > window_t, not t >= window_t
    bf16_timestep: bool = False  # test the timestep as the reference's bfloat16 transformer sees it

    def __post_init__(self):
        if self.t2i not in T2I_REGULATIONS:
            raise ValueError(f"RegulateConfig.t2i={self.t2i!r}: expected one of {list(T2I_REGULATIONS)}")

    @classmethod
    def reference(cls, **overrides) -> "RegulateConfig":
        """The public reference code's timing rules, for both modes; `overrides` replace fields (e.g.
        `localize_at` on a smaller model)."""
        base = cls(amplify_first_step=True, max_noise_patches=2000, relocalize_above=True, bf16_timestep=True,
                   t2i="noise")
        return dataclasses.replace(base, **overrides)

    def timestep(self, t: jax.Array) -> jax.Array:
        """The timestep the window rules compare (float32)."""
        return reference_timestep(t) if self.bf16_timestep else jnp.asarray(t, jnp.float32)

    def threshold(self, value: float) -> jax.Array:
        """A constant compared with `timestep(t)`. PyTorch compares a bfloat16 tensor with a Python number
        in bfloat16 (CPU and CUDA kernels alike), so the reference's `t >= 850` means t >= 848."""
        v = jnp.float32(value)
        return v.astype(jnp.bfloat16).astype(jnp.float32) if self.bf16_timestep else v

    def in_window(self, t: jax.Array) -> jax.Array:
        return self.timestep(t) >= self.threshold(self.window_t)

    def first_step(self, t: jax.Array) -> jax.Array:
        """The reference's first-step test `timestep == 1000`."""
        return self.timestep(t) == self.threshold(1000.0)

    def relocalize(self, t: jax.Array) -> jax.Array:
        """Whether text-to-image re-localizes at this step: t >= window_t (and t >= localize_t when set), or
        the reference's `int(timestep) > window_t` (an integer comparison, no cast)."""
        if self.relocalize_above:
            return jnp.floor(self.timestep(t)) > self.window_t
        if self.localize_t is not None:
            return self.in_window(t) & (self.timestep(t) >= self.threshold(self.localize_t))
        return self.in_window(t)


def reference_timestep(t: jax.Array) -> jax.Array:
    """sigma * 1000 as the reference's bfloat16 transformer sees it, float32: its pipeline casts the
    scheduler timestep to bf16 and divides by 1000 in bf16, the transformer multiplies by 1000 in bf16
    (each operation computed in float32 and rounded to bf16, as PyTorch does). 850.4 becomes 852."""
    def bf16(x):
        return x.astype(jnp.bfloat16).astype(jnp.float32)

    return bf16(bf16(bf16(jnp.asarray(t, jnp.float32)) / jnp.float32(1000)) * jnp.float32(1000))


def first_patches(mask: jax.Array, n: int | None) -> jax.Array:
    """The first n True entries of each row of mask [B, N] in raster order (all for n = None)."""
    if n is None:
        return mask
    return mask & (jnp.cumsum(mask.astype(jnp.int32), axis=-1) <= n)


def restriction_scale(config: RegulateConfig) -> np.ndarray:
    """The [5, 5] (query group, key group) post-softmax scale of the editing restriction."""
    s = np.ones((5, 5), np.float32)
    s[[TEXT, GEN], CTX_CORE] = config.core_scale
    s[[TEXT, GEN], CTX_RING] = config.ring_scale
    s[GEN, [TEXT, GEN]] = config.amplify
    return s


def context_restriction(layout: hk.TokenLayout, core_ctx: jax.Array, ring_ctx: jax.Array,
                        config: RegulateConfig = RegulateConfig(), active=True, even_if_empty=False
                        ) -> hk.AttentionMask:
    """AttentionMask restricting the flow from unsafe context patches (core/ring: [B, n_ctx] bool).

    `active` (a traced bool) switches the whole transformation off outside the start-up window; an image
    with empty masks is left exactly as it is (no amplification either), unless `even_if_empty` (a traced
    bool: the reference's first step), where it gets the x`amplify` alone.
    """
    labels = jnp.where(core_ctx, 1, jnp.where(ring_ctx, 2, 0)).astype(jnp.int32)
    groups = hk.token_groups(layout, ctx_labels=labels, num_img_labels=1, num_ctx_labels=3)
    found = jnp.logical_or(jnp.any(core_ctx | ring_ctx, axis=-1), even_if_empty)
    return _group_mask(groups, restriction_scale(config), jnp.logical_and(active, found), config)


def _group_mask(groups: jax.Array, scale: np.ndarray, on: jax.Array, config: RegulateConfig) -> hk.AttentionMask:
    """The post-softmax (query group, key group) `scale` for the images where `on` ([B] bool), identity
    for the others; with `config.renormalise`, the additive bias log(scale) instead."""
    scale = jnp.where(on[:, None, None, None], jnp.asarray(scale), 1.0)  # [B, 1, G, G]
    if config.renormalise:
        return hk.AttentionMask(groups, bias=jnp.log(scale), layers=config.blocks)
    return hk.AttentionMask(groups, scale=scale, layers=config.blocks)


def text_restriction(layout: hk.TokenLayout, core_gen: jax.Array, ring_gen: jax.Array,
                     config: RegulateConfig = RegulateConfig(), active=True) -> hk.AttentionMask:
    """AttentionMask restricting the flow from the text into unsafe generated patches (core/ring:
    [B, n_img] bool): their post-softmax weights on text keys x core_scale / x ring_scale, not
    renormalised (with `config.renormalise`, the additive bias log(scale) instead). Images with empty
    masks, and every step outside the window (`active`, a traced bool), are left exactly as they are."""
    labels = jnp.where(core_gen, 1, jnp.where(ring_gen, 2, 0)).astype(jnp.int32)
    groups = hk.token_groups(layout, img_labels=labels, num_img_labels=3)
    s = np.ones((5, 5), np.float32)
    s[GEN_CORE, TEXT], s[GEN_RING, TEXT] = config.core_scale, config.ring_scale
    return _group_mask(groups, s, jnp.logical_and(active, jnp.any(core_gen | ring_gen, axis=-1)), config)


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

    @classmethod
    def reference(cls, anchors: jax.Array, rng: jax.Array, mode: str = "t2i", localize: dict | None = None,
                  **regulate) -> "UVRController":
        """The public reference code's setting for `mode`: `LocalizeConfig.reference(mode, **localize)` and
        `RegulateConfig.reference(**regulate)`."""
        return cls(anchors, rng, mode, loc.LocalizeConfig.reference(mode, **(localize or {})),
                   RegulateConfig.reference(**regulate))

    def hooks(self, state, step, t, geometry: Geometry) -> hk.Hooks:
        reg = self.regulate
        active = reg.in_window(t)
        b = state["core"].shape[0]
        if self.mode == "t2i":
            core, ring = state["core"].reshape(b, -1), state["ring"].reshape(b, -1)
            edits, attention = (), ()
            if "noise" in reg.t2i:
                edits = noise_replacement(first_patches(core, reg.max_noise_patches), reg, active, geometry.stacks)
            if "restrict" in reg.t2i:
                attention = (text_restriction(geometry.layout, core, ring, reg, active),)
            return hk.Hooks(capture=(reg.localize_at,), edits=edits, attention=attention,
                            rng=self.rng if edits else None)
        ch, cw = geometry.ctx_grid
        core = loc.resize_mask(state["core"], ch, cw).reshape(b, -1)
        ring = loc.resize_mask(state["ring"], ch, cw).reshape(b, -1)
        even_if_empty = reg.first_step(t) if reg.amplify_first_step else False
        mask = context_restriction(geometry.layout, core, ring, reg, active, even_if_empty)
        return hk.Hooks(capture=(reg.localize_at,), attention=(mask,))

    def update(self, state, captures, step, t, geometry: Geometry):
        gh, gw = geometry.grid
        heads = captures[self.regulate.localize_at][:, :gh * gw]
        scores = loc.score_patches(heads, self.anchors).reshape(-1, gh, gw)
        core, ring = loc.localize(scores, self.localize)
        # text-to-image refreshes the mask at every window step; editing localizes once, at the first step
        refresh = self.regulate.relocalize(t) if self.mode == "t2i" else (step == 0)
        return {"core": jnp.where(refresh, core, state["core"]), "ring": jnp.where(refresh, ring, state["ring"])}
