"""SD3 / SD3.5 MMDiT (medium, MMDiT-X medium, large) as Flax linen modules applied functionally.

Parameter paths mirror diffusers' `SD3Transformer2DModel` (`pos_embed/proj/kernel`, `attn/to_q/kernel`, ...).

Block layout. The joint blocks do not all have the same parameters: MMDiT-X layers (`dual_attention_layers`)
add an image self-attention `attn2` and a 9-chunk `norm1`, and the last block (context pre-only) has a
2-chunk `norm1_context` and no `attn/to_add_out` or `ff_context`. `nn.scan` needs identical parameters at
every step, so the blocks are cut into *segments*: maximal runs of consecutive blocks with the same
structure, each stacked along a leading layer axis and run by its own `nn.scan`. The segment that starts at
layer s is stored under `transformer_blocks_{s}`, the first one under plain `transformer_blocks`:

    SD3-medium / SD3.5-large    transformer_blocks [N-1] (layers 0..N-2), transformer_blocks_{N-1} [1]
    SD3.5-medium                transformer_blocks [13] (MMDiT-X 0..12), transformer_blocks_13 [10],
                                transformer_blocks_23 [1]

so diffusers' `transformer_blocks.{i}.*` is slot i - s of the segment holding layer i (the identity for the
first segment), and inside a segment every name is diffusers'. `stacks(config)` lists the segments for
conversion (`convert/keymaps/sd3.py`); every segment is a scanned stack, its leading axis "layers".
(Padding every block to one structure with zero tensors would keep a single stack, but it invents weights
that training would move and computes `attn2` where the model has none.)

Hooks see one stack "joint" of `num_layers` blocks whatever the segments, with FLUX's site names and
`TokenLayout(text_first=False)` groups. The last block's text stream stops at the attention, so it offers only
`LAST_BLOCK_TXT_SITES` (wildcard captures skip the others). MMDiT-X's `attn2` is image-only: attention masks
and sites describe the joint attention, not it.

    model = SD3Transformer(config)
    out = model.apply({"params": params}, hidden_states, encoder_hidden_states, pooled_projections,
                      timestep)                                            # [B, C, H, W]

or `forward(params, config, ...) -> (out, captures)` with hooks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import hooks as hk
from jaxdit import sharding
from jaxdit.attention import Attention, FeedForward, resolve_backend
from jaxdit.configs import SD3Config
from jaxdit.layers import AdaLNModulation, MLPEmbedder, declare, dense, layer_norm, modulate, timestep_sinusoid

STACK = "joint"
_SITES = ("resid_pre", "attn_heads", "attn_out", "mlp_act", "mlp_out", "resid_post")
# Hook sites offered by the joint blocks (see jaxdit.hooks); the joint sequence is [image, text].
POSITIONS = {STACK: {"img": _SITES, "txt": _SITES, "joint": hk.ATTENTION_SITES},
             "embed": {"txt": ("pooled",)}}  # the conditioning outside the blocks: one "layer"
# The last block's text stream only feeds the attention (context pre-only): it has these sites alone.
LAST_BLOCK_TXT_SITES = ("resid_pre", "attn_heads")


def num_layers(config: SD3Config) -> dict[str, int]:
    return {STACK: config.num_layers, "embed": 1}


# --- block segments ---------------------------------------------------------------------------------

def _structure(config: SD3Config, layer: int) -> tuple[bool, bool]:
    """(MMDiT-X dual attention, context pre-only) of one block."""
    return layer in config.dual_attention_layers, layer == config.num_layers - 1


def segments(config: SD3Config) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive blocks with the same parameter structure, in run order."""
    n = config.num_layers
    cuts = [i for i in range(1, n) if _structure(config, i) != _structure(config, i - 1)]
    bounds = [0, *cuts, n]
    return list(zip(bounds[:-1], bounds[1:]))


def segment_name(start: int) -> str:
    return "transformer_blocks" if start == 0 else f"transformer_blocks_{start}"


def stacks(config: SD3Config) -> dict[str, int]:
    """Stacked parameter subtrees -> number of layers (for conversion and sharding)."""
    return {segment_name(a): b - a for a, b in segments(config)}


# --- modules ----------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """diffusers `PatchEmbed` with SD3 cropping: Conv k=s=p patches + a center crop of the position table.

    The table `pos_embed` [1, max*max, D] is a checkpoint buffer: loaded, never recomputed.
    """

    dim: int
    patch_size: int
    max_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, h*w, D]
        p, m = self.patch_size, self.max_size
        # The patch kernel [p, p, C, D] and the table are small: replicated.
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=declare(nn.linear.default_kernel_init, (None, None, None, None)),
                    bias_init=declare(nn.initializers.zeros_init(), (None,)),
                    name="proj")(jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype))
        b, h, w, d = x.shape
        table = self.param("pos_embed", declare(nn.initializers.zeros, (None, None, None)), (1, m * m, self.dim),
                           jnp.float32)
        top, left = (m - h) // 2, (m - w) // 2
        pos = table.reshape(m, m, d)[top:top + h, left:left + w].reshape(1, h * w, d)
        # Like diffusers: the float32 table is added before casting to the compute dtype.
        return (x.reshape(b, h * w, d).astype(jnp.float32) + pos.astype(jnp.float32)).astype(self.dtype)


class TimeTextEmbed(nn.Module):
    """diffusers `CombinedTimestepTextProjEmbeddings`: MLP(sinusoid(t)) + MLP(pooled text)."""

    dim: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        # The pipeline passes sigma * 1000 already: no scaling here. Sinusoid in float32, result cast.
        t_emb = MLPEmbedder(self.dim, self.dtype, name="timestep_embedder")
        text_emb = MLPEmbedder(self.dim, self.dtype, name="text_embedder")
        return t_emb(timestep_sinusoid(timestep).astype(self.dtype)) + text_emb(pooled.astype(self.dtype))


class JointBlock(nn.Module):
    """diffusers `JointTransformerBlock` (SAI `JointBlock`) on the joint [image, text] sequence."""

    config: SD3Config
    layout: hk.TokenLayout
    plan: Any
    dual: bool  # MMDiT-X: + image self-attention `attn2`, 9-chunk `norm1`
    last: bool  # context pre-only: the text stream only feeds the attention

    @nn.compact
    def __call__(self, carry, temb, hooks, layer):
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        img, txt, buffers = carry
        bh = hk.BlockHooks(hooks, STACK, layer, self.layout, buffers, dict(self.plan))
        img, txt = bh.site("img", "resid_pre", img), bh.site("txt", "resid_pre", txt)
        d = cfg.inner_dim
        mod = AdaLNModulation(d, 9 if self.dual else 6, dt, name="norm1")(temb)
        shift, scale, gate, shift2, scale2, gate2 = mod[:6]
        c_mod = AdaLNModulation(d, 2 if self.last else 6, dt, name="norm1_context")(temb)
        if self.last:  # diffusers `AdaLayerNormContinuous`: (scale, shift)
            c_scale, c_shift = c_mod
        else:
            c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = c_mod

        backend = resolve_backend(cfg.attention_backend, dt)
        qk_norm = cfg.qk_norm is not None
        img_norm = layer_norm(img)
        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, dt, backend, qk_norm=qk_norm, context=True,
                         context_out=not self.last, name="attn")
        attn_img, attn_txt = attn(modulate(img_norm, shift, scale), modulate(layer_norm(txt), c_shift, c_scale),
                                  None, bh, self.layout)
        img = img + gate[:, None] * bh.site("img", "attn_out", attn_img)
        if self.dual:
            # Image-only self-attention on the same normalised input; no hooks or masks (those describe the
            # joint sequence).
            shift3, scale3, gate3 = mod[6:]
            attn2 = Attention(cfg.num_attention_heads, cfg.attention_head_dim, dt, backend, qk_norm=qk_norm,
                              name="attn2")
            img_only = hk.TokenLayout(n_txt=0, n_img=img.shape[1], text_first=False)
            attn2_img, _ = attn2(modulate(img_norm, shift3, scale3), None, None, None, img_only)
            img = img + gate3[:, None] * attn2_img
        mlp = FeedForward(4 * d, dt, name="ff")(modulate(layer_norm(img), shift2, scale2),
                                               lambda h: bh.site("img", "mlp_act", h))
        img = bh.site("img", "resid_post", img + gate2[:, None] * bh.site("img", "mlp_out", mlp))

        if not self.last:
            txt = txt + c_gate[:, None] * bh.site("txt", "attn_out", attn_txt)
            mlp = FeedForward(4 * d, dt, name="ff_context")(modulate(layer_norm(txt), c_shift2, c_scale2),
                                                            lambda h: bh.site("txt", "mlp_act", h))
            txt = bh.site("txt", "resid_post", txt + c_gate2[:, None] * bh.site("txt", "mlp_out", mlp))
        return (img, txt, bh.buffers), None


class SD3Transformer(nn.Module):
    config: SD3Config

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,  # [B, C, H, W] latents
        encoder_hidden_states: jax.Array,  # [B, N_txt, joint_attention_dim]
        pooled_projections: jax.Array,  # [B, pooled_projection_dim]
        timestep: jax.Array,  # [B] or scalar: sigma * 1000, as the pipeline passes it
        hooks: hk.Hooks | None = None,
    ) -> jax.Array:  # [B, out_channels, H, W]
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        _check_inputs(cfg, hidden_states, encoder_hidden_states, pooled_projections, timestep)
        _check_hooks(cfg, hooks)
        if hooks is not None and hooks.empty:
            hooks = None
        batch, _, height, width = hidden_states.shape
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p
        layout = hk.TokenLayout(n_txt=encoder_hidden_states.shape[1], n_img=grid_h * grid_w, text_first=False)

        img = PatchEmbed(cfg.inner_dim, p, cfg.pos_embed_max_size, dt, name="pos_embed")(hidden_states)
        pooled_projections, captures = hk.model_site(hooks, "embed", "txt", "pooled", pooled_projections, layout,
                                                     POSITIONS, num_layers(cfg))
        for name, value in captures.items():
            self.sow("intermediates", name, value)
        temb = TimeTextEmbed(cfg.inner_dim, dt, name="time_text_embed")(
            jnp.asarray(timestep, jnp.float32).reshape(-1), pooled_projections)
        txt = dense(cfg.caption_projection_dim, "context_embedder", dt, axes=(None, "embed"))(
            encoder_hidden_states.astype(dt))

        n = cfg.num_layers
        plan = hk.capture_plan(hooks, STACK, n, POSITIONS, num_layers(cfg))
        buffers = {key: jnp.zeros((n if layers is None else len(layers), *_site_shape(cfg, layout, batch, key)),
                                  jnp.float32 if key.startswith("joint.") else dt)
                   for key, layers in plan.items()}
        for start, stop in segments(cfg):
            dual, last = _structure(cfg, start)
            scan = nn.scan(JointBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(nn.broadcast, nn.broadcast, 0), length=stop - start,
                           metadata_params={nn.PARTITION_NAME: "layers"})
            blocks = scan(cfg, layout, tuple(sorted(plan.items())), dual, last, name=segment_name(start))
            (img, txt, buffers), _ = blocks((img, txt, buffers), temb, hooks, jnp.arange(start, stop, dtype=jnp.int32))
        absent = {f"{STACK}.{n - 1}.txt.{site}" for site in _SITES if site not in LAST_BLOCK_TXT_SITES}
        for name, value in hk.unpack_captures(STACK, plan, buffers, n).items():
            if name not in absent:  # wildcard captures: the last block has no such text site
                self.sow("intermediates", name, value)

        scale, shift = AdaLNModulation(cfg.inner_dim, 2, dt, name="norm_out")(temb)  # diffusers order
        img = dense(p * p * cfg.output_channels, "proj_out", dt, axes=("embed", None))(
            modulate(layer_norm(img), shift, scale))
        return unpatchify(img, grid_h, grid_w, p)


def unpatchify(tokens: jax.Array, grid_h: int, grid_w: int, patch_size: int) -> jax.Array:
    """[B, h*w, p*p*C] with features ordered (p, q, c) -> [B, C, h*p, w*p] (diffusers' einsum)."""
    b, _, f = tokens.shape
    p = patch_size
    x = tokens.reshape(b, grid_h, grid_w, p, p, f // (p * p))
    x = jnp.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, x.shape[1], grid_h * p, grid_w * p)


def _site_shape(cfg: SD3Config, layout: hk.TokenLayout, batch: int, key: str) -> tuple[int, ...]:
    stream, site = key.split(".")
    heads, dh, d = cfg.num_attention_heads, cfg.attention_head_dim, cfg.inner_dim
    if site in hk.ATTENTION_SITES:
        return hk.attention_site_shape(site, batch, heads, layout)[0]
    n = layout.n_img if stream == "img" else layout.n_txt
    if site == "attn_heads":
        return batch, n, heads, dh
    return batch, n, 4 * d if site == "mlp_act" else d


def _check_inputs(cfg: SD3Config, hidden, context, pooled, timestep):
    def fail(msg):
        raise ValueError(f"SD3Transformer: {msg}")

    p, m = cfg.patch_size, cfg.pos_embed_max_size
    if hidden.ndim != 4 or hidden.shape[1] != cfg.in_channels:
        fail(f"hidden_states must be [B, {cfg.in_channels}, H, W] latents, got {tuple(hidden.shape)}")
    height, width = hidden.shape[2:]
    if height % p or width % p:
        fail(f"latent height and width must be multiples of patch_size {p}, got {height}x{width}")
    if height // p > m or width // p > m:
        fail(f"a {height}x{width} latent is a {height // p}x{width // p} patch grid, larger than the "
             f"{m}x{m} position table (pos_embed_max_size)")
    batch = hidden.shape[0]
    if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != cfg.joint_attention_dim:
        fail(f"encoder_hidden_states must be [{batch}, L, {cfg.joint_attention_dim}], got {tuple(context.shape)}")
    if tuple(pooled.shape) != (batch, cfg.pooled_projection_dim):
        fail(f"pooled_projections must be [{batch}, {cfg.pooled_projection_dim}], got {tuple(pooled.shape)}")
    if np.size(timestep) not in (1, batch):
        fail(f"timestep must have 1 or {batch} values, got shape {np.shape(timestep)}")


def _check_hooks(cfg: SD3Config, hooks: hk.Hooks | None):
    if hooks is None:
        return
    hk.validate_hooks(hooks, POSITIONS, num_layers(cfg))
    last = cfg.num_layers - 1
    for name in (*hooks.capture, *(e.position for e in hooks.edits)):
        pos = hk.Position.parse(name)
        if pos.stack == STACK and pos.layer == last and pos.stream == "txt" and pos.site not in LAST_BLOCK_TXT_SITES:
            raise ValueError(f"hook position {name!r}: the last block is context pre-only; its text stream has "
                             f"only {list(LAST_BLOCK_TXT_SITES)}")


def forward(params, config: SD3Config, hidden_states, encoder_hidden_states, pooled_projections, timestep,
            hooks: hk.Hooks | None = None):
    """Pure forward: returns (prediction [B, C, H, W], captures {position name: array})."""
    out, state = SD3Transformer(config).apply(
        {"params": params}, hidden_states, encoder_hidden_states, pooled_projections, timestep, hooks,
        mutable=["intermediates"])
    captures = {k: v[0] for k, v in state.get("intermediates", {}).items()}
    return out, captures


def _boxed_init(config: SD3Config, rng: jax.Array, n_txt: int = 2):
    p = config.patch_size
    args = (jnp.zeros((1, config.in_channels, p, p)), jnp.zeros((1, n_txt, config.joint_attention_dim)),
            jnp.zeros((1, config.pooled_projection_dim)), jnp.ones((1,)))
    return SD3Transformer(config).init(rng, *args)["params"]


def init_params(config: SD3Config, rng: jax.Array, n_txt: int = 2):
    """Randomly initialised parameters (float32; a zero position table); shapes are input-independent."""
    return sharding.unboxed(_boxed_init(config, rng, n_txt))


def abstract_params(config: SD3Config):
    """ShapeDtypeStruct tree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def logical_axes(config: SD3Config):
    """The logical axes every parameter declares, as a tree of tuples like the parameters' (for
    `jaxdit.sharding.param_specs`); read off an abstract init, nothing is allocated."""
    return sharding.declared_axes(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))
