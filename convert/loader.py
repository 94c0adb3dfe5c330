"""`load_transformer` and `convert`: any supported checkpoint form -> (config, params).

Accepted forms:
- a jaxdit checkpoint directory (written by `convert` / `jaxdit convert`);
- a diffusers model folder: `config.json` + one `.safetensors` file or a sharded `*.safetensors.index.json`,
  or a pipeline folder with `model_index.json` (its `transformer/` is used);
- an original single-file checkpoint (`.safetensors`), family and config read off its tensors; the
  other components of an all-in-one file (VAE, text encoders) are set aside, with one warning naming them.
`load_vae` reads the autoencoder of such a file (or BFL's `ae.safetensors`, or a diffusers folder).
Pickle-based files (.bin/.pt/.ckpt) are refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.convert import checkpoint as ckpt
from jaxdit.convert.keymaps import components
from jaxdit.io import CheckpointError, TensorSource, refuse_pickle
from jaxdit.convert.tree import fill_params


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    diffusers_class: str
    config_from_diffusers: Callable[[dict], Any]
    abstract_params: Callable[[Any], Any]
    logical_axes: Callable[[Any], Any]  # config -> the logical axes its parameters declare
    stacks: Callable[[Any], dict[str, int]]
    is_original: Callable[[list[str]], bool]
    rename_original: Callable | None  # None when `original_renamer` is set
    infer_original_config: Callable
    # Renames that depend on the architecture (SD3: mixed blocks stored as segments, the last block's
    # modulation swap in original files): config -> rename, used instead of the identity (diffusers
    # folders) and `rename_original` (original files).
    diffusers_renamer: Callable[[Any], Callable] | None = None
    original_renamer: Callable[[Any], Callable] | None = None


def families() -> dict[str, Family]:
    from jaxdit import flux, sd3
    from jaxdit.configs import FluxConfig, SD3Config
    from jaxdit.convert.keymaps import flux as flux_keys
    from jaxdit.convert.keymaps import sd3 as sd3_keys

    return {
        "flux": Family(
            "flux", flux_keys.DIFFUSERS_CLASS, FluxConfig.from_diffusers, flux.abstract_params, flux.logical_axes,
            lambda c: {"transformer_blocks": c.num_layers, "single_transformer_blocks": c.num_single_layers},
            flux_keys.is_original, flux_keys.rename_original, flux_keys.infer_original_config),
        "sd3": Family(
            "sd3", sd3_keys.DIFFUSERS_CLASS, SD3Config.from_diffusers, sd3.abstract_params, sd3.logical_axes,
            sd3.stacks, sd3_keys.is_original, None, sd3_keys.infer_original_config,
            diffusers_renamer=sd3_keys.diffusers_renamer, original_renamer=sd3_keys.original_renamer),
    }


def _family_for_class(cls_name: str, where) -> Family:
    for fam in families().values():
        if fam.diffusers_class == cls_name:
            return fam
    known = [f.diffusers_class for f in families().values()]
    raise CheckpointError(f"{where}: model class {cls_name!r} is not supported (supported: {known})")


class KeySubset:
    """A tensor source seen through some of its keys (an all-in-one file's transformer or VAE tensors)."""

    def __init__(self, source, keys):
        self.source, self._keys, self.path = source, list(keys), source.path

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str):
        return self.source.shape(key)

    def get(self, key: str):
        return self.source.get(key)

    def file_of(self, key: str):
        return self.source.file_of(key)


def transformer_tensors(source):
    """`source` without the tensors of the other components an all-in-one file stores beside the
    transformer (`keymaps.components`), with one warning naming each skipped prefix and its count."""
    skipped = components.other_components(source.keys())
    if not skipped:
        return source
    warnings.warn(f"{source.path}: skipped {sum(skipped.values())} tensors of other components "
                  f"({components.describe(skipped)}); only the transformer is read")
    return KeySubset(source, [k for k in source.keys() if components.component_of(k) is None])


def _check_family(config, fam: Family, where) -> None:
    # A config of the other family would fail later on the first tensor, with a less useful message.
    if config is not None and getattr(config, "family", None) != fam.name:
        raise CheckpointError(f"{where}: holds a transformer of family {fam.name!r}, but the config given is "
                              f"a {type(config).__name__}")


def _progress(desc: str, total: int):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silent in logs and CI.
    return lambda it: tqdm(it, desc=desc, total=total, unit="tensor", leave=False, disable=None)


def read_torch_checkpoint(path, dtype=None, config=None, allow_nonfinite: bool = True):
    """(config, numpy params) from a diffusers folder or an original single file; NaN / inf weights warn
    (`allow_nonfinite`) or are refused (see `convert.tree.fill_params`)."""
    path = Path(path)
    refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "model_index.json").is_file():
        if not (path / "transformer").is_dir():
            raise CheckpointError(f"{path}: pipeline folder without a transformer/ component")
        path = path / "transformer"
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: a diffusers model folder needs config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        fam = _family_for_class(raw.get("_class_name", "?"), cfg_file)
        _check_family(config, fam, path)
        try:
            config = config or fam.config_from_diffusers(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
        source = TensorSource(path)
        rename = fam.diffusers_renamer(config) if fam.diffusers_renamer else (lambda k, t: [(k, t)])
    else:
        source = TensorSource(path)
        fam = next((f for f in families().values() if f.is_original(source.keys())), None)
        if fam is None:
            raise CheckpointError(f"{path}: not a recognised original checkpoint "
                                  f"(first keys: {sorted(source.keys())[:5]})")
        _check_family(config, fam, path)
        source = transformer_tensors(source)
        config = config or fam.infer_original_config(source)
        rename = fam.original_renamer(config) if fam.original_renamer else fam.rename_original
    params = fill_params(source, fam.abstract_params(config), fam.stacks(config), rename,
                         dtype=None if dtype is None else jnp.dtype(dtype),
                         progress=_progress(f"reading {path.name}", len(source.keys())),
                         allow_nonfinite=allow_nonfinite)
    return config, params


def config_from_file(path):
    """A transformer config from a JSON file: a diffusers config.json (`_class_name`) or a jaxdit one
    (`family`, as jaxdit checkpoints store it)."""
    from jaxdit.configs import config_from_json

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        if "family" in raw:
            return config_from_json(raw)
        if "_class_name" not in raw:
            raise ValueError("neither a diffusers config (_class_name) nor a jaxdit one (family)")
        return _family_for_class(raw["_class_name"], path).config_from_diffusers(raw)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_config(path):
    """The transformer config of a jaxdit checkpoint, a diffusers model folder or a pipeline folder,
    without reading any weights."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    if ckpt.is_checkpoint(path):
        return ckpt.load_config(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a jaxdit checkpoint, a diffusers model folder (config.json) or a "
                              "pipeline folder (model_index.json)")
    return config_from_file(path / "config.json")


def param_shardings(config, params, mesh):
    """NamedSharding tree of a transformer's parameter (or ShapeDtypeStruct) tree on `mesh`, from the
    logical axes its modules declare (an abstract init of `config`, nothing allocated)."""
    from jaxdit import sharding

    return sharding.param_shardings(params, mesh, families()[config.family].logical_axes(config))


def load_transformer(path, mesh=None, dtype=None, config=None):
    """(config, params) from any supported checkpoint form.

    mesh: restore/put every parameter sharded on this mesh (the axes the model declares under
    `jaxdit.sharding.RULES`).
    dtype: cast floating parameters (e.g. "bfloat16"); default keeps the checkpoint dtype.
    """
    dtype = None if dtype is None else jnp.dtype(dtype)
    if ckpt.is_checkpoint(path):
        return ckpt.restore_checkpoint(path, mesh, dtype, param_shardings)
    config, params = read_torch_checkpoint(path, dtype, config)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(config, params, mesh))
    else:
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return config, params


def convert(src, out, dtype=None, overwrite: bool = False, config=None, allow_nonfinite: bool = False) -> Path:
    """Convert a PyTorch checkpoint (any accepted form) into a jaxdit checkpoint directory at `out`.

    Refused before reading when `out` cannot be written or exists (without `overwrite`); weights holding
    NaN or inf are refused unless `allow_nonfinite` (then they are converted, with a warning)."""
    ckpt.check_writable(out)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (--overwrite replaces it)")
    config, params = read_torch_checkpoint(src, dtype, config, allow_nonfinite)
    return ckpt.save_checkpoint(out, config, params, overwrite=overwrite)


def _vae_prefix(source) -> str:
    from jaxdit.convert.keymaps import vae as vae_keys

    keys = source.keys()
    for prefix in vae_keys.PREFIXES + ("",):
        if prefix + vae_keys.MARKER in keys:
            return prefix
    raise CheckpointError(f"{source.path}: no autoencoder tensors (looked for "
                          f"{[p + vae_keys.MARKER for p in vae_keys.PREFIXES + ('',)]})")


def read_vae_folder(path, dtype=None):
    """(config, params) from a diffusers `vae/` folder (config.json + safetensors, single or sharded) or a
    pipeline folder holding one. Pickle weights are refused. `dtype` casts the parameters (e.g.
    "bfloat16"); the compute dtype is `config.dtype` (`config.replace(dtype=...)`)."""
    from jaxdit import vae

    path = Path(path)
    refuse_pickle(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        if not (path / "vae").is_dir():
            raise CheckpointError(f"{path}: pipeline folder without a vae/ component")
        path = path / "vae"
    cfg_file = path / "config.json"
    if not path.is_dir() or not cfg_file.is_file():
        raise CheckpointError(f"{path}: a diffusers VAE folder needs config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    cls_name = raw.get("_class_name", vae.DIFFUSERS_CLASS)
    if cls_name != vae.DIFFUSERS_CLASS:
        raise CheckpointError(f"{cfg_file}: model class {cls_name!r} is not {vae.DIFFUSERS_CLASS!r}")
    try:
        config = vae.VAEConfig.from_diffusers(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    params = fill_params(TensorSource(path), vae.abstract_params(config), {},
                         dtype=None if dtype is None else jnp.dtype(dtype))
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def load_vae(path, dtype=None, config=None):
    """(config, params) of the autoencoder in any form: a diffusers `vae/` or pipeline folder
    (`read_vae_folder`), an all-in-one single file (its `first_stage_model.*` or `vae.*` tensors), or
    BFL's `ae.safetensors` (LDM names, no prefix).

    A single file does not record the group-norm count nor the latent scaling and shift: those come from
    `config` when given (then used as it is), else from the released VAE of the family whose transformer
    the file holds (`jaxdit.vae.FLUX_VAE` / `SD3_VAE`); a file holding only a VAE is taken as FLUX.1's, the
    one such file released (`ae.safetensors`). The other fields are read off the tensors.
    """
    from jaxdit import vae
    from jaxdit.convert.keymaps import vae as vae_keys

    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        return read_vae_folder(path, dtype=dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    source = TensorSource(path)
    prefix = _vae_prefix(source)
    if config is None:
        fam = next((f for f in families().values() if f.is_original(source.keys())), None)
        base = vae.SD3_VAE if fam is not None and fam.name == "sd3" else vae.FLUX_VAE
        config = vae_keys.infer_config(source, prefix, base)
    # Only the tensors under the VAE's prefix; unprefixed, only LDM encoder/decoder names (a bare file).
    owned = [k for k in source.keys() if k.startswith(prefix) and (prefix or components.component_of(k) is None)]
    levels = len(config.block_out_channels)

    def rename(key, tensor):
        return vae_keys.rename_original(key[len(prefix):], tensor, levels)

    params = fill_params(KeySubset(source, owned), vae.abstract_params(config), {}, rename,
                         dtype=None if dtype is None else jnp.dtype(dtype),
                         progress=_progress(f"reading {path.name}", len(owned)))
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def as_numpy(params):
    return jax.tree_util.tree_map(np.asarray, params)
