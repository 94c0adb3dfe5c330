"""The CPU kernels (train/cpu_kernels.cc): top_k bit for bit lax.top_k and an order computed independently
with numpy, in and out of jit / vmap / shard_map; the k-sparse products against float64 numpy and the XLA
loops they replace; bad indices refused; the fallback without them."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdit.train import cpu_kernels


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def _numpy_top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k in XLA's float total order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN), lower
    index first among equal keys, by a stable sort of order keys made from the bit patterns."""
    bits = x.view(np.int32).astype(np.int64)
    keys = np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # monotone in the total order
    order = np.argsort(-keys, axis=-1, kind="stable")[..., :k].astype(np.int32)
    return np.take_along_axis(x, order, axis=-1), order


def _awkward(rng, rows: int, n: int) -> np.ndarray:
    """Normal entries with repeats, signed zeros, infinities and NaNs of both signs."""
    x = rng.normal(size=(rows, n)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = 1.0
    x[rng.random(x.shape) < 0.1] = 0.0
    x[rng.random(x.shape) < 0.1] = -0.0
    x[rng.random(x.shape) < 0.02] = np.inf
    x[rng.random(x.shape) < 0.02] = -np.inf
    x[rng.random(x.shape) < 0.02] = np.float32("nan")
    x[rng.random(x.shape) < 0.02] = -np.float32("nan")
    x[0] = 2.5  # a row of one value: every entry ties
    x[1] = np.arange(n, dtype=np.float32)  # ascending: every entry beats the last
    return x


def test_the_kernels_are_built_here():
    """CI has a C++ compiler: the kernels must be on, or the tests below would test lax.top_k twice."""
    assert cpu_kernels.available()
    x, index = jnp.zeros((4, 40), jnp.float32), jnp.zeros((4, 3), jnp.int32)
    both = lambda x, i: (cpu_kernels.top_k(x, 3), _products(x.T, i, x[:, :3], x[:, :4], transposed=True))  # noqa: E731
    lowered = jax.jit(both).lower(x, index).as_text()
    for target in cpu_kernels.TARGETS:
        assert target in lowered


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (16, 16), (17, 5), (40, 1), (384, 6), (300, 32),
                                 (1000, 64), (4096, 32), (512, 256)])
def test_top_k_is_lax_top_k_bit_for_bit(n, k):
    rng = np.random.default_rng(n * 1000 + k)
    x = _awkward(rng, 67, n)
    values, index = jax.jit(lambda x: cpu_kernels.top_k(x, k))(x)
    ref_values, ref_index = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(_bits(values), _bits(ref_values))
    np.testing.assert_array_equal(np.asarray(index), np.asarray(ref_index))
    np_values, np_index = _numpy_top_k(x, k)
    np.testing.assert_array_equal(_bits(values), _bits(np_values))
    np.testing.assert_array_equal(np.asarray(index), np_index)


def test_top_k_many_rows_over_threads_and_leading_axes():
    """Rows split into chunks over the thread pool (5000 rows of 300), and leading axes flattened."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 300)).astype(np.float32)
    values, index = cpu_kernels.top_k(x, 7)
    np_values, np_index = _numpy_top_k(x, 7)
    np.testing.assert_array_equal(_bits(values), _bits(np_values))
    np.testing.assert_array_equal(np.asarray(index), np_index)
    x3 = x.reshape(10, 500, 300)
    values3, index3 = jax.jit(lambda x: cpu_kernels.top_k(x, 7))(x3)
    np.testing.assert_array_equal(np.asarray(index3).reshape(5000, 7), np_index)
    vmapped = jax.vmap(lambda r: cpu_kernels.top_k(r, 7))(x[:50])
    np.testing.assert_array_equal(np.asarray(vmapped[1]), np_index[:50])


def test_top_k_inside_shard_map_varies_like_its_input():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    rng = np.random.default_rng(2)
    x = jax.device_put(rng.normal(size=(8, 64)).astype(np.float32), NamedSharding(mesh, P("data", "tensor")))
    f = jax.jit(jax.shard_map(lambda b: cpu_kernels.top_k(b, 3), mesh=mesh, in_specs=P("data", "tensor"),
                              out_specs=(P("data", "tensor"), P("data", "tensor"))))
    values, index = f(x)
    blocks = np.asarray(x).reshape(8, 4, 16)
    for t in range(4):
        np_values, np_index = _numpy_top_k(blocks[:, t], 3)
        np.testing.assert_array_equal(np.asarray(values)[:, 3 * t:3 * t + 3], np_values)
        np.testing.assert_array_equal(np.asarray(index)[:, 3 * t:3 * t + 3], np_index)


def test_other_dtypes_and_shapes_take_lax_top_k():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 9)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.top_k(x, 2)[1]), np.asarray(jax.lax.top_k(x, 2)[1]))
    assert "jaxdit_topk_f32" not in jax.jit(lambda x: cpu_kernels.top_k(x, 2)).lower(x).as_text()


def _products(table, index, weight, src, transposed=False):
    """The three k-sparse products of one table, each with its sparse.py XLA loop as the fallback."""
    from jaxdit.train import sparse
    m = table.shape[0]
    return (cpu_kernels.weighted_rows(table, index, weight, sparse._weighted_rows_xla),
            cpu_kernels.row_products(table, index, src, sparse._row_products_xla),
            cpu_kernels.scatter_rows(index, weight, src, m, functools.partial(sparse._scatter_rows_xla, m=m),
                                     transposed),
            cpu_kernels.scatter_rows_dot(index, weight, src, table,
                                         functools.partial(sparse._decode_bwd_xla, dtype=jnp.float32)))


def _numpy_products(table, index, weight, src):
    t, w, x = (np.asarray(a, np.float64) for a in (table, weight, src))
    rows = t[np.asarray(index)]  # [B, k, d]
    scatter = np.zeros_like(t)
    np.add.at(scatter, np.asarray(index).reshape(-1), (w[:, :, None] * x[:, None, :]).reshape(-1, t.shape[1]))
    return np.einsum("bk,bkd->bd", w, rows), np.einsum("bd,bkd->bk", x, rows), scatter


@pytest.mark.parametrize("m,d,batch,k", [(50, 48, 300, 6), (4096, 256, 64, 32), (37, 19, 5000, 3), (8, 1, 3, 8)])
def test_sparse_products_match_numpy_and_the_xla_loops(m, d, batch, k):
    """Against float64 numpy (1e-5 relative to the row scale), and against the XLA loops of sparse.py with
    repeated indices (many tokens on one row), for both layouts of the scatter."""
    from jaxdit.train import sparse
    rng = np.random.default_rng(m + d + batch + k)
    table = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    index = jnp.asarray(rng.integers(0, m, size=(batch, k)), jnp.int32)
    index = index.at[: batch // 3].set(jnp.minimum(index[: batch // 3], 2))  # crowd a few rows
    weight = jnp.asarray(rng.normal(size=(batch, k)), jnp.float32)
    src = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
    *got, (fused_scatter, fused_dots) = jax.jit(_products)(table, index, weight, src)
    got_t = jax.jit(functools.partial(_products, transposed=True))(table, index, weight, src)[2]
    np.testing.assert_array_equal(np.asarray(got_t), np.asarray(got[2]).T)
    np.testing.assert_array_equal(np.asarray(fused_scatter), np.asarray(got[2]))  # one pass, the same sums
    np.testing.assert_array_equal(np.asarray(fused_dots), np.asarray(got[1]))
    xla = (sparse._weighted_rows_xla(table, index, weight), sparse._row_products_xla(table, index, src),
           sparse._scatter_rows_xla(index, weight, src, m))
    for ours, theirs, exact in zip(got, xla, _numpy_products(table, index, weight, src)):
        scale = max(1.0, float(np.abs(exact).max()))
        np.testing.assert_allclose(np.asarray(ours), exact, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-5 * scale)
    again = jax.jit(_products)(table, index, weight, src)[:3]
    for a, b in zip(got, again):  # the same bits every run, whatever thread took which rows
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_index_out_of_range_is_refused():
    table, weight = jnp.ones((10, 4), jnp.float32), jnp.ones((3, 2), jnp.float32)
    bad = jnp.asarray([[0, 1], [2, 10], [3, 4]], jnp.int32)
    with pytest.raises(Exception, match="index out of range"):
        jax.block_until_ready(_products(table, bad, weight, jnp.ones((3, 4), jnp.float32))[0])
    for which in (1, 2, 3):
        with pytest.raises(Exception, match="index out of range"):
            jax.block_until_ready(_products(table, bad, weight, jnp.ones((3, 4), jnp.float32))[which])


def test_without_the_kernels_the_same_results(tmp_path):
    """JAXDIT_CPU_KERNELS=0 (or no compiler) falls back to lax.top_k: the same numbers."""
    code = (
        "import numpy as np, jax, logging; logging.basicConfig(level=logging.WARNING)\n"
        "from jaxdit.train import cpu_kernels\n"
        "x = np.random.default_rng(5).normal(size=(33, 100)).astype(np.float32)\n"
        "v, i = cpu_kernels.top_k(x, 4)\n"
        "print(cpu_kernels.available(), ' '.join(map(str, np.asarray(i).ravel())))\n")
    outs = {}
    for flag in ("0", "1"):
        env = dict(os.environ, JAXDIT_CPU_KERNELS=flag, JAXDIT_CACHE_DIR=str(tmp_path / "cache"))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs[flag] = done.stdout.split(maxsplit=1)
    assert outs["0"][0] == "False" and outs["1"][0] == "True"
    assert outs["0"][1] == outs["1"][1]
    assert (tmp_path / "cache").is_dir()  # built from nothing into the cache directory


def test_a_broken_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="false failed on cpu_kernels.cc"):
        cpu_kernels.build(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("JAXDIT_CACHE_DIR", str(blocked / "cache"))  # under a file: no directory can be made
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = cpu_kernels.build()
    assert path.parent == tmp_path / "tmp" / f"jaxdit-{os.getuid()}" and path.is_file()
    assert cpu_kernels.build() == path  # found there the next time, not rebuilt
