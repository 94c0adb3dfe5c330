"""SAE files: jaxdit's own layout, and export/import of the SAELens and EleutherAI sparsify layouts.

jaxdit (`save_sae` / `load_sae`):

    SAE_DIR/sae.json              {"format": "jaxdit-sae", "version": 1, "config": SAEConfig, "training": {...}}
    SAE_DIR/params.safetensors    float32 W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d] (+ threshold [n])

SAELens (`cfg.json` + `sae_weights.safetensors`): W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]
(+ threshold for jumprelu); `architecture` topk (with `k`), jumprelu (our jumprelu, and batchtopk with its
inference threshold, as SAELens saves BatchTopK), standard (our relu); `apply_b_dec_to_input` true,
`normalize_activations` "none", `hook_name` = the hook position and `model_name`. The cfg.json is
written with these fields at its top level and no `sae_lens_version` (SAELens did not write it), which
SAELens reads through its loader for configs without a version; import reads either layout.

sparsify (`cfg.json` + `sae.safetensors`, TopK only): encoder.weight [n, d] = W_enc^T, encoder.bias [n],
W_dec [n, d] (the same array as ours: no transposition, whatever SAELens' sparsify converter does),
b_dec [d]; `d_in`, `num_latents`, `k` in cfg.json.

Neither format has an input scale, so it is folded into the weights on export (W_enc * s, W_dec / s,
b_dec / s; latents unchanged). The scale is a power of two, so this is exact, and it is recorded with the
jaxdit config in the weights file's safetensors metadata (`jaxdit`, where neither library looks) so
import unfolds it exactly: export then import returns the parameters bit for bit. Files written by other
tools import with scale 1.

Every directory is written under a temporary name and renamed when complete; tensors are safetensors,
never pickle.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxdit.convert.checkpoint import atomic_directory, check_writable
from jaxdit.convert.safetensors_io import SafetensorsFile
from jaxdit.train.sae import SAEConfig, check_params

FORMAT = {"format": "jaxdit-sae", "version": 1}
FORMATS = ("saelens", "sparsify")
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.float64): "F64"}

Tensors = dict[str, np.ndarray]


class SAEFormatError(ValueError):
    """An SAE directory or file that cannot be read as the format asked for."""


# --- safetensors ---------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> None:
    """Write the safetensors layout: u64 header length, JSON header (8-byte aligned), raw little-endian data."""
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_DTYPES:
            raise SAEFormatError(f"cannot write tensor {name!r} of dtype {a.dtype} as safetensors")
        blob = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path: Path) -> Tensors:
    f = SafetensorsFile(path)
    return {k: np.array(f.get(k)) for k in f.keys()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e})") from None


# --- jaxdit's own layout -------------------------------------------------------------------------------

def save_sae(out: str | os.PathLike, cfg: SAEConfig, params, *, overwrite: bool = False,
             training: dict[str, Any] | None = None) -> Path:
    """Write an SAE directory (params as float32 safetensors, config as JSON), atomically."""
    tensors = {k: np.asarray(v, np.float32) for k, v in params.items()}
    check_params(cfg, tensors, where=str(out))
    with atomic_directory(out, overwrite) as tmp:
        write_safetensors(tmp / "params.safetensors", tensors)
        (tmp / "sae.json").write_text(json.dumps({**FORMAT, "config": cfg.to_json(), "training": training or {}},
                                                 indent=1))
    return Path(out)


def resolve_sae_dir(path: str | os.PathLike) -> Path:
    """An SAE directory, or a training output directory holding one under `sae/`."""
    path = Path(path)
    if (path / "sae.json").is_file():
        return path
    if (path / "sae" / "sae.json").is_file():
        return path / "sae"
    if not path.exists():
        raise FileNotFoundError(f"SAE directory {path} does not exist")
    raise SAEFormatError(f"{path}: not a jaxdit SAE directory (no sae.json; a training run writes it to OUT/sae "
                         "when it finishes)")


def load_sae(path: str | os.PathLike) -> tuple[SAEConfig, dict[str, np.ndarray]]:
    """(config, float32 numpy params) from an SAE directory or a training output directory."""
    path = resolve_sae_dir(path)
    meta = _read_json(path / "sae.json")
    if meta.get("format") != FORMAT["format"]:
        raise SAEFormatError(f"{path / 'sae.json'}: format {meta.get('format')!r}, expected {FORMAT['format']!r}")
    cfg = SAEConfig.from_json(meta["config"])
    params = read_safetensors(path / "params.safetensors")
    check_params(cfg, params, where=str(path))
    return cfg, {k: v.astype(np.float32) for k, v in params.items()}


# --- folding the input scale ---------------------------------------------------------------------------

def _fold(cfg: SAEConfig, params: Tensors) -> Tensors:
    """Weights that read unscaled inputs: latents unchanged, reconstruction in model units."""
    s = np.float32(cfg.input_scale)
    out = {"W_enc": params["W_enc"] * s, "b_enc": params["b_enc"], "W_dec": params["W_dec"] / s,
           "b_dec": params["b_dec"] / s}
    if "threshold" in params:
        out["threshold"] = params["threshold"]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _unfold(scale: float, params: Tensors) -> Tensors:
    s = np.float32(scale)
    return {**params, "W_enc": params["W_enc"] / s, "W_dec": params["W_dec"] * s, "b_dec": params["b_dec"] * s}


def _jaxdit_record(cfg: SAEConfig) -> dict[str, str]:
    """The safetensors metadata of an exported weights file: the jaxdit config (with the input scale)."""
    return {"jaxdit": json.dumps({**FORMAT, "config": cfg.to_json()})}


def _read_record(path: Path, external: dict[str, Any]) -> dict[str, Any] | None:
    """The jaxdit record of an export: in its weights file's metadata, or in cfg.json where earlier jaxdit
    versions put it (SAELens `metadata.jaxdit`, sparsify `jaxdit`); None for files of other tools."""
    meta = SafetensorsFile(path).metadata
    if "jaxdit" in meta:
        try:
            return json.loads(meta["jaxdit"])
        except ValueError as e:
            raise SAEFormatError(f"{path}: jaxdit metadata is not valid JSON ({e})") from None
    return (external.get("metadata") or {}).get("jaxdit") or external.get("jaxdit")


def _restore_config(record: dict[str, Any] | None, base: SAEConfig, where: str) -> tuple[SAEConfig, float]:
    """(config, scale to unfold) from an exported jaxdit record, or (base, 1) for foreign files."""
    if not record:
        return base, 1.0
    cfg = SAEConfig.from_json(record["config"])
    if (cfg.d_in, cfg.n_latents) != (base.d_in, base.n_latents):
        raise SAEFormatError(f"{where}: jaxdit record says d_in={cfg.d_in}, n_latents={cfg.n_latents} but the "
                             f"weights are d_in={base.d_in}, n_latents={base.n_latents}")
    return cfg, cfg.input_scale


def _shape_check(tensors: Tensors, want: dict[str, tuple[int, ...]], where: str) -> None:
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise SAEFormatError(f"{where}: missing tensors {missing} (found {sorted(tensors)})")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


# --- SAELens -------------------------------------------------------------------------------------------

_TO_SAELENS = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}


def to_saelens(cfg: SAEConfig, params: Tensors) -> tuple[dict[str, Any], Tensors]:
    """(cfg.json dict, tensors) in the SAELens layout (fields at the top level, no version), input scale
    folded in."""
    tensors = _fold(cfg, params)
    out = {"architecture": _TO_SAELENS[cfg.arch], "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "hook_name": cfg.position, "model_name": cfg.model}
    if cfg.arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    return out, tensors


def from_saelens(saelens_cfg: dict[str, Any], tensors: Tensors, where: str = "SAELens SAE",
                 record: dict[str, Any] | None = None) -> tuple[SAEConfig, Tensors]:
    """(config, params) from an SAELens cfg.json dict (with or without its v6 `metadata` block) and its
    tensors; `record`, the jaxdit record of our own exports, restores the exact config."""
    arch = saelens_cfg.get("architecture", "standard")
    ours = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}.get(arch)
    if ours is None:
        raise SAEFormatError(f"{where}: architecture {arch!r} is not supported (topk, jumprelu, standard)")
    for key, ok in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if saelens_cfg.get(key, "none") != ok:
            raise SAEFormatError(f"{where}: {key}={saelens_cfg[key]!r} is not supported (only {ok!r}); the "
                                 "normalisation constant is not part of the saved SAE")
    if saelens_cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEFormatError(f"{where}: rescale_acts_by_decoder_norm=true is not supported; fold the decoder "
                             "norms first (SAELens SAE.fold_W_dec_norm())")
    try:
        d, n = int(saelens_cfg["d_in"]), int(saelens_cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise SAEFormatError(f"{where}: cfg.json needs integer d_in and d_sae ({e})") from None
    want = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if ours == "jumprelu":
        want["threshold"] = (n,)
    _shape_check(tensors, want, where)
    params = {k: np.asarray(tensors[k], np.float32) for k in want}
    if not saelens_cfg.get("apply_b_dec_to_input", True):
        # x W_enc + b_enc == (x - b_dec) W_enc + (b_enc + b_dec W_enc): our encoder always centres.
        w_enc, b_enc, b_dec = (tensors[k].astype(np.float64) for k in ("W_enc", "b_enc", "b_dec"))
        params["b_enc"] = (b_enc + b_dec @ w_enc).astype(np.float32)
    metadata = saelens_cfg.get("metadata") or {}
    base = SAEConfig(d_in=d, n_latents=n, arch=ours, k=int(saelens_cfg.get("k", 1)),
                     position=metadata.get("hook_name", saelens_cfg.get("hook_name")),
                     model=metadata.get("model_name", saelens_cfg.get("model_name")))
    cfg, scale = _restore_config(record, base, where)
    if cfg.arch != ours and not (cfg.arch == "batchtopk" and ours == "jumprelu"):
        raise SAEFormatError(f"{where}: architecture {arch!r} does not match the jaxdit record ({cfg.arch!r})")
    return cfg, _unfold(scale, params)


# --- sparsify ------------------------------------------------------------------------------------------

def to_sparsify(cfg: SAEConfig, params: Tensors) -> tuple[dict[str, Any], Tensors]:
    if cfg.arch != "topk":
        raise SAEFormatError(f"the sparsify format holds TopK SAEs only, this SAE is {cfg.arch!r}")
    t = _fold(cfg, params)
    tensors = {"encoder.weight": np.ascontiguousarray(t["W_enc"].T), "encoder.bias": t["b_enc"],
               "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    out = {"activation": "topk", "expansion_factor": max(cfg.n_latents // cfg.d_in, 1),
           "normalize_decoder": True, "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": False,
           "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    return out, tensors


def from_sparsify(sparsify_cfg: dict[str, Any], tensors: Tensors, where: str = "sparsify SAE",
                  record: dict[str, Any] | None = None) -> tuple[SAEConfig, Tensors]:
    """(config, params) from a sparsify cfg.json dict and its tensors; `record` as for `from_saelens`."""
    if sparsify_cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{where}: activation {sparsify_cfg['activation']!r} is not supported (topk only)")
    for key in ("transcode", "skip_connection"):
        if sparsify_cfg.get(key):
            raise SAEFormatError(f"{where}: {key}=true is not supported (an autoencoder without skip connection only)")
    try:
        d = int(sparsify_cfg["d_in"])
        n = int(sparsify_cfg.get("num_latents") or d * int(sparsify_cfg["expansion_factor"]))
        k = int(sparsify_cfg["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise SAEFormatError(f"{where}: cfg.json needs d_in, k and num_latents or expansion_factor ({e})") from None
    _shape_check(tensors, {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}, where)
    params = {"W_enc": np.ascontiguousarray(tensors["encoder.weight"].T), "b_enc": tensors["encoder.bias"],
              "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    params = {k_: np.asarray(v, np.float32) for k_, v in params.items()}
    cfg, scale = _restore_config(record, SAEConfig(d_in=d, n_latents=n, k=k), where)
    return cfg, _unfold(scale, params)


# --- directories ---------------------------------------------------------------------------------------

_FILES = {"saelens": ("cfg.json", "sae_weights.safetensors"), "sparsify": ("cfg.json", "sae.safetensors")}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown SAE format {fmt!r}; expected one of {list(FORMATS)}")


def export_sae(src: str | os.PathLike, out: str | os.PathLike, fmt: str, overwrite: bool = False) -> Path:
    """A jaxdit SAE directory (or training output) -> an SAELens or sparsify directory at `out`."""
    _check_format(fmt)
    check_writable(out)
    cfg, params = load_sae(src)
    cfg_json, tensors = (to_saelens if fmt == "saelens" else to_sparsify)(cfg, params)
    cfg_name, weights_name = _FILES[fmt]
    with atomic_directory(out, overwrite) as tmp:
        write_safetensors(tmp / weights_name, tensors, _jaxdit_record(cfg))
        (tmp / cfg_name).write_text(json.dumps(cfg_json, indent=1))
    return Path(out)


def import_sae(src: str | os.PathLike, out: str | os.PathLike, fmt: str, overwrite: bool = False) -> Path:
    """An SAELens or sparsify directory -> a jaxdit SAE directory at `out`."""
    _check_format(fmt)
    check_writable(out)
    src = Path(src)
    cfg_name, weights_name = _FILES[fmt]
    if not (src / weights_name).is_file():
        if not src.exists():
            raise FileNotFoundError(f"{src} does not exist")
        raise SAEFormatError(f"{src}: not a {fmt} SAE directory (no {weights_name})")
    external = _read_json(src / cfg_name)
    tensors = read_safetensors(src / weights_name)
    record = _read_record(src / weights_name, external)
    cfg, params = (from_saelens if fmt == "saelens" else from_sparsify)(external, tensors, str(src), record)
    return save_sae(out, cfg, params, overwrite=overwrite, training={"imported_from": str(src), "format": fmt})
