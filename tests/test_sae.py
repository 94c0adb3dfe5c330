"""SAE model functions: exact sharded TopK, gathers, loss sharded vs one device, JumpReLU estimator, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdit.sharding import make_mesh
from jaxdit.train import sae, sparse

BATCH = ("data", "fsdp")


def _mesh(data, tensor):
    return make_mesh(data, 1, tensor)


@pytest.mark.parametrize("data,tensor,n,k", [(2, 4, 64, 10), (1, 8, 16, 5), (4, 2, 32, 32), (1, 8, 64, 1)])
def test_sharded_topk_equals_lax_top_k_with_ties(data, tensor, n, k):
    """Integer-valued latents have many ties; the global order must be lax.top_k's (lower index first)."""
    rng = np.random.default_rng(n + k)
    x = jnp.asarray(rng.integers(-3, 4, (16, n)).astype(np.float32))
    x = x.at[0].set(0.0).at[1].set(-jnp.inf)  # a row of equal values, a row of -inf (AuxK with no dead latents)
    x = x.at[2, ::3].set(-0.0)  # lax.top_k orders -0.0 below +0.0
    fn = jax.jit(jax.shard_map(lambda a: sparse.topk(a, k, "tensor"), mesh=_mesh(data, tensor),
                               in_specs=P(BATCH, "tensor"), out_specs=P(BATCH)))
    values, index = fn(x)
    ref_values, ref_index = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(ref_values))
    np.testing.assert_array_equal(np.asarray(index), np.asarray(ref_index))


def test_sharded_gathers_equal_dense_products():
    mesh = _mesh(2, 4)
    rng = np.random.default_rng(0)
    xc, w_enc = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), jnp.asarray(rng.normal(size=(6, 32)), jnp.float32)
    b_enc, w_dec = jnp.asarray(rng.normal(size=(32,)), jnp.float32), jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    index = jnp.asarray(rng.integers(0, 32, (8, 5)), jnp.int32)

    def local(xc, w_enc, b_enc, w_dec, index):
        v = sparse.gather_encode(xc, w_enc, b_enc, index, "tensor")
        return v, sparse.gather_decode(v, index, w_dec, "tensor")

    specs = (P(BATCH), P(None, "tensor"), P("tensor"), P("tensor"), P(BATCH))
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(BATCH), P(BATCH))))
    values, recon = fn(xc, w_enc, b_enc, w_dec, index)
    dense_pre = xc @ w_enc + b_enc
    np.testing.assert_allclose(values, jnp.take_along_axis(dense_pre, index, 1), rtol=1e-5, atol=1e-5)
    z = jnp.zeros((8, 32)).at[jnp.arange(8)[:, None], index].add(values)
    np.testing.assert_allclose(recon, z @ w_dec, rtol=1e-5, atol=1e-5)


def _loss_fns(cfg, loss_cfg, batch, mesh):
    specs = {k: v for k, v in {"W_enc": P(None, "tensor"), "b_enc": P("tensor"), "W_dec": P("tensor", None),
                               "b_dec": P(), "threshold": P("tensor")}.items() if k in sae.param_shapes(cfg)}

    def single(p, x, s):
        return sae.train_loss(p, cfg, loss_cfg, x, s, sae.Axes(), batch)

    params = sae.init_params(cfg, jax.random.key(0), threshold=0.1)
    keys = jax.eval_shape(single, params, jnp.zeros((batch, cfg.d_in)), jnp.zeros((cfg.n_latents,), jnp.int32))[1]
    sharded = jax.shard_map(lambda p, x, s: sae.train_loss(p, cfg, loss_cfg, x, s, sae.Axes("tensor", BATCH), batch),
                            mesh=mesh, in_specs=(specs, P(BATCH), P("tensor")),
                            out_specs=(P(), {k: P("tensor") if k == "fired" else P() for k in keys}))
    return params, single, sharded


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_loss_and_gradients_sharded_equal_single_device(arch):
    cfg = sae.SAEConfig(d_in=8, n_latents=64, k=4, arch=arch, jumprelu_bandwidth=0.5)
    loss_cfg = sae.LossConfig(aux_k=8, dead_tokens=1, sparsity_coeff=0.1)
    params, single, sharded = _loss_fns(cfg, loss_cfg, 32, _mesh(2, 4))
    x = jax.random.normal(jax.random.key(1), (32, 8)) + 0.5
    since = jnp.arange(64, dtype=jnp.int32) % 2  # half the latents dead: AuxK active
    (l1, a1), g1 = jax.jit(jax.value_and_grad(sharded, has_aux=True))(params, x, since)
    (l2, a2), g2 = jax.jit(jax.value_and_grad(single, has_aux=True))(params, x, since)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_array_equal(a1["fired"], a2["fired"])
    for key in a2:
        np.testing.assert_allclose(a1[key], a2[key], rtol=1e-5, err_msg=key)
    for key in g2:
        np.testing.assert_allclose(g1[key], g2[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if arch in sae.SPARSE_ARCHS:
        assert float(a2["aux_loss"]) > 0
    if arch == "jumprelu":
        assert float(jnp.abs(g2["threshold"]).max()) > 0  # the straight-through estimator reaches the threshold


def test_topk_training_reconstruction_equals_inference():
    cfg = sae.SAEConfig(d_in=8, n_latents=32, k=3, input_scale=0.25)
    params = sae.init_params(cfg, jax.random.key(0), b_dec=jnp.full((8,), 0.1))
    x = jax.random.normal(jax.random.key(1), (16, 8)) * 4
    _, aux = sae.train_loss(params, cfg, sae.LossConfig(aux_alpha=0.0), x, jnp.zeros((32,), jnp.int32), sae.Axes(), 16)
    recon = sae.reconstruct(params, cfg, x)
    xn = x * cfg.input_scale
    fvu = jnp.sum((x - recon) ** 2) * cfg.input_scale ** 2 / jnp.sum((xn - xn.mean(0)) ** 2)
    np.testing.assert_allclose(aux["fvu"], fvu, rtol=1e-5)
    values, index = sae.encode(params, cfg, x.reshape(2, 8, 8))
    assert values.shape == index.shape == (2, 8, 3)
    dense = sae.encode_dense(params, cfg, x)
    assert int((dense > 0).sum(-1).max()) <= 3
    np.testing.assert_allclose(sae.decode(params, cfg, dense), recon, rtol=1e-5, atol=1e-6)


def test_jumprelu_straight_through_gradients():
    pre = jnp.array([[0.05, 0.3, 0.52, 0.9]])
    th = jnp.array([0.5, 0.5, 0.5, 0.5])
    bw = 0.1
    np.testing.assert_array_equal(sae.jumprelu(pre, th, bw), jnp.array([[0, 0, 0.52, 0.9]]))
    d_pre, d_th = jax.grad(lambda p, t: jnp.sum(sae.jumprelu(p, t, bw)), argnums=(0, 1))(pre, th)
    np.testing.assert_array_equal(d_pre, jnp.array([[0, 0, 1, 1]]))
    # rectangle kernel: only |pre - th| < bw / 2 contributes, -th / bw each
    np.testing.assert_allclose(d_th, jnp.array([0, 0, -5.0, 0]), rtol=1e-6)
    d_l0 = jax.grad(lambda t: jnp.sum(sae.heaviside(pre, t, bw)))(th)
    np.testing.assert_allclose(d_l0, jnp.array([0, 0, -10.0, 0]), rtol=1e-6)


def test_decoder_projection_and_renormalisation():
    cfg = sae.SAEConfig(d_in=6, n_latents=10, k=2)
    params = sae.init_params(cfg, jax.random.key(0))
    np.testing.assert_allclose(jnp.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(params["W_enc"], params["W_dec"].T)
    grads = {k: jax.random.normal(jax.random.key(2), v.shape) for k, v in params.items()}
    projected = sae.project_decoder_grad(grads, params)
    np.testing.assert_allclose(jnp.sum(projected["W_dec"] * params["W_dec"], axis=1), 0.0, atol=1e-6)
    np.testing.assert_array_equal(projected["W_enc"], grads["W_enc"])
    moved = sae.normalize_decoder({**params, "W_dec": params["W_dec"] * jnp.arange(1.0, 11.0)[:, None]})
    np.testing.assert_allclose(jnp.linalg.norm(moved["W_dec"], axis=1), 1.0, rtol=1e-6)


def test_input_scale_is_a_power_of_two_and_geometric_median():
    assert sae.input_scale_for(100.0) == 0.125  # 1/sqrt(100) = 0.1 -> 2^-3
    assert sae.input_scale_for(1.0) == 1.0
    assert sae.input_scale_for(0.01, target=4.0) == 16.0
    with pytest.raises(ValueError, match="mean squared norm"):
        sae.input_scale_for(float("nan"))
    # the geometric median ignores an outlier that drags the mean
    points = jnp.concatenate([jax.random.normal(jax.random.key(0), (99, 3)) * 0.1, jnp.full((1, 3), 1000.0)])
    median = sae.geometric_median(points)
    assert float(jnp.abs(median).max()) < 0.1 < float(jnp.abs(points.mean(0)).max())


def test_config_errors():
    with pytest.raises(ValueError, match="k=100 must be between 1 and the SAE width n_latents=64"):
        sae.SAEConfig(d_in=8, n_latents=64, k=100)
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        sae.SAEConfig(d_in=8, n_latents=64, arch="gated")
    cfg = sae.SAEConfig(d_in=8, n_latents=16, k=2)
    with pytest.raises(ValueError, match="width 7, this SAE expects 8"):
        sae.encode(sae.init_params(cfg, jax.random.key(0)), cfg, jnp.zeros((3, 7)))
    with pytest.raises(ValueError, match=r"W_dec has shape \(16, 9\), expected \(16, 8\)"):
        sae.check_params(cfg, {**sae.init_params(cfg, jax.random.key(0)), "W_dec": jnp.zeros((16, 9))})


def test_dead_counter_saturates():
    since = jnp.array([0, 5, np.iinfo(np.int32).max - 10], jnp.int32)
    out = sae.update_since_fired(since, jnp.array([1, 0, 0]), 100)
    assert out[0] == 0 and out[1] == 105 and 0 < int(out[2]) <= np.iinfo(np.int32).max
