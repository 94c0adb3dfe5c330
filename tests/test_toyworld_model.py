"""The committed toy-world weights: they load like any checkpoint, they are what the recorded command
produces, the detector reads rendered scenes, the model draws what it is asked (the prompt-following bars of
docs/toyworld.md, on a small sample of fresh items, with a margin for its size), and hooks reach it."""

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
def following(world):
    from jaxdit.toyworld.evaluation import prompt_following, run_suites
    from jaxdit.toyworld.suites import build_suites

    tw, det = world
    # Items of a seed no measurement in the docs uses, so the bars hold on items nobody looked at.
    suites = build_suites("star", n=N, seed=424_242)
    return prompt_following(run_suites(tw, det, suites, "star"))


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


# Margin for N = 16 items per suite: one standard error of a rate near 0.9 is about 0.075.
MARGIN = 0.12


def test_prompt_following_bars_hold_on_fresh_items(following):
    from jaxdit.toyworld.evaluation import BARS

    floors = {k: bar - MARGIN for k, bar in BARS.items()}
    missed = {k: (round(following[k], 3), round(floor, 3)) for k, floor in floors.items() if following[k] < floor}
    assert not missed, missed


def _phases(info: dict) -> list[dict]:
    """The training records of the committed weights, first phase first (a continued phase keeps the
    record of the weights it started from under "base")."""
    return ([] if info is None else _phases(info.get("base"))) + ([info] if info else [])


def test_committed_weights_are_what_the_recorded_commands_produce(world):
    """Re-run the first training steps of every recorded phase (command, seed, data mix, starting weights):
    the same losses, step by step. The variant without the pooled input (`weights_attention`): its phases
    start as the committed weights' do, and its phase 4 (the fade, from the committed weights) re-runs too;
    its phase 5 starts from phase 4's export, which is not committed."""
    import jax

    from jaxdit.toyworld import train as T
    from jaxdit.toyworld.data import training_batch
    from jaxdit.toyworld.pipeline import ToyWorld

    tw, _ = world
    cfg = M.ToyConfig(tw.flux_config, tw.t5_config)
    phases = _phases(tw.info)
    assert phases and phases[-1] is tw.info
    variant = _phases(ToyWorld.load(DEFAULT_DIR.parent / "weights_attention").info)
    assert variant[:len(phases)] == phases and variant[len(phases)]["hyper"]["pooled"] == "fade"
    assert variant[-1]["hyper"]["pooled"] == "off" and len(variant) == len(phases) + 2
    for info in phases + [variant[len(phases)]]:
        hyper, first = info["hyper"], info["first_steps"]
        assert info["reproduce"].startswith(f"jaxdit toyworld train --run RUN --seed {hyper['seed']} "
                                            f"--steps {hyper['steps']}")
        opt = T.make_optimizer(hyper["lr"], hyper["warmup"], hyper["steps"])
        pooled = hyper.get("pooled", "mean")
        params = T.initial_params(cfg, hyper["seed"], hyper.get("init_from"), pooled)
        state = {"params": params, "ema": params, "opt_state": opt.init(params)}
        step_fn = T.make_step(cfg, opt, hyper["ema"], pooled, hyper.get("fade_steps", 0))
        key = jax.random.key(hyper["seed"] + 1)
        for rec in first:
            step = rec["step"] - 1
            batch = training_batch(hyper["seed"], step, hyper["t2i_batch"], hyper["edit_batch"], tw.tokenizer,
                                   hyper.get("mix", "uniform"))
            state, metrics = step_fn(state, batch, jax.random.fold_in(key, step), step)
            for k in ("loss", "loss_t2i", "loss_edit"):
                assert float(metrics[k]) == pytest.approx(rec[k], rel=1e-4), (hyper.get("init_from"), rec["step"], k)


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
