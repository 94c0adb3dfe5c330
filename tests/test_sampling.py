"""Flow-matching schedules against diffusers' scheduler, and the compiled Euler loop against its step()."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from jaxdit import sampling

OFFICIAL = {
    # scheduler/scheduler_config.json of the official checkpoints
    "flux-dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                 "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
                 "shift": 3.0, "use_dynamic_shifting": True},
    "flux-schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                     "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
}


def _diffusers(cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in cfg.items() if k != "_class_name"})


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
@pytest.mark.parametrize("size,steps", [(256, 4), (512, 28), (1024, 28), (768, 50), (1024, 1)])
def test_flux_schedules_equal_diffusers(name, size, steps):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = OFFICIAL[name]
    seq = (size // 16) ** 2
    ref = _diffusers(cfg)
    mu = calculate_shift(seq, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sig, ts = sampling.flux_schedule(sampling.SchedulerConfig.from_diffusers(cfg), steps, seq)
    np.testing.assert_array_equal(sig, ref.sigmas.numpy())
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())


@pytest.mark.parametrize("steps", [1, 4, 28, 40])
@pytest.mark.parametrize("shift", [3.0, 1.0, 2.5])
def test_sd3_schedules_equal_diffusers(steps, shift):
    cfg = {**OFFICIAL["sd3"], "shift": shift}
    ref = _diffusers(cfg)
    ref.set_timesteps(steps)
    sig, ts = sampling.flow_match_schedule(sampling.SchedulerConfig.from_diffusers(cfg), steps)
    np.testing.assert_array_equal(sig, ref.sigmas.numpy())
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())


def test_mu_values_and_config_errors():
    cfg = sampling.SchedulerConfig.from_diffusers(OFFICIAL["flux-dev"])
    assert cfg == sampling.FLUX_DEV_SCHEDULER
    assert sampling.flux_mu(4096, cfg) == pytest.approx(1.15) and sampling.flux_mu(1024, cfg) == pytest.approx(0.63)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        sampling.SchedulerConfig.from_diffusers({**OFFICIAL["sd3"], "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="not supported"):
        sampling.SchedulerConfig.from_diffusers({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="mu"):
        sampling.flow_match_schedule(cfg, 4, sigmas=np.linspace(1, 0.25, 4))


def test_euler_loop_equals_diffusers_step():
    """A fixed nonlinear 'model' integrated by our scan and by diffusers' step(), same schedule."""
    cfg = OFFICIAL["flux-dev"]
    steps, seq = 7, 64
    sig, ts = sampling.flux_schedule(sampling.SchedulerConfig.from_diffusers(cfg), steps, seq)
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32) / 4
    x0 = np.random.default_rng(1).standard_normal((2, seq, 8)).astype(np.float32)

    ref = _diffusers(cfg)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=sampling.flux_mu(seq, sampling.FLUX_DEV_SCHEDULER))
    x = torch.from_numpy(x0)
    for t in ref.timesteps:
        v = torch.tanh(x @ torch.from_numpy(w)) * (t / 1000)
        x = ref.step(v, t, x, return_dict=False)[0]

    seen = []
    out = jax.jit(lambda x: sampling.euler_sample(
        lambda x, t, i: jnp.tanh(x @ w) * (t / 1000), x, sig, ts, on_step=lambda i: seen.append(int(i))))(x0)
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=0, atol=1e-6)
    jax.effects_barrier()
    assert seen == list(range(steps))


class _RowController:
    """A controller whose state is each batch row's latest capture (its row number times the step)."""

    def init(self, batch, geometry):
        return {"seen": jnp.zeros((batch, 3))}

    def hooks(self, state, step, t, geometry):
        from jaxdit import hooks as hk

        return hk.Hooks()

    def update(self, state, captures, step, t, geometry):
        return {"seen": captures["rows"]}


@pytest.mark.parametrize("branches,lead", [(1, 0), (2, 0), (2, 1), (3, 2)])
def test_controller_state_is_one_per_image_from_the_lead_branch(branches, lead):
    """With the batch holding `branches` copies of 2 images, the controller's state for every copy of image j
    is what it found on branch `lead`'s row of image j."""
    b = 2
    rows = jnp.arange(branches * b, dtype=jnp.float32)

    def velocity(x, t, i, step_hooks, aux):
        return jnp.zeros_like(x), {"rows": jnp.tile((rows * (i + 1))[:, None], (1, 3))}, aux

    sigmas, timesteps = jnp.linspace(1.0, 0.0, 4), jnp.linspace(1000.0, 250.0, 3)
    _, state = sampling.controlled_euler(velocity, jnp.zeros((b, 5, 4)), sigmas, timesteps,
                                         controller=_RowController(), branches=branches, lead=lead)
    seen = np.asarray(state["seen"])[:, 0]
    expected = np.tile(np.arange(lead * b, (lead + 1) * b) * 3.0, branches)  # the last of 3 steps
    np.testing.assert_array_equal(seen, expected)


def test_a_controller_group_runs_each_controller_on_the_same_captures():
    """hooks.ControllerGroup: states side by side, captures united, each state what that controller alone
    would have reached, also across guidance branches."""
    from jaxdit import hooks as hk

    class Scaled(_RowController):
        def __init__(self, k, name):
            self.k, self.name = k, name

        def hooks(self, state, step, t, geometry):
            return hk.Hooks(capture=(self.name,))

        def update(self, state, captures, step, t, geometry):
            return {"seen": captures["rows"] * self.k}

    rows = jnp.arange(4, dtype=jnp.float32)
    seen_hooks = []

    def velocity(x, t, i, step_hooks, aux):
        seen_hooks.append(step_hooks.capture)
        return jnp.zeros_like(x), {"rows": jnp.tile((rows * (i + 1))[:, None], (1, 3))}, aux

    sigmas, timesteps = jnp.linspace(1.0, 0.0, 4), jnp.linspace(1000.0, 250.0, 3)
    run = lambda ctl: sampling.controlled_euler(velocity, jnp.zeros((2, 5, 4)), sigmas, timesteps,  # noqa: E731
                                                controller=ctl, branches=2, lead=1)[1]
    group = hk.ControllerGroup((Scaled(1.0, "a.0.img.resid_pre"), Scaled(-2.0, "b.0.img.resid_pre")))
    both = run(group)
    assert set(seen_hooks[-1]) == {"a.0.img.resid_pre", "b.0.img.resid_pre"}
    for alone, state in zip(group.controllers, both):
        np.testing.assert_array_equal(np.asarray(state["seen"]), np.asarray(run(alone)["seen"]))
