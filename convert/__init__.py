"""PyTorch checkpoints (safetensors only) -> jaxdit parameter trees -> orbax checkpoints."""

from jaxdit.convert.loader import convert, load_transformer, load_vae  # noqa: F401
from jaxdit.io import CheckpointError, UnsafeFormatError  # noqa: F401
