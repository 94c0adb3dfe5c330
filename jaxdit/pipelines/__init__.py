"""Text-to-image and editing pipelines over the JAX parts: FLUX.1, FLUX.1 Kontext, SD3 / SD3.5.

    pipe = FluxPipeline.from_pretrained("FLUX.1-dev/")          # diffusers layout (model_index.json)
    images = pipe("a red star", height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5, seed=0)

diffusers spellings are understood where they have a JAX meaning: `from_pretrained(..., torch_dtype=...)`
is `dtype`, `generator=` is an int seed or a `jax.random` key (a torch.Generator is refused, naming
`seed`), and the returned list of images also answers `.images`.

Each pipeline mirrors its diffusers counterpart step for step (prompt encoding, latent packing and ids,
schedule, guidance, decoding), so with the same initial noise the results agree with diffusers. The
denoising loop is one compiled program (`jaxdit.pipelines.loops`); `hooks` (a `jaxdit.hooks.Hooks`,
or a function step -> Hooks) reach the transformer at every step with `Hooks.step` set to the step index;
a `controller` (e.g. `jaxdit.safety.uvr.regulate.UVRController`) carries state across steps.

One idea a module: `folders` (model_index.json, component folders, scheduler config, the components
loaded through `jaxdit.convert`), `images` (PIL / numpy outputs, PNG files), `inputs` (prompt lists, noise
keys), `progress` (the denoising bar), `flux` (FLUX.1 and Kontext), `sd3` (SD3 / SD3.5), `loops` (the
compiled denoising programs), `capture` (captures brought to the host). `load_pipeline` picks the class
a folder names.
"""

from __future__ import annotations

from pathlib import Path

from jaxdit.hooks import Geometry  # noqa: F401  (kept importable from here; it lives with the hook contract)
from jaxdit.io import CheckpointError
from jaxdit.pipelines.capture import capture_run  # noqa: F401
from jaxdit.pipelines.flux import PREFERRED_KONTEXT_RESOLUTIONS, FluxKontextPipeline, FluxPipeline  # noqa: F401
from jaxdit.pipelines.folders import (load_text_encoder, load_transformer, load_vae,  # noqa: F401
                                      read_model_index)
from jaxdit.pipelines.images import Images, save_png, to_pil  # noqa: F401
from jaxdit.pipelines.sd3 import SD3Pipeline
from jaxdit.sampling import HooksArg  # noqa: F401
from jaxdit.text import load_tokenizer  # noqa: F401


PIPELINES = {"FluxPipeline": FluxPipeline, "FluxKontextPipeline": FluxKontextPipeline,
             "StableDiffusion3Pipeline": SD3Pipeline}


def load_pipeline(path, dtype: str | None = None, mesh=None, editing: bool = False):
    """The pipeline class named by the folder's model_index.json, loaded. `editing` requires Kontext."""
    root = Path(path)
    name = read_model_index(root).get("_class_name")
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
