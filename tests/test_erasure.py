"""Linear concept erasure (jaxdit.safety.erasure) against numpy written from its definition, a planted
direction recovered, and the one-line errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.safety import erasure


def _planted(rng, d=16, n=400, shift=3.0):
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    safe = rng.normal(size=(n, d)) + 0.5
    unsafe = rng.normal(size=(n, d)) + 0.5 + shift * v
    return v, unsafe, safe


def test_rank_one_span_is_the_mean_difference_and_erase_matches_numpy():
    rng = np.random.default_rng(0)
    v, unsafe, safe = _planted(rng)
    sub = erasure.fit_subspace(unsafe, safe, 1)
    u = np.asarray(sub.basis)[:, 0]
    diff = unsafe.mean(0) - safe.mean(0)
    assert abs(u @ diff / np.linalg.norm(diff)) == pytest.approx(1.0, abs=1e-6)
    assert abs(u @ v) > 0.98  # the planted direction, up to sampling noise
    x = rng.normal(size=(5, 7, 16)).astype(np.float32)
    mu = safe.mean(0)
    want = x - np.einsum("...d,d->...", x - mu, u)[..., None] * u  # x - P (x - mu)
    got = np.asarray(erasure.erase(jnp.asarray(x), sub))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_erased_vectors_sit_at_the_safe_mean_along_the_span_and_keep_the_rest():
    rng = np.random.default_rng(1)
    _, unsafe, safe = _planted(rng, d=12)
    sub = erasure.fit_subspace(unsafe, safe, 3)
    u = np.asarray(sub.basis, np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-6)
    x = jnp.asarray(unsafe, jnp.float32)
    once = np.asarray(erasure.erase(x, sub), np.float64)
    np.testing.assert_allclose(once @ u, np.broadcast_to(safe.mean(0) @ u, (len(unsafe), 3)), atol=1e-4)
    rest = np.eye(12) - u @ u.T  # the orthogonal complement is untouched
    np.testing.assert_allclose(once @ rest, unsafe @ rest, atol=1e-4)
    twice = np.asarray(erasure.erase(jnp.asarray(once, jnp.float32), sub))
    np.testing.assert_allclose(twice, once, atol=1e-5)  # a projection: idempotent


def test_higher_ranks_add_the_directions_of_largest_class_offset():
    rng = np.random.default_rng(2)
    d = 10
    safe = rng.normal(size=(500, d))
    unsafe = rng.normal(size=(500, d))
    unsafe[:, 0] += 2.0  # the mean difference
    unsafe[:, 1] *= 6.0  # no mean shift, but unsafe vectors spread far along axis 1
    u = np.asarray(erasure.fit_subspace(unsafe, safe, 2).basis)
    assert abs(u[0, 0]) > 0.98 and abs(u[1, 1]) > 0.95


@pytest.mark.parametrize("unsafe, safe, rank, words", [
    (np.zeros((4, 3)), np.zeros((4, 5)), 1, "must be [N, D]"),
    (np.zeros((0, 3)), np.ones((4, 3)), 1, "needs vectors of both kinds"),
    (np.ones((4, 3)), np.zeros((4, 3)), 4, "rank 4 must be in [1, 3]"),
    (np.ones((4, 3)), np.ones((4, 3)), 1, "same mean"),
])
def test_bad_fits_are_refused_in_one_line(unsafe, safe, rank, words):
    with pytest.raises(ValueError, match=None) as e:
        erasure.fit_subspace(unsafe, safe, rank)
    assert words in str(e.value) and "\n" not in str(e.value)
