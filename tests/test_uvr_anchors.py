"""UVR anchor banks: k-means, concept tokens, patch selection, collection from a tiny FLUX, file round trip."""

import numpy as np
import pytest

from jaxdit.safety.uvr import anchors as anc


def test_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 5
    x = np.concatenate([c + 0.05 * rng.standard_normal((40, 8)) for c in centres])
    found = anc.kmeans(x, 3)
    dist = np.linalg.norm(found[:, None] - centres[None], axis=-1)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2] and dist.min(1).max() < 0.1


def test_discriminant_bank_is_fishers_direction_and_separates_what_the_mean_does_not():
    """Two Gaussian classes with one shared, correlated covariance: the bank's direction is the true
    Sigma^-1 (mu_1 - mu_0), score_patches puts the class means one apart, and it separates the classes where
    the concept's mean direction (what k-means anchors score along) does not."""
    import jax.numpy as jnp

    from jaxdit.safety.uvr.localize import score_patches

    rng = np.random.default_rng(0)
    h, d = 2, 4
    a = rng.normal(size=(h * d, h * d))
    cov = a @ a.T / (h * d) + np.diag(np.r_[25.0, np.ones(h * d - 1)])  # a large shared component on axis 0
    mu0 = np.r_[10.0, np.zeros(h * d - 1)]
    mu1 = mu0 + np.r_[0.0, 1.5, -1.0, np.zeros(h * d - 3)]
    n = 20000
    y = rng.random(n) < 0.2
    x = rng.multivariate_normal(np.zeros(h * d), cov, size=n) + np.where(y[:, None], mu1, mu0)
    bank = anc.discriminant_anchors(x.reshape(n, h, d), y, ridge=0.0)
    assert bank.shape == (h, 1, d)
    truth = np.linalg.solve(cov, mu1 - mu0)
    w = bank.reshape(-1)
    assert w @ truth / np.linalg.norm(w) / np.linalg.norm(truth) > 0.995
    score = np.asarray(score_patches(jnp.asarray(x.reshape(1, n, h, d), jnp.float32), jnp.asarray(bank)))[0]
    np.testing.assert_allclose(score[y].mean() - score[~y].mean(), 1.0, rtol=1e-3)

    def auc(s):  # P(concept patch scores above another patch)
        ranks = np.argsort(np.argsort(s))
        return (ranks[y].mean() - (y.sum() - 1) / 2) / (~y).sum()

    mean_bank = x[y].mean(0).reshape(h, 1, d)
    by_mean = np.asarray(score_patches(jnp.asarray(x.reshape(1, n, h, d), jnp.float32), jnp.asarray(mean_bank)))[0]
    assert auc(score) > 0.8 and auc(score) > auc(by_mean) + 0.2  # 0.84 against 0.52
    with pytest.raises(ValueError, match="1 concept"):
        anc.discriminant_anchors(x[:10].reshape(10, h, d), np.arange(10) == 0)


def test_patch_mask_from_attention():
    rng = np.random.default_rng(1)
    probs = rng.random((2, 3, 5, 10)) * 0.01
    probs[:, :, 2, [1, 7]] += 1.0  # token 2 attends to patches 1 and 7
    mask = anc.patch_mask_from_attention(probs, np.array([2]), n_gen=8, quantile=0.75)
    assert np.flatnonzero(mask).tolist() == [1, 7]


@pytest.fixture(scope="module")
def dev_pipe(tmp_path_factory):
    from jaxdit.pipeline import FluxPipeline
    from pipeline_twins import flux_pipeline_folder

    path = tmp_path_factory.mktemp("anchors") / "dev"
    flux_pipeline_folder(path, guidance=True, seed=21)
    return FluxPipeline.from_pretrained(path)


def test_concept_tokens(dev_pipe):
    tok = dev_pipe.tokenizer_2
    pos = anc.concept_token_positions(tok, "a photo of a cat sitting", "cat", 12)
    ids = tok("a photo of a cat sitting", padding="max_length", max_length=12)["input_ids"]
    assert tok.decode([ids[i] for i in pos]).strip() == "cat"


def test_collect_save_load_and_use(dev_pipe, tmp_path):
    prompts = ["a photo of a cat sitting on a red chair", "two dogs and a cat in the snow"]
    bank, meta = anc.collect(dev_pipe, prompts, "cat", position="single.1.img.attn_heads", height=32, width=32,
                             num_inference_steps=3, window_t=0.0, num_anchors=4, max_sequence_length=24)
    cfg = dev_pipe.transformer_config
    assert bank.shape == (cfg.num_attention_heads, 4, cfg.attention_head_dim)
    assert meta["steps"] == [0, 1, 2] and meta["vectors"] > 0 and np.isfinite(bank).all()
    path = anc.save_bank(tmp_path / "cat.safetensors", bank, meta)
    loaded, loaded_meta = anc.load_bank(path)
    np.testing.assert_array_equal(loaded, bank)
    assert loaded_meta["concept"] == "cat" and loaded_meta["format"] == "uvr-anchors"
    with pytest.raises(ValueError, match="does not contain the concept"):
        anc.collect(dev_pipe, ["a dog"], "cat", position="single.1.img.attn_heads", height=32, width=32,
                    num_inference_steps=2, window_t=0.0, max_sequence_length=12)


def test_collect_with_a_labeller_applied_after_each_run(dev_pipe):
    """A labeller sees each run's output and captures; giving the masks it finds is the same as giving them."""
    prompts = ["a photo of a cat", "a cat in the snow"]
    kw = dict(position="single.1.img.attn_heads", height=32, width=32, num_inference_steps=2, window_t=0.0,
              num_anchors=2, max_sequence_length=12)
    masks = [np.arange(64) % 2 == 0, np.arange(64) < 3]
    seen = []

    def labeller(i, output, kept):
        seen.append((i, sorted(kept), output.shape))
        return masks[i]

    bank, meta = anc.collect(dev_pipe, prompts, "unused", labeller=labeller, **kw)
    given, _ = anc.collect(dev_pipe, prompts, "unused", patch_masks=masks, **kw)
    np.testing.assert_array_equal(bank, given)
    assert [s[:2] for s in seen] == [(0, [0, 1]), (1, [0, 1])] and meta["vectors"] == 2 * (32 + 3)


def test_cli_anchors_then_generate_with_uvr(dev_pipe, tmp_path, capsys):
    from PIL import Image

    from jaxdit.cli import main

    folder = tmp_path / "pipe"
    from pipeline_twins import flux_pipeline_folder

    flux_pipeline_folder(folder, guidance=True, seed=21)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat sitting on a red chair\n\na cat on the moon\n")
    bank = tmp_path / "cat.safetensors"
    assert main(["uvr", "anchors", "--model", str(folder), "--concept", "cat", "--prompts", str(prompts),
                 "--out", str(bank), "--position", "single.1.img.attn_heads", "--steps", "2", "--size", "32",
                 "--window-t", "0", "--num-anchors", "3"]) == 0
    assert bank.exists()
    base = ["generate", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--size", "32",
            "--max-sequence-length", "12"]
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "uvr.png"), "--uvr", str(bank), "--uvr-threshold=-1e9"]) == 0
    with Image.open(tmp_path / "uvr.png") as im:
        assert im.size == (32, 32)
    assert main([*base, "--out", str(tmp_path / "x.png"), "--uvr", str(prompts)]) == 2
    assert "prompts.txt" in capsys.readouterr().err


@pytest.mark.parametrize("editing", [False, True])
def test_startup_analysis(tmp_path, editing):
    """`jaxdit uvr analyze` on tiny FLUX / Kontext folders: flows per step and block, IoU, PNG charts."""
    import json

    from PIL import Image

    from jaxdit.cli import main
    from pipeline_twins import flux_pipeline_folder

    folder = tmp_path / "pipe"
    flux_pipeline_folder(folder, guidance=True, seed=22, kontext=editing)
    bank = tmp_path / "bank.safetensors"
    rng = np.random.default_rng(0)
    anc.save_bank(bank, rng.standard_normal((2, 3, 16)).astype(np.float32),
                  {"concept": "cat", "position": "single.1.img.attn_heads"})
    args = ["uvr", "analyze", "--model", str(folder), "--bank", str(bank), "--prompt", "a photo of a cat sitting",
            "--concept", "cat", "--out", str(tmp_path / "report"), "--steps", "3", "--size", "32",
            "--threshold=-1e9"]
    if editing:
        src = tmp_path / "in.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src)
        args += ["--image", str(src)]
    assert main(args) == 0
    report = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert report["steps"] == [0, 1, 2] and report["iou_with_final"][-1] == 1.0
    assert len(report["layers"]) == 2 + 3 and np.asarray(report["text_flow_in_region"]).shape == (3, 5)
    assert np.all(np.asarray(report["text_flow_in_region"]) > 0)
    flows = np.asarray(report["context_flow_in_region"])
    assert (flows > 0).all() if editing else (flows == 0).all()
    for png in ["text_flow.png", "iou.png"] + (["context_flow.png"] if editing else []):
        with Image.open(tmp_path / "report" / png) as im:
            assert im.format == "PNG"
