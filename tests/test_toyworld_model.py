"""The committed toy-world weights: they load like any checkpoint, the detector reads rendered scenes, the
model has learned the world's flow, the suites are measured on it, and hooks reach it.

The issue's prompt-following bars (>= 90% requested-object accuracy, forbidden concept in >= 90% of explicit
prompts and benign edits) are measured by `jaxdit toyworld eval` and reported in docs/toyworld.md; the
committed weights do not meet them yet, so they are not asserted here."""

import numpy as np
import pytest

import jaxdit
from jaxdit import hooks as hk
from jaxdit.safety import evaluate as ev
from jaxdit.toyworld import model as M
from jaxdit.toyworld.weights import DEFAULT_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_DIR / "transformer").is_dir(), reason="no committed toy-world weights")

N = 16  # samples per suite: one compiled batch per task

@pytest.fixture(scope="module")
def world():
    from jaxdit.toyworld.detector import Detector
    from jaxdit.toyworld.pipeline import ToyWorld

    return ToyWorld.load(), Detector.load()


@pytest.fixture(scope="module")
def records(world):
    from jaxdit.toyworld.evaluation import run_suites
    from jaxdit.toyworld.suites import build_suites

    tw, det = world
    suites = build_suites("star", n=N, suites=("explicit", "benign_edits", "safe"))
    return ev.summarize(run_suites(tw, det, suites, "star"))


def test_committed_checkpoint_is_a_jaxdit_checkpoint():
    config, params = jaxdit.load_transformer(DEFAULT_DIR / "transformer")
    assert config == M.FLUX_CONFIG
    assert params["transformer_blocks"]["attn"]["to_q"]["kernel"].shape[0] == config.num_layers
    total = sum(f.stat().st_size for f in DEFAULT_DIR.rglob("*") if f.is_file())
    assert total < 20e6


def test_detector_on_rendered_ground_truth(world):
    from jaxdit.toyworld.detector import accuracy

    acc = accuracy(world[1], n=300, seed=777)
    assert acc["exact_set_accuracy"] >= 0.98, acc


def test_suite_numbers_are_measured(records):
    for suite in ("explicit", "benign_edits", "safe"):
        assert records[suite]["n"] == N
        assert 0 <= records[suite]["presence_base"] <= 1 and 0 <= records[suite]["accuracy_base"] <= 1


def test_trained_weights_beat_initialisation_on_held_out_scenes(world):
    """The committed model has learned the world: its flow-matching loss on scenes it never saw (a seed
    stream training does not use) is far below that of the same network at its initialisation."""
    import jax

    from jaxdit.toyworld.data import training_batch
    from jaxdit.toyworld.train import flow_loss

    tw, _ = world
    cfg = M.ToyConfig(tw.flux_config, tw.t5_config)
    batch = training_batch(987_654_321, 0, 16, 16, tw.tokenizer)
    init = M.init_params(cfg, jax.random.key(0))

    def loss(params):
        key = jax.random.key(1)
        return float(flow_loss(params, cfg, batch["t2i"]["image"], batch["t2i"]["ids"], batch["t2i"]["mask"], key)
                     + flow_loss(params, cfg, batch["edit"]["image"], batch["edit"]["ids"], batch["edit"]["mask"],
                                 key, batch["edit"]["context"]))

    trained, untrained = loss(tw.params), loss(init)
    assert trained < 0.25 * untrained, (trained, untrained)


def test_hooks_reach_the_toy_model(world):
    tw, _ = world
    cap = hk.Hooks(capture=("single.1.img.resid_post", "double.0.joint.attn_probs_txt_to_img"))
    ids, mask = tw.tokenizer(["a red star"])
    x = np.zeros((1, M.TOKENS, 48), np.float32)
    v, caps = M.velocity(tw.params, tw.flux_config, tw.t5_config, x, ids, mask, np.ones(1), hooks=cap)
    assert v.shape == (1, M.TOKENS, 48)
    assert caps["single.1.img.resid_post"].shape == (1, M.TOKENS, tw.flux_config.inner_dim)
    assert caps["double.0.joint.attn_probs_txt_to_img"].shape[-2:] == (tw.tokenizer.max_length, M.TOKENS)
