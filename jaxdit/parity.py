"""Numerical parity of jaxdit models against their PyTorch (diffusers) twins, block by block.

`run_parity` builds the PyTorch model (random weights from a preset, or a real checkpoint folder),
converts it with jaxdit's own loader, runs both on the same random inputs, and compares every block's
outputs (captured through jaxdit hooks and torch forward hooks) and the final prediction.
Needs torch and diffusers (`pip install jaxdit[parity]`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Row:
    name: str
    max_abs: float
    rel: float  # max |jax - torch| / max |torch|
    torch_rel: float | None = None  # torch at the same dtype vs torch float32 (bf16 runs)


@dataclasses.dataclass
class ParityReport:
    model: str
    dtype: str
    rows: list[Row]
    seconds: dict[str, float]

    @property
    def output(self) -> Row:
        return self.rows[-1]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "seconds": self.seconds,
                "rows": [dataclasses.asdict(r) for r in self.rows], "output_rel": self.output.rel}

    def table(self) -> str:
        head = f"{'position':<34} {'max abs err':>12} {'rel err':>10}"
        if any(r.torch_rel is not None for r in self.rows):
            head += f" {'torch ' + self.dtype + ' rel':>18}"
        lines = [f"parity of {self.model} at {self.dtype} (rel = max|jax - torch| / max|torch fp32|)", head,
                 "-" * len(head)]
        for r in self.rows:
            line = f"{r.name:<34} {r.max_abs:>12.3e} {r.rel:>10.3e}"
            if r.torch_rel is not None:
                line += f" {r.torch_rel:>18.3e}"
            lines.append(line)
        return "\n".join(lines)


def _compare(name, ours, ref, torch_same_dtype=None) -> Row:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = np.abs(ours - ref)
    scale = max(np.abs(ref).max(), 1e-30)
    torch_rel = None
    if torch_same_dtype is not None:
        torch_rel = float(np.abs(np.asarray(torch_same_dtype, np.float64) - ref).max() / scale)
    return Row(name, float(err.max()), float(err.max() / scale), torch_rel)


def randomize_weights(model, seed: int = 0):
    """Seeded random weights for every parameter (no zero-initialised layer can hide a bug)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return model


def flux_inputs(config, batch, height, width, text_tokens, kontext, seed):
    from jaxdit import flux

    grid_h, grid_w = height // 16, width // 16
    rng = np.random.default_rng(seed)
    ids = flux.image_ids(grid_h, grid_w)
    n_ctx = 0
    if kontext:
        ids = np.concatenate([ids, flux.image_ids(grid_h, grid_w, index=1)])
        n_ctx = grid_h * grid_w
    inputs = dict(
        hidden_states=rng.standard_normal((batch, len(ids), config.in_channels), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_tokens, config.joint_attention_dim), np.float32),
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim), np.float32),
        timestep=np.linspace(1.0, 0.3, batch).astype(np.float32),
        img_ids=ids,
        txt_ids=flux.text_ids(text_tokens),
        guidance=np.full((batch,), 3.5, np.float32) if config.guidance_embeds else None,
    )
    return inputs, n_ctx


def sd3_inputs(config, batch, height, width, text_tokens, seed):
    """Random SD3 inputs: latents [B, C, H/8, W/8], sigma * 1000 timesteps as the pipeline passes them."""
    rng = np.random.default_rng(seed)
    return dict(
        hidden_states=rng.standard_normal((batch, config.in_channels, height // 8, width // 8), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_tokens, config.joint_attention_dim), np.float32),
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim), np.float32),
        timestep=np.linspace(1000.0, 300.0, batch).astype(np.float32),
    ), 0


@dataclasses.dataclass(frozen=True)
class _Family:
    """What parity needs to know of a model family."""

    torch_class: str  # diffusers class name
    blocks: Any  # torch model -> [(position prefix, block module)]
    inputs: Any  # (config, batch, height, width, text_tokens, kontext, seed) -> (inputs, n_ctx)
    default_text_tokens: int
    capture: tuple[str, ...]
    forward: Any  # (params, config, inputs, hooks, n_ctx) -> (out, captures)


def _families():
    from jaxdit import flux, sd3

    return {
        "flux": _Family(
            "FluxTransformer2DModel",
            lambda m: [(f"double.{i}", b) for i, b in enumerate(m.transformer_blocks)]
            + [(f"single.{i}", b) for i, b in enumerate(m.single_transformer_blocks)],
            flux_inputs, 512,
            tuple(f"{s}.*.{st}.resid_post" for s in ("double", "single") for st in ("img", "txt")),
            lambda p, c, x, h, n: flux.forward(p, c, **x, hooks=h, num_context_tokens=n)),
        "sd3": _Family(
            "SD3Transformer2DModel",
            lambda m: [(f"joint.{i}", b) for i, b in enumerate(m.transformer_blocks)],
            lambda c, b, h, w, t, kontext, seed: sd3_inputs(c, b, h, w, t, seed), 333,
            ("joint.*.img.resid_post", "joint.*.txt.resid_post"),
            lambda p, c, x, h, n: sd3.forward(p, c, **x, hooks=h)),
    }


def run_parity(preset: str | None = None, model_dir: str | None = None, dtype: str = "float32", batch: int = 1,
               height: int | None = None, width: int | None = None, text_tokens: int | None = None,
               kontext: bool = False, seed: int = 0) -> ParityReport:
    import diffusers
    import jax
    import torch
    from diffusers.utils import logging as diffusers_logging

    from jaxdit import hooks as hk, load_transformer
    from jaxdit.configs import get_config

    diffusers_logging.set_verbosity_error()
    if (preset is None) == (model_dir is None):
        raise ValueError("give exactly one of --preset or --model")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r}: expected float32 or bfloat16")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is not None:
            path = Path(model_dir)
            if (path / "model_index.json").is_file():
                path = path / "transformer"
            t0 = time.perf_counter()
            config, params = load_transformer(path, dtype=None if dtype == "float32" else dtype)
            seconds["convert"] = time.perf_counter() - t0
            fam = _families()[config.family]
            torch_model = getattr(diffusers, fam.torch_class).from_pretrained(
                path, torch_dtype=torch.float32, use_safetensors=True, local_files_only=True)
            name = str(model_dir)
        else:
            config = get_config(preset)
            fam = _families()[config.family]
            torch_model = randomize_weights(getattr(diffusers, fam.torch_class)(**config.to_diffusers()), seed)
            path = Path(tmp) / "transformer"
            torch_model.save_pretrained(path)
            name = f"{preset} (random weights)"
            t0 = time.perf_counter()
            config, params = load_transformer(path, dtype=None if dtype == "float32" else dtype)
            seconds["convert"] = time.perf_counter() - t0
        torch_model.eval()
    if kontext and config.family != "flux":
        raise ValueError("--kontext applies to FLUX models only")
    config = config.replace(dtype=dtype)
    tiny = config.inner_dim < 512
    height = height or (64 if tiny else 1024)
    width = width or (96 if tiny else 1024)
    if height % 16 or width % 16:
        raise ValueError(f"--height/--width must be multiples of 16 (8x VAE, 2x2 patches), got {height}x{width}")
    text_tokens = text_tokens or (8 if tiny else fam.default_text_tokens)
    inputs, n_ctx = fam.inputs(config, batch, height, width, text_tokens, kontext, seed)
    blocks = fam.blocks(torch_model)

    # torch: float32 reference (and the same dtype as ours, for comparison) with per-block outputs
    # (diffusers blocks return (encoder_hidden_states, hidden_states); SD3's last block has no text output).
    def torch_run(dt):
        seen = {}
        handles = [b.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(
            n, tuple(None if o is None else o.float().numpy() for o in (out[1], out[0])))) for n, b in blocks]
        model = torch_model.to(dt)
        args = {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        args = {k: v if v is None or k.endswith("_ids") else v.to(dt) for k, v in args.items()}
        try:
            start = time.perf_counter()
            with torch.no_grad():
                out = model(**args, return_dict=False)[0].float().numpy()
            seconds[f"torch_{dt}".replace("torch.", "")] = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
        return out, seen

    ref, ref_blocks = torch_run(torch.float32)
    same = same_blocks = None
    if dtype != "float32":
        same, same_blocks = torch_run(tdtype)
    torch_model.to(torch.float32)

    fn = jax.jit(lambda p, x: fam.forward(p, config, x, hk.Hooks(capture=fam.capture), n_ctx))
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        start = time.perf_counter()
        out, caps = jax.block_until_ready(fn(params, inputs))
        seconds["jax_compile_and_run"] = time.perf_counter() - start

    rows = []
    for n, _ in blocks:
        for i, stream in enumerate(("img", "txt")):
            if ref_blocks[n][i] is None:
                continue
            rows.append(_compare(f"{n}.{stream}.resid_post", np.asarray(caps[f"{n}.{stream}.resid_post"], np.float32),
                                 ref_blocks[n][i], None if same_blocks is None else same_blocks[n][i]))
    rows.append(_compare("output", np.asarray(out, np.float32), ref, same))
    return ParityReport(name, dtype, rows, seconds)


def write_json(report: ParityReport, path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2))


# --- the other components of a pipeline folder --------------------------------------------------------

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "pipeline")


def run_component_parity(model_dir: str, component: str, height: int | None = None, width: int | None = None,
                         text_tokens: int | None = None, steps: int = 4, seed: int = 0) -> ParityReport:
    """float32 parity of one component of a diffusers pipeline folder (real or tiny weights).

    text encoders: every hidden state, the pooled/projected output; vae: encode moments and decode;
    pipeline: final latents and decoded images after `steps` steps from the same initial noise.
    """
    import jax

    root = Path(model_dir)
    if component not in COMPONENTS[1:]:
        raise ValueError(f"--component {component!r}: expected one of {COMPONENTS}")
    if component != "pipeline" and not (root / component).is_dir():
        raise ValueError(f"{root}: no {component}/ folder")
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with jax.default_matmul_precision("highest"):
        if component.startswith("text_encoder"):
            rows = _text_encoder_rows(root / component, rng, text_tokens)
        elif component == "vae":
            rows = _vae_rows(root / "vae", rng, height or 64, width or 64)
        else:
            rows = _pipeline_rows(root, rng, height, width, steps, seed)
    return ParityReport(f"{root} {component}", "float32", rows, {"total": time.perf_counter() - start})


def _text_encoder_rows(folder: Path, rng, text_tokens):
    import torch
    import transformers

    from jaxdit import text
    from jaxdit.convert import load_text_encoder

    config, params = load_text_encoder(folder)
    arch = json.loads((folder / "config.json").read_text()).get("architectures", ["?"])[0]
    model = getattr(transformers, arch).from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    if isinstance(config, text.ClipTextConfig):
        n = min(text_tokens or config.max_position_embeddings, config.max_position_embeddings)
        ids = rng.integers(1, config.vocab_size - 1, (2, n))
        ids[:, n // 2] = config.eos_token_id if config.eos_token_id != 2 else config.vocab_size - 1
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), output_hidden_states=True)
        out = text.clip.forward(params, config, ids)
        rows = [_compare(f"hidden_states[{i}]", out.hidden_states[i], h.numpy())
                for i, h in enumerate(ref.hidden_states)]
        rows.append(_compare("last_hidden_state", out.last_hidden_state, ref.last_hidden_state.numpy()))
        if out.text_embeds is not None:
            rows.append(_compare("text_embeds", out.text_embeds, ref.text_embeds.numpy()))
        else:
            rows.append(_compare("pooler_output", out.pooler_output, ref.pooler_output.numpy()))
        return rows
    ids = rng.integers(0, config.vocab_size, (2, text_tokens or 64))
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(ids)) if hasattr(model, "encoder") else model(torch.from_numpy(ids))
    return [_compare("last_hidden_state", text.t5.forward(params, config, ids), ref.last_hidden_state.numpy())]


def _vae_rows(folder: Path, rng, height: int, width: int):
    import torch
    from diffusers import AutoencoderKL

    from jaxdit import vae
    from jaxdit.convert import read_vae_folder

    config, params = read_vae_folder(folder)
    model = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    images = rng.uniform(-1, 1, (1, config.in_channels, height, width)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(dist.mean).sample.numpy()
    mean, logvar = vae.encode(params, config, images)
    return [_compare("encode.mean", mean, dist.mean.numpy()), _compare("encode.logvar", logvar, dist.logvar.numpy()),
            _compare("decode", vae.decode(params, config, dist.mean.numpy()), decoded)]


def _pipeline_rows(root: Path, rng, height, width, steps: int, seed: int):
    import diffusers
    import torch

    from jaxdit import flux
    from jaxdit.pipeline import load_pipeline

    ours = load_pipeline(root)
    name = json.loads((root / "model_index.json").read_text())["_class_name"]
    ref = getattr(diffusers, name).from_pretrained(root, local_files_only=True, use_safetensors=True)
    f = ours.vae_scale_factor
    height, width = height or 16 * f, width or 16 * f
    prompt = "a red star at the top left and a blue ring"
    packed = ours.transformer_config.family == "flux"  # FLUX packs 2x2 patches outside the model
    channels = ours.transformer_config.in_channels // (4 if packed else 1)
    noise = rng.standard_normal((1, channels, height // f, width // f)).astype(np.float32)
    latents = np.asarray(flux.pack_latents(noise)) if packed else noise
    kw = dict(height=height, width=width, num_inference_steps=steps)
    with torch.no_grad():
        ref_latents = ref(prompt=prompt, latents=torch.from_numpy(latents), output_type="latent", **kw).images.numpy()
        ref_images = ref(prompt=prompt, latents=torch.from_numpy(latents), output_type="np", **kw).images
    got_latents = ours(prompt, latents=latents, output_type="latent", progress=False, **kw)
    got_images = ours(prompt, latents=latents, output_type="np", progress=False, **kw)
    return [_compare("final latents", got_latents, ref_latents), _compare("images", got_images, ref_images)]
