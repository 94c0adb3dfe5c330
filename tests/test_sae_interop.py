"""SAELens / sparsify export and import: exact round trips, schemas, and the libraries' own loaders."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.train import interop, sae


def _random_sae(arch, d=8, n=24, k=3, scale=0.25):
    cfg = sae.SAEConfig(d_in=d, n_latents=n, arch=arch, k=k, input_scale=scale, position="single.1.img.resid_post",
                        model="tiny-flux")
    params = sae.init_params(cfg, jax.random.key(1), b_dec=jax.random.normal(jax.random.key(2), (d,)))
    params["b_enc"] = jax.random.normal(jax.random.key(3), (n,)) * 0.1
    if "threshold" in params:
        params["threshold"] = jnp.abs(jax.random.normal(jax.random.key(4), (n,))) * 0.05
    return cfg, {k_: np.asarray(v) for k_, v in params.items()}


def _inputs(d=8, n=32):
    return np.asarray(jax.random.normal(jax.random.key(5), (n, d)) * 4, np.float32)


@pytest.mark.parametrize("fmt,arch", [("saelens", "topk"), ("saelens", "batchtopk"), ("saelens", "jumprelu"),
                                      ("saelens", "relu"), ("sparsify", "topk")])
def test_export_import_round_trip_is_exact(tmp_path, fmt, arch):
    cfg, params = _random_sae(arch)
    interop.save_sae(tmp_path / "sae", cfg, params)
    interop.export_sae(tmp_path / "sae", tmp_path / "out", fmt)
    interop.import_sae(tmp_path / "out", tmp_path / "back", fmt)
    cfg2, params2 = interop.load_sae(tmp_path / "back")
    assert cfg2 == cfg
    assert set(params2) == set(params)
    for key in params:
        np.testing.assert_array_equal(params2[key], params[key], err_msg=key)
    with pytest.raises(FileExistsError):
        interop.export_sae(tmp_path / "sae", tmp_path / "out", fmt)


def test_saelens_schema(tmp_path):
    cfg, params = _random_sae("topk")
    interop.save_sae(tmp_path / "sae", cfg, params)
    interop.export_sae(tmp_path / "sae", tmp_path / "out", "saelens")
    saved = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert saved["architecture"] == "topk" and saved["k"] == 3 and saved["d_in"] == 8 and saved["d_sae"] == 24
    assert saved["apply_b_dec_to_input"] is True and saved["normalize_activations"] == "none"
    assert saved["hook_name"] == "single.1.img.resid_post"
    tensors = interop.read_safetensors(tmp_path / "out" / "sae_weights.safetensors")
    shapes = {k: v.shape for k, v in tensors.items()}
    assert shapes == {"W_enc": (8, 24), "b_enc": (24,), "W_dec": (24, 8), "b_dec": (8,)}
    np.testing.assert_array_equal(tensors["W_enc"], params["W_enc"] * 0.25)  # input scale folded in


def test_sparsify_schema_is_not_transposed(tmp_path):
    cfg, params = _random_sae("topk", scale=1.0)
    interop.save_sae(tmp_path / "sae", cfg, params)
    interop.export_sae(tmp_path / "sae", tmp_path / "out", "sparsify")
    saved = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (saved["d_in"], saved["num_latents"], saved["k"], saved["activation"]) == (8, 24, 3, "topk")
    tensors = interop.read_safetensors(tmp_path / "out" / "sae.safetensors")
    np.testing.assert_array_equal(tensors["encoder.weight"], params["W_enc"].T)
    np.testing.assert_array_equal(tensors["W_dec"], params["W_dec"])  # [n, d] in both libraries
    assert tensors["encoder.bias"].shape == (24,) and tensors["b_dec"].shape == (8,)


def test_import_errors(tmp_path):
    cfg, params = _random_sae("jumprelu")
    interop.save_sae(tmp_path / "sae", cfg, params)
    with pytest.raises(interop.SAEFormatError, match="sparsify format holds TopK SAEs only"):
        interop.export_sae(tmp_path / "sae", tmp_path / "sp", "sparsify")
    interop.export_sae(tmp_path / "sae", tmp_path / "lens", "saelens")
    cfg_path = tmp_path / "lens" / "cfg.json"
    original = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**original, "d_in": 9}))
    with pytest.raises(interop.SAEFormatError, match=r"tensor 'W_enc' has shape \(8, 24\), expected \(9, 24\)"):
        interop.import_sae(tmp_path / "lens", tmp_path / "x", "saelens")
    cfg_path.write_text(json.dumps({**original, "architecture": "gated"}))
    with pytest.raises(interop.SAEFormatError, match="architecture 'gated' is not supported"):
        interop.import_sae(tmp_path / "lens", tmp_path / "x", "saelens")
    cfg_path.write_text(json.dumps({**original, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(interop.SAEFormatError, match="normalize_activations"):
        interop.import_sae(tmp_path / "lens", tmp_path / "x", "saelens")
    with pytest.raises(interop.SAEFormatError, match="not a sparsify SAE directory"):
        interop.import_sae(tmp_path / "lens", tmp_path / "x", "sparsify")
    with pytest.raises(FileNotFoundError):
        interop.import_sae(tmp_path / "nowhere", tmp_path / "x", "saelens")
    assert not (tmp_path / "x").exists()


# --- the libraries' own loaders ---------------------------------------------------------------------

def _saelens():
    warnings.filterwarnings("ignore", category=UserWarning)
    from sae_lens import SAE

    return SAE


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_saelens_loads_our_export_and_agrees(tmp_path, arch):
    SAE = _saelens()
    import torch

    cfg, params = _random_sae(arch)
    interop.save_sae(tmp_path / "sae", cfg, params)
    interop.export_sae(tmp_path / "sae", tmp_path / "out", "saelens")
    model = SAE.load_from_disk(str(tmp_path / "out"))
    x = _inputs()
    with torch.no_grad():
        latents = model.encode(torch.from_numpy(x)).numpy()
        recon = model.decode(torch.from_numpy(latents)).numpy()
    np.testing.assert_allclose(latents, sae.encode_dense(params, cfg, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(recon, sae.reconstruct(params, cfg, x), rtol=1e-5, atol=1e-4)
    assert model.cfg.metadata.hook_name == cfg.position


def test_saelens_saved_sae_imports_and_agrees(tmp_path):
    _saelens()
    import torch
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    model = TopKSAE(TopKSAEConfig(d_in=8, d_sae=24, k=3, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_model(str(tmp_path / "lens"))
    interop.import_sae(tmp_path / "lens", tmp_path / "ours", "saelens")
    cfg, params = interop.load_sae(tmp_path / "ours")
    assert cfg.arch == "topk" and cfg.k == 3 and cfg.input_scale == 1.0
    x = _inputs()
    with torch.no_grad():
        ref = model.decode(model.encode(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(sae.reconstruct(params, cfg, x), ref, rtol=1e-5, atol=1e-4)


def _sparsify():
    from sparsify import SparseCoder, SparseCoderConfig

    return SparseCoder, SparseCoderConfig


def test_sparsify_loads_our_export_and_agrees(tmp_path):
    SparseCoder, _ = _sparsify()
    import torch

    cfg, params = _random_sae("topk")
    interop.save_sae(tmp_path / "sae", cfg, params)
    interop.export_sae(tmp_path / "sae", tmp_path / "out", "sparsify")
    coder = SparseCoder.load_from_disk(tmp_path / "out")
    x = _inputs()
    with torch.no_grad():
        out = coder(torch.from_numpy(x))
        acts, index = coder.encode(torch.from_numpy(x))[:2]
    np.testing.assert_allclose(out.sae_out.numpy(), sae.reconstruct(params, cfg, x), rtol=1e-5, atol=1e-4)
    ours = np.asarray(sae.encode_dense(params, cfg, x))
    theirs = np.zeros_like(ours)
    np.put_along_axis(theirs, index.numpy(), acts.numpy(), 1)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_sparsify_saved_sae_imports_and_agrees(tmp_path):
    SparseCoder, SparseCoderConfig = _sparsify()
    import torch

    torch.manual_seed(0)
    coder = SparseCoder(8, SparseCoderConfig(num_latents=24, k=3))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_()
    coder.save_to_disk(tmp_path / "sp")
    interop.import_sae(tmp_path / "sp", tmp_path / "ours", "sparsify")
    cfg, params = interop.load_sae(tmp_path / "ours")
    assert (cfg.d_in, cfg.n_latents, cfg.k) == (8, 24, 3)
    x = _inputs()
    with torch.no_grad():
        ref = coder(torch.from_numpy(x)).sae_out.numpy()
    np.testing.assert_allclose(sae.reconstruct(params, cfg, x), ref, rtol=1e-5, atol=1e-4)
