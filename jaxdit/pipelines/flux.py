"""FLUX.1 dev / schnell text-to-image and FLUX.1 Kontext editing, step for step as diffusers'
`FluxPipeline` and `FluxKontextPipeline`."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import flux, hooks as hk, sampling, text, vae
from jaxdit.pipelines.folders import dtype_name, load_components, load_text_encoder, load_vae, scheduler_config
from jaxdit.pipelines.images import postprocess
from jaxdit.pipelines.inputs import noise_key, prompt_list
from jaxdit.pipelines.loops import flux_sample
from jaxdit.pipelines.progress import StepProgress

PREFERRED_KONTEXT_RESOLUTIONS = [  # (width, height): what Kontext was trained on
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


@dataclasses.dataclass
class FluxPipeline(StepProgress):
    """FLUX.1 dev / schnell text-to-image (diffusers `FluxPipeline`)."""

    transformer_config: Any
    transformer_params: Any
    clip_config: Any
    clip_params: Any
    tokenizer: Any
    t5_config: Any
    t5_params: Any
    tokenizer_2: Any
    vae_config: Any
    vae_params: Any
    scheduler: sampling.SchedulerConfig
    default_max_sequence_length: int = 512

    @classmethod
    def from_pretrained(cls, path, dtype: str | None = None, mesh=None, *, torch_dtype=None):
        """Load every component of a local diffusers FLUX folder (`transformer/` may be a jaxdit checkpoint).

        dtype: compute dtype and parameter dtype of all components ("bfloat16" on accelerators);
        `torch_dtype` (diffusers' spelling) says the same.
        mesh: shard the transformer and T5 on this mesh.
        """
        dtype = dtype_name(dtype, torch_dtype)
        root, parts, tcfg, tparams = load_components(path, "flux", dtype, mesh)
        ccfg, cparams = load_text_encoder(parts["text_encoder"], dtype=dtype)
        t5cfg, t5params = load_text_encoder(parts["text_encoder_2"], dtype=dtype, mesh=mesh)
        vcfg, vparams = load_vae(parts["vae"], dtype=dtype)
        if dtype is not None:
            tcfg, ccfg, t5cfg, vcfg = (c.replace(dtype=dtype) for c in (tcfg, ccfg, t5cfg, vcfg))
        default = sampling.FLUX_DEV_SCHEDULER if tcfg.guidance_embeds else sampling.FLUX_SCHNELL_SCHEDULER
        return cls(tcfg, tparams, ccfg, cparams, text.load_tokenizer(parts["tokenizer"]), t5cfg, t5params,
                   text.load_tokenizer(parts["tokenizer_2"]), vcfg, vparams, scheduler_config(root, default),
                   **({} if tcfg.guidance_embeds else {"default_max_sequence_length": 256}))

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_config.downsample_factor

    def encode_prompt(self, prompts: list[str], max_sequence_length: int):
        """(prompt_embeds [B, L, 4096] from T5, pooled [B, 768] from CLIP), as diffusers encodes them."""
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length={max_sequence_length}: FLUX supports at most 512")
        pooled = text.clip_encode(self.clip_params, self.clip_config, self.tokenizer, prompts).pooled
        embeds = text.t5_encode(self.t5_params, self.t5_config, self.tokenizer_2, prompts,
                                max_length=max_sequence_length).last_hidden_state
        return embeds, pooled

    def _latent_grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"height and width must be multiples of {2 * f} (VAE factor {f} x 2x2 packing), "
                             f"got {height}x{width}")
        return height // f, width // f

    def _token_grid(self, height: int, width: int) -> tuple[int, int]:
        h, w = self._latent_grid(height, width)
        return h // 2, w // 2

    def _guidance(self, batch: int, scale: float):
        if not self.transformer_config.guidance_embeds:
            return None
        return jnp.full((batch,), scale, jnp.float32)

    def _check_latents(self, latents, batch: int, height: int, width: int, seed) -> jax.Array:
        if latents is None:
            return self.initial_latents(batch, height, width, seed)
        gh, gw = self._token_grid(height, width)
        want = (batch, gh * gw, self.transformer_config.in_channels)
        if tuple(latents.shape) != want:
            raise ValueError(f"latents: expected packed shape {want} for {height}x{width}, got {tuple(latents.shape)}")
        return jnp.asarray(latents)

    def initial_latents(self, batch: int, height: int, width: int, seed) -> jax.Array:
        """Packed noise [B, (h/2)(w/2), 4C] drawn from `seed`, an int or a jax.random key (deterministic)."""
        h, w = self._latent_grid(height, width)
        channels = self.transformer_config.in_channels // 4
        noise = jax.random.normal(noise_key(seed), (batch, channels, h, w), jnp.float32)
        return flux.pack_latents(noise)

    def _sample(self, latents, grid, embeds, pooled, guidance, sigmas, timesteps, context=None, context_ids=None,
                hooks: sampling.HooksArg = None, progress: bool = True, controller=None):
        """Run the compiled denoising loop; context tokens (Kontext) ride after the noise tokens."""
        ids = flux.image_ids(*grid)
        if context is not None:
            ids = np.concatenate([ids, context_ids])
        dt = jnp.dtype(self.transformer_config.dtype)
        cast = lambda x: None if x is None else jnp.asarray(x).astype(dt)  # noqa: E731
        with self._progress(len(timesteps), progress) as on_step:
            ctx_grid = None if context is None else tuple(int(v) + 1 for v in context_ids[-1, 1:])
            geometry = hk.Geometry(hk.TokenLayout(embeds.shape[1], latents.shape[1], 0 if context is None else
                                                 context.shape[1]), tuple(grid), ctx_grid)
            out = flux_sample(
                self.transformer_params, cast(latents), cast(embeds), cast(pooled), guidance, sigmas, timesteps, ids,
                flux.text_ids(embeds.shape[1]), cast(context), None if callable(hooks) else hooks, controller,
                config=self.transformer_config, hooks_fn=hooks if callable(hooks) else None,
                on_step=on_step, geometry=geometry)
            out = jax.block_until_ready(out)
        return out

    def decode(self, packed: jax.Array, height: int, width: int) -> jax.Array:
        h, w = self._latent_grid(height, width)
        z = vae.denormalize_latents(flux.unpack_latents(packed.astype(jnp.float32), h, w), self.vae_config)
        return vae.decode(self.vae_params, self.vae_config, z.astype(jnp.dtype(self.vae_config.dtype)))

    def __call__(self, prompt: str | Sequence[str], height: int = 1024, width: int = 1024,
                 num_inference_steps: int = 28, guidance_scale: float = 3.5, seed: int = 0,
                 latents: jax.Array | None = None, max_sequence_length: int | None = None,
                 num_images_per_prompt: int = 1, hooks: sampling.HooksArg = None, output_type: str = "pil",
                 progress: bool = True, controller=None, generator=None):
        """`generator`, diffusers' spelling, replaces `seed`: an int or a jax.random key."""
        key = noise_key(seed if generator is None else generator)
        prompts = prompt_list(prompt, num_images_per_prompt)
        grid = self._token_grid(height, width)
        embeds, pooled = self.encode_prompt(prompts, max_sequence_length or self.default_max_sequence_length)
        latents = self._check_latents(latents, len(prompts), height, width, key)
        sigmas, timesteps = sampling.flux_schedule(self.scheduler, num_inference_steps, latents.shape[1])
        out = self._sample(latents, grid, embeds, pooled, self._guidance(len(prompts), guidance_scale), sigmas,
                           timesteps, hooks=hooks, progress=progress, controller=controller)
        if output_type == "latent":
            return out
        return postprocess(self.decode(out, height, width), output_type)


@dataclasses.dataclass
class FluxKontextPipeline(FluxPipeline):
    """FLUX.1 Kontext editing (diffusers `FluxKontextPipeline`): context-image tokens after the noise."""

    # diffusers' `default_sample_size`: a side left None counts as 128 latent pixels (1024 at factor 8).
    DIFFUSERS_SAMPLE_SIZE = 128

    def edit_sizes(self, image_size: tuple[int, int], height: int | None = None, width: int | None = None,
                   max_area: int = 1024 ** 2, auto_resize: bool = True, context_area: int | None = None,
                   keep_aspect: bool = True) -> tuple[tuple[int, int], tuple[int, int]]:
        """((context width, height), (output width, height)) of an edit of an image of `image_size` (w, h),
        known before any work. The context image is resized, with auto_resize, to the preferred Kontext
        resolution nearest its aspect (about 1024x1024, as diffusers does), scaled to `context_area`
        pixels when that is given; without auto_resize it keeps its own size. The output has the aspect
        of width / height and about `max_area` pixels. A side left None is the context's with
        `keep_aspect` (BFL's Kontext sampling: the edit keeps the image's shape), and diffusers'
        1024 x 1024 default (`DIFFUSERS_SAMPLE_SIZE` x the VAE factor) without it, so that both None give
        a square output whatever the image. Every side is rounded down to a multiple of 2 x the VAE
        factor."""
        multiple = self.vae_scale_factor * 2
        w, h = image_size
        if auto_resize:
            _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
            if context_area is not None:
                scale = (context_area / (w * h)) ** 0.5
                w, h = round(w * scale), round(h * scale)
        context = w // multiple * multiple, h // multiple * multiple
        default = context if keep_aspect else (self.DIFFUSERS_SAMPLE_SIZE * self.vae_scale_factor,) * 2
        aspect = (width or default[0]) / (height or default[1])
        output = (round((max_area * aspect) ** 0.5) // multiple * multiple,
                  round((max_area / aspect) ** 0.5) // multiple * multiple)
        if 0 in context + output:
            raise ValueError(f"an edit of a {image_size[0]}x{image_size[1]} image: context {context[0]}x{context[1]}"
                             f", output {output[0]}x{output[1]}; every side needs at least {multiple} pixels")
        return context, output

    def prepare_image(self, image, size: tuple[int, int]) -> np.ndarray:
        """PIL image -> [1, 3, H, W] in [-1, 1], resized to `size` (w, h) (see `edit_sizes`)."""
        from PIL import Image

        if image.size != tuple(size):
            image = image.resize(tuple(size), resample=Image.LANCZOS)
        x = np.asarray(image.convert("RGB"), np.float32) / 255.0
        return (x.transpose(2, 0, 1)[None] * 2 - 1).astype(np.float32)

    def __call__(self, image, prompt: str | Sequence[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 28, guidance_scale: float = 3.5, seed: int = 0,
                 latents: jax.Array | None = None, max_sequence_length: int | None = None,
                 num_images_per_prompt: int = 1, hooks: sampling.HooksArg = None, output_type: str = "pil",
                 progress: bool = True, max_area: int = 1024 ** 2, auto_resize: bool = True, controller=None,
                 context_area: int | None = None, generator=None, keep_aspect: bool = True):
        """Sizes as `edit_sizes` computes them (`keep_aspect=False`: diffusers' square default when height
        and width are None); `generator` (diffusers' spelling) replaces `seed`."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"image: expected a PIL image, got {type(image).__name__}")
        key = noise_key(seed if generator is None else generator)
        context_size, (width, height) = self.edit_sizes(image.size, height, width, max_area, auto_resize,
                                                        context_area, keep_aspect)
        pixels = self.prepare_image(image, context_size)
        prompts = prompt_list(prompt, num_images_per_prompt)
        grid = self._token_grid(height, width)
        embeds, pooled = self.encode_prompt(prompts, max_sequence_length or self.default_max_sequence_length)

        ctx = vae.encode_mean_normalized(self.vae_params, self.vae_config,
                                         jnp.asarray(pixels).astype(jnp.dtype(self.vae_config.dtype)))
        context = jnp.broadcast_to(flux.pack_latents(ctx.astype(jnp.float32)),
                                   (len(prompts),) + flux.pack_latents(ctx).shape[1:])
        context_ids = flux.image_ids(ctx.shape[2] // 2, ctx.shape[3] // 2, index=1)
        latents = self._check_latents(latents, len(prompts), height, width, key)
        sigmas, timesteps = sampling.flux_schedule(self.scheduler, num_inference_steps, latents.shape[1])
        out = self._sample(latents, grid, embeds, pooled, self._guidance(len(prompts), guidance_scale), sigmas,
                           timesteps, context, context_ids, hooks, progress, controller)
        if output_type == "latent":
            return out
        return postprocess(self.decode(out, height, width), output_type)
