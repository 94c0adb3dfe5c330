"""Several processes as one JAX run: 2 local CPU processes x 4 devices, joined by jax.distributed.

Each multi-process run starts its processes with `subprocess` (a timeout on every one, so that a hang
fails the test instead of hanging the suite), through the `jaxdit` command line where there is one and
through this file's `__main__` otherwise; results are compared with one process holding 8 devices (this
pytest process, see conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
LIMIT_S = 300  # wall-clock bound of any multi-process command here
SURVIVOR_BOUND_S = 60  # a killed process must surface on the other one within this
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
       "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTHONUNBUFFERED": "1"}  # float32 matmuls as in conftest


# --- starting processes -------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's processes: runs of the same program (the
    killed and the resumed training, say) compile it once."""
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    del ENV["JAX_COMPILATION_CACHE_DIR"], ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One process per id, each running `argv` plus its distributed flags, output into log files."""

    def __init__(self, argv: list[str], logs: Path, extra: tuple[str, ...] = ()):
        port = _free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"process{i}.log" for i in range(PROCESSES)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(
                    [*argv, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(PROCESSES),
                     "--process-id", str(i), *extra], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT))
        self.started = time.monotonic()

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self, i: int, limit: float = LIMIT_S) -> int:
        """Process i's exit status; every process is killed and the test fails if it runs past `limit`."""
        try:
            return self.procs[i].wait(timeout=max(limit - (time.monotonic() - self.started), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"process {i} still running after {limit} s:\n{self.output(i)[-3000:]}")

    def finish(self) -> None:
        """Wait for every process and require success."""
        for i in range(PROCESSES):
            assert self.wait(i) == 0, f"process {i} failed:\n{self.output(i)[-3000:]}"

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _jaxdit(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxdit.cli", *args]


# --- SAE training ---------------------------------------------------------------------------------------

STEPS = 60


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sae", "train", "--data", str(data), "--out", str(out), "--steps", str(STEPS), "--latents", "64",
            "--k", "4", "--batch-size", "64", "--lr", "1e-3", "--warmup", "5", "--aux-k", "8", "--dead-tokens", "128",
            "--mesh", "2,1,4", "--log-every", "10", "--checkpoint-every", "10", "--no-progress", *extra]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """8 chunks of planted sparse activations (d 16): each of 2 data streams reads 4."""
    from jaxdit.train.store import ActivationStore

    path = tmp_path_factory.mktemp("data") / "acts"
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(24, 16))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    store = ActivationStore.create(path, d=16)
    for _ in range(8):
        codes = rng.uniform(1, 2, (256, 24)) * (rng.random((256, 24)) < 3 / 24)
        store.append((3 * codes @ atoms + 1).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def two_process_run(store, tmp_path_factory) -> Path:
    """`jaxdit sae train` on 2 processes x 4 devices, mesh data 2 (one per process) x tensor 4."""
    out = tmp_path_factory.mktemp("train") / "two"
    run = Run(_jaxdit(*_train_argv(store, out)), out.parent / "logs-two")
    run.finish()
    assert "wrote" in run.output(0) and "wrote" not in run.output(1)  # one process reports
    return out


def _params(out: Path) -> dict[str, np.ndarray]:
    from jaxdit.train.interop import load_sae

    return load_sae(out)[1]


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_same_sae_as_one_process_with_8_devices(two_process_run, store, tmp_path):
    from test_sae_cli import run_cli

    one = tmp_path / "one"
    assert run_cli(_train_argv(store, one, "--data-streams", "2")) == 0
    record = json.loads((two_process_run / "train.json").read_text())
    assert record["train"]["data_streams"] == 2  # one stream per process by default
    two, single = _params(two_process_run), _params(one)
    for key in single:
        np.testing.assert_allclose(two[key], single[key], rtol=0, atol=1e-6, err_msg=key)
    assert max(m["aux_loss"] for m in _metrics(one)) > 0  # AuxK ran, its programs chosen alike everywhere
    assert [m["step"] for m in _metrics(two_process_run)] == list(range(10, STEPS + 1, 10))


@pytest.fixture(scope="module")
def killed_run(store, tmp_path_factory):
    """A 2-process run whose process 1 is killed (SIGKILL) mid-run after its first checkpoint:
    (out, exit status of process 0, seconds from the kill to its exit, its output)."""
    out = tmp_path_factory.mktemp("train") / "killed"
    run = Run(_jaxdit(*_train_argv(store, out)), out.parent / "logs-killed", ("--heartbeat-timeout", "5"))
    while not (out / "checkpoints" / "10").is_dir():  # orbax renames a step into place once complete
        assert all(p.poll() is None for p in run.procs), f"a process ended early:\n{run.output(0)[-3000:]}"
        assert time.monotonic() - run.started < LIMIT_S, "no checkpoint written"
        time.sleep(0.02)
    run.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    status = run.wait(0, limit=killed_at - run.started + SURVIVOR_BOUND_S)
    run.kill()
    return out, status, time.monotonic() - killed_at, run.output(0)


def test_a_killed_process_stops_the_other_with_a_clear_error_in_bounded_time(killed_run):
    out, status, seconds, output = killed_run
    print(f"survivor exited with status {status} {seconds:.1f} s after the kill")
    assert status != 0 and seconds < SURVIVOR_BOUND_S
    assert "another task died" in output or "process 0 of 2 stopped" in output, output[-3000:]
    assert not (out / "sae").exists()  # the kill came mid-run


def test_resume_on_both_processes_after_a_kill_is_bitwise_the_uninterrupted_run(killed_run, two_process_run,
                                                                                   store):
    out = killed_run[0]
    resumed = Run(_jaxdit(*_train_argv(store, out, "--resume")), out.parent / "logs-resumed")
    resumed.finish()
    uninterrupted, again = _params(two_process_run), _params(out)
    for key in uninterrupted:
        np.testing.assert_array_equal(again[key], uninterrupted[key], err_msg=key)
    assert _metrics(out) == _metrics(two_process_run)


def test_checkpoints_of_two_processes_restore_onto_one_process_and_other_meshes(two_process_run):
    import jax

    from jaxdit.train import trainer

    final = _params(two_process_run)
    for mesh in [(1, 1, 1), (1, 1, 8), (4, 1, 2)]:
        _, tc, state, position = trainer.restore_checkpoint(two_process_run, mesh=mesh)
        assert position == STEPS * tc.batch_size // tc.data_streams  # rows consumed by each stream
        assert int(state["step"]) == STEPS
        assert state["params"]["W_enc"].sharding.mesh.devices.shape == mesh
        for key, value in state["params"].items():
            np.testing.assert_array_equal(np.asarray(value), final[key], err_msg=f"{key} on mesh {mesh}")
    _, _, earlier, _ = trainer.restore_checkpoint(two_process_run, mesh=(2, 1, 4), step=STEPS - 10)
    assert int(earlier["step"]) == STEPS - 10 and len(jax.devices()) == 8


# --- harvesting -----------------------------------------------------------------------------------------

HARVEST_POSITIONS = ("double.1.img.resid_post", "double.0.txt.resid_post")


@pytest.fixture(scope="module")
def harvest_inputs(tmp_path_factory):
    """A tiny-flux checkpoint, conditioning for 5 prompts and the prompts' texts."""
    from jaxdit.convert.checkpoint import save_checkpoint
    from jaxdit.train.interop import write_safetensors

    root = tmp_path_factory.mktemp("harvest")
    save_checkpoint(root / "ckpt", *_tiny_flux())
    rng = np.random.default_rng(1)
    write_safetensors(root / "emb.safetensors", {
        "encoder_hidden_states": rng.normal(size=(5, 5, 24)).astype(np.float32),
        "pooled_projections": rng.normal(size=(5, 12)).astype(np.float32)})
    (root / "prompts.json").write_text(json.dumps([f"prompt {i}" for i in range(5)]))
    return root


def _harvest_argv(root: Path, out: Path) -> list[str]:
    return ["sae", "harvest", "--model", str(root / "ckpt"), "--conditioning", str(root / "emb.safetensors"),
            "--prompts", str(root / "prompts.json"), "--positions", *HARVEST_POSITIONS, "--steps", "0", "1",
            "--num-steps", "2", "--height", "32", "--width", "32", "--batch-size", "2", "--seed", "3",
            "--out", str(out)]


def test_two_processes_harvest_one_consistent_store(harvest_inputs, tmp_path):
    from test_sae_cli import run_cli

    from jaxdit.train.store import ActivationStore

    two = tmp_path / "two"
    run = Run(_jaxdit(*_harvest_argv(harvest_inputs, two)), tmp_path / "logs")
    run.finish()
    # 3 batches of 2, 2 and 1 prompts: process 0 takes batches 0 and 2, process 1 batch 1
    assert "process 0 of 2: batches 0, 2 (prompt rows 0..2, 4..5)" in run.output(0)
    assert "process 1 of 2: batches 1 (prompt rows 2..4)" in run.output(1)
    assert run_cli(_harvest_argv(harvest_inputs, tmp_path / "one")) == 0
    for position in HARVEST_POSITIONS:
        a, b = ActivationStore.open(two / position), ActivationStore.open(tmp_path / "one" / position)
        assert a.manifest == b.manifest  # every chunk listed once, in batch order, with its prompts
        assert [c["batch"] for c in a.chunks] == [0, 1, 2] and a.manifest["prompts"] == 5
        assert [c["prompt_texts"] for c in a.chunks] == [["prompt 0", "prompt 1"], ["prompt 2", "prompt 3"],
                                                         ["prompt 4"]]
        for i in range(len(a.chunks)):
            np.testing.assert_allclose(a.read(i), b.read(i), rtol=1e-6, atol=1e-6, err_msg=f"{position} chunk {i}")
        assert sorted(p.name for p in (two / position / "chunks").iterdir()) == ["000000", "000001", "000002"]
        assert sorted(p.name for p in (two / position).iterdir()) == ["chunks", "manifest.json"]


# --- sharded FLUX inference and parameter checkpoints ------------------------------------------------------

def _tiny_flux():
    """tiny-flux and numpy parameters of its shapes, drawn on the host (no compile)."""
    import jax

    from jaxdit import flux
    from jaxdit.configs import get_config

    cfg = get_config("tiny-flux")
    shapes = jax.eval_shape(lambda: flux.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(5)
    return cfg, jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def _flux_problem():
    """tiny-flux parameters (numpy) and a batch of 4 inputs, the same in every process."""
    from jaxdit import flux

    cfg, params = _tiny_flux()
    rng = np.random.default_rng(2)
    inputs = {"hidden_states": rng.normal(size=(4, 12, 16)), "encoder_hidden_states": rng.normal(size=(4, 5, 24)),
              "pooled_projections": rng.normal(size=(4, 12)), "timestep": rng.uniform(size=(4,)),
              "guidance": np.full((4,), 3.5)}
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    return cfg, params, inputs, flux.image_ids(3, 4), flux.text_ids(5)


def _flux_forward(cfg, params, inputs, img_ids, txt_ids):
    import jax

    from jaxdit import flux

    return jax.jit(lambda p, x: flux.forward(p, cfg, x["hidden_states"], x["encoder_hidden_states"],
                                             x["pooled_projections"], x["timestep"], img_ids, txt_ids,
                                             x["guidance"])[0])(params, inputs)


def flux_worker(out: Path) -> None:
    """One process of the sharded run: the forward on an fsdp 4 x tensor 2 mesh of all 8 devices, then
    an orbax checkpoint of the sharded parameters (every process writes its shards)."""
    import jax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from jaxdit import flux, sharding
    from jaxdit.configs import dump_config
    from jaxdit.convert.checkpoint import FORMAT, MARKER

    cfg, params, inputs, img_ids, txt_ids = _flux_problem()
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    assert jax.device_count() == 8 and len(mesh.local_devices) == 4

    def put(value, target):  # every process holds the whole value and gives each device its block
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    on_mesh = jax.tree.map(put, params, sharding.param_shardings(params, mesh, flux.logical_axes(cfg)))
    assert on_mesh["transformer_blocks"]["attn"]["to_q"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    batch = {k: put(v, sharding.batch_sharding(mesh, v.shape)) for k, v in inputs.items()}
    prediction = _flux_forward(cfg, on_mesh, batch, img_ids, txt_ids)
    assert len(prediction.sharding.device_set) == 8 and not prediction.is_fully_addressable
    prediction = multihost_utils.process_allgather(prediction, tiled=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((out / "ckpt" / "params").absolute(), on_mesh)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        dump_config(cfg, out / "ckpt" / "config.json")
        (out / "ckpt" / MARKER).write_text(json.dumps({**FORMAT, "family": cfg.family}))
        np.save(out / "prediction.npy", np.asarray(prediction))
    multihost_utils.sync_global_devices("flux-worker-done")


def test_sharded_flux_forward_over_two_processes_and_its_checkpoint(tmp_path):
    import jax

    from jaxdit import load_transformer, sharding

    run = Run([sys.executable, __file__, "flux", str(tmp_path)], tmp_path / "logs")
    run.finish()
    cfg, params, inputs, img_ids, txt_ids = _flux_problem()
    single = np.asarray(_flux_forward(cfg, jax.device_put(params, jax.devices()[0]), inputs, img_ids, txt_ids))
    prediction = np.load(tmp_path / "prediction.npy")
    np.testing.assert_allclose(prediction, single, rtol=0, atol=1e-5 * np.abs(single).max())

    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    _, restored = load_transformer(tmp_path / "ckpt")  # onto one process, unsharded
    for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
        np.testing.assert_array_equal(np.asarray(value), flat[path], err_msg=str(path))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    _, on_mesh = load_transformer(tmp_path / "ckpt", mesh=mesh)  # onto another mesh of one process
    kernel = on_mesh["single_transformer_blocks"]["proj_mlp"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for path, value in jax.tree_util.tree_flatten_with_path(on_mesh)[0]:
        np.testing.assert_array_equal(np.asarray(value), flat[path], err_msg=str(path))


# --- flags --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2 must be below --num-processes 2"),
    (["--coordinator", "localhost"], "argument --coordinator: expected HOST:PORT"),
    (["--coordinator", "host:70000"], "argument --coordinator: expected HOST:PORT"),
    (["--num-processes", "2"], "--num-processes and --process-id go together"),
    (["--num-processes", "0", "--process-id", "0"], "argument --num-processes: expected a positive integer"),
])
def test_bad_distributed_flags_are_refused_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    from test_sae_cli import run_cli

    for command in (["sae", "train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "run"),
                     "--steps", "1"], ["sae", "harvest", "--model", str(tmp_path / "m"), "--positions",
                                       "double.0.img.resid_post", "--steps", "0", "--out", str(tmp_path / "h")]):
        assert run_cli(command + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err and f"jaxdit {' '.join(command[:2])}: error:" in err, err
    assert not list(tmp_path.iterdir())  # nothing written


if __name__ == "__main__":  # a worker process: tests/test_multihost.py flux OUT --coordinator ... --process-id I
    from jaxdit.distributed import Launch, join

    _, case, where, _, coordinator, _, count, _, index = sys.argv
    join(Launch(coordinator=coordinator, num_processes=int(count), process_id=int(index)))
    {"flux": flux_worker}[case](Path(where))
