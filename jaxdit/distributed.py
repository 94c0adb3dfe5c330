"""Several processes as one JAX program, through JAX's own multi-controller runtime.

    jaxdit sae train ... --coordinator HOST:PORT --num-processes N --process-id I   # no launcher needed
    jaxdit sae train ... --distributed       # SLURM, Open MPI, Cloud TPU pods, JAX_COORDINATOR_ADDRESS

Every process runs the same command; `initialize` joins them with `jax.distributed.initialize` (process 0
hosts the coordinator at HOST:PORT), after which `jax.devices()` lists the devices of every process and
a mesh spans them. Values not given as flags come from the environment by JAX's own rules
(`JAX_COORDINATOR_ADDRESS`, SLURM / Open MPI variables, the Cloud TPU metadata); without any of the
flags a command runs as one process and never starts the runtime.

A process that dies stops sending heartbeats, and JAX then ends every other process with a fatal error
("... another task died ...") after `heartbeat_timeout` seconds, so a failure surfaces everywhere within
a bound instead of leaving the survivors blocked in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from typing import Any

import numpy as np

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


class DistributedError(ConnectionError):
    """Joining the processes failed, or one of them stopped; the message names this process."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run; None fields come from the environment."""

    coordinator: str | None = None  # HOST:PORT of the coordinator (process 0 listens on PORT)
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = 100  # seconds without heartbeats before a process counts as dead (JAX's)
    init_timeout: int = 300  # seconds to wait for every process to join (JAX's)


def coordinator_address(text: str) -> str:
    """An argparse `type=`: HOST:PORT (host name, IPv4, or [IPv6]; port 1..65535)."""
    match = _ADDRESS.match(text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 10.0.0.1:1234, a port in 1..65535), "
                                         f"got {text!r}")
    return text


def launch_from(args: argparse.Namespace) -> Launch | None:
    """The launch the command-line flags ask for (None: run as one process), or a one-line ValueError."""
    given = {name: getattr(args, name, None) for name in ("coordinator", "num_processes", "process_id")}
    if not getattr(args, "distributed", False) and all(v is None for v in given.values()):
        return None
    if (given["num_processes"] is None) != (given["process_id"] is None):
        raise ValueError("--num-processes and --process-id go together (or leave both to the environment)")
    if given["process_id"] is not None and given["process_id"] >= given["num_processes"]:
        raise ValueError(f"--process-id {given['process_id']} must be below --num-processes "
                         f"{given['num_processes']} (processes are numbered from 0)")
    return Launch(**given, heartbeat_timeout=args.heartbeat_timeout, init_timeout=args.init_timeout)


def join(launch: Launch) -> None:
    """`jax.distributed.initialize` for `launch`; call before anything else uses JAX."""
    import jax

    # Collectives between CPU processes (the tests, CPU-only hosts) need a transport; GPU and TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = launch.coordinator or "the coordinator from the environment"
    try:
        jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                                   process_id=launch.process_id, initialization_timeout=launch.init_timeout,
                                   heartbeat_timeout_seconds=launch.heartbeat_timeout,
                                   # an exiting process waits this long for the others, no longer
                                   shutdown_timeout_seconds=launch.heartbeat_timeout)
    except ValueError as e:  # nothing in the environment describes a multi-process run
        raise DistributedError(f"cannot join a multi-process run: {e} (give --coordinator, --num-processes and "
                               "--process-id, or run under SLURM, Open MPI or a Cloud TPU pod)") from None
    except RuntimeError as e:  # unreachable coordinator, timeout, or JAX already in use in this process
        who = "this process" if launch.process_id is None else f"process {launch.process_id}"
        raise DistributedError(f"{who} could not join the run at {where}: {first_line(e)}") from None


def initialize(args: argparse.Namespace) -> None:
    """Join the processes named by the command-line flags, if any: the one entry every command calls."""
    launch = launch_from(args)
    if launch is not None:
        join(launch)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def describe() -> str:
    """'process I of N' for messages."""
    import jax

    return f"process {jax.process_index()} of {jax.process_count()}"


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to do for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (a collective: all processes call it)."""
    import jax

    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    width = 1 << int(max(int(sizes.max()), 1) - 1).bit_length()  # powers of two: few distinct programs
    padded = np.zeros(width, np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, np.asarray(sizes).reshape(-1))]
