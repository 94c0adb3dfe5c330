"""diffusers pipeline folders: `model_index.json`, the component folders, the scheduler config, and the
components loaded through `jaxdit.convert` (transformer, text encoders, VAE)."""

from __future__ import annotations

import json
from pathlib import Path

from jaxdit import sampling
from jaxdit.configs import check_field_types
from jaxdit.convert import load_text_encoder, load_transformer, load_vae  # noqa: F401
from jaxdit.io import CheckpointError


def component(root: Path, name: str, required: bool = True) -> Path | None:
    path = root / name
    if not path.is_dir():
        if required:
            raise CheckpointError(f"{root}: pipeline folder is missing its {name}/ component")
        return None
    return path


def read_model_index(root: Path) -> dict:
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


def load_components(path, family: str, dtype, mesh):
    """(root, component folders, transformer config, transformer params) of a pipeline folder."""
    root = Path(path)
    read_model_index(root)
    parts = {n: component(root, n) for n in ("transformer", "text_encoder", "text_encoder_2", "tokenizer",
                                              "tokenizer_2", "vae")}
    tcfg, tparams = load_transformer(parts["transformer"], mesh=mesh, dtype=dtype)
    if tcfg.family != family:
        raise CheckpointError(f"{parts['transformer']}: a {tcfg.family} transformer, not {family}")
    return root, parts, tcfg, tparams


def scheduler_config(root: Path, default: sampling.SchedulerConfig) -> sampling.SchedulerConfig:
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return default
    try:
        raw = json.loads(f.read_text())
        check_field_types(sampling.SchedulerConfig, {k: v for k, v in raw.items() if v is not None})
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    return sampling.SchedulerConfig.from_diffusers(raw, str(f))


def dtype_name(dtype: str | None, torch_dtype) -> str | None:
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
