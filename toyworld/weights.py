"""The toy-world weights folder (committed under toyworld/weights/, the package jaxdit.toyworld).

    transformer/     a jaxdit checkpoint: `jaxdit.load_transformer(path)` reads it like any other
    text_encoder/    orbax tree of the T5 encoder, with t5_config.json beside it
    detector/        orbax tree of the detector (jaxdit.toyworld.detector)
    vocab.json       the word-level tokenizer
    training.json    command, seed, hyper-parameters, steps, training time and hardware
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxdit.text import t5

DEFAULT_DIR = Path(__file__).parent / "weights"


def save_tree(path, tree) -> None:
    from jaxdit.convert.checkpoint import atomic_directory

    with atomic_directory(path, overwrite=True) as tmp:
        ck = ocp.StandardCheckpointer()
        ck.save(tmp / "tree", jax.device_get(tree))
        ck.wait_until_finished()


def load_tree(path, abstract=None):
    path = Path(path) / "tree"
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: no saved parameter tree")
    return ocp.StandardCheckpointer().restore(path.absolute(), abstract)


def save_weights(out, cfg, params, tokenizer, info: dict) -> Path:
    from jaxdit.convert.checkpoint import save_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "transformer", cfg.flux, params["transformer"], overwrite=True)
    save_tree(out / "text_encoder", params["text_encoder"])
    (out / "text_encoder" / "t5_config.json").write_text(json.dumps(cfg.t5.to_json(), indent=2))
    tokenizer.save(out / "vocab.json")
    info = {**info, "hardware": f"{platform.machine()} CPU, {jax.device_count()} device(s)"}
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return out


def load_text_encoder(folder):
    folder = Path(folder)
    d = json.loads((folder / "text_encoder" / "t5_config.json").read_text())
    d.pop("family", None)
    cfg = t5.T5EncoderConfig(**d)
    params = load_tree(folder / "text_encoder", jax.eval_shape(lambda: t5.init_params(cfg, jax.random.key(0))))
    return cfg, params
