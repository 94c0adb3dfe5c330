"""`jaxdit safety erase` and `--erase FILE` on a tiny FLUX pipeline folder: the pooled vectors against the
folder's own transformers CLIP, the fitted file, generation with it, and the one-line refusals."""

import numpy as np
import pytest
import torch

from jaxdit.safety import erasure
from test_cli_errors import run  # (status, stdout, stderr); a refusal is exactly one line

UNSAFE = ["a cat", "a small cat", "a photo of a cat", "two cats on a chair", "a cat sitting"]
SAFE = ["a dog", "a red chair", "a photo of a tree", "two dogs on a sofa", "a house"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from pipeline_twins import flux_pipeline_folder

    root = tmp_path_factory.mktemp("erase")
    flux_pipeline_folder(root / "dev", guidance=True, seed=71)
    (root / "unsafe.txt").write_text("\n".join(UNSAFE) + "\n\n")
    (root / "safe.txt").write_text("\n".join(SAFE) + "\n")
    return root


def _torch_pooled(folder, prompts):
    import transformers as tf

    tok = tf.CLIPTokenizer.from_pretrained(folder / "dev" / "tokenizer")
    model = tf.CLIPTextModel.from_pretrained(folder / "dev" / "text_encoder").eval()
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(ids.input_ids).pooler_output.numpy()


def test_fit_writes_the_span_of_the_pipelines_pooled_vectors(folder, capsys):
    out = folder / "cat.safetensors"
    status, text, _ = run(capsys, "safety", "erase", "--model", folder / "dev", "--unsafe-prompts",
                          folder / "unsafe.txt", "--safe-prompts", folder / "safe.txt", "--rank", "2",
                          "--concept", "cat", "--out", out)
    assert status == 0 and "rank 2, 5 unsafe and 5 safe prompts" in text
    sub, meta = erasure.load_subspace(out)
    assert meta["concept"] == "cat" and meta["position"] == erasure.POOLED and meta["unsafe_prompts"] == 5
    want = erasure.fit_subspace(_torch_pooled(folder, UNSAFE), _torch_pooled(folder, SAFE), 2)
    # the same span (columns up to sign) and anchor, from diffusers' own text encoder
    proj = lambda u: np.asarray(u, np.float64) @ np.asarray(u, np.float64).T  # noqa: E731
    np.testing.assert_allclose(proj(sub.basis), proj(want.basis), atol=2e-4)
    np.testing.assert_allclose(np.asarray(sub.anchor), np.asarray(want.anchor), atol=2e-5)


def test_generate_with_the_erasure(folder, tmp_path, capsys):
    sub = erasure.fit_subspace(np.eye(32)[:1] * 5.0, np.zeros((3, 32)), 1)
    path = erasure.save_subspace(tmp_path / "e.safetensors", sub, {"concept": "x"})
    common = ["generate", "--model", folder / "dev", "--prompt", "a cat", "--steps", "2", "--size", "16",
              "--max-sequence-length", "4"]
    assert run(capsys, *common, "--out", tmp_path / "plain.png")[0] == 0
    assert run(capsys, *common, "--erase", path, "--out", tmp_path / "erased.png")[0] == 0
    from PIL import Image

    plain, erased = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.int32) for n in ("plain", "erased"))
    assert np.abs(plain - erased).max() > 0  # the pooled vector's first coordinate moved to 0


def test_refusals_name_the_file(folder, tmp_path, capsys):
    wide = erasure.save_subspace(tmp_path / "wide.safetensors",
                                 erasure.fit_subspace(np.ones((2, 64)), np.zeros((2, 64)), 1), {"model": "other"})
    common = ["generate", "--model", folder / "dev", "--prompt", "a cat", "--steps", "1", "--size", "16"]
    status, _, err = run(capsys, *common, "--erase", wide, "--out", tmp_path / "x.png")
    assert status == 2 and "width 64" in err and "32" in err and not (tmp_path / "x.png").exists()
    from safetensors.numpy import save_file

    save_file({"basis": np.zeros((3, 1), np.float32)}, tmp_path / "other.safetensors")
    status, _, err = run(capsys, *common, "--erase", tmp_path / "other.safetensors", "--out", tmp_path / "x.png")
    assert status == 2 and "not a concept erasure" in err and "other.safetensors" in err
    (tmp_path / "empty.txt").write_text("\n\n")
    status, _, err = run(capsys, "safety", "erase", "--model", folder / "dev", "--unsafe-prompts",
                         tmp_path / "empty.txt", "--safe-prompts", folder / "safe.txt",
                         "--out", tmp_path / "e.safetensors")
    assert status == 2 and "--unsafe-prompts" in err and "no prompts" in err
    status, _, err = run(capsys, "safety", "eval", "--model", folder / "dev", "--prompts", "p.csv", "--method", "erase",
                         "--out", tmp_path / "run")
    assert status == 2 and "--method erase needs --erase FILE" in err
