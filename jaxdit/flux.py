"""FLUX.1 transformer (dev, schnell, Kontext) as Flax linen modules applied functionally.

Parameter paths mirror diffusers' `FluxTransformer2DModel` (`transformer_blocks/attn/to_q/kernel`, ...);
the double- and single-stream blocks are stacked along a leading layer axis and run under `nn.scan`.

    model = FluxTransformer(config)
    out = model.apply({"params": params}, hidden_states, encoder_hidden_states, pooled_projections,
                      timestep, img_ids, txt_ids, guidance)            # [B, N_img, in_channels]

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
from jaxdit.configs import FluxConfig
from jaxdit.layers import AdaLNModulation, MLPEmbedder, dense, layer_norm, modulate, rope_table, timestep_sinusoid

# Hook sites offered by each stack and stream (see jaxdit.hooks).
POSITIONS = {
    "double": {
        "img": ("resid_pre", "attn_heads", "attn_out", "mlp_act", "mlp_out", "resid_post"),
        "txt": ("resid_pre", "attn_heads", "attn_out", "mlp_act", "mlp_out", "resid_post"),
        "joint": hk.ATTENTION_SITES,
    },
    "single": {
        "img": ("resid_pre", "attn_heads", "mlp_act", "update", "resid_post"),
        "txt": ("resid_pre", "attn_heads", "mlp_act", "update", "resid_post"),
        "joint": hk.ATTENTION_SITES,
    },
    "embed": {"txt": ("pooled",)},  # the conditioning outside the blocks: one "layer"
}


def num_layers(config: FluxConfig) -> dict[str, int]:
    return {"double": config.num_layers, "single": config.num_single_layers, "embed": 1}


def _site_shape(config: FluxConfig, layout: hk.TokenLayout, batch: int, stream: str, site: str):
    n = {"img": layout.n_img + layout.n_ctx, "txt": layout.n_txt}.get(stream)
    heads, dh, d = config.num_attention_heads, config.attention_head_dim, config.inner_dim
    if site in hk.ATTENTION_SITES:
        return hk.attention_site_shape(site, batch, heads, layout)
    width = {"attn_heads": None, "mlp_act": 4 * d}.get(site, d)
    shape = (batch, n, heads, dh) if site == "attn_heads" else (batch, n, width)
    return shape, jnp.dtype(config.dtype)


def _joint_site(bh: hk.BlockHooks, site: str, x: jax.Array, layout: hk.TokenLayout) -> jax.Array:
    """A per-stream site on the joint [txt, img] sequence of a single-stream block."""
    if not (bh.wants("txt", site) or bh.wants("img", site)):
        return x
    txt = bh.site("txt", site, x[:, layout.txt_slice])
    img = bh.site("img", site, x[:, layout.img_slice])
    return jnp.concatenate([txt, img], axis=1)


class DoubleStreamBlock(nn.Module):
    """diffusers `FluxTransformerBlock` (BFL `DoubleStreamBlock`)."""

    config: FluxConfig
    layout: hk.TokenLayout
    plan: Any

    @nn.compact
    def __call__(self, carry, temb, rope, hooks, layer):
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        img, txt, buffers = carry
        bh = hk.BlockHooks(hooks, "double", layer, self.layout, buffers, dict(self.plan))
        img, txt = bh.site("img", "resid_pre", img), bh.site("txt", "resid_pre", txt)
        d = cfg.inner_dim
        shift, scale, gate, shift2, scale2, gate2 = AdaLNModulation(d, 6, dt, name="norm1")(temb)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = AdaLNModulation(d, 6, dt, name="norm1_context")(temb)

        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, dt, resolve_backend(cfg.attention_backend, dt),
                         qk_norm=True, context=True, name="attn")
        attn_img, attn_txt = attn(modulate(layer_norm(img), shift, scale), modulate(layer_norm(txt), c_shift, c_scale),
                                  rope, bh, self.layout)
        attn_img, attn_txt = bh.site("img", "attn_out", attn_img), bh.site("txt", "attn_out", attn_txt)
        img = img + gate[:, None] * attn_img
        txt = txt + c_gate[:, None] * attn_txt

        mlp_img = FeedForward(4 * d, dt, name="ff")(modulate(layer_norm(img), shift2, scale2),
                                                    lambda h: bh.site("img", "mlp_act", h))
        mlp_txt = FeedForward(4 * d, dt, name="ff_context")(modulate(layer_norm(txt), c_shift2, c_scale2),
                                                            lambda h: bh.site("txt", "mlp_act", h))
        img = img + gate2[:, None] * bh.site("img", "mlp_out", mlp_img)
        txt = txt + c_gate2[:, None] * bh.site("txt", "mlp_out", mlp_txt)
        img, txt = bh.site("img", "resid_post", img), bh.site("txt", "resid_post", txt)
        return (img, txt, bh.buffers), None


class SingleStreamBlock(nn.Module):
    """diffusers `FluxSingleTransformerBlock` (BFL `SingleStreamBlock`) on the joint [txt, img] sequence."""

    config: FluxConfig
    layout: hk.TokenLayout
    plan: Any

    @nn.compact
    def __call__(self, carry, temb, rope, hooks, layer):
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        x, buffers = carry
        bh = hk.BlockHooks(hooks, "single", layer, self.layout, buffers, dict(self.plan))
        x = _joint_site(bh, "resid_pre", x, self.layout)
        shift, scale, gate = AdaLNModulation(cfg.inner_dim, 3, dt, name="norm")(temb)
        x_mod = modulate(layer_norm(x), shift, scale)
        mlp = nn.gelu(dense(4 * cfg.inner_dim, "proj_mlp", dt, axes=("embed", "mlp"))(x_mod), approximate=True)
        mlp = _joint_site(bh, "mlp_act", mlp, self.layout)
        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, dt, resolve_backend(cfg.attention_backend, dt),
                         qk_norm=True, out=False, name="attn")
        attn_out, _ = attn(x_mod, None, rope, bh, self.layout)
        # row-parallel over the joined [attention heads | MLP units] input
        proj_out = dense(cfg.inner_dim, "proj_out", dt, axes=("mlp", "embed"))
        update = gate[:, None] * proj_out(jnp.concatenate([attn_out, mlp], axis=-1))
        x = x + _joint_site(bh, "update", update, self.layout)
        x = _joint_site(bh, "resid_post", x, self.layout)
        return (x, bh.buffers), None


class TimeTextEmbed(nn.Module):
    """diffusers `CombinedTimestep(Guidance)TextProjEmbeddings`: t (+ guidance) + pooled text."""

    dim: int
    guidance_embeds: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, timestep, guidance, pooled):
        # Sinusoids in float32 from the x1000 values; only the result is cast to the compute dtype.
        emb = MLPEmbedder(self.dim, self.dtype, name="timestep_embedder")(
            timestep_sinusoid(timestep * 1000).astype(self.dtype))
        if self.guidance_embeds:
            emb = emb + MLPEmbedder(self.dim, self.dtype, name="guidance_embedder")(
                timestep_sinusoid(guidance * 1000).astype(self.dtype))
        return emb + MLPEmbedder(self.dim, self.dtype, name="text_embedder")(pooled.astype(self.dtype))


class FluxTransformer(nn.Module):
    config: FluxConfig

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,  # [B, N_img, in_channels] packed latents (+ context tokens for Kontext)
        encoder_hidden_states: jax.Array,  # [B, N_txt, joint_attention_dim]
        pooled_projections: jax.Array,  # [B, pooled_projection_dim]
        timestep: jax.Array,  # [B] sigma in [0, 1]
        img_ids: jax.Array,  # [N_img, 3]
        txt_ids: jax.Array,  # [N_txt, 3]
        guidance: jax.Array | None = None,  # [B] guidance scale (dev / Kontext)
        hooks: hk.Hooks | None = None,
        num_context_tokens: int = 0,  # trailing image tokens that are Kontext context (for hooks only)
    ) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        _check_inputs(cfg, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                      guidance)
        if img_ids.ndim == 3:  # accepted like diffusers' deprecated batched ids
            img_ids, txt_ids = img_ids[0], txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        batch, n_img, _ = hidden_states.shape
        n_txt = encoder_hidden_states.shape[1]
        layout = hk.TokenLayout(n_txt=n_txt, n_img=n_img - num_context_tokens, n_ctx=num_context_tokens)
        hk.validate_hooks(hooks, POSITIONS, num_layers(cfg))
        if hooks is not None and hooks.empty:
            hooks = None

        img = dense(cfg.inner_dim, "x_embedder", dt, axes=(None, "embed"))(hidden_states.astype(dt))
        txt = dense(cfg.inner_dim, "context_embedder", dt, axes=(None, "embed"))(encoder_hidden_states.astype(dt))
        pooled_projections, captures = hk.model_site(hooks, "embed", "txt", "pooled", pooled_projections, layout,
                                                     POSITIONS, num_layers(cfg))
        temb = TimeTextEmbed(cfg.inner_dim, cfg.guidance_embeds, dt, name="time_text_embed")(
            jnp.asarray(timestep, jnp.float32).reshape(-1),
            None if guidance is None else jnp.asarray(guidance, jnp.float32).reshape(-1),
            pooled_projections)
        ids = jnp.concatenate([txt_ids, img_ids], axis=0).astype(jnp.float32)
        rope = rope_table(ids, cfg.axes_dims_rope, cfg.rope_theta)

        for stack, block_cls, length in (("double", DoubleStreamBlock, cfg.num_layers),
                                         ("single", SingleStreamBlock, cfg.num_single_layers)):
            plan = hk.capture_plan(hooks, stack, length, POSITIONS, num_layers(cfg))
            buffers = {}
            for key, layers in plan.items():
                shape, bdt = _site_shape(cfg, layout, batch, *key.split("."))
                buffers[key] = jnp.zeros((length if layers is None else len(layers), *shape), bdt)
            scan = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=length,
                           metadata_params={nn.PARTITION_NAME: "layers"})
            name = "transformer_blocks" if stack == "double" else "single_transformer_blocks"
            blocks = scan(cfg, layout, tuple(sorted(plan.items())), name=name)
            layer_ids = jnp.arange(length, dtype=jnp.int32)
            if stack == "double":
                (img, txt, buffers), _ = blocks((img, txt, buffers), temb, rope, hooks, layer_ids)
                x = jnp.concatenate([txt, img], axis=1)
            else:
                (x, buffers), _ = blocks((x, buffers), temb, rope, hooks, layer_ids)
            captures.update(hk.unpack_captures(stack, plan, buffers, length))
        for name, value in captures.items():
            self.sow("intermediates", name, value)

        img = x[:, n_txt:]
        scale, shift = AdaLNModulation(cfg.inner_dim, 2, dt, name="norm_out")(temb)  # diffusers order
        img = modulate(layer_norm(img), shift, scale)
        return dense(cfg.output_channels, "proj_out", dt, axes=("embed", None))(img)


def _check_inputs(cfg, hidden, context, pooled, timestep, img_ids, txt_ids, guidance):
    def fail(msg):
        raise ValueError(f"FluxTransformer: {msg}")

    if hidden.ndim != 3 or hidden.shape[-1] != cfg.in_channels:
        fail(f"hidden_states must be [B, N, {cfg.in_channels}], got {tuple(hidden.shape)}")
    if context.ndim != 3 or context.shape[-1] != cfg.joint_attention_dim or context.shape[0] != hidden.shape[0]:
        fail(f"encoder_hidden_states must be [{hidden.shape[0]}, L, {cfg.joint_attention_dim}], "
             f"got {tuple(context.shape)}")
    if pooled.shape != (hidden.shape[0], cfg.pooled_projection_dim):
        fail(f"pooled_projections must be [{hidden.shape[0]}, {cfg.pooled_projection_dim}], got {tuple(pooled.shape)}")
    if np.size(timestep) not in (1, hidden.shape[0]):
        fail(f"timestep must have 1 or {hidden.shape[0]} values, got shape {np.shape(timestep)}")
    n_axes = len(cfg.axes_dims_rope)
    if img_ids.shape[-2:] != (hidden.shape[1], n_axes):
        fail(f"img_ids must be [{hidden.shape[1]}, {n_axes}], got {tuple(img_ids.shape)}")
    if txt_ids.shape[-2:] != (context.shape[1], n_axes):
        fail(f"txt_ids must be [{context.shape[1]}, {n_axes}], got {tuple(txt_ids.shape)}")
    if cfg.guidance_embeds and guidance is None:
        fail("this model has a guidance embedding (dev / Kontext); pass guidance")
    if not cfg.guidance_embeds and guidance is not None:
        fail("this model has no guidance embedding (schnell); guidance must be None")


def forward(params, config: FluxConfig, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
            txt_ids, guidance=None, hooks: hk.Hooks | None = None, num_context_tokens: int = 0):
    """Pure forward: returns (prediction, captures) with captures {position name: array}."""
    out, state = FluxTransformer(config).apply(
        {"params": params}, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
        guidance, hooks, num_context_tokens, mutable=["intermediates"])
    captures = {k: v[0] for k, v in state.get("intermediates", {}).items()}
    return out, captures


def _boxed_init(config: FluxConfig, rng: jax.Array, n_img: int = 4, n_txt: int = 2):
    return FluxTransformer(config).init(rng, *_dummy_inputs(config, n_img, n_txt))["params"]


def init_params(config: FluxConfig, rng: jax.Array, n_img: int = 4, n_txt: int = 2):
    """Randomly initialised parameters (float32); shapes are independent of the dummy token counts."""
    return sharding.unboxed(_boxed_init(config, rng, n_img, n_txt))


def abstract_params(config: FluxConfig):
    """ShapeDtypeStruct tree of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def logical_axes(config: FluxConfig):
    """The logical axes every parameter declares, as a tree of tuples like the parameters' (for
    `jaxdit.sharding.param_specs`); read off an abstract init, nothing is allocated."""
    return sharding.declared_axes(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))


def _dummy_inputs(config, n_img, n_txt, batch=1):
    guidance = jnp.ones((batch,)) if config.guidance_embeds else None
    return (jnp.zeros((batch, n_img, config.in_channels)), jnp.zeros((batch, n_txt, config.joint_attention_dim)),
            jnp.zeros((batch, config.pooled_projection_dim)), jnp.ones((batch,)), jnp.zeros((n_img, 3)),
            jnp.zeros((n_txt, 3)), guidance)


# --- latents, ids and Kontext context tokens -------------------------------------------------------

def pack_latents(latents: jax.Array) -> jax.Array:
    """[B, C, H, W] VAE latents -> [B, (H/2)(W/2), 4C] tokens, features ordered (c, ph, pw)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `pack_latents` for a latent grid of `height` x `width` (latent pixels)."""
    b, n, f = tokens.shape
    c = f // 4
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not form a {height // 2}x{width // 2} grid")
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(grid_h: int, grid_w: int, index: int = 0) -> np.ndarray:
    """Position ids (index, row, col) of a grid_h x grid_w token grid, row-major: [grid_h*grid_w, 3]."""
    ids = np.zeros((grid_h, grid_w, 3), np.float32)
    ids[..., 0] = index
    ids[..., 1] = np.arange(grid_h)[:, None]
    ids[..., 2] = np.arange(grid_w)[None, :]
    return ids.reshape(-1, 3)


def text_ids(n_txt: int) -> np.ndarray:
    return np.zeros((n_txt, 3), np.float32)


def with_context(noise_tokens: jax.Array, noise_ids, context_tokens: jax.Array, context_ids):
    """Kontext: append context-image tokens (ids with first axis 1) after the noise tokens.

    Returns (tokens, ids, num_context_tokens) to pass as hidden_states, img_ids, num_context_tokens.
    """
    if context_tokens.shape[0] != noise_tokens.shape[0]:
        context_tokens = jnp.broadcast_to(context_tokens, (noise_tokens.shape[0], *context_tokens.shape[1:]))
    tokens = jnp.concatenate([noise_tokens, context_tokens.astype(noise_tokens.dtype)], axis=1)
    ids = jnp.concatenate([jnp.asarray(noise_ids), jnp.asarray(context_ids)], axis=0)
    return tokens, ids, context_tokens.shape[1]


def noise_prediction(prediction: jax.Array, num_noise_tokens: int) -> jax.Array:
    """Kontext: keep the prediction of the noise tokens only."""
    return prediction[:, :num_noise_tokens]
