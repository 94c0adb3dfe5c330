"""Bad input to any command: status 2, one line naming the flag / file / key / field, no traceback, nothing
written (issue 17). Also the quiet mismatches it listed: each now said, or fixed."""

import argparse
import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jaxdit.cli import build_parser, main
from jaxdit.configs import get_config


def run(capsys, *argv):
    """(status, stdout, stderr) of `jaxdit ARGV`; a refusal must be exactly one line, without a traceback."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if status == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return status, out, err


def files(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def readonly(tmp_path):
    """A directory this process cannot write in (a chmod 0555 folder; /proc for root, who ignores modes)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except OSError:
        yield ro
    else:
        (ro / "probe").unlink()
        yield type(ro)("/proc")
    ro.chmod(0o755)


# --- numbers are validated by the parser ------------------------------------------------------------------

MODEL = ["--model", "m", "--prompt", "p", "--out", "o.png"]


@pytest.mark.parametrize("argv,flag", [
    (["generate", *MODEL, "--steps", "0"], "--steps"),
    (["generate", *MODEL, "--steps", "-1"], "--steps"),
    (["generate", *MODEL, "--size", "0"], "--size"),
    (["generate", *MODEL, "--num-images", "0"], "--num-images"),
    (["generate", *MODEL, "--guidance", "nan"], "--guidance"),
    (["edit", *MODEL, "--image", "i.png", "--size", "32x0"], "--size"),
    (["parity", "--preset", "tiny-flux", "--batch", "0"], "--batch"),
    (["sae", "train", "--data", "d", "--out", "o", "--steps", "10", "--batch-size", "0"], "--batch-size"),
    (["sae", "train", "--data", "d", "--out", "o", "--steps", "10", "--b1", "1"], "--b1"),
    (["sae", "train", "--data", "d", "--out", "o", "--steps", "10", "--mesh", "0,1,1"], "--mesh"),
    (["sae", "harvest", "--model", "m", "--positions", "p", "--steps", "-1", "--out", "o"], "--steps"),
    (["safedig", "adapt", "--dictionary", "d", "--target", "t", "--out", "o", "--lr", "0"], "--lr"),
    (["uvr", "anchors", "--model", "m", "--concept", "c", "--prompts", "p", "--out", "o", "--quantile", "2"],
     "--quantile"),
    (["safety", "eval", "--model", "m", "--prompts", "p", "--out", "o", "--seed", "-3"], "--seed"),
])
def test_numeric_flags_are_refused_by_the_parser(capsys, argv, flag):
    status, _, err = run(capsys, *argv)
    assert status == 2 and f"argument {flag}:" in err and err.startswith(f"jaxdit {argv[0]}")


def test_every_numeric_flag_is_validated():
    """No option of the commands in this package is a bare int / float (toy world: its own module)."""
    def walk(prog, parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if name != "toyworld":
                        yield from walk(f"{prog} {name}", sub)
            elif action.type in (int, float):
                yield f"{prog} {action.option_strings}"

    assert list(walk("jaxdit", build_parser())) == []


def test_harvest_steps_beyond_the_schedule_are_refused_first(tmp_path, capsys):
    status, _, err = run(capsys, "sae", "harvest", "--model", tmp_path / "none", "--positions", "p", "--steps", "0",
                         "5", "--num-steps", "2", "--out", tmp_path / "acts")
    assert status == 2 and "--steps 5" in err and "--num-steps 2" in err and files(tmp_path) == []


def test_usage_errors_name_the_sub_command(capsys):
    status, _, err = run(capsys, "sae", "export", "--format", "saelens", "only-one")
    assert status == 2 and err.startswith("jaxdit sae export: error:") and "out" in err


# --- outputs are checked before any work ------------------------------------------------------------------

def _flux_folder(tmp_path, name="transformer", **tensors):
    """A tiny diffusers FLUX transformer folder; `tensors` replace some of its weights."""
    from twins import flux_twin

    cfg = get_config("tiny-flux")
    sd = {k: v.contiguous() for k, v in flux_twin(cfg, seed=3).state_dict().items()}
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **cfg.to_diffusers()}))
    save_file({**sd, **tensors}, path / "diffusion_pytorch_model.safetensors")
    return path


def test_outputs_in_unwritable_places_are_refused_first(tmp_path, readonly, capsys):
    # generate: refused before the (here missing) model is even looked at
    status, _, err = run(capsys, "generate", "--model", tmp_path / "no-model", "--prompt", "p", "--out",
                         readonly / "x.png")
    assert status == 2 and f"--out {readonly / 'x.png'}" in err and "not writable" in err
    # convert: before reading the (here missing) source
    status, _, err = run(capsys, "convert", tmp_path / "no-source", readonly / "out")
    assert status == 2 and str(readonly / "out") in err and "not writable" in err
    # sae export
    _topk_sae(tmp_path)
    status, _, err = run(capsys, "sae", "export", "--format", "saelens", tmp_path / "sae", readonly / "x")
    assert status == 2 and str(readonly / "x") in err
    status, _, err = run(capsys, "sae", "harvest", "--model", tmp_path / "m", "--positions", "p", "--steps", "0",
                         "--out", readonly / "acts")
    assert status == 2 and "--out" in err
    # a parent that is a file
    (tmp_path / "file").write_text("x")
    status, _, err = run(capsys, "safedig", "route", "--source-unsafe", "a", "--source-safe", "b", "--shift-unsafe",
                         "c", "--shift-safe", "d", "--out", tmp_path / "file" / "r.json")
    assert status == 2 and "is not a directory" in err and "--out" in err
    assert files(tmp_path) == ["file", "ro", "sae"]


# --- weights: non-float refused, non-finite refused or warned ---------------------------------------------

def test_int_weights_are_refused_naming_the_key(tmp_path, capsys):
    src = _flux_folder(tmp_path, **{"proj_out.bias": torch.zeros(16, dtype=torch.int32)})
    status, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert status == 2 and "'proj_out.bias'" in err and "int32" in err and "floating point" in err
    assert files(tmp_path) == ["transformer"]


def test_int_weights_in_a_jaxdit_checkpoint_are_refused(tmp_path):
    from jaxdit import load_transformer
    from jaxdit.convert import CheckpointError
    from jaxdit.convert.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", get_config("tiny-flux"), {"proj_out": {"bias": np.zeros(16, np.int32)}})
    with pytest.raises(CheckpointError, match="proj_out/bias is int32"):
        load_transformer(tmp_path / "ckpt")


def test_nonfinite_weights(tmp_path, capsys):
    """convert refuses them (naming the first key) unless --allow-nonfinite; loading warns once."""
    from jaxdit import load_transformer

    src = _flux_folder(tmp_path, **{"x_embedder.weight": torch.full((32, 16), float("nan"))})
    status, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert status == 2 and "'x_embedder.weight'" in err and "--allow-nonfinite" in err
    assert files(tmp_path) == ["transformer"]
    status, _, err = run(capsys, "convert", src, tmp_path / "out", "--allow-nonfinite")
    assert status == 0 and err.count("\n") == 1
    assert err.startswith("jaxdit convert: warning: tensor 'x_embedder.weight'") and "512 NaN or inf" in err
    with pytest.warns(UserWarning, match="x_embedder.weight"):
        load_transformer(src)


# --- config files: field types ------------------------------------------------------------------------------

def test_config_field_types_name_the_file_and_field(tmp_path, capsys):
    src = _flux_folder(tmp_path)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "num_layers": "two"}))
    status, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert status == 2 and str(src / "config.json") in err and "'num_layers' is 'two'" in err
    assert "an integer" in err and files(tmp_path) == ["transformer"]


@pytest.mark.parametrize("reader,cfg,field", [
    ("vae", {"block_out_channels": 128}, "block_out_channels"),
    ("clip", {"vocab_size": 64, "hidden_size": "32", "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 16}, "hidden_size"),
    ("t5", {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2.5, "num_heads": 4,
            "feed_forward_proj": "gated-gelu"}, "num_layers"),
    ("jaxdit", {**get_config("tiny-sd3").to_json(), "qk_norm": 1}, "qk_norm"),
])
def test_every_config_reader_checks_field_types(reader, cfg, field):
    from jaxdit.configs import config_from_json
    from jaxdit.text.clip import ClipTextConfig
    from jaxdit.text.t5 import T5EncoderConfig
    from jaxdit.vae import VAEConfig

    read = {"vae": VAEConfig.from_diffusers, "clip": lambda c: ClipTextConfig.from_transformers(c, False),
            "t5": T5EncoderConfig.from_transformers, "jaxdit": config_from_json}[reader]
    with pytest.raises(ValueError, match=f"field '{field}' is"):
        read(cfg)


# --- temporaries of an interrupted convert -------------------------------------------------------------------

def test_stale_temporaries_of_the_same_target_are_removed(tmp_path, capsys):
    src = _flux_folder(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-0123abcd"  # a killed convert's half-written output
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "blob").write_bytes(b"0" * 1000)
    other = tmp_path / f".other.tmp-{dead}-0123abcd"  # another target's: not touched
    other.mkdir()
    status, out, err = run(capsys, "convert", src, tmp_path / "out")
    assert status == 0 and err == f"jaxdit convert: warning: removed {stale}, left behind by an interrupted run\n"
    assert files(tmp_path) == [other.name, "out", "transformer"]


# --- wording ---------------------------------------------------------------------------------------------------

def test_files_that_are_not_utf8_are_named(tmp_path, capsys):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a cat\n\xff\xfe dog\n")
    for argv in (["sae", "harvest", "--model", tmp_path / "pipe", "--prompts", bad, "--positions", "p", "--steps",
                  "0", "--out", tmp_path / "acts"],
                 ["uvr", "anchors", "--model", tmp_path / "pipe", "--concept", "cat", "--prompts", bad, "--out",
                  tmp_path / "bank.safetensors"],
                 ["safety", "eval", "--model", tmp_path / "pipe", "--prompts", bad, "--out", tmp_path / "run"]):
        status, _, err = run(capsys, *argv)
        assert status == 2 and f"--prompts {bad}: not UTF-8 text" in err, err
    status, _, err = run(capsys, "edit", "--model", tmp_path / "pipe", "--image", bad, "--prompt", "p", "--out",
                         tmp_path / "e.png")
    assert status == 2 and f"--image {bad}: cannot read an image" in err
    assert files(tmp_path) == ["pipe", "prompts.txt"]


def test_sae_train_messages(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    x[300] = np.nan
    np.save(tmp_path / "x.npy", x)
    argv = ["sae", "train", "--data", tmp_path / "x.npy", "--out", tmp_path / "run", "--steps", "2", "--batch-size",
            "16", "--warmup", "1", "--k", "2", "--expansion", "2", "--no-progress", "--mesh", "1,1,1"]
    status, _, err = run(capsys, *argv)
    assert status == 2 and err.startswith("jaxdit sae train: error:") and "x.npy, row 300" in err
    assert "read shuffled, from anywhere in the data" in err
    x[300] = 0
    np.save(tmp_path / "x.npy", x)
    assert run(capsys, *argv)[0] == 0
    status, _, err = run(capsys, *argv)
    assert status == 2 and "already holds a training run; add --resume to continue it" in err


# --- SAE exports -------------------------------------------------------------------------------------------------

def _topk_sae(tmp_path):
    import jax

    from jaxdit.train import interop, sae

    cfg = sae.SAEConfig(d_in=8, n_latents=24, k=3, input_scale=0.5, position="double.0.img.resid_post",
                        model="tiny")
    params = {k: np.asarray(v) for k, v in sae.init_params(cfg, jax.random.key(1)).items()}
    interop.save_sae(tmp_path / "sae", cfg, params)
    return cfg


def test_saelens_export_claims_no_sae_lens_version(tmp_path):
    from jaxdit.convert.safetensors_io import SafetensorsFile
    from jaxdit.train import interop

    cfg = _topk_sae(tmp_path)
    interop.export_sae(tmp_path / "sae", tmp_path / "lens", "saelens")
    saved = (tmp_path / "lens" / "cfg.json").read_text()
    assert "sae_lens_version" not in saved and json.loads(saved)["hook_name"] == cfg.position
    record = json.loads(SafetensorsFile(tmp_path / "lens" / "sae_weights.safetensors").metadata["jaxdit"])
    assert record["config"]["input_scale"] == 0.5
    interop.import_sae(tmp_path / "lens", tmp_path / "back", "saelens")
    assert interop.load_sae(tmp_path / "back")[0] == cfg


def test_sparsify_loads_our_export_without_dropping_args(tmp_path, caplog):
    warnings.filterwarnings("ignore", category=UserWarning)
    from sparsify import SparseCoder

    from jaxdit.train import interop

    cfg = _topk_sae(tmp_path)
    interop.export_sae(tmp_path / "sae", tmp_path / "sp", "sparsify")
    SparseCoder.load_from_disk(tmp_path / "sp")
    assert "Dropping extra args" not in caplog.text
    interop.import_sae(tmp_path / "sp", tmp_path / "back", "sparsify")
    assert interop.load_sae(tmp_path / "back")[0] == cfg


def test_uvr_bank_has_the_usual_file_mode(tmp_path):
    from jaxdit.safety.uvr.anchors import save_bank

    path = save_bank(tmp_path / "bank.safetensors", np.zeros((2, 3, 4), np.float32), {"position": "p"})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


# --- pipelines: prompts, harvest sizes, diffusers spellings, Kontext sizes ---------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from pipeline_twins import flux_pipeline_folder

    root = tmp_path_factory.mktemp("pipelines")
    flux_pipeline_folder(root / "dev", guidance=True, seed=61)
    flux_pipeline_folder(root / "kontext", guidance=True, seed=62, kontext=True)
    return root


def test_harvest_reads_the_vae_factor_and_warns_of_truncated_prompts(folders, tmp_path, capsys):
    from jaxdit.train.store import ActivationStore

    (tmp_path / "prompts.txt").write_text("a cat\na photo of a cat sitting on a red chair\n")
    status, _, err = run(capsys, "sae", "harvest", "--model", folders / "dev", "--prompts", tmp_path / "prompts.txt",
                         "--positions", "double.0.img.resid_post", "--steps", "0", "--num-steps", "1", "--height",
                         "16", "--width", "32", "--out", tmp_path / "acts")
    store = ActivationStore.open(tmp_path / "acts" / "double.0.img.resid_post")
    assert status == 0 and store.chunks[0]["tokens"] == (16 // 4) * (32 // 4)  # tiny VAE: factor 2, not 8
    # the tiny CLIP keeps 16 tokens: one line, naming how many were dropped
    lines = re.findall(r"jaxdit sae harvest: warning: .*", err)
    assert len(lines) == 1 and re.fullmatch(r"jaxdit sae harvest: warning: CLIP keeps 16 tokens: 1 prompt\(s\) "
                                            r"truncated, (\d+) token\(s\) dropped \(\1 from 'a photo of a cat "
                                            r"sitting on a red chair'\)", lines[0]), lines


def test_diffusers_spellings(folders):
    import jax

    from jaxdit.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folders / "dev", torch_dtype=torch.float32)
    assert pipe.transformer_config.dtype == "float32"
    with pytest.raises(TypeError, match="dtype='float32', 'bfloat16' or 'float16'"):
        FluxPipeline.from_pretrained(folders / "dev", torch_dtype=torch.int8)
    kw = dict(height=16, width=16, num_inference_steps=1, max_sequence_length=4, progress=False)
    out = pipe("a cat", generator=jax.random.key(5), output_type="np", **kw)
    np.testing.assert_array_equal(out, pipe("a cat", seed=5, output_type="np", **kw))
    np.testing.assert_array_equal(pipe("a cat", generator=5, output_type="np", **kw), out)
    assert pipe("a cat", seed=5, **kw).images[0].size == (16, 16)
    with pytest.raises(TypeError, match=r"a Generator cannot seed the noise: pass seed=INT or generator=jax.random"):
        pipe("a cat", generator=torch.Generator().manual_seed(5), **kw)


def test_edit_says_and_follows_its_sizes(folders, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (23, 37, 3), dtype=np.uint8)).save(src)
    argv = ["edit", "--model", folders / "kontext", "--image", src, "--prompt", "blue", "--steps", "1",
            "--max-sequence-length", "4"]
    # --size governs the context too: the preferred 1328x800 scaled to 32*32 pixels, sides multiples of 4
    status, out, _ = run(capsys, *argv, "--size", "32", "--out", tmp_path / "a.png")
    assert status == 0 and out.startswith("context image 37x23 -> 40x24 (60 tokens); output 32x32 (64 tokens)\n")
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (32, 32)
    # --no-auto-resize without --size keeps the input size (rounded down) for the context and the output
    from jaxdit.cli import _edit_sizes
    from jaxdit.pipeline import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(folders / "kontext")
    with Image.open(src) as image:
        kw = _edit_sizes(pipe, image, argparse.Namespace(size=None, no_auto_resize=True))
        assert pipe.edit_sizes(image.size, **kw) == ((36, 20), (36, 20))
    assert capsys.readouterr().out == "context image 37x23 -> 36x20 (45 tokens); output 36x20 (45 tokens)\n"
