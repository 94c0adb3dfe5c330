"""PyTorch checkpoints (safetensors only) -> jaxdit parameter trees -> orbax checkpoints, and the loading
of every model component: transformer, VAE, text encoders."""

from jaxdit.convert.loader import convert, load_transformer, load_vae, read_vae_folder  # noqa: F401
from jaxdit.convert.text_encoders import load_text_encoder, read_text_encoder  # noqa: F401
from jaxdit.io import CheckpointError, UnsafeFormatError  # noqa: F401
