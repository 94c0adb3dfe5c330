"""Bad checkpoints fail with an error naming the file, key and shapes, and leave nothing behind."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jaxdit import load_transformer
from jaxdit.cli import main
from jaxdit.configs import get_config
from jaxdit.convert import CheckpointError, UnsafeFormatError, convert
from twins import flux_twin


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    cfg = get_config("tiny-flux")
    model = flux_twin(cfg, seed=3)
    return cfg, {k: v.contiguous() for k, v in model.state_dict().items()}


def _folder(tmp_path, cfg, sd, name="transformer"):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **cfg.to_diffusers()}))
    save_file(sd, path / "diffusion_pytorch_model.safetensors")
    return path


def _assert_fails_cleanly(tmp_path, src, exc, *needles):
    out = tmp_path / "out"
    with pytest.raises(exc) as info:
        convert(src, out)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    return str(info.value)


def test_missing_key(tmp_path, state):
    cfg, sd = state
    sd = dict(sd)
    del sd["transformer_blocks.1.attn.to_k.weight"]
    src = _folder(tmp_path, cfg, sd)
    _assert_fails_cleanly(tmp_path, src, CheckpointError, "missing", "transformer_blocks.1.attn.to_k.weight")


def test_unexpected_key(tmp_path, state):
    cfg, sd = state
    src = _folder(tmp_path, cfg, {**sd, "transformer_blocks.0.attn.to_z.weight": torch.zeros(2, 2)})
    _assert_fails_cleanly(tmp_path, src, CheckpointError, "unexpected", "transformer_blocks.0.attn.to_z.weight")


def test_extra_layer(tmp_path, state):
    cfg, sd = state
    src = _folder(tmp_path, cfg, {**sd, "transformer_blocks.7.attn.to_q.bias": torch.zeros(32)})
    _assert_fails_cleanly(tmp_path, src, CheckpointError, "transformer_blocks.7.attn.to_q.bias", "2 layers")


def test_wrong_shape(tmp_path, state):
    cfg, sd = state
    src = _folder(tmp_path, cfg, {**sd, "single_transformer_blocks.2.proj_mlp.weight": torch.zeros(100, 32)})
    msg = _assert_fails_cleanly(tmp_path, src, CheckpointError, "single_transformer_blocks.2.proj_mlp.weight",
                                "(100, 32)", "(128, 32)")
    assert "diffusion_pytorch_model.safetensors" in msg


def test_truncated_file(tmp_path, state):
    cfg, sd = state
    src = _folder(tmp_path, cfg, sd)
    f = src / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _assert_fails_cleanly(tmp_path, src, CheckpointError, "truncated", str(f))


def test_not_safetensors(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"hello, this is not a checkpoint at all" * 10)
    _assert_fails_cleanly(tmp_path, f, CheckpointError, "not a safetensors file", str(f))
    g = tmp_path / "tiny.safetensors"
    g.write_bytes(b"abc")
    _assert_fails_cleanly(tmp_path, g, CheckpointError, "not a safetensors file", str(g))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickles_are_refused_without_unpickling(tmp_path, suffix, monkeypatch):
    f = tmp_path / f"model{suffix}"
    torch.save({"x": torch.zeros(2)}, f)
    import pickle

    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    _assert_fails_cleanly(tmp_path, f, UnsafeFormatError, "refusing", str(f))


def test_pickle_disguised_as_safetensors_and_pickle_only_folder(tmp_path, state):
    cfg, _ = state
    f = tmp_path / "sneaky.safetensors"
    torch.save({"x": torch.zeros(2)}, f)
    _assert_fails_cleanly(tmp_path, f, UnsafeFormatError, "refusing", str(f))
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **cfg.to_diffusers()}))
    torch.save({"x": torch.zeros(2)}, folder / "diffusion_pytorch_model.bin")
    _assert_fails_cleanly(tmp_path, folder, UnsafeFormatError, "diffusion_pytorch_model.bin")


def test_missing_shard_and_bad_config(tmp_path, state):
    cfg, sd = state
    src = _folder(tmp_path, cfg, sd)
    (src / "diffusion_pytorch_model.safetensors").rename(src / "part-1.safetensors")
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{k: "part-1.safetensors" for k in sd}, "proj_out.bias": "part-2.safetensors"}}))
    _assert_fails_cleanly(tmp_path, src, CheckpointError, "part-2.safetensors", "missing")
    bad = _folder(tmp_path, cfg, sd, "other")
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    _assert_fails_cleanly(tmp_path, bad, CheckpointError, "UNet2DConditionModel", "not supported")


def test_existing_output_is_not_clobbered(tmp_path, state):
    cfg, sd = state
    src = _folder(tmp_path, cfg, sd)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert(src, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_reports_errors_and_converts(tmp_path, state, capsys):
    cfg, sd = state
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err
    src = _folder(tmp_path, cfg, sd)
    assert main(["convert", str(src), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    loaded_cfg, params = load_transformer(tmp_path / "out")
    assert loaded_cfg == cfg
    assert np.asarray(params["proj_out"]["kernel"]).dtype.name == "bfloat16"
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_safetensors_whose_header_length_starts_with_0x80_is_accepted(tmp_path):
    """The header length is little-endian: a file whose first byte is 0x80 is still safetensors."""
    from safetensors.numpy import save_file as save_np

    from jaxdit.convert.safetensors_io import SafetensorsFile

    for pad in range(200):
        f = tmp_path / "t.safetensors"
        save_np({"x" * (1 + pad): np.zeros(2, np.float32)}, f)
        if f.read_bytes()[0] == 0x80:
            break
    assert f.read_bytes()[0] == 0x80
    assert SafetensorsFile(f).keys() == ["x" * (1 + pad)]
