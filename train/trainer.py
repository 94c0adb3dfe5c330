"""SAE training: optax Adam under `jax.jit` on a ("data", "fsdp", "tensor") mesh, resumable exactly.

    cfg, params = train(data, out_dir, SAEConfig(d_in=3072, n_latents=49152, k=64), TrainConfig(steps=...))

Sharding. Specs come from the parameters' logical axes (`sae.param_axes`) under the one
`jaxdit.sharding.RULES` table: the batch is split over ("data", "fsdp"), the latents over "tensor": W_enc
P(None, 'tensor'), b_enc / threshold / dead counters P('tensor'), W_dec P('tensor', None), b_dec P(); Adam
moments are sharded like their parameters. The loss runs inside `jax.shard_map` (`sae.train_loss` with the exact
two-stage TopK), so the [B, n] latents never leave their shard; gradients, the optimiser step and the
decoder renormalisation (row-wise) run under GSPMD on the same shardings.

Output directory:

    OUT/train.json       SAE config (with the input scale estimated from data), train config, data path
    OUT/checkpoints/     orbax CheckpointManager: params, optimiser state, step, dead counters, and
                         the data-stream position (JSON) of every saved step
    OUT/metrics.jsonl    one JSON object per logged step (loss, fvu, mse, l0, dead_fraction, aux_loss, lr, ...)
    OUT/sae/             the final SAE (`jaxdit.train.interop.save_sae`), written when training ends

Resume (`resume=True`) restores the newest checkpoint and continues as if never interrupted: the state
is complete and the data stream is a function of its position, so on CPU the final parameters are
bitwise those of an uninterrupted run. `RunOptions` (mesh included) may change between the two; the
checkpoint is restored straight onto the new shardings.

AuxK. While no latent is dead the AuxK term is exactly 0, and the loop runs a step compiled without
it; steps where some latent is dead run a step compiled with AuxK at the narrowest width holding the
dead latents (`sae.auxk_widths`, each compiled when first needed). The host knows without asking the
device that no latent can be dead before `dead_tokens` tokens since the last read of the dead-latent
counters (`auxk_choice`), so it reads them (one host sync) only when that bound runs out, after
(dead_tokens - the largest counter) / batch_size steps, and at every step while some latent is dead. The
choice is a function of the state, so a resumed run makes the same choices; skipping AuxK changes no bit
of the result.

NaN / inf. The step records the first step whose batch was not finite (a device-side flag, no host sync);
the host reads it at every log and before every checkpoint and stops with the step, the stream position
and the chunk and row it came from, so no checkpoint ever holds a poisoned state.

Several processes: join them first (`jaxdit.distributed`, `jax.distributed.initialize`); the mesh then
spans every process's devices. The global batch of a step is `TrainConfig.data_streams` equal slices,
slice k from the data stream reading chunks k, k + streams, ... (`store.SlicedStream`), so the batches
depend on the number of streams, not on the number of processes or the mesh; each process reads only
the streams whose rows its devices hold (one stream per process by default: each reads its own share
of the chunks). Checkpoints are written by orbax from all processes and restore onto any number of
processes and any mesh; train.json, metrics, the progress bar and the final SAE come from process 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxdit import distributed
from jaxdit.convert.checkpoint import atomic_file
from jaxdit.sharding import RULES, logical_spec, make_mesh
from jaxdit.train import sae
from jaxdit.train.interop import save_sae
from jaxdit.train.store import ArraySource, SlicedStream, Source, StoreError, open_source

BATCH_AXES = RULES["batch"]
(LATENT_AXIS,) = RULES["latents"]
BATCH_SPEC = logical_spec(("batch", None))  # a [batch, d] array of activations
DECAYS = ("linear", "cosine", "constant")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


class NonFiniteError(ValueError):
    """NaN or inf in the training data or the loss."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained parameters (a resumed run must match it exactly)."""

    steps: int
    batch_size: int = 4096  # global tokens per step
    lr: float | None = None  # None: 2e-4 / sqrt(n / 2^14) (sparsify, dictionary_learning)
    warmup_steps: int = 1000
    decay: str = "linear"  # shape of the final decay to min_lr_ratio * lr
    decay_start: float = 0.8  # fraction of `steps` where the decay begins
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 6.25e-10  # OpenAI's; inputs have unit mean squared norm, so gradients are small
    clip_norm: float | None = 1.0
    loss: sae.LossConfig = sae.LossConfig()
    seed: int = 0  # parameter init and data order
    b_dec_init: str = "geometric_median"
    init_rows: int = 16384  # rows (from the start of the stream) for the input scale and b_dec
    normalize_inputs: bool = True  # scale inputs to mean squared norm ~ target_sq_norm
    target_sq_norm: float = 1.0
    shuffle_window: int = 4  # store chunks shuffled together (see BatchStream)
    # The batch is this many slices, each from its own share of the data chunks (store.SlicedStream).
    # None: the number of processes for a new run, the recorded number for a resumed one.
    data_streams: int | None = None
    threshold_ema: float = 0.01  # batchtopk: rate of the inference-threshold running average

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay {self.decay!r}: expected one of {list(DECAYS)}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init {self.b_dec_init!r}: expected one of {list(B_DEC_INITS)}")
        if not 0 <= self.decay_start <= 1:
            raise ValueError(f"decay_start must be a fraction in [0, 1], got {self.decay_start}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.data_streams is not None and self.data_streams < 1:
            raise ValueError(f"data_streams must be >= 1, got {self.data_streams}")

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "TrainConfig":
        return cls(**{**record, "loss": sae.LossConfig(**record["loss"])})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def base_lr(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run executes; free to change between a run and its resumption."""

    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); -1: the remaining devices
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    progress: bool = True


# --- schedule, optimiser, shardings ---------------------------------------------------------------------

def lr_schedule(tc: TrainConfig, base_lr: float) -> optax.Schedule:
    """Linear warm-up (the first update already at lr / warmup), constant, then the final decay."""
    start = int(tc.decay_start * tc.steps)
    span = max(tc.steps - start, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (t + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
        frac = jnp.clip((t - start) / span, 0.0, 1.0)
        if tc.decay == "linear":
            decay = 1 - (1 - tc.min_lr_ratio) * frac
        elif tc.decay == "cosine":
            decay = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        else:
            decay = 1.0
        return base_lr * warm * decay

    return schedule


def make_optimizer(tc: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    adam = optax.adam(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps)
    return optax.chain(clip_by_global_norm(tc.clip_norm), adam) if tc.clip_norm else adam


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same empty state) scaling by one factor, min(1, max_norm / norm): a
    multiply, which XLA fuses into Adam's moment updates, where optax's per-element divide makes it write
    out a clipped copy of every gradient first (24 ms a step for W_enc at d 768 on CPU)."""
    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def param_specs(cfg: sae.SAEConfig) -> dict[str, P]:
    """PartitionSpec of every SAE parameter (`check_mesh` makes the tensor axis divide the latents)."""
    return {name: logical_spec(axes) for name, axes in sae.param_axes(cfg).items()}


def mesh_for(sizes: tuple[int, int, int]) -> Mesh:
    """The mesh of `RunOptions.mesh`: fully given sizes may use fewer devices than there are (the first
    ones), with one process; a mesh of several processes spans all their devices."""
    count = int(np.prod(sizes))
    if -1 not in sizes and jax.process_count() > 1 and count != jax.device_count():
        raise ValueError(f"mesh {','.join(map(str, sizes))} has {count} devices, but the "
                         f"{jax.process_count()} processes have {jax.device_count()}: a mesh of several processes "
                         "spans every device (-1 for one axis takes the rest)")
    return make_mesh(*sizes, devices=None if -1 in sizes else jax.devices()[:count])


def check_mesh(cfg: sae.SAEConfig, tc: TrainConfig, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tc.batch_size % shards:
        raise ValueError(f"batch size {tc.batch_size} is not divisible by data*fsdp = {shards}")
    if tc.data_streams and tc.batch_size % tc.data_streams:
        raise ValueError(f"batch size {tc.batch_size} is not divisible by the {tc.data_streams} data streams")
    if cfg.n_latents % mesh.shape[LATENT_AXIS]:
        raise ValueError(f"n_latents {cfg.n_latents} is not divisible by the tensor axis ({mesh.shape[LATENT_AXIS]})")


# --- the train step -------------------------------------------------------------------------------------

def init_state(cfg: sae.SAEConfig, tc: TrainConfig, optimizer, b_dec: jax.Array | None) -> dict[str, Any]:
    """The whole training state: parameters, optimiser state, dead counters, step, first bad step."""
    params = sae.init_params(cfg, jax.random.key(tc.seed), b_dec)
    return {"params": params, "opt": optimizer.init(params),
            "since_fired": jnp.zeros((cfg.n_latents,), jnp.int32),
            "step": jnp.zeros((), jnp.int32),
            "bad_step": jnp.full((), -1, jnp.int32)}  # first step whose batch held NaN/inf, -1 if none


def state_shardings(cfg: sae.SAEConfig, optimizer, mesh: Mesh, abstract_state) -> dict[str, Any]:
    named = {k: NamedSharding(mesh, s) for k, s in param_specs(cfg).items()}
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_utils.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt"], named,
                                           transform_non_params=lambda _: replicated)
    return {"params": named, "opt": opt, "since_fired": NamedSharding(mesh, logical_spec(("latents",))),
            "step": replicated, "bad_step": replicated}


def uses_auxk(cfg: sae.SAEConfig, tc: TrainConfig) -> bool:
    """Whether the loss has an AuxK term (TopK-type SAEs with aux_alpha > 0)."""
    return cfg.arch in sae.SPARSE_ARCHS and tc.loss.aux_alpha > 0


def make_train_step(cfg: sae.SAEConfig, tc: TrainConfig, mesh: Mesh, optimizer, schedule, shardings, *,
                    auxk_width: int | None = None):
    """jit(step)(state, x [B, d]) -> (state, metrics); `state` is donated.

    `auxk_width` (see `sae.train_loss`): None decides inside the program whether AuxK runs and at which
    width; `train` instead compiles one step per width it needs and picks it on the host
    (`auxk_choice`): 0, the step without AuxK, wherever no latent is dead (AuxK would add exact zeros to
    the loss and the gradients there; tests/test_sae_train.py checks the bits against computing it), and
    the narrowest width holding the dead latents elsewhere. A program with a `lax.switch` pays, even in
    its empty branch, for copying the other branches' residuals; these do not.
    """
    # Only the mesh axes with more than one device: a collective over a size-1 axis is still a copy on CPU.
    batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    latents = LATENT_AXIS if mesh.shape[LATENT_AXIS] > 1 else None
    axes = sae.Axes(latents, batch_axes)
    specs = {k: P(*(a if a == latents else None for a in spec)) for k, spec in param_specs(cfg).items()}
    batch = tc.batch_size
    _, aux_shapes = jax.eval_shape(  # which metrics this architecture and loss report
        lambda x, s: sae.train_loss(sae.init_params(cfg, jax.random.key(0)), cfg, tc.loss, x, s, sae.Axes(), batch,
                                    auxk_width),
        jax.ShapeDtypeStruct((batch, cfg.d_in), jnp.float32), jax.ShapeDtypeStruct((cfg.n_latents,), jnp.int32))
    aux_specs = {k: P(latents) if k == "fired" else P() for k in aux_shapes}
    loss = jax.shard_map(
        lambda p, x, s: sae.train_loss(p, cfg, tc.loss, x, s, axes, batch, auxk_width), mesh=mesh,
        in_specs=(specs, P(batch_axes or None, None), P(latents)), out_specs=(P(), aux_specs))

    def step(state, x):
        params = state["params"]
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, x, state["since_fired"])
        grads = sae.project_decoder_grad(grads, params)
        updates, opt = optimizer.update(grads, state["opt"], params)
        params = sae.normalize_decoder(optax.apply_updates(params, updates))
        if cfg.arch == "batchtopk":  # inference threshold: running average of the batch thresholds
            old = params["threshold"]
            new = jnp.where(state["step"] == 0, aux["batch_threshold"],
                            (1 - tc.threshold_ema) * old + tc.threshold_ema * aux["batch_threshold"])
            params = {**params, "threshold": jnp.broadcast_to(new, old.shape)}
        count = state["step"] + 1
        finite = jnp.isfinite(jnp.sum(x * 0.0))  # NaN iff some entry is not finite; one fast reduction
        new_state = {"params": params, "opt": opt,
                     "since_fired": sae.update_since_fired(state["since_fired"], aux.pop("fired"), batch),
                     "step": count,
                     "bad_step": jnp.where((state["bad_step"] < 0) & ~finite, count, state["bad_step"])}
        return new_state, {"loss": value, "lr": schedule(state["step"]), **aux}

    return jax.jit(step, in_shardings=(shardings, NamedSharding(mesh, BATCH_SPEC)),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


def auxk_choice(step: int, max_since_fired: int, num_dead: int, cfg: sae.SAEConfig, tc: TrainConfig
                ) -> tuple[int, int]:
    """(the last step at which no latent can be dead, the AuxK width for step + 1), after `step` steps
    left every latent at most `max_since_fired` tokens since it last fired and `num_dead` latents dead.

    Counters grow by one batch per step at most, so no latent can be dead for (dead_tokens -
    max_since_fired) / batch_size more steps; once one is, the width is the narrowest of
    `sae.auxk_widths` holding the dead latents (0: no AuxK)."""
    dead_tokens = tc.loss.dead_tokens
    if max_since_fired < dead_tokens:
        return step + 1 + (dead_tokens - 1 - max_since_fired) // tc.batch_size, 0
    aux_k = min(tc.loss.aux_k, cfg.n_latents)
    return step, next(w for w in sae.auxk_widths(aux_k) if w >= min(num_dead, aux_k))


# --- data-dependent initialisation ----------------------------------------------------------------------

def process_rows(mesh: Mesh, batch: int) -> tuple[int, int]:
    """The rows [start, stop) of a [batch, d] array sharded over the batch axes that this process's
    devices hold (all of them with one process; a block of them when the batch axes span processes)."""
    index = NamedSharding(mesh, BATCH_SPEC).addressable_devices_indices_map((batch, 1))
    blocks = sorted({rows.indices(batch)[:2] for rows, _ in index.values()})
    start, stop = blocks[0][0], blocks[-1][1]
    if sum(b - a for a, b in blocks) != stop - start:  # a mesh of arbitrarily ordered devices
        raise ValueError(f"the batch rows held by {distributed.describe()} are not one block: {blocks}")
    return start, stop


def _global_batch(local: np.ndarray, mesh: Mesh, batch: int, rows: tuple[int, int]) -> jax.Array:
    """This process's rows [start, stop) of the batch -> the global [batch, d] array over the batch axes."""
    def block(index):  # one device's rows, found among this process's rows
        start, stop, _ = index[0].indices(batch)
        return local[start - rows[0]:stop - rows[0]]

    return jax.make_array_from_callback((batch, local.shape[1]), NamedSharding(mesh, BATCH_SPEC), block)


def _streams(tc: TrainConfig) -> int:
    return tc.data_streams or jax.process_count()


def estimate_init(source: Source, cfg: sae.SAEConfig, tc: TrainConfig, mesh: Mesh) -> tuple[float, np.ndarray | None]:
    """(input scale, b_dec in scaled units or None) from the first `init_rows` rows of the streams."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    size = tc.init_rows + -tc.init_rows % math.lcm(shards, _streams(tc))  # sharded and sliced like a batch
    rows = process_rows(mesh, size)
    stream = SlicedStream(source, size, rows, parts=_streams(tc), seed=tc.seed, window=tc.shuffle_window)
    sample = _global_batch(stream.next(), mesh, size, rows)
    if not bool(jax.jit(lambda x: jnp.all(jnp.isfinite(x)))(sample)):
        raise NonFiniteError(f"non-finite activations (NaN or inf) in the first {size} rows of the data, "
                             f"used to initialise the SAE: {stream.describe_nonfinite(1)}")
    scale = 1.0
    if tc.normalize_inputs:
        mean_sq = float(jax.jit(lambda x: jnp.mean(jnp.sum(x * x, axis=-1)))(sample))
        scale = sae.input_scale_for(mean_sq, tc.target_sq_norm)
    if tc.b_dec_init == "zeros":
        return scale, None
    scaled = sample * scale
    center = sae.geometric_median(scaled) if tc.b_dec_init == "geometric_median" else jnp.mean(scaled, axis=0)
    return scale, np.asarray(multihost_utils.process_allgather(center, tiled=True))


# --- the loop ----------------------------------------------------------------------------------------

def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (works when it spans processes)."""
    return np.asarray(x.addressable_data(0))


def _checkpoint_manager(out: Path, opts: RunOptions, create: bool = True) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        out.absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=opts.keep_checkpoints, cleanup_tmp_directories=True,
                                             create=create))


def _restore(manager: ocp.CheckpointManager, step: int, abstract, shardings) -> tuple[dict[str, Any], int]:
    """(training state on `shardings`, data position) of a saved step. Orbax reads each shard from the
    saved arrays whatever processes and mesh wrote them."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
    return restored.state, int(restored.meta["position"])


RECORD = "train.json"


def read_record(out: str | os.PathLike) -> dict[str, Any]:
    """OUT/train.json of a run: {"sae": ..., "train": ..., "data": ...}."""
    path = Path(out) / RECORD
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a training run")
    return json.loads(path.read_text())


def _start_record(out: Path, cfg: sae.SAEConfig, tc: TrainConfig, data) -> None:
    """Write OUT/train.json for a fresh run (refusing to overwrite an existing run)."""
    if (out / RECORD).exists() or (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a training run (pass resume / --resume to continue it)")
    distributed.barrier("jaxdit-sae-start-checked")  # every host has checked before process 0 writes the record
    if jax.process_index() == 0:
        record = {"format": "jaxdit-sae-training", "version": 1, "sae": cfg.to_json(), "train": tc.to_json(),
                  "data": str(data)}
        with atomic_file(out / RECORD) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    distributed.barrier("jaxdit-sae-start-written")


def _resumed(out: Path, cfg: sae.SAEConfig, tc: TrainConfig) -> tuple[sae.SAEConfig, TrainConfig]:
    """The stored SAE config (with its input scale) and `tc` with the run's data streams, after checking
    that the run's settings are unchanged."""
    if not (out / RECORD).exists():
        raise FileNotFoundError(f"cannot resume: {out / RECORD} does not exist")
    record = read_record(out)
    # a record without data streams comes from a trainer that read one stream per process
    stored_train = {"data_streams": jax.process_count(), **record["train"]}
    if tc.data_streams is None:
        tc = dataclasses.replace(tc, data_streams=stored_train["data_streams"])
    given_sae = {k: v for k, v in cfg.to_json().items() if k != "input_scale"}
    pairs = (("train.", stored_train, tc.to_json()), ("sae.", record["sae"], given_sae))
    problems = [f"{prefix}{k}: checkpoint {stored.get(k)!r}, given {v!r}"
                for prefix, stored, given in pairs for k, v in given.items() if stored.get(k) != v]
    if problems:
        raise ValueError(f"cannot resume {out} with different settings: {'; '.join(problems)}")
    return sae.SAEConfig.from_json(record["sae"]), tc


def _abstract_state(cfg: sae.SAEConfig, tc: TrainConfig, mesh: Mesh):
    """(optimizer, lr schedule, abstract training state, its shardings on `mesh`)."""
    schedule = lr_schedule(tc, tc.base_lr(cfg.n_latents))
    optimizer = make_optimizer(tc, schedule)
    abstract = jax.eval_shape(lambda: init_state(cfg, tc, optimizer, None))
    return optimizer, schedule, abstract, state_shardings(cfg, optimizer, mesh, abstract)


def restore_checkpoint(out: str | os.PathLike, mesh: tuple[int, int, int] = (-1, 1, 1), step: int | None = None
                       ) -> tuple[sae.SAEConfig, TrainConfig, dict[str, Any], int]:
    """(SAE config, train config, training state on `mesh`, data position) of the run in `out` at its
    checkpoint `step` (default: the newest), whatever number of processes and mesh saved it."""
    out = Path(out)
    record = read_record(out)
    cfg, tc = sae.SAEConfig.from_json(record["sae"]), TrainConfig.from_json(record["train"])
    if not (out / "checkpoints").is_dir():
        raise FileNotFoundError(f"{out / 'checkpoints'} does not exist: the run saved no checkpoint")
    _, _, abstract, shardings = _abstract_state(cfg, tc, mesh_for(mesh))
    manager = _checkpoint_manager(out, RunOptions(), create=False)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"{out / 'checkpoints'}: no checkpoint of step {step} "
                                    f"(saved: {sorted(manager.all_steps())})")
        state, position = _restore(manager, step, abstract, shardings)
    finally:
        manager.close()
    return cfg, tc, state, position


def train(data: str | os.PathLike, out: str | os.PathLike, cfg: sae.SAEConfig, tc: TrainConfig,
          opts: RunOptions = RunOptions(), *, resume: bool = False,
          callback: Callable[[dict[str, Any]], None] | None = None) -> tuple[sae.SAEConfig, sae.Params]:
    """Train an SAE on `data` (activation store, .npy or `store.ArraySource`; see also `train_array`),
    writing into `out`; returns (config, params).

    `cfg.input_scale` is replaced by the estimate from data (if tc.normalize_inputs). `callback(metrics)`
    runs on process 0 after every logged step. With `resume`, `out` must hold a run started with the
    same configs; it continues from its newest checkpoint (on any mesh and number of processes; bitwise
    on the same mesh). Every process of a multi-process run calls this with the same arguments.
    """
    out = Path(out)
    source = open_source(data)
    if source.d != cfg.d_in:
        raise StoreError(f"training data {data} has d={source.d}, but the SAE expects d_in={cfg.d_in}")
    mesh = mesh_for(opts.mesh)
    if resume:
        cfg, tc = _resumed(out, cfg, tc)
    else:
        tc = dataclasses.replace(tc, data_streams=_streams(tc))
    check_mesh(cfg, tc, mesh)
    b_dec = None
    if not resume:
        scale, b_dec = estimate_init(source, cfg, tc, mesh)
        cfg = cfg.replace(input_scale=scale)
        _start_record(out, cfg, tc, data)

    optimizer, schedule, abstract, shardings = _abstract_state(cfg, tc, mesh)
    step_fns: dict[int | None, Callable] = {}

    def step_fn(auxk_width: int | None):  # compiled when first needed
        if auxk_width not in step_fns:
            step_fns[auxk_width] = make_train_step(cfg, tc, mesh, optimizer, schedule, shardings,
                                                   auxk_width=auxk_width)
        return step_fns[auxk_width]

    dead_counts = jax.jit(lambda s: (jnp.max(s), jnp.sum(s >= tc.loss.dead_tokens, dtype=jnp.int32)))
    rows = process_rows(mesh, tc.batch_size)
    lead = jax.process_index() == 0
    manager = _checkpoint_manager(out, opts)
    try:
        latest = manager.latest_step() if resume else None
        if latest is not None:
            state, position = _restore(manager, latest, abstract, shardings)
        else:
            if b_dec is None and tc.b_dec_init != "zeros":  # resumed before the first checkpoint: start over
                b_dec = estimate_init(source, cfg, tc, mesh)[1]
            state = jax.jit(lambda b: init_state(cfg, tc, optimizer, b), out_shardings=shardings)(b_dec)
            position = 0
        start = int(_host(state["step"]))
        stream = SlicedStream(source, tc.batch_size, rows, parts=tc.data_streams, seed=tc.seed,
                              window=tc.shuffle_window, position=position)
        metrics_path = out / "metrics.jsonl"
        if lead:
            _truncate_metrics(metrics_path, start)

        def check_finite() -> None:
            """Raise if any step so far had a non-finite batch (before anything of it is saved)."""
            bad = int(_host(state["bad_step"]))
            if bad >= 0:
                first, last = stream.span(bad)
                raise NonFiniteError(f"non-finite activations (NaN or inf) in the training batch of step {bad} "
                                     f"(data position {first}..{last}): {stream.describe_nonfinite(bad)}")

        def choose(done: int) -> tuple[int, int]:
            top, num_dead = dead_counts(state["since_fired"])
            return auxk_choice(done, int(_host(top)), int(_host(num_dead)), cfg, tc)

        # Each step's program is a function of the state alone (so of nothing RunOptions or a resumption
        # change), read from the dead-latent counters only when the bound from the last read has run out.
        # Every process reads the same replicated counters, so all of them run the same program.
        auxk = uses_auxk(cfg, tc)
        free_until, width = choose(start) if auxk else (tc.steps, None)
        bar = tqdm(total=tc.steps, initial=start, disable=not (lead and opts.progress), desc="sae train", unit="step")
        t0 = t_last = time.perf_counter()
        s_last = start
        for s in range(start + 1, tc.steps + 1):
            if auxk and s > free_until:
                free_until, width = choose(s - 1)
            program = step_fn(0 if auxk and s <= free_until else width)
            state, metrics = program(state, _global_batch(stream.next(), mesh, tc.batch_size, rows))
            bar.update(1)
            if s % opts.log_every == 0 or s == tc.steps:
                check_finite()
                row = {k: float(_host(v)) for k, v in metrics.items()}
                if not math.isfinite(row["loss"]):
                    raise NonFiniteError(f"the loss became non-finite at step {s} (inputs were finite): {row}")
                now = time.perf_counter()
                row = {"step": s, "tokens": s * tc.batch_size, **row,
                       "tokens_per_s": (s - s_last) * tc.batch_size / max(now - t_last, 1e-9), "elapsed_s": now - t0}
                t_last, s_last = now, s
                if lead:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.3f}")
                    if callback is not None:
                        callback(row)
            if s % opts.checkpoint_every == 0 or s == tc.steps:
                check_finite()
                meta = ocp.args.JsonSave({"position": stream.position, "step": s})
                manager.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=meta))
        bar.close()
    finally:  # a pending asynchronous save completes even when the run stops with an error
        manager.wait_until_finished()
        manager.close()
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    params = {k: np.asarray(v) for k, v in params.items()}
    if lead:
        save_sae(out / "sae", cfg, params, overwrite=True,
                 training={"steps": tc.steps, "tokens": tc.steps * tc.batch_size, "data": str(data)})
    distributed.barrier("jaxdit-sae-saved")  # OUT/sae exists on return, on every process
    return cfg, params


def train_array(x: np.ndarray, out: str | os.PathLike, cfg: sae.SAEConfig, tc: TrainConfig,
                opts: RunOptions = RunOptions(), *, resume: bool = False,
                callback: Callable[[dict[str, Any]], None] | None = None,
                name: str = "array") -> tuple[sae.SAEConfig, sae.Params]:
    """`train` on rows x [N, d] held in memory (no file written for them): the batches, and so the
    parameters, are bitwise those of `train` on `x` saved as `.npy`. `name` stands for the data in
    train.json and in error messages."""
    return train(ArraySource(x, name=name), out, cfg, tc, opts, resume=resume, callback=callback)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the step a run resumes from (they will be logged again)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(l + "\n" for l in lines))
