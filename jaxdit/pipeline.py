"""Text-to-image and editing pipelines over the JAX parts: FLUX.1, FLUX.1 Kontext, SD3 / SD3.5.

    pipe = FluxPipeline.from_pretrained("FLUX.1-dev/")          # diffusers layout (model_index.json)
    images = pipe("a red star", height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5, seed=0)

diffusers spellings are understood where they have a JAX meaning: `from_pretrained(..., torch_dtype=...)`
is `dtype`, `generator=` is an int seed or a `jax.random` key (a torch.Generator is refused, naming
`seed`), and the returned list of images also answers `.images`.

Each pipeline mirrors its diffusers counterpart step for step (prompt encoding, latent packing and ids,
schedule, guidance, decoding), so with the same initial noise the results agree with diffusers. The
denoising loop is one compiled program (`jaxdit.sampling.euler_sample`); `hooks` (a `jaxdit.hooks.Hooks`,
or a function step -> Hooks) reach the transformer at every step with `Hooks.step` set to the step index;
a `controller` (e.g. `jaxdit.safety.uvr.regulate.UVRController`) carries state across steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdit import flux, hooks as hk, sampling, text, vae
from jaxdit.configs import check_field_types
from jaxdit.io import CheckpointError


Geometry = hk.Geometry  # kept importable from here (it lives with the hook contract)

PREFERRED_KONTEXT_RESOLUTIONS = [  # (width, height): what Kontext was trained on
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]

HooksArg = sampling.HooksArg


def _component(root: Path, name: str, required: bool = True) -> Path | None:
    path = root / name
    if not path.is_dir():
        if required:
            raise CheckpointError(f"{root}: pipeline folder is missing its {name}/ component")
        return None
    return path


def _read_model_index(root: Path) -> dict:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such pipeline folder")
    index = root / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    try:
        return json.loads(index.read_text())
    except ValueError as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None


def _load_components(path, family: str, dtype, mesh):
    """(root, component folders, transformer config, transformer params) of a pipeline folder."""
    from jaxdit import load_transformer

    root = Path(path)
    _read_model_index(root)
    parts = {n: _component(root, n) for n in ("transformer", "text_encoder", "text_encoder_2", "tokenizer",
                                              "tokenizer_2", "vae")}
    tcfg, tparams = load_transformer(parts["transformer"], mesh=mesh, dtype=dtype)
    if tcfg.family != family:
        raise CheckpointError(f"{parts['transformer']}: a {tcfg.family} transformer, not {family}")
    return root, parts, tcfg, tparams


def _scheduler(root: Path, default: sampling.SchedulerConfig) -> sampling.SchedulerConfig:
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return default
    try:
        raw = json.loads(f.read_text())
        check_field_types(sampling.SchedulerConfig, {k: v for k, v in raw.items() if v is not None})
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    return sampling.SchedulerConfig.from_diffusers(raw, str(f))


def _dtype_name(dtype: str | None, torch_dtype) -> str | None:
    """jaxdit's `dtype` from it or from diffusers' `torch_dtype` (torch.bfloat16, "bfloat16", "auto")."""
    if torch_dtype is None:
        return dtype
    if dtype is not None:
        raise TypeError("give dtype or torch_dtype, not both")
    name = str(torch_dtype).removeprefix("torch.")
    if name == "auto":  # diffusers: the checkpoint's own dtype, jaxdit's dtype=None
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise TypeError(f"torch_dtype={torch_dtype}: jaxdit takes dtype='float32', 'bfloat16' or 'float16'")
    return name


def _noise_key(seed) -> jax.Array:
    """The noise key from a `seed` int or diffusers' `generator` spelling: an int or a `jax.random` key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(seed)
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if isinstance(seed, jax.Array) and seed.shape == (2,) and seed.dtype == jnp.uint32:  # jax.random.PRNGKey
        return jax.random.wrap_key_data(seed)
    raise TypeError(f"a {type(seed).__name__} cannot seed the noise: pass seed=INT or generator=jax.random.key(INT) "
                    "(a torch.Generator has no JAX meaning)")


class Images(list):
    """The generated PIL images: a list, which also answers diffusers' `output.images`."""

    @property
    def images(self) -> list:
        return self


def to_pil(images: np.ndarray):
    """[B, 3, H, W] float in [-1, 1] -> PIL images (diffusers' postprocess: round(x * 255))."""
    from PIL import Image

    x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in x]


def _postprocess(images, output_type: str):
    if output_type == "pil":
        return Images(to_pil(images))
    if output_type == "np":  # [B, H, W, 3] in [0, 1], like diffusers' output_type="np"
        return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    raise ValueError(f"output_type={output_type!r}: expected 'pil', 'np' or 'latent'")


def _prompts(prompt: str | Sequence[str], num_images_per_prompt: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt: give at least one prompt")
    return [p for p in prompts for _ in range(num_images_per_prompt)]


class _StepProgress:
    """A denoising progress bar ticked from inside the compiled loop. `_tick` is a bound method, stable
    across calls, so passing it as a static argument keeps jit's cache."""

    def _tick(self, step) -> None:
        if getattr(self, "_bar", None) is not None:
            self._bar.update(1)

    @contextlib.contextmanager
    def _progress(self, total: int, enabled: bool):
        """Yields the `on_step` callback (None when disabled); waits for the last tick before closing."""
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="denoising", unit="step", leave=False)
        try:
            yield self._tick if enabled else None
            jax.effects_barrier()
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None


@dataclasses.dataclass
class FluxPipeline(_StepProgress):
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
        dtype = _dtype_name(dtype, torch_dtype)
        root, parts, tcfg, tparams = _load_components(path, "flux", dtype, mesh)
        ccfg, cparams = text.load_text_encoder(parts["text_encoder"], dtype=dtype)
        t5cfg, t5params = text.load_text_encoder(parts["text_encoder_2"], dtype=dtype, mesh=mesh)
        vcfg, vparams = vae.load_vae(parts["vae"], dtype=dtype)
        if dtype is not None:
            tcfg, ccfg, t5cfg, vcfg = (c.replace(dtype=dtype) for c in (tcfg, ccfg, t5cfg, vcfg))
        default = sampling.FLUX_DEV_SCHEDULER if tcfg.guidance_embeds else sampling.FLUX_SCHNELL_SCHEDULER
        return cls(tcfg, tparams, ccfg, cparams, text.load_tokenizer(parts["tokenizer"]), t5cfg, t5params,
                   text.load_tokenizer(parts["tokenizer_2"]), vcfg, vparams, _scheduler(root, default),
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
        noise = jax.random.normal(_noise_key(seed), (batch, channels, h, w), jnp.float32)
        return flux.pack_latents(noise)

    def _sample(self, latents, grid, embeds, pooled, guidance, sigmas, timesteps, context=None, context_ids=None,
                hooks: HooksArg = None, progress: bool = True, controller=None):
        """Run the compiled denoising loop; context tokens (Kontext) ride after the noise tokens."""
        ids = flux.image_ids(*grid)
        if context is not None:
            ids = np.concatenate([ids, context_ids])
        dt = jnp.dtype(self.transformer_config.dtype)
        cast = lambda x: None if x is None else jnp.asarray(x).astype(dt)  # noqa: E731
        with self._progress(len(timesteps), progress) as on_step:
            ctx_grid = None if context is None else tuple(int(v) + 1 for v in context_ids[-1, 1:])
            geometry = Geometry(hk.TokenLayout(embeds.shape[1], latents.shape[1], 0 if context is None else
                                               context.shape[1]), tuple(grid), ctx_grid)
            out = _flux_sample(
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
                 num_images_per_prompt: int = 1, hooks: HooksArg = None, output_type: str = "pil",
                 progress: bool = True, controller=None, generator=None):
        """`generator`, diffusers' spelling, replaces `seed`: an int or a jax.random key."""
        key = _noise_key(seed if generator is None else generator)
        prompts = _prompts(prompt, num_images_per_prompt)
        grid = self._token_grid(height, width)
        embeds, pooled = self.encode_prompt(prompts, max_sequence_length or self.default_max_sequence_length)
        latents = self._check_latents(latents, len(prompts), height, width, key)
        sigmas, timesteps = sampling.flux_schedule(self.scheduler, num_inference_steps, latents.shape[1])
        out = self._sample(latents, grid, embeds, pooled, self._guidance(len(prompts), guidance_scale), sigmas,
                           timesteps, hooks=hooks, progress=progress, controller=controller)
        if output_type == "latent":
            return out
        return _postprocess(self.decode(out, height, width), output_type)


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
                 num_images_per_prompt: int = 1, hooks: HooksArg = None, output_type: str = "pil",
                 progress: bool = True, max_area: int = 1024 ** 2, auto_resize: bool = True, controller=None,
                 context_area: int | None = None, generator=None, keep_aspect: bool = True):
        """Sizes as `edit_sizes` computes them (`keep_aspect=False`: diffusers' square default when height
        and width are None); `generator` (diffusers' spelling) replaces `seed`."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"image: expected a PIL image, got {type(image).__name__}")
        key = _noise_key(seed if generator is None else generator)
        context_size, (width, height) = self.edit_sizes(image.size, height, width, max_area, auto_resize,
                                                        context_area, keep_aspect)
        pixels = self.prepare_image(image, context_size)
        prompts = _prompts(prompt, num_images_per_prompt)
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
        return _postprocess(self.decode(out, height, width), output_type)


@functools.partial(jax.jit, static_argnames=("config", "hooks_fn", "on_step", "geometry"))
def _flux_sample(params, latents, embeds, pooled, guidance, sigmas, timesteps, img_ids, txt_ids, context, hooks,
                 controller, *, config, hooks_fn, on_step, geometry):
    """The FLUX denoising loop as one program: [noise; context] tokens in, noise-token velocity out.

    A `controller` (e.g. UVR) carries its state through the loop: hooks from the state before each
    step, the state updated from that step's captures after it.
    """
    n_noise = latents.shape[1]
    n_ctx = 0 if context is None else context.shape[1]

    def velocity(x, t, i, step_hooks, aux):
        tokens = x if context is None else jnp.concatenate([x, context], axis=1)
        v, caps = flux.forward(params, config, tokens, embeds, pooled, jnp.full((x.shape[0],), t / 1000), img_ids,
                               txt_ids, guidance, step_hooks, n_ctx)
        return v[:, :n_noise], caps, aux

    return sampling.controlled_euler(velocity, latents, sigmas, timesteps, hooks_fn if hooks_fn is not None else hooks,
                                     controller, geometry, on_step=on_step)[0]


@dataclasses.dataclass
class SD3Pipeline(_StepProgress):
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
        dtype = _dtype_name(dtype, torch_dtype)
        root, parts, tcfg, tparams = _load_components(path, "sd3", dtype, mesh)

        def encoder(folder, tok_folder, on_mesh=False):
            cfg, params = text.load_text_encoder(folder, dtype=dtype, mesh=mesh if on_mesh else None)
            return (cfg if dtype is None else cfg.replace(dtype=dtype)), params, text.load_tokenizer(tok_folder)

        t5_folder = _component(root, "text_encoder_3", required=False)
        t5 = encoder(t5_folder, _component(root, "tokenizer_3"), True) if t5_folder is not None else None
        vcfg, vparams = vae.load_vae(parts["vae"], dtype=dtype)
        if dtype is not None:
            tcfg, vcfg = tcfg.replace(dtype=dtype), vcfg.replace(dtype=dtype)
        return cls(tcfg, tparams, encoder(parts["text_encoder"], parts["tokenizer"]),
                   encoder(parts["text_encoder_2"], parts["tokenizer_2"]), t5, vcfg, vparams,
                   _scheduler(root, sampling.SD3_SCHEDULER))

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
                 hooks: HooksArg = None, output_type: str = "pil", progress: bool = True, controller=None,
                 generator=None):
        """`generator`, diffusers' spelling, replaces `seed`: an int or a jax.random key."""
        key = _noise_key(seed if generator is None else generator)
        prompts = _prompts(prompt, num_images_per_prompt)
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
            negative = _prompts(negative, num_images_per_prompt)
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
            geometry = Geometry(hk.TokenLayout(embeds.shape[1], grid[0] * grid[1], text_first=False), grid,
                                stacks=("joint",))
            out = _sd3_sample(self.transformer_params, jnp.asarray(latents).astype(dt), embeds.astype(dt),
                              pooled.astype(dt), jnp.float32(guidance_scale), sigmas, timesteps,
                              None if callable(hooks) else hooks, controller, config=self.transformer_config,
                              cfg_on=cfg_on, hooks_fn=hooks if callable(hooks) else None,
                              on_step=on_step, geometry=geometry)
            out = jax.block_until_ready(out)
        if output_type == "latent":
            return out
        z = vae.denormalize_latents(out.astype(jnp.float32), self.vae_config)
        images = vae.decode(self.vae_params, self.vae_config, z.astype(jnp.dtype(self.vae_config.dtype)))
        return _postprocess(images, output_type)


@functools.partial(jax.jit, static_argnames=("config", "cfg_on", "hooks_fn", "on_step", "geometry"))
def _sd3_sample(params, latents, embeds, pooled, guidance_scale, sigmas, timesteps, hooks, controller, *, config,
                cfg_on, hooks_fn, on_step, geometry):
    """The SD3 denoising loop as one program; with CFG the batch is [negative; positive] (a controller
    sees and steers both halves)."""
    from jaxdit import sd3

    def velocity(x, t, i, step_hooks, aux):
        x_in = jnp.concatenate([x, x]) if cfg_on else x
        v, caps = sd3.forward(params, config, x_in, embeds, pooled, jnp.full((x_in.shape[0],), t), step_hooks)
        if cfg_on:
            uncond, cond = jnp.split(v, 2)
            v = sampling.cfg_combine(uncond, cond, guidance_scale)
        return v, caps, aux

    return sampling.controlled_euler(velocity, latents, sigmas, timesteps, hooks_fn if hooks_fn is not None else hooks,
                                     controller, geometry, controller_batch=latents.shape[0] * (2 if cfg_on else 1),
                                     on_step=on_step)[0]


PIPELINES = {"FluxPipeline": FluxPipeline, "FluxKontextPipeline": FluxKontextPipeline,
             "StableDiffusion3Pipeline": SD3Pipeline}


def load_pipeline(path, dtype: str | None = None, mesh=None, editing: bool = False):
    """The pipeline class named by the folder's model_index.json, loaded. `editing` requires Kontext."""
    root = Path(path)
    name = _read_model_index(root).get("_class_name")
    if name not in PIPELINES:
        raise CheckpointError(f"{root / 'model_index.json'}: pipeline {name!r} is not supported "
                              f"(supported: {sorted(PIPELINES)})")
    cls = PIPELINES[name]
    if editing and cls is not FluxKontextPipeline:
        raise ValueError(f"{root}: editing needs a FLUX.1 Kontext pipeline, this folder holds a {name}")
    if not editing and cls is FluxKontextPipeline:
        raise ValueError(f"{root}: this folder holds a FLUX.1 Kontext pipeline, which edits an input image; "
                         f"use `jaxdit edit --image IN` (or FluxKontextPipeline in Python)")
    return cls.from_pretrained(root, dtype=dtype, mesh=mesh)


def save_png(image, path) -> Path:
    """Write a PIL image as PNG atomically (temporary file, then rename)."""
    from jaxdit.convert.checkpoint import atomic_file

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: output must be a .png file")
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path


_CAPTURE_SINKS: dict[int, tuple[set | None, dict]] = {}
_CAPTURE_COUNTER = itertools.count()


def _capture_to_host(caps, step, sink):
    wanted, kept = _CAPTURE_SINKS[int(sink)]
    if wanted is None or int(step) in wanted:
        kept[int(step)] = {k: np.asarray(v) for k, v in caps.items()}


@struct.dataclass
class _Recorder:
    """Controller bringing each step's captures to the host. `sink` (a traced int) names the dict they go
    to, so one compiled loop serves every capture_run call with the same shapes."""

    sink: jax.Array
    capture: tuple[str, ...] = struct.field(pytree_node=False, default=())

    def init(self, batch, geometry):
        return jnp.zeros((), jnp.int32)

    def hooks(self, state, step, t, geometry):
        return hk.Hooks(capture=self.capture)

    def update(self, state, captures, step, t, geometry):
        jax.debug.callback(_capture_to_host, dict(captures), step, self.sink, ordered=True)
        return state


def capture_run(pipe, *args, capture: Sequence[str], steps: Sequence[int] | None = None, **kwargs):
    """Run a pipeline once and bring the captured positions of the chosen steps to the host.

    Returns (pipeline output, {step: {position: numpy array}}). Captures travel out of the compiled loop
    through a host callback, so memory holds one step's captures at a time on the device.
    """
    token = next(_CAPTURE_COUNTER)
    kept: dict[int, dict[str, np.ndarray]] = {}
    _CAPTURE_SINKS[token] = (None if steps is None else {int(s) for s in steps}, kept)
    try:
        out = pipe(*args, controller=_Recorder(jnp.int32(token), tuple(capture)), **kwargs)
        jax.effects_barrier()
    finally:
        del _CAPTURE_SINKS[token]
    return out, kept
