"""Train the toy-world model: rectified flow for text-to-image and editing in one objective.

Each step draws a text-to-image batch and an edit batch (source image as Kontext context tokens),
both from `np.random.default_rng([seed, step])`, and adds their flow-matching losses. The learning rate
is constant after a warm-up and nothing depends on the total step count, so the state after K steps is the
same whether a run was asked for K or more steps: `--steps K --seed S` reproduces the checkpoint at step K.
An exponential moving average of the parameters is the exported model.

Run directory: state_<step>/ (orbax: params, ema, opt_state), log.jsonl, and on completion (or with
--export) the weights folder (see jaxdit.toyworld.weights).
"""

from __future__ import annotations

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

DEFAULTS = dict(seed=0, steps=3000, t2i_batch=48, edit_batch=16, lr=1e-3, warmup=200, ema=0.998,
                checkpoint_every=200)


def _logit_normal(key, n):
    return jax.nn.sigmoid(jax.random.normal(key, (n,)))


def flow_loss(params, cfg: M.ToyConfig, images, ids, mask, key, context=None):
    """Rectified flow: x_s = (1 - s) x0 + s n, target velocity n - x0, s = shift(u), u ~ logit-normal(0, 1)."""
    x0 = M.to_tokens(images)
    k1, k2 = jax.random.split(key)
    s = M.shift_sigma(_logit_normal(k1, x0.shape[0]))
    n = jax.random.normal(k2, x0.shape)
    xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * n
    ctx = None if context is None else M.to_tokens(context)
    v, _ = M.velocity(params, cfg.flux, cfg.t5, xs, ids, mask, s, ctx)
    return jnp.mean((v - (n - x0)) ** 2)


def make_optimizer(lr, warmup):
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))


def make_step(cfg: M.ToyConfig, opt, ema_decay: float):
    @jax.jit
    def step(state, batch, key):
        params, ema, opt_state = state["params"], state["ema"], state["opt_state"]
        k1, k2 = jax.random.split(key)

        def loss_fn(p):
            lt = flow_loss(p, cfg, batch["t2i"]["image"], batch["t2i"]["ids"], batch["t2i"]["mask"], k1)
            le = flow_loss(p, cfg, batch["edit"]["image"], batch["edit"]["ids"], batch["edit"]["mask"], k2,
                           batch["edit"]["context"])
            return lt + le, (lt, le)

        (loss, (lt, le)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return {"params": params, "ema": ema, "opt_state": opt_state}, {"loss": loss, "loss_t2i": lt, "loss_edit": le}

    return step


def debiased_ema(ema, init, decay: float, steps: int):
    """The EMA without its pull towards the initial parameters: (ema - d^n init) / (1 - d^n).

    The average starts at the initial parameters, so after n steps a weight d^n of it is still random
    initialisation; this is the bias correction Adam applies to its moments.
    """
    w = decay ** steps
    return jax.tree.map(lambda e, p0: (e - w * p0) / (1 - w), ema, init)


def _prefetch(seed, start, steps, t2i, edits, tok, depth=4):
    q: queue.Queue = queue.Queue(depth)

    def work():
        for s in range(start, steps):
            q.put(training_batch(seed, s, t2i, edits, tok))

    threading.Thread(target=work, daemon=True).start()
    for _ in range(start, steps):
        yield q.get()


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


def train(run, *, seed=0, steps=3000, t2i_batch=48, edit_batch=16, lr=1e-3, warmup=200, ema=0.998,
          checkpoint_every=200, export: str | None = None, command: str = "", progress=True) -> dict:
    """Train (resuming from the latest state in `run`), then export the EMA weights to `export`."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    hyper = dict(seed=seed, steps=steps, t2i_batch=t2i_batch, edit_batch=edit_batch, lr=lr, warmup=warmup, ema=ema)
    tok = WordTokenizer.from_grammar()
    cfg = M.ToyConfig(M.FLUX_CONFIG, M.t5_config(len(tok)))
    opt = make_optimizer(lr, warmup)
    params = M.init_params(cfg, jax.random.key(seed))
    state = {"params": params, "ema": params, "opt_state": opt.init(params)}
    start, path = _latest_state(run)
    if path is not None:
        hp = json.loads((run / "hyper.json").read_text())
        if hp != hyper | {"steps": hp["steps"]}:
            raise ValueError(f"{run} was trained with {hp}, not {hyper}")
        state = ocp.StandardCheckpointer().restore(path / "state", jax.tree.map(np.asarray, state))
    (run / "hyper.json").write_text(json.dumps(hyper))
    step_fn = make_step(cfg, opt, ema)
    key = jax.random.key(seed + 1)
    elapsed = json.loads((run / "elapsed.json").read_text())["seconds"] if (run / "elapsed.json").exists() else 0.0
    t0 = time.time()
    log = open(run / "log.jsonl", "a")
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="toyworld train")
    for step, batch in zip(range(start, steps), _prefetch(seed, start, steps, t2i_batch, edit_batch, tok)):
        state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
        bar.update(1)
        if (step + 1) % 20 == 0 or step + 1 == steps:
            m = {k: float(v) for k, v in metrics.items()}
            bar.set_postfix(loss=f"{m['loss']:.4f}")
            log.write(json.dumps({"step": step + 1, "seconds": round(elapsed + time.time() - t0, 1), **m}) + "\n")
            log.flush()
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            _save_state(run, step + 1, state)
            (run / "elapsed.json").write_text(json.dumps({"seconds": elapsed + time.time() - t0, "step": step + 1}))
    bar.close()
    seconds = elapsed + time.time() - t0
    info = {"hyper": hyper, "step": steps, "train_seconds": round(seconds, 1), "command": command}
    if export:
        from jaxdit.toyworld.weights import save_weights

        info["reproduce"] = _reproduce(hyper, steps)
        weights = debiased_ema(state["ema"], M.init_params(cfg, jax.random.key(seed)), ema, steps)
        save_weights(export, cfg, jax.device_get(weights), tok, info)
    return info


def _reproduce(hyper: dict, steps: int) -> str:
    extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in hyper.items()
                    if k not in ("seed", "steps") and v != DEFAULTS[k])
    return (f"jaxdit toyworld train --run RUN --seed {hyper['seed']} --steps {steps}{extra} "
            f"--export jaxdit/toyworld/weights")


def export_from_run(run, out, command: str = "", which: str = "ema") -> dict:
    """Export the latest state of `run` (a partial run too): its debiased EMA ("ema") or raw "params"."""
    if which not in ("ema", "params"):
        raise ValueError(f"which={which!r}: expected 'ema' or 'params'")
    run = Path(run)
    step, path = _latest_state(run)
    if path is None:
        raise FileNotFoundError(f"{run}: no training state to export")
    hyper = json.loads((run / "hyper.json").read_text())
    tok = WordTokenizer.from_grammar()
    cfg = M.ToyConfig(M.FLUX_CONFIG, M.t5_config(len(tok)))
    opt = make_optimizer(hyper["lr"], hyper["warmup"])
    params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
    target = {"params": params, "ema": params, "opt_state": jax.eval_shape(opt.init, params)}
    state = ocp.StandardCheckpointer().restore(path / "state", target)
    elapsed = json.loads((run / "elapsed.json").read_text())
    info = {"hyper": hyper | {"steps": step}, "step": step, "train_seconds": round(elapsed["seconds"], 1),
            "command": command, "reproduce": _reproduce(hyper, step), "weights": which}
    from jaxdit.toyworld.weights import save_weights

    weights = (state["params"] if which == "params" else
               debiased_ema(state["ema"], M.init_params(cfg, jax.random.key(hyper["seed"])), hyper["ema"], step))
    save_weights(out, cfg, jax.device_get(weights), tok, info)
    return info
