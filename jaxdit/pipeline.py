"""The pipelines' public names, importable from here as before: they live in `jaxdit.pipelines`.

    from jaxdit.pipeline import FluxPipeline, FluxKontextPipeline, SD3Pipeline, load_pipeline, save_png
"""

from jaxdit.pipelines import (PIPELINES, PREFERRED_KONTEXT_RESOLUTIONS, FluxKontextPipeline,  # noqa: F401
                              FluxPipeline, Geometry, HooksArg, Images, SD3Pipeline, capture_run, load_pipeline,
                              save_png, to_pil)
from jaxdit.pipelines.loops import flux_sample as _flux_sample, sd3_sample as _sd3_sample  # noqa: F401
