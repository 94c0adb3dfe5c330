"""Captured activations brought to the host while a pipeline runs (`capture_run`).

The compiled loop hands each step's captures to a host callback; a traced integer names the dict they go
to in a registry of open runs, so one compiled loop serves every `capture_run` call with the same shapes.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdit import hooks as hk


_CAPTURE_SINKS: dict[int, tuple[set | None, dict]] = {}
_CAPTURE_COUNTER = itertools.count()


def _capture_to_host(caps, step, sink):
    wanted, kept = _CAPTURE_SINKS[int(sink)]
    if wanted is None or int(step) in wanted:
        kept[int(step)] = {k: np.asarray(v) for k, v in caps.items()}


@struct.dataclass
class _Recorder:
    """Controller bringing each step's captures to the host. `sink` (a traced int) names the dict they go
    to, so one compiled loop serves every capture_run call with the same shapes."""

    sink: jax.Array
    capture: tuple[str, ...] = struct.field(pytree_node=False, default=())

    def init(self, batch, geometry):
        return jnp.zeros((), jnp.int32)

    def hooks(self, state, step, t, geometry):
        return hk.Hooks(capture=self.capture)

    def update(self, state, captures, step, t, geometry):
        jax.debug.callback(_capture_to_host, dict(captures), step, self.sink, ordered=True)
        return state


def capture_run(pipe, *args, capture: Sequence[str], steps: Sequence[int] | None = None, **kwargs):
    """Run a pipeline once and bring the captured positions of the chosen steps to the host.

    Returns (pipeline output, {step: {position: numpy array}}). Captures travel out of the compiled loop
    through a host callback, so memory holds one step's captures at a time on the device.
    """
    token = next(_CAPTURE_COUNTER)
    kept: dict[int, dict[str, np.ndarray]] = {}
    _CAPTURE_SINKS[token] = (None if steps is None else {int(s) for s in steps}, kept)
    try:
        out = pipe(*args, controller=_Recorder(jnp.int32(token), tuple(capture)), **kwargs)
        jax.effects_barrier()
    finally:
        del _CAPTURE_SINKS[token]
    return out, kept
