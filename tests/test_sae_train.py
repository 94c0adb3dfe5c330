"""SAE training: planted dictionary recovery, sharded = single device, exact resume, bad-input errors."""

import json

import numpy as np
import pytest

from jaxdit.train import sae, trainer
from jaxdit.train.interop import load_sae
from jaxdit.train.store import ActivationStore, BatchStream, StoreError


def _planted(n_rows=32768, d=32, atoms=48, k=3, seed=0):
    """Rows = 3 * (sum of k unit atoms with weights in [1, 2]) + 1: a known sparse dictionary, offset."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    chosen = np.argsort(rng.random((n_rows, atoms)), axis=1)[:, :k]
    codes = np.zeros((n_rows, atoms))
    np.put_along_axis(codes, chosen, rng.uniform(1, 2, (n_rows, k)), 1)
    return (3 * codes @ dictionary + 1).astype(np.float32), dictionary


def _run(data, out, cfg, tc, mesh=(1, 1, 1), **kw):
    opts = trainer.RunOptions(mesh=mesh, log_every=kw.pop("log_every", 10),
                              checkpoint_every=kw.pop("checkpoint_every", 1000), progress=False)
    return trainer.train(data, out, cfg, tc, opts, **kw)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_planted_dictionary_is_recovered(tmp_path):
    x, dictionary = _planted()
    np.save(tmp_path / "x.npy", x)
    cfg = sae.SAEConfig(d_in=32, n_latents=96, k=3)
    tc = trainer.TrainConfig(steps=800, batch_size=256, lr=3e-3, warmup_steps=20,
                             loss=sae.LossConfig(aux_k=16, dead_tokens=256 * 20))
    cfg, params = _run(tmp_path / "x.npy", tmp_path / "run", cfg, tc, log_every=100)
    rows = params["W_dec"] / np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    best = (dictionary @ rows.T).max(axis=1)  # signed: codes are positive, so atoms must match in sign
    final = _metrics(tmp_path / "run")[-1]
    print(f"planted recovery: {np.mean(best >= 0.9):.3f} of atoms at cosine >= 0.9, median cosine "
          f"{np.median(best):.4f}, min {best.min():.4f}; final FVU {final['fvu']:.4f}, L0 {final['l0']:.2f}")
    assert np.mean(best >= 0.9) >= 0.9
    assert final["fvu"] < 0.1 and final["l0"] <= 3
    assert cfg.input_scale == 0.125  # mean squared norm ~ 71: 2^round(log2(71^-0.5))
    saved_cfg, saved = load_sae(tmp_path / "run")
    assert saved_cfg == cfg and all(np.array_equal(saved[k], params[k]) for k in params)


def test_sharded_training_matches_single_device_step_for_step(tmp_path):
    x, _ = _planted(n_rows=4096, d=16, atoms=24)
    np.save(tmp_path / "x.npy", x)
    cfg = sae.SAEConfig(d_in=16, n_latents=64, k=4)
    tc = trainer.TrainConfig(steps=12, batch_size=64, lr=1e-3, warmup_steps=2,
                             loss=sae.LossConfig(aux_k=8, dead_tokens=128))  # AuxK active from step 3
    _, single = _run(tmp_path / "x.npy", tmp_path / "single", cfg, tc, mesh=(1, 1, 1), log_every=1)
    _, sharded = _run(tmp_path / "x.npy", tmp_path / "sharded", cfg, tc, mesh=(2, 1, 4), log_every=1)
    for a, b in zip(_metrics(tmp_path / "single"), _metrics(tmp_path / "sharded")):
        assert a["step"] == b["step"]
        for key in ("loss", "fvu", "mse", "l0", "dead_fraction", "aux_loss", "lr"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-7, err_msg=f"{key} at step {a['step']}")
    assert max(m["aux_loss"] for m in _metrics(tmp_path / "single")) > 0  # AuxK was exercised
    for key in single:
        np.testing.assert_allclose(sharded[key], single[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("mesh", [(1, 1, 1), (2, 1, 4)])
def test_skipping_auxk_while_no_latent_is_dead_is_bitwise_neutral(tmp_path, monkeypatch, mesh):
    """A run where no latent dies (the step compiled without AuxK throughout) equals, bit for bit, the same
    run computing AuxK, at full width and scaled by 0, every step (what the trainer did before)."""
    x, _ = _planted(n_rows=2048, d=16, atoms=24)
    np.save(tmp_path / "x.npy", x)
    cfg = sae.SAEConfig(d_in=16, n_latents=64, k=4)
    tc = trainer.TrainConfig(steps=8, batch_size=64, warmup_steps=2, loss=sae.LossConfig(aux_k=64, dead_tokens=256))
    decisions, choice = [], trainer.auxk_choice

    def recorded(step, *args):
        decisions.append((step, *choice(step, *args)))
        return decisions[-1][1:]

    monkeypatch.setattr(trainer, "auxk_choice", recorded)
    _, skipped = _run(tmp_path / "x.npy", tmp_path / "skipped", cfg, tc, mesh=mesh, log_every=1)
    assert decisions[0] == (0, 4, 0)  # before 256 tokens no latent can be dead: no need to read the counters
    assert len(decisions) > 1 and all(last > step for step, last, _ in decisions)  # read again later: none dead
    assert sae.auxk_widths(64) == (16, 64)
    monkeypatch.setattr(trainer, "auxk_choice", lambda step, *args: (step, 64))  # full-width AuxK every step
    _, always = _run(tmp_path / "x.npy", tmp_path / "always", cfg, tc, mesh=mesh, log_every=1)
    for key in always:
        np.testing.assert_array_equal(skipped[key], always[key], err_msg=key)
    timing = ("tokens_per_s", "elapsed_s")
    for a, b in zip(_metrics(tmp_path / "skipped"), _metrics(tmp_path / "always")):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
        assert a["dead_fraction"] == 0 and a["aux_loss"] == 0


def test_auxk_choice_bounds_the_dead_latents_and_picks_the_narrowest_width():
    cfg = sae.SAEConfig(d_in=8, n_latents=128, k=4)
    tc = trainer.TrainConfig(steps=100, batch_size=64, loss=sae.LossConfig(aux_k=64, dead_tokens=256))
    assert trainer.auxk_choice(10, 0, 0, cfg, tc) == (14, 0)  # 4 more batches before a counter reaches 256
    assert trainer.auxk_choice(10, 255, 0, cfg, tc) == (11, 0)
    assert trainer.auxk_choice(10, 256, 3, cfg, tc) == (10, 16)  # dead now: AuxK at step 11, 3 of 16 slots
    assert trainer.auxk_choice(10, 300, 17, cfg, tc) == (10, 64)
    assert trainer.auxk_choice(10, 300, 100, cfg, tc) == (10, 64)  # aux_k caps the width


class _Killed(Exception):
    pass


def test_resume_after_a_kill_is_bitwise_identical(tmp_path):
    x, _ = _planted(n_rows=3000, d=16, atoms=24)
    np.save(tmp_path / "x.npy", x)
    cfg = sae.SAEConfig(d_in=16, n_latents=64, k=4)
    tc = trainer.TrainConfig(steps=30, batch_size=64, warmup_steps=5, loss=sae.LossConfig(aux_k=8, dead_tokens=256))
    run = dict(mesh=(2, 1, 4), log_every=5, checkpoint_every=10)
    _, uninterrupted = _run(tmp_path / "x.npy", tmp_path / "a", cfg, tc, **run)

    def kill(metrics):
        if metrics["step"] == 25:  # after the step-20 checkpoint: steps 21..25 are lost
            raise _Killed

    with pytest.raises(_Killed):
        _run(tmp_path / "x.npy", tmp_path / "b", cfg, tc, callback=kill, **run)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(tmp_path / "x.npy", tmp_path / "b", cfg, tc, **run)
    _, resumed = _run(tmp_path / "x.npy", tmp_path / "b", cfg, tc, resume=True, **run)
    for key in uninterrupted:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
    assert _metrics(tmp_path / "a") == [dict(m, tokens_per_s=a["tokens_per_s"], elapsed_s=a["elapsed_s"])
                                        for m, a in zip(_metrics(tmp_path / "b"), _metrics(tmp_path / "a"))]
    with pytest.raises(ValueError, match="train.steps: checkpoint 30, given 40"):
        _run(tmp_path / "x.npy", tmp_path / "b", cfg, trainer.TrainConfig(**{**tc.__dict__, "steps": 40}),
             resume=True, **run)


def test_non_finite_activations_name_step_position_and_chunk(tmp_path):
    store = ActivationStore.create(tmp_path / "s", d=8)
    rng = np.random.default_rng(0)
    for i in range(6):
        rows = rng.normal(size=(40, 8)).astype(np.float32)
        if i == 4:
            rows[17, 3] = np.nan
        store.append(rows)
    tc = trainer.TrainConfig(steps=20, batch_size=16, warmup_steps=1, init_rows=16, shuffle_window=1)
    stream = BatchStream(store, 16, seed=0, window=1)
    bad_step = next(s for s in range(1, 100) if not np.isfinite(stream.next()).all())
    with pytest.raises(trainer.NonFiniteError) as err:
        _run(tmp_path / "s", tmp_path / "run", sae.SAEConfig(d_in=8, n_latents=16, k=2), tc,
             log_every=5, checkpoint_every=5)
    message = str(err.value)
    first = (bad_step - 1) * 16
    assert f"step {bad_step} (data position {first}..{first + 16}" in message
    assert "chunk '000004', row 17" in message
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert all(s < bad_step for s in saved)  # no checkpoint holds the poisoned state


def test_non_finite_rows_in_the_init_sample(tmp_path):
    x = np.ones((64, 4), np.float32)
    x[:, 2] = np.inf
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(trainer.NonFiniteError, match=r"initialise the SAE: first at .*x.npy, row \d+"):
        _run(tmp_path / "x.npy", tmp_path / "run", sae.SAEConfig(d_in=4, n_latents=8, k=2),
             trainer.TrainConfig(steps=2, batch_size=8, init_rows=8))


def test_wrong_width_and_bad_mesh(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((64, 6), np.float32))
    tc = trainer.TrainConfig(steps=2, batch_size=8)
    with pytest.raises(StoreError, match="has d=6, but the SAE expects d_in=4"):
        _run(tmp_path / "x.npy", tmp_path / "run", sae.SAEConfig(d_in=4, n_latents=8, k=2), tc)
    with pytest.raises(ValueError, match="not divisible by the tensor axis"):
        _run(tmp_path / "x.npy", tmp_path / "run", sae.SAEConfig(d_in=6, n_latents=6, k=2), tc, mesh=(1, 1, 4))
    with pytest.raises(ValueError, match="batch size 8 is not divisible by data"):
        _run(tmp_path / "x.npy", tmp_path / "run", sae.SAEConfig(d_in=6, n_latents=8, k=2), tc, mesh=(3, 1, 1))


@pytest.mark.parametrize("arch,compute_dtype",
                         [("batchtopk", "float32"), ("jumprelu", "bfloat16"), ("relu", "float32")])
def test_other_architectures_train(tmp_path, arch, compute_dtype):
    x, _ = _planted(n_rows=2048, d=16, atoms=24)
    np.save(tmp_path / "x.npy", x)
    cfg = sae.SAEConfig(d_in=16, n_latents=32, k=3, arch=arch, compute_dtype=compute_dtype, jumprelu_bandwidth=0.05)
    tc = trainer.TrainConfig(steps=60, batch_size=64, lr=3e-3, warmup_steps=5, b1=0.0 if arch == "jumprelu" else 0.9,
                             loss=sae.LossConfig(sparsity_coeff=1e-3))
    cfg, params = _run(tmp_path / "x.npy", tmp_path / "run", cfg, tc, mesh=(2, 1, 2), log_every=20)
    metrics = _metrics(tmp_path / "run")
    assert metrics[-1]["fvu"] < metrics[0]["fvu"] and np.isfinite(metrics[-1]["loss"])
    if arch == "batchtopk":  # the inference threshold tracks the smallest kept value
        assert np.all(params["threshold"] == params["threshold"][0]) and params["threshold"][0] > 0
        z = np.asarray(sae.encode_dense(params, cfg, x[:256]))
        assert 1 <= (z > 0).sum(-1).mean() <= 3 * cfg.k
