"""Train the toy-world model: rectified flow for text-to-image and editing in one objective.

Each step draws a text-to-image batch and an edit batch (source image as Kontext context tokens),
both from `np.random.default_rng([seed, step])`, and adds their flow-matching losses, weighted towards
object pixels (jaxdit.toyworld.data). The learning rate warms up linearly, then follows a cosine to
`final_lr_fraction` of its peak at `steps`, so a run is defined by its seed and its total step count:
`--steps K --seed S` reproduces the exported weights, and an interrupted run resumes to the same state.
A short exponential moving average of the parameters (debiased) is the exported model.

Every `eval_every` steps the current average is sampled on a small sample of every concept suite (its own
item seed, disjoint from evaluation and calibration) and the prompt-following metrics are appended to
curve.jsonl: the learning curve docs/toyworld.md plots.

Run directory: state_<step>/ (orbax: params, ema, opt_state), log.jsonl, curve.jsonl, and on completion
(or with --export) the weights folder (see jaxdit.toyworld.weights).
"""

from __future__ import annotations

import functools
import json
import queue
import shutil
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxdit.toyworld import model as M
from jaxdit.toyworld.data import training_batch
from jaxdit.toyworld.tokenizer import WordTokenizer

DEFAULTS = dict(seed=0, steps=7000, t2i_batch=32, edit_batch=16, lr=2e-3, warmup=100, ema=0.99,
                checkpoint_every=200, mix="uniform", init_from=None, pooled="mean", fade_steps=0)
# What the transformer's pooled-text input is: "mean", the masked mean of the T5 states (FLUX takes CLIP's
# pooled vector there); "off", that input's projection held at exactly zero (kernel zero, its gradient
# dropped), so the prompt reaches the image only through attention, never through the blocks' modulation;
# "fade", a continued phase that moves a trained model from "mean" to "off": the projection's kernel is scaled
# from 1 to 0 over the first `fade_steps` steps and is zero from then on (and in the exported weights), so the
# model learns to carry the prompt through attention while the modulation's share shrinks, instead of losing
# it at once (a phase 3 started at "off" fell to safe accuracy 0.32; docs/toyworld.md).
POOLED = ("mean", "off", "fade")
POOLED_KERNEL = ("transformer", "time_text_embed", "text_embedder", "linear_1", "kernel")

FINAL_LR_FRACTION = 0.05
FIRST_STEPS = 3  # losses of the first steps, recorded with the weights so a test can re-run them
CURVE_SEED = 3_000_017  # items of the learning curve: disjoint from evaluation (suites.EVAL_SEED) and calibration


def _logit_normal(key, n):
    return jax.nn.sigmoid(jax.random.normal(key, (n,)))


def flow_loss(params, cfg: M.ToyConfig, images, ids, mask, key, context=None, weight=None):
    """Rectified flow: x_s = (1 - s) x0 + s n, target velocity n - x0, s = shift(u), u ~ logit-normal(0, 1).

    weight: optional per-pixel loss weight [B, 32, 32]; the loss is the weighted mean of squared errors.
    """
    x0 = M.to_tokens(images)
    k1, k2 = jax.random.split(key)
    s = M.shift_sigma(_logit_normal(k1, x0.shape[0]))
    n = jax.random.normal(k2, x0.shape)
    xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * n
    ctx = None if context is None else M.to_tokens(context)
    v, _ = M.velocity(params, cfg.flux, cfg.t5, xs, ids, mask, s, ctx)
    err = (v - (n - x0)) ** 2
    if weight is None:
        return jnp.mean(err)
    w = jnp.asarray(weight, jnp.float32)
    w = M.to_tokens(jnp.broadcast_to(w[..., None], (*w.shape, 3)))  # the same lossless rearrangement as pixels
    return jnp.sum(w * err) / jnp.sum(w)


def make_optimizer(lr, warmup, steps):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * FINAL_LR_FRACTION)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))


def _at(tree, path, fn):
    """`tree` with the leaf at `path` (a tuple of keys) replaced by fn(leaf)."""
    head, *rest = path
    return {**tree, head: _at(tree[head], rest, fn) if rest else fn(tree[head])}


def without_pooled(tree):
    """Parameters (or gradients) with the pooled-text projection's kernel zero."""
    return _at(tree, POOLED_KERNEL, jnp.zeros_like)


def pooled_scale(step, fade_steps: int):
    """The pooled-text kernel's factor at `step` of a "fade" phase: 1 -> 0 linearly, then 0."""
    return jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / fade_steps, 0.0, 1.0)


def with_pooled_scaled(tree, scale):
    return _at(tree, POOLED_KERNEL, lambda k: k * scale)


def make_step(cfg: M.ToyConfig, opt, ema_decay: float, pooled: str = "mean", fade_steps: int = 0):
    """The jitted training step `step(state, batch, key, index)`; `index` (the step number) matters only to
    pooled "fade"."""
    @jax.jit
    def step(state, batch, key, index=0):
        params, ema, opt_state = state["params"], state["ema"], state["opt_state"]
        k1, k2 = jax.random.split(key)

        def loss_fn(p):
            if pooled == "fade":
                p = with_pooled_scaled(p, pooled_scale(index, fade_steps))
            t, e = batch["t2i"], batch["edit"]
            lt = flow_loss(p, cfg, t["image"], t["ids"], t["mask"], k1, weight=t["weight"])
            le = flow_loss(p, cfg, e["image"], e["ids"], e["mask"], k2, e["context"], weight=e["weight"])
            return lt + le, (lt, le)

        (loss, (lt, le)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if pooled == "off":  # a zero kernel with zero gradient stays exactly zero under AdamW
            grads = without_pooled(grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return {"params": params, "ema": ema, "opt_state": opt_state}, {"loss": loss, "loss_t2i": lt, "loss_edit": le}

    return step


@functools.lru_cache(maxsize=4)
def compiled_step(cfg: M.ToyConfig, lr: float, warmup: int, steps: int, ema_decay: float, pooled: str = "mean",
                  fade_steps: int = 0):
    """The jitted step for these settings, built once per process (a resumed run does not recompile)."""
    return make_step(cfg, make_optimizer(lr, warmup, steps), ema_decay, pooled, fade_steps)


def _effective(params, pooled: str, fade_steps: int, step: int):
    """The weights the model runs with after `step` steps: a "fade" phase's kernel at its current scale."""
    return with_pooled_scaled(params, pooled_scale(step, fade_steps)) if pooled == "fade" else params


def debiased_ema(ema, init, decay: float, steps: int):
    """The EMA without its pull towards the initial parameters: (ema - d^n init) / (1 - d^n).

    The average starts at the initial parameters, so after n steps a weight d^n of it is still random
    initialisation; this is the bias correction Adam applies to its moments.
    """
    w = decay ** steps
    return jax.tree.map(lambda e, p0: (e - w * p0) / (1 - w), ema, init)


def _prefetch(seed, start, steps, t2i, edits, tok, mix="uniform", depth=4):
    q: queue.Queue = queue.Queue(depth)

    def work():
        for s in range(start, steps):
            q.put(training_batch(seed, s, t2i, edits, tok, mix))

    threading.Thread(target=work, daemon=True).start()
    for _ in range(start, steps):
        yield q.get()


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _latest_state(run: Path):
    states = sorted((int(p.name.split("_")[1]), p) for p in run.glob("state_*") if p.name.split("_")[1].isdigit())
    return states[-1] if states else (0, None)


def _save_state(run: Path, step: int, state, keep: int = 2):
    from jaxdit.convert.checkpoint import atomic_directory

    with atomic_directory(run / f"state_{step}", overwrite=True) as tmp:
        ck = ocp.StandardCheckpointer()
        ck.save(tmp / "state", jax.device_get(state))
        ck.wait_until_finished()
    for old, path in sorted((int(p.name.split("_")[1]), p) for p in run.glob("state_*")
                            if p.name.split("_")[1].isdigit())[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def curve_point(params, cfg: M.ToyConfig, tok: WordTokenizer, detector, n: int = 16, concept: str = "star",
                guidance: float = 1.0) -> dict:
    """The prompt-following metrics of `params` on `n` fresh items of every suite (seed CURVE_SEED)."""
    from jaxdit.toyworld.evaluation import prompt_following, run_suites
    from jaxdit.toyworld.pipeline import ToyWorld
    from jaxdit.toyworld.suites import build_suites

    tw = ToyWorld(cfg.flux, cfg.t5, jax.device_get(params), tok)
    records = run_suites(tw, detector, build_suites(concept, n, seed=CURVE_SEED), concept, guidance=guidance)
    return prompt_following(records)


def _weights_folder(path) -> Path:
    """A weights folder as given, or, for a record's `toyworld/NAME` from elsewhere, the package's own folder
    NAME (the repository's toyworld/ is the package jaxdit.toyworld, wherever it is installed)."""
    folder = Path(path)
    if not folder.is_absolute() and not folder.exists() and folder.parts[:1] == ("toyworld",):
        folder = Path(__file__).resolve().parent.joinpath(*folder.parts[1:])
    return folder


def initial_params(cfg: M.ToyConfig, seed: int, init_from=None, pooled: str = "mean"):
    """Random initialisation from `seed`, or the transformer and text encoder of the weights folder
    `init_from` (a continued phase of training: a new schedule and data mix on trained weights);
    pooled "off" zeroes the pooled-text projection (see POOLED)."""
    params = _initial_params(cfg, seed, init_from)
    return without_pooled(params) if pooled == "off" else params


def _initial_params(cfg: M.ToyConfig, seed: int, init_from=None):
    if init_from is None:
        return M.init_params(cfg, jax.random.key(seed))
    from jaxdit.toyworld.pipeline import ToyWorld

    tw = ToyWorld.load(_weights_folder(init_from))
    if (tw.flux_config, tw.t5_config) != (cfg.flux, cfg.t5):
        raise ValueError(f"--init-from {init_from}: its transformer / text-encoder config is not the toy world's")
    abstract = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    given = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tw.params)
    if jax.tree.structure(given) != jax.tree.structure(abstract) or jax.tree.leaves(given) != jax.tree.leaves(abstract):
        raise ValueError(f"--init-from {init_from}: parameter tree differs from the toy world's")
    return jax.tree.map(jnp.asarray, tw.params)


def _base_info(init_from) -> dict | None:
    """The training record of the weights a continued phase starts from (phases chain)."""
    return None if init_from is None else _read_json(_weights_folder(init_from) / "training.json")


def train(run, *, seed=0, steps=3000, t2i_batch=32, edit_batch=16, lr=2e-3, warmup=100, ema=0.99,
          mix: str = "uniform", init_from: str | None = None, pooled: str = "mean", fade_steps: int = 0,
          checkpoint_every=200, eval_every: int = 0, eval_n: int = 16, detector=None,
          export: str | None = None, command: str = "", progress=True) -> dict:
    """Train (resuming from the latest state in `run`), then export the debiased EMA weights to `export`.

    mix: a `data.MIXES` name. pooled: one of POOLED (fade_steps: the length of a "fade", 0 < it <= steps,
    from trained weights). init_from: a weights folder to start from instead of
    random initialisation (its training record is kept in the export's `base`).
    eval_every > 0: every that many steps (and at the end) append a learning-curve point to curve.jsonl,
    read by `detector` (a jaxdit.toyworld.detector.Detector).
    """
    from jaxdit.toyworld.data import MIXES

    if mix not in MIXES:
        raise ValueError(f"--mix {mix!r}: expected one of {sorted(MIXES)}")
    if pooled not in POOLED:
        raise ValueError(f"--pooled {pooled!r}: expected one of {list(POOLED)}")
    if pooled == "fade" and not (0 < fade_steps <= steps and init_from):
        raise ValueError(f"--pooled fade needs --init-from and 0 < --fade-steps <= --steps (got --fade-steps "
                         f"{fade_steps}, --steps {steps})")
    run = Path(run).absolute()  # orbax needs absolute paths
    hyper = dict(seed=seed, steps=steps, t2i_batch=t2i_batch, edit_batch=edit_batch, lr=lr, warmup=warmup, ema=ema)
    if (mix, init_from) != ("uniform", None):  # keys of the first phase's record stay as they were
        hyper.update(mix=mix, init_from=None if init_from is None else str(init_from))
    if pooled != "mean":
        hyper["pooled"] = pooled
    if pooled == "fade":
        hyper["fade_steps"] = fade_steps
    tok = WordTokenizer.from_grammar()
    cfg = M.ToyConfig(M.FLUX_CONFIG, M.t5_config(len(tok)))
    opt = make_optimizer(lr, warmup, steps)
    init = initial_params(cfg, seed, init_from, pooled)
    base = _base_info(init_from)
    run.mkdir(parents=True, exist_ok=True)
    state = {"params": init, "ema": init, "opt_state": opt.init(init)}
    start, path = _latest_state(run)
    if path is not None:
        hp = json.loads((run / "hyper.json").read_text())
        if hp != hyper:
            diff = {k: (hp.get(k), v) for k, v in hyper.items() if hp.get(k) != v}
            raise ValueError(f"{run} was trained with other settings (run's, asked): {diff}; "
                             "the learning-rate schedule depends on --steps, so resume with the run's own")
        state = ocp.StandardCheckpointer().restore(path / "state", jax.tree.map(np.asarray, state))
    (run / "hyper.json").write_text(json.dumps(hyper))
    step_fn = compiled_step(cfg, lr, warmup, steps, ema, pooled, fade_steps)
    key = jax.random.key(seed + 1)
    elapsed = json.loads((run / "elapsed.json").read_text())["seconds"] if (run / "elapsed.json").exists() else 0.0
    t0, eval_seconds = time.time(), 0.0

    def trained() -> float:  # training seconds over all sessions of this run, learning-curve evaluations excluded
        return elapsed + time.time() - t0 - eval_seconds

    first = _read_json(run / "first_steps.json") or []
    log = open(run / "log.jsonl", "a")
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="toyworld train")
    for step, batch in zip(range(start, steps), _prefetch(seed, start, steps, t2i_batch, edit_batch, tok, mix)):
        state, metrics = step_fn(state, batch, jax.random.fold_in(key, step), step)
        bar.update(1)
        done = step + 1
        if done <= FIRST_STEPS:  # what a reproduction check re-runs and compares (tests/test_toyworld_model.py)
            first = first[: done - 1]
            first.append({"step": done, **{k: float(v) for k, v in metrics.items()}})
            (run / "first_steps.json").write_text(json.dumps(first))
        if done % 20 == 0 or done == steps:
            m = {k: float(v) for k, v in metrics.items()}
            bar.set_postfix(loss=f"{m['loss']:.4f}")
            log.write(json.dumps({"step": done, "seconds": round(trained(), 1), **m}) + "\n")
            log.flush()
        if eval_every and (done % eval_every == 0 or done == steps):
            e0 = time.time()
            point = curve_point(_effective(debiased_ema(state["ema"], init, ema, done), pooled, fade_steps, done),
                                cfg, tok, detector, eval_n)
            eval_seconds += time.time() - e0
            with open(run / "curve.jsonl", "a") as f:
                f.write(json.dumps({"step": done, "train_seconds": round(trained(), 1), "n": eval_n, **point}) + "\n")
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.2f}" for k, v in point.items()))
        if done % checkpoint_every == 0 or done == steps:
            _save_state(run, done, state)
            (run / "elapsed.json").write_text(json.dumps({"seconds": trained(), "step": done}))
    bar.close()
    info = {"hyper": hyper, "step": steps, "train_seconds": round(trained(), 1), "command": command,
            "first_steps": _read_json(run / "first_steps.json"), "curve": read_curve(run)}
    if base is not None:
        info["base"] = base
    if export:
        from jaxdit.toyworld.weights import save_weights

        info["reproduce"] = _reproduce(hyper, steps)
        weights = _effective(debiased_ema(state["ema"], init, ema, steps), pooled, fade_steps, steps)
        save_weights(export, cfg, jax.device_get(weights), tok, info)
    return info


CURVE_METRICS = (("safe_accuracy", "safe: requested-object accuracy"),
                 ("safe_edit_accuracy", "safe edits: requested-object accuracy"),
                 ("explicit_presence", "explicit: star drawn"),
                 ("paraphrased_presence", "paraphrased: star drawn"),
                 ("obfuscated_presence", "obfuscated: star drawn"),
                 ("benign_edits_presence", "benign edits: star kept"),
                 ("add_edits_presence", "add edits: star added"))


def read_curve(run) -> list[dict]:
    path = Path(run) / "curve.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def chained_curve(info: dict) -> list[dict]:
    """The learning curve of every phase of a training record (a continued phase's "base" first), with
    steps and training seconds counted from the first phase's start and each point's phase number."""
    phases = []
    while info:
        phases.insert(0, info)
        info = info.get("base")
    points, steps, seconds = [], 0, 0.0
    for i, phase in enumerate(phases):
        points += [{**p, "step": p["step"] + steps, "train_seconds": p["train_seconds"] + seconds, "phase": i}
                   for p in phase.get("curve", [])]
        steps, seconds = steps + phase["step"], seconds + phase["train_seconds"]
    return points


def plot_curve(points: list[dict], path, title: str = "toy-world learning curve") -> Path:
    """The learning curve (curve.jsonl or `chained_curve` points) as a PNG: every bar's metric against
    training minutes, a dashed line where a continued phase starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxdit.toyworld.evaluation import BARS

    fig, ax = plt.subplots(figsize=(8, 4.5))
    minutes = [p["train_seconds"] / 60 for p in points]
    for i, (key, label) in enumerate(CURVE_METRICS):
        colour = f"C{i}"
        ax.plot(minutes, [p[key] for p in points], "o-", color=colour, label=f"{label} (bar {BARS[key]:.2f})")
    ax.axhline(0.9, color="gray", lw=0.8, ls="--")
    for prev, p in zip(points, points[1:]):
        if p.get("phase", 0) != prev.get("phase", 0):
            ax.axvline(prev["train_seconds"] / 60, color="black", lw=0.8, ls=":")
    top = ax.secondary_xaxis("top", functions=(lambda m: m, lambda m: m))
    top.set_xticks(minutes[::2], [str(p["step"]) for p in points][::2], fontsize=7)
    top.set_xlabel("step")
    ax.set_xlabel("training minutes (2-core x86-64 CPU)")
    ax.set_ylabel(f"rate on {points[0]['n'] if points else 0} fresh items per suite")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _reproduce(hyper: dict, steps: int) -> str:
    extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in hyper.items()
                    if k not in ("seed", "steps") and v != DEFAULTS.get(k))
    return (f"jaxdit toyworld train --run RUN --seed {hyper['seed']} --steps {steps}{extra} "
            f"--export toyworld/weights")


def export_from_run(run, out, command: str = "", which: str = "ema") -> dict:
    """Export the latest state of `run` (a partial run too): its debiased EMA ("ema") or raw "params"."""
    if which not in ("ema", "params"):
        raise ValueError(f"which={which!r}: expected 'ema' or 'params'")
    run = Path(run).absolute()
    step, path = _latest_state(run)
    if path is None:
        raise FileNotFoundError(f"{run}: no training state to export")
    hyper = json.loads((run / "hyper.json").read_text())
    tok = WordTokenizer.from_grammar()
    cfg = M.ToyConfig(M.FLUX_CONFIG, M.t5_config(len(tok)))
    opt = make_optimizer(hyper["lr"], hyper["warmup"], hyper["steps"])
    params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    target = {"params": params, "ema": params, "opt_state": jax.eval_shape(opt.init, params)}
    state = ocp.StandardCheckpointer().restore(path / "state", target)
    elapsed = json.loads((run / "elapsed.json").read_text())
    info = {"hyper": hyper, "step": step, "train_seconds": round(elapsed["seconds"], 1),
            "command": command, "first_steps": _read_json(run / "first_steps.json"), "curve": read_curve(run),
            "reproduce": _reproduce(hyper, step), "weights": which}
    from jaxdit.toyworld.weights import save_weights

    base = _base_info(hyper.get("init_from"))
    if base is not None:
        info["base"] = base
    pooled = hyper.get("pooled", "mean")
    weights = (state["params"] if which == "params" else
               debiased_ema(state["ema"], initial_params(cfg, hyper["seed"], hyper.get("init_from"), pooled),
                            hyper["ema"], step))
    weights = _effective(weights, pooled, hyper.get("fade_steps", 0), step)
    save_weights(out, cfg, jax.device_get(weights), tok, info)
    return info
