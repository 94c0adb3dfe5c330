"""The safetensors reader and the checkpoint errors, kept importable from here: they live in `jaxdit.io`."""

from jaxdit.io import (PICKLE_SUFFIXES, CheckpointError, SafetensorsFile, TensorSource,  # noqa: F401
                       UnsafeFormatError, refuse_pickle)
