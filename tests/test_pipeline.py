"""Whole pipelines against diffusers on complete tiny folders, with the same initial noise."""

import numpy as np
import pytest
import torch

from jaxdit import hooks as hk
from jaxdit.pipeline import FluxKontextPipeline, FluxPipeline
from pipeline_twins import flux_pipeline_folder, packed_noise, sd3_pipeline_folder
from twins import rel_err

PROMPTS = ["a photo of a cat sitting on a red chair", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_pipe") / "pipe"
    return path, flux_pipeline_folder(path, guidance=True)


def _torch_run(pipe, latents, **kw):
    with torch.no_grad():
        return pipe(latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(0), **kw).images


def test_flux_pipeline_matches_diffusers(flux_dev):
    path, ref_pipe = flux_dev
    height, width, steps = 32, 48, 4
    latents = packed_noise(2, 4, height // 2, width // 2)
    kw = dict(prompt=PROMPTS, height=height, width=width, num_inference_steps=steps, guidance_scale=3.5,
              max_sequence_length=12)
    ref_latents = _torch_run(ref_pipe, latents, output_type="latent", **kw).numpy()
    ref_images = _torch_run(ref_pipe, latents, output_type="np", **kw)

    pipe = FluxPipeline.from_pretrained(path)
    ours = pipe(**kw, latents=latents, output_type="latent", progress=False)
    assert rel_err(ours, ref_latents) <= 1e-4
    images = pipe(**kw, latents=latents, output_type="np", progress=False)
    assert images.shape == ref_images.shape == (2, height, width, 3)
    assert np.abs(images - ref_images).max() <= 1e-4


def test_flux_pipeline_seeded_noise_and_pil(flux_dev):
    path, _ = flux_dev
    pipe = FluxPipeline.from_pretrained(path)
    a = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=2, seed=3, max_sequence_length=8)
    b = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=2, seed=3, max_sequence_length=8)
    c = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=2, seed=4, max_sequence_length=8)
    assert a[0].size == (32, 32) and a[0].mode == "RGB"
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(PROMPTS[0], height=30, width=32, num_inference_steps=2)


def test_hooks_see_every_step(flux_dev):
    path, _ = flux_dev
    pipe = FluxPipeline.from_pretrained(path)
    steps_seen = []
    import jax

    def record(params, x, ctx):
        jax.debug.callback(lambda s: steps_seen.append(int(s)), ctx.step, ordered=True)
        return x

    hooks = hk.Hooks(edits=(hk.Edit("double.0.img.resid_post", record),))
    pipe(PROMPTS[0], height=32, width=32, num_inference_steps=3, max_sequence_length=8, hooks=hooks,
         output_type="latent", progress=False)
    jax.effects_barrier()
    assert steps_seen == [0, 1, 2]


def test_kontext_pipeline_matches_diffusers(tmp_path):
    from PIL import Image

    path = tmp_path / "kontext"
    ref_pipe = flux_pipeline_folder(path, guidance=True, seed=5, kontext=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    height, width = 24, 40
    latents = packed_noise(1, 4, height // 2, width // 2, seed=1)
    kw = dict(prompt=PROMPTS[1], height=height, width=width, num_inference_steps=3, guidance_scale=2.5,
              max_sequence_length=10, max_area=height * width)
    with torch.no_grad():
        ref = ref_pipe(image=image, latents=torch.from_numpy(latents), output_type="latent", _auto_resize=False,
                       **kw).images.numpy()
    pipe = FluxKontextPipeline.from_pretrained(path)
    ours = pipe(image, **kw, latents=latents, auto_resize=False, output_type="latent", progress=False)
    assert rel_err(ours, ref) <= 1e-4


def test_cli_generate_and_edit(flux_dev, tmp_path, capsys):
    from PIL import Image

    from jaxdit.cli import main

    path, _ = flux_dev
    out = tmp_path / "img.png"
    args = ["--model", str(path), "--prompt", "a cat", "--steps", "2", "--size", "48x32",
            "--max-sequence-length", "8"]
    assert main(["generate", *args, "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (48, 32) and im.format == "PNG"
    # errors: wrong path, missing component, bad size, editing with a non-Kontext pipeline
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["generate", *args[:-4], "--size", "30x32", "--out", str(tmp_path / "b.png")]) == 2
    assert "multiples of 4" in capsys.readouterr().err and not (tmp_path / "b.png").exists()
    assert main(["edit", *args, "--image", str(out), "--out", str(tmp_path / "e.png")]) == 2
    assert "Kontext" in capsys.readouterr().err
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(path, broken)
    shutil.rmtree(broken / "vae")
    assert main(["generate", "--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "c.png")]) == 2
    assert "vae/" in capsys.readouterr().err


def test_cli_edit_with_kontext(tmp_path):
    from PIL import Image

    from jaxdit.cli import main

    path = tmp_path / "kontext"
    flux_pipeline_folder(path, guidance=True, seed=6, kontext=True)
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "edited.png"
    assert main(["edit", "--model", str(path), "--image", str(src), "--prompt", "make it blue", "--out", str(out),
                 "--steps", "2", "--size", "32", "--no-auto-resize", "--max-sequence-length", "8"]) == 0
    with Image.open(out) as im:
        assert im.size == (32, 32)
    # generate on a Kontext folder: one clear line pointing to `edit`, no output written
    assert main(["generate", "--model", str(path), "--prompt", "a cat", "--out", str(tmp_path / "g.png")]) == 2
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "vae", "pipeline"])
def test_parity_cli_covers_every_component(flux_dev, component, capsys):
    import json

    from jaxdit.cli import main

    path, _ = flux_dev
    assert main(["parity", "--model", str(path), "--component", component, "--height", "32", "--width", "32",
                 "--text-tokens", "12", "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["rows"]) >= 1 and all(r["rel"] <= 1e-4 for r in report["rows"]), report["rows"]


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_pipeline_matches_diffusers(tmp_path, with_t5):
    from jaxdit.pipeline import SD3Pipeline

    path = tmp_path / "sd3"
    ref_pipe = sd3_pipeline_folder(path, seed=2, with_t5=with_t5)
    height, width = 32, 48  # latent 16x24 (VAE factor 2), patch 2
    latents = np.random.default_rng(3).standard_normal((2, 4, 16, 24)).astype(np.float32)
    kw = dict(prompt=PROMPTS, height=height, width=width, num_inference_steps=3, guidance_scale=4.5,
              max_sequence_length=10)
    with torch.no_grad():
        ref = ref_pipe(latents=torch.from_numpy(latents), output_type="latent", **kw).images.numpy()
        ref_images = ref_pipe(latents=torch.from_numpy(latents), output_type="np", **kw).images
    pipe = SD3Pipeline.from_pretrained(path)
    ours = pipe(**kw, latents=latents, output_type="latent", progress=False)
    assert rel_err(ours, ref) <= 1e-4
    images = pipe(**kw, latents=latents, output_type="np", progress=False)
    assert np.abs(images - ref_images).max() <= 1e-4


def test_pipeline_with_a_converted_transformer(flux_dev, tmp_path):
    """A pipeline folder whose transformer/ is a jaxdit checkpoint (jaxdit convert) gives the same result."""
    import shutil

    from jaxdit.convert import convert

    path, _ = flux_dev
    converted = tmp_path / "converted"
    shutil.copytree(path, converted, ignore=shutil.ignore_patterns("transformer"))
    convert(path / "transformer", converted / "transformer")
    latents = packed_noise(1, 4, 16, 16, seed=9)
    kw = dict(prompt=PROMPTS[0], height=32, width=32, num_inference_steps=2, max_sequence_length=8,
              latents=latents, output_type="latent", progress=False)
    a = FluxPipeline.from_pretrained(path)(**kw)
    b = FluxPipeline.from_pretrained(converted)(**kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
