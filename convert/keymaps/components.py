"""The other components of a pipeline stored beside the transformer in all-in-one single files.

SAI's SD3 / SD3.5 files and all-in-one FLUX.1 files keep the transformer under `model.diffusion_model.`
(or unprefixed) and the rest of the pipeline under prefixes of their own: the autoencoder in the LDM
layout under `first_stage_model.` (diffusers also reads `vae.`), the text encoders in the transformers
layout under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`, and, in older files, under
`cond_stage_model.` / `conditioner.`. No transformer tensor name starts with one of these.
"""

from __future__ import annotations

from collections import Counter

# Most specific first: a tensor is counted under the first prefix it starts with.
PREFIXES = ("first_stage_model.", "vae.", "text_encoders.clip_l.", "text_encoders.clip_g.",
            "text_encoders.t5xxl.", "text_encoders.", "cond_stage_model.", "conditioner.")


def component_of(key: str) -> str | None:
    """The other-component prefix `key` lies under, or None for a transformer tensor."""
    return next((p for p in PREFIXES if key.startswith(p)), None)


def other_components(keys) -> Counter:
    """prefix -> how many of `keys` lie under it, in the order first seen."""
    return Counter(p for p in map(component_of, keys) if p is not None)


def describe(counts: Counter) -> str:
    """`first_stage_model.* (244), text_encoders.t5xxl.* (170)`: for the one line naming what was skipped."""
    return ", ".join(f"{prefix}* ({n})" for prefix, n in counts.items())
