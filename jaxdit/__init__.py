"""jaxdit: FLUX.1 and SD3.x diffusion transformers in JAX, with UVR and SafeDIG safety.

The package root is a facade over every layer: `jaxdit.load_transformer` is `jaxdit.convert.load_transformer`,
imported when called. Nothing inside the package imports names from here."""

__version__ = "0.1.0"


def load_transformer(path, mesh=None, dtype=None, config=None):
    """(config, params) from a jaxdit checkpoint, a diffusers folder, or an original single file
    (`jaxdit.convert.load_transformer`)."""
    from jaxdit.convert.loader import load_transformer as _load

    return _load(path, mesh=mesh, dtype=dtype, config=config)
