"""Flow-matching schedules and the Euler sampler, the whole loop compiled as one program.

Schedules equal diffusers' `FlowMatchEulerDiscreteScheduler` as the FLUX and SD3 pipelines drive it:
static shift (SD3.x, schnell with shift 1), FLUX's resolution-dependent dynamic shift (mu linear in the
image-token count), computed on the host in float32 exactly as diffusers does. The sampler runs every step
inside one `lax.scan`: no host round trip per step; the step index is passed to the model (and its hooks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import hooks as hk

_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Fields of a diffusers `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], where: str = "scheduler config") -> "SchedulerConfig":
        name = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{where}: scheduler {name!r} is not supported (FlowMatchEulerDiscreteScheduler only)")
        bad = [k for k in _UNSUPPORTED if cfg.get(k)]
        if bad:
            raise ValueError(f"{where}: options {bad} are not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in cfg.items() if k in fields and v is not None}
        if values.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ValueError(f"{where}: time_shift_type {values['time_shift_type']!r}")
        return cls(**values)


# Official scheduler configs (the `scheduler/scheduler_config.json` of each checkpoint).
FLUX_DEV_SCHEDULER = SchedulerConfig(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                     base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = SchedulerConfig(shift=1.0, use_dynamic_shifting=False)
SD3_SCHEDULER = SchedulerConfig(shift=3.0)


def flux_mu(image_seq_len: int, config: SchedulerConfig) -> float:
    """FLUX's shift parameter: linear in the image-token count (0.5 at 256 tokens, 1.15 at 4096)."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def _shift(sigmas: np.ndarray, config: SchedulerConfig, mu: float | None) -> np.ndarray:
    """Shift in the array's own precision with Python-float constants, as diffusers computes it."""
    if config.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this schedule uses dynamic shifting: pass mu (see flux_mu)")
        if config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return mu / (mu + (1 / sigmas - 1))
    return config.shift * sigmas / (1 + (config.shift - 1) * sigmas)


def _stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - terminal)
    return (1 - one_minus / scale).astype(np.float32)


def flow_match_schedule(config: SchedulerConfig, num_steps: int, sigmas=None, mu: float | None = None):
    """(sigmas [N+1] ending in 0, timesteps [N] = sigma * num_train_timesteps), float32 numpy.

    `sigmas=None` reproduces `set_timesteps(num_steps)` (SD3 pipelines): a linspace between the
    scheduler's own sigma_max and sigma_min, shifted. FLUX pipelines pass `linspace(1, 1/N, N)` and mu.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    n = config.num_train_timesteps
    if sigmas is None:
        # The scheduler's own range, built in float32 at construction; the linspace between its ends and
        # the shift that follows run in float64 (diffusers' set_timesteps without sigmas).
        train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        if not config.use_dynamic_shifting:
            train = _shift(train, config, None)
        sigmas = np.linspace(float(train[0]) * n, float(train[-1]) * n, num_steps) / n
    else:
        sigmas = np.asarray(sigmas).astype(np.float32)
    if len(sigmas) != num_steps:
        raise ValueError(f"{len(sigmas)} sigmas given for {num_steps} steps")
    sigmas = _shift(sigmas, config, mu)
    if config.shift_terminal:
        sigmas = _stretch_to_terminal(sigmas, config.shift_terminal)
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(n)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def flux_schedule(config: SchedulerConfig, num_steps: int, image_seq_len: int):
    """The FLUX pipelines' schedule: sigmas linspace(1, 1/N, N), mu from the (noise) image-token count."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    return flow_match_schedule(config, num_steps, sigmas=sigmas, mu=flux_mu(image_seq_len, config))


Denoiser = Callable[..., Any]


def euler_sample(denoise: Denoiser, latents: jax.Array, sigmas: jax.Array, timesteps: jax.Array,
                 on_step: Callable[[jax.Array], None] | None = None, state: Any = None):
    """Integrate the flow ODE with Euler steps, all steps inside one `lax.scan`.

    denoise(latents, timestep, step_index) -> velocity, with `timestep` the scheduler's value
    (sigma * 1000) and `step_index` an int32 scalar. With `state` (any pytree, e.g. a safety
    controller's masks), denoise(latents, timestep, step_index, state) -> (velocity, state) and the final
    state is returned too. The update is computed in float32 and cast back to the latents' dtype, as
    diffusers does. `on_step(step_index)` runs as a host callback after each step (progress bars);
    None adds nothing to the program.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    stateful = state is not None

    def body(carry, i):
        x, st = carry
        if stateful:
            v, st = denoise(x, timesteps[i], i, st)
        else:
            v = denoise(x, timesteps[i], i)
        x_next = (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)).astype(x.dtype)
        if on_step is not None:
            jax.debug.callback(on_step, i, ordered=True)
        return (x_next, st), None

    (out, state), _ = jax.lax.scan(body, (latents, state), jnp.arange(timesteps.shape[0], dtype=jnp.int32))
    return (out, state) if stateful else out


HooksArg = hk.Hooks | Callable[[jax.Array], hk.Hooks] | None  # fixed, or a function of the step index


def hooks_at(hooks: HooksArg, step: jax.Array) -> hk.Hooks | None:
    """The user's Hooks for one step (a fixed value or a function of the step), carrying that step."""
    if hooks is None:
        return None
    h = hooks(step) if callable(hooks) else hooks
    return h.replace(step=step)


def controlled_euler(velocity: Callable, latents: jax.Array, sigmas: jax.Array, timesteps: jax.Array,
                     hooks: HooksArg = None, controller: "hk.Controller | None" = None,
                     geometry: "hk.Geometry | None" = None, *, aux: Any = None, branches: int = 1, lead: int = 0,
                     on_step: Callable[[jax.Array], None] | None = None):
    """The one denoising loop of every pipeline: Euler steps (`euler_sample`) of
    velocity(x, timestep, step_index, step_hooks, aux) -> (velocity, captures, aux), where step_hooks
    are the user's `hooks` at that step merged with the `controller`'s (`hk.Controller`: its hooks from
    the state before the step, its state updated from the step's captures after it) and `aux` is the
    caller's own carried state (e.g. a guidance momentum). `branches`: how many copies of the latents the
    model's batch holds each step (classifier-free guidance's conditional and unconditional branches, ...),
    branch after branch; the controller then keeps one state per image, the one it finds on branch `lead`
    (the prompt's), for every branch: the branches predict the same image, so they are steered on the same
    patches, and only the prompt's branch names the concept.

    Returns (latents, final controller state or None).
    """
    if controller is None and aux is None:
        out = euler_sample(lambda x, t, i: velocity(x, t, i, hooks_at(hooks, i), None)[0], latents, sigmas,
                           timesteps, on_step)
        return out, None

    def denoise(x, t, i, state):
        ctrl, carried = state
        step_hooks = hooks_at(hooks, i)
        if controller is not None:
            step_hooks = hk.merge(step_hooks, controller.hooks(ctrl, i, t, geometry)).replace(step=i)
        v, caps, carried = velocity(x, t, i, step_hooks, carried)
        if controller is not None:
            ctrl = _from_lead(controller.update(ctrl, caps, i, t, geometry), branches, lead)
        return v, (ctrl, carried)

    start = (None if controller is None else controller.init(branches * latents.shape[0], geometry), aux)
    out, (ctrl, _) = euler_sample(denoise, latents, sigmas, timesteps, on_step, state=start)
    return out, ctrl


def _from_lead(state, branches: int, lead: int):
    """Every leaf [branches * B, ...] with each branch's rows replaced by branch `lead`'s."""
    if branches == 1:
        return state
    return jax.tree.map(lambda s: jnp.concatenate([jnp.split(s, branches)[lead]] * branches), state)


def cfg_combine(uncond: jax.Array, cond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond) (diffusers' SD3 formula)."""
    return uncond + scale * (cond - uncond)
