"""SD3 / SD3.5 text-to-image, step for step as diffusers' `StableDiffusion3Pipeline`."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxdit import hooks as hk, sampling, text, vae
from jaxdit.pipelines.folders import (component, dtype_name, load_components, load_text_encoder, load_vae,
                                     scheduler_config)
from jaxdit.pipelines.images import postprocess
from jaxdit.pipelines.inputs import noise_key, prompt_list
from jaxdit.pipelines.loops import sd3_sample
from jaxdit.pipelines.progress import StepProgress


@dataclasses.dataclass
class SD3Pipeline(StepProgress):
    """SD3 / SD3.5 text-to-image with true classifier-free guidance (diffusers `StableDiffusion3Pipeline`).

    Conditioning: penultimate hidden states of CLIP-L and CLIP-G concatenated on features, zero-padded
    to the T5 width and followed by the T5 tokens (77 + 256 = 333 tokens; zeros without T5); pooled =
    [CLIP-L text_embeds, CLIP-G text_embeds].
    """

    transformer_config: Any
    transformer_params: Any
    clip_l: tuple[Any, Any, Any]  # (config, params, tokenizer)
    clip_g: tuple[Any, Any, Any]
    t5: tuple[Any, Any, Any] | None
    vae_config: Any
    vae_params: Any
    scheduler: sampling.SchedulerConfig

    @classmethod
    def from_pretrained(cls, path, dtype: str | None = None, mesh=None, *, torch_dtype=None):
        """As `FluxPipeline.from_pretrained`."""
        dtype = dtype_name(dtype, torch_dtype)
        root, parts, tcfg, tparams = load_components(path, "sd3", dtype, mesh)

        def encoder(folder, tok_folder, on_mesh=False):
            cfg, params = load_text_encoder(folder, dtype=dtype, mesh=mesh if on_mesh else None)
            return (cfg if dtype is None else cfg.replace(dtype=dtype)), params, text.load_tokenizer(tok_folder)

        t5_folder = component(root, "text_encoder_3", required=False)
        t5 = encoder(t5_folder, component(root, "tokenizer_3"), True) if t5_folder is not None else None
        vcfg, vparams = load_vae(parts["vae"], dtype=dtype)
        if dtype is not None:
            tcfg, vcfg = tcfg.replace(dtype=dtype), vcfg.replace(dtype=dtype)
        return cls(tcfg, tparams, encoder(parts["text_encoder"], parts["tokenizer"]),
                   encoder(parts["text_encoder_2"], parts["tokenizer_2"]), t5, vcfg, vparams,
                   scheduler_config(root, sampling.SD3_SCHEDULER))

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_config.downsample_factor

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 256, clip_skip: int | None = None):
        """(prompt_embeds [B, 77 + L, joint_attention_dim], pooled [B, 2048])."""
        outs = [text.clip_encode(p, c, tok, prompts, clip_skip=clip_skip) for c, p, tok in (self.clip_l, self.clip_g)]
        clip_embeds = jnp.concatenate([o.hidden_state for o in outs], axis=-1)
        pooled = jnp.concatenate([o.pooled for o in outs], axis=-1)
        width = self.transformer_config.joint_attention_dim
        if self.t5 is not None:
            cfg, params, tok = self.t5
            t5_embeds = text.t5_encode(params, cfg, tok, prompts, max_length=max_sequence_length).last_hidden_state
        else:
            t5_embeds = jnp.zeros((len(prompts), max_sequence_length, width), clip_embeds.dtype)
        clip_embeds = jnp.pad(clip_embeds, ((0, 0), (0, 0), (0, t5_embeds.shape[-1] - clip_embeds.shape[-1])))
        return jnp.concatenate([clip_embeds, t5_embeds.astype(clip_embeds.dtype)], axis=1), pooled

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        m = self.vae_scale_factor * self.transformer_config.patch_size
        if height % m or width % m:
            raise ValueError(f"height and width must be multiples of {m} (VAE factor x patch size), "
                             f"got {height}x{width}")
        return batch, self.transformer_config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    def __call__(self, prompt: str | Sequence[str], height: int = 1024, width: int = 1024,
                 num_inference_steps: int = 28, guidance_scale: float = 7.0, seed: int = 0,
                 negative_prompt: str | Sequence[str] | None = None, latents: jax.Array | None = None,
                 max_sequence_length: int = 256, num_images_per_prompt: int = 1, clip_skip: int | None = None,
                 hooks: sampling.HooksArg = None, output_type: str = "pil", progress: bool = True, controller=None,
                 generator=None):
        """`generator`, diffusers' spelling, replaces `seed`: an int or a jax.random key."""
        key = noise_key(seed if generator is None else generator)
        prompts = prompt_list(prompt, num_images_per_prompt)
        shape = self._latent_shape(len(prompts), height, width)
        if latents is None:
            latents = jax.random.normal(key, shape, jnp.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape} for {height}x{width}, got {tuple(latents.shape)}")
        embeds, pooled = self.encode_prompt(prompts, max_sequence_length, clip_skip)
        cfg_on = guidance_scale > 1
        if cfg_on:
            n_base = len(prompts) // num_images_per_prompt
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * n_base if isinstance(negative, str) else list(negative)
            if len(negative) != n_base:
                raise ValueError(f"negative_prompt: {len(negative)} given for {n_base} prompts")
            negative = prompt_list(negative, num_images_per_prompt)
            neg_embeds, neg_pooled = self.encode_prompt(negative, max_sequence_length, clip_skip)
            embeds = jnp.concatenate([neg_embeds, embeds])
            pooled = jnp.concatenate([neg_pooled, pooled])
        tokens = (shape[2] // self.transformer_config.patch_size) * (shape[3] // self.transformer_config.patch_size)
        mu = sampling.flux_mu(tokens, self.scheduler) if self.scheduler.use_dynamic_shifting else None
        sigmas, timesteps = sampling.flow_match_schedule(self.scheduler, num_inference_steps, mu=mu)
        dt = jnp.dtype(self.transformer_config.dtype)
        with self._progress(num_inference_steps, progress) as on_step:
            p = self.transformer_config.patch_size
            grid = (shape[2] // p, shape[3] // p)
            geometry = hk.Geometry(hk.TokenLayout(embeds.shape[1], grid[0] * grid[1], text_first=False), grid,
                                   stacks=("joint",))
            out = sd3_sample(self.transformer_params, jnp.asarray(latents).astype(dt), embeds.astype(dt),
                             pooled.astype(dt), jnp.float32(guidance_scale), sigmas, timesteps,
                             None if callable(hooks) else hooks, controller, config=self.transformer_config,
                             cfg_on=cfg_on, hooks_fn=hooks if callable(hooks) else None,
                             on_step=on_step, geometry=geometry)
            out = jax.block_until_ready(out)
        if output_type == "latent":
            return out
        z = vae.denormalize_latents(out.astype(jnp.float32), self.vae_config)
        images = vae.decode(self.vae_params, self.vae_config, z.astype(jnp.dtype(self.vae_config.dtype)))
        return postprocess(images, output_type)
