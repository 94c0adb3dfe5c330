"""SAE model functions: exact sharded TopK, gathers, loss sharded vs one device, JumpReLU estimator, init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdit.sharding import make_mesh
from jaxdit.train import sae, sparse

BATCH = ("data", "fsdp")


def _mesh(data, tensor):
    return make_mesh(data, 1, tensor, devices=jax.devices()[:data * tensor])


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


@pytest.mark.parametrize("dense,small_block", [(False, 0), (False, sparse.SMALL_BLOCK), (True, 0)])
@pytest.mark.parametrize("data,tensor", [(2, 4), (8, 1), (1, 1)])
def test_sparse_encode_decode_gradients_equal_dense_autodiff(monkeypatch, data, tensor, dense, small_block):
    """select_encode / gather_decode (k-sparse by slot or in one op, or dense backward; sharded or not)
    against plain autodiff."""
    monkeypatch.setattr(sparse, "SMALL_BLOCK", small_block)
    mesh = _mesh(data, tensor)
    rng = np.random.default_rng(0)
    d = 128
    xn, w_enc = jnp.asarray(rng.normal(size=(8, d)), jnp.float32), jnp.asarray(rng.normal(size=(d, 32)), jnp.float32)
    b_enc, w_dec = jnp.asarray(rng.normal(size=(32,)), jnp.float32), jnp.asarray(rng.normal(size=(32, d)), jnp.float32)
    b_dec = jnp.asarray(rng.normal(size=(d,)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(8, d)), jnp.float32)

    def reference(w_enc, b_enc, w_dec, b_dec):
        pre = (xn - b_dec) @ w_enc + b_enc
        values, index = jax.lax.top_k(pre, 5)
        recon = jnp.einsum("bk,bkd->bd", jax.nn.relu(values), w_dec[index])
        return jnp.sum((recon - target) ** 2)

    def local(w_enc, b_enc, w_dec, b_dec, xn, target):
        vary = lambda a: jax.lax.pcast(a, BATCH, to="varying")  # noqa: E731
        pre = jax.lax.stop_gradient((xn - b_dec) @ w_enc + b_enc)
        selected, index = sparse.topk(pre, 5, "tensor")
        v = sparse.select_encode(selected, xn, vary(b_dec), vary(w_enc), vary(b_enc), index, "tensor", dense)
        recon = sparse.gather_decode(jax.nn.relu(v), index, vary(w_dec), "tensor", dense=dense)
        return jax.lax.psum(jnp.sum((recon - target) ** 2), BATCH)

    specs = (P(None, "tensor"), P("tensor"), P("tensor"), P(), P(BATCH), P(BATCH))
    fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
    args = (w_enc, b_enc, w_dec, b_dec)
    value, grads = jax.jit(jax.value_and_grad(lambda *a: fn(*a, xn, target), argnums=(0, 1, 2, 3)))(*args)
    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for name, g, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads, ref_grads):
        # a float32 sum's error scales with its summands, not its result: small entries of a gradient whose
        # largest are ~1e4 differ by ~1e-4 between summation orders (devices, threads), so atol follows the scale
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=max(1e-4, 1e-7 * scale), err_msg=name)


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


@pytest.mark.parametrize("arch,batch", [("topk", 32), ("topk", 2 * 2 * sae.ROW_BLOCK), ("batchtopk", 32),
                                        ("jumprelu", 32), ("relu", 32)])
def test_loss_and_gradients_sharded_equal_single_device(arch, batch):
    """(2 * 2 * ROW_BLOCK rows: the TopK selection runs by row blocks, on one device and on each shard.)"""
    cfg = sae.SAEConfig(d_in=8, n_latents=64, k=4, arch=arch, jumprelu_bandwidth=0.5)
    loss_cfg = sae.LossConfig(aux_k=8, dead_tokens=1, sparsity_coeff=0.1)
    params, single, sharded = _loss_fns(cfg, loss_cfg, batch, _mesh(2, 4))
    x = jax.random.normal(jax.random.key(1), (batch, 8)) + 0.5
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


def _always_full_width(num_dead, widths):
    return jnp.asarray(len(widths), jnp.int32)  # the widest AuxK branch, dead latents or not


@pytest.mark.parametrize("num_dead", [0, 3, 40])
def test_auxk_runs_only_when_it_contributes_and_as_narrow_as_the_dead_count(monkeypatch, num_dead):
    """Skipping AuxK while nothing is dead changes no bit of the loss, the metrics or the gradients against
    computing it at full width (and scaling it by 0); narrowing it to the dead count changes nothing but
    the rounding of the dense products."""
    cfg = sae.SAEConfig(d_in=8, n_latents=128, k=4)
    loss_cfg = sae.LossConfig(aux_k=64, dead_tokens=100)
    assert sae.auxk_widths(64) == (16, 64)
    params = sae.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (32, 8)) + 0.5
    since = jnp.where(jnp.arange(128) < num_dead, 100, 0).astype(jnp.int32)

    def run():
        fn = lambda p: sae.train_loss(p, cfg, loss_cfg, x, since, sae.Axes(), 32)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (loss, aux), grads = run()
    monkeypatch.setattr(sae, "_auxk_branch", _always_full_width)
    (ref_loss, ref_aux), ref_grads = run()
    assert (float(aux["aux_loss"]) > 0) == (num_dead > 0)
    same = np.testing.assert_array_equal if num_dead == 0 else functools.partial(np.testing.assert_allclose,
                                                                                  rtol=1e-6, atol=1e-9)
    same(loss, ref_loss)
    for key in ref_aux:
        same(aux[key], ref_aux[key], err_msg=key)
    for key in ref_grads:
        same(grads[key], ref_grads[key], err_msg=key)


@pytest.mark.parametrize("tensor,stages", [(1, 1), (4, 2)])
def test_no_second_top_k_on_an_unsharded_latent_axis(tensor, stages):
    fn = jax.shard_map(lambda a: sparse.topk(a, 3, "tensor"), mesh=_mesh(1, tensor), in_specs=P(None, "tensor"),
                       out_specs=P())
    jaxpr = jax.make_jaxpr(fn)(jnp.zeros((4, 16)))
    count = str(jaxpr).count("top_k[")
    assert count == stages, jaxpr



def test_top_k_selection_by_row_blocks_equals_the_whole_batch():
    cfg = sae.SAEConfig(d_in=16, n_latents=256, k=8)
    params = sae.init_params(cfg, jax.random.key(0), b_dec=jnp.full((16,), 0.1))
    rows = 3 * sae.ROW_BLOCK
    xn = jax.random.normal(jax.random.key(1), (rows, 16))
    keep = jnp.arange(256) % 3 == 0
    values, index = jax.jit(lambda p, x: sae._top_preactivations(p, cfg, x, 8, sae.Axes(), keep))(params, xn)
    pre = jnp.where(keep, (xn - params["b_dec"]) @ params["W_enc"] + params["b_enc"], -jnp.inf)
    ref_values, ref_index = jax.lax.top_k(pre, 8)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(values, ref_values, rtol=1e-6, atol=1e-6)
