"""The 16-channel AutoencoderKL against diffusers: encode moments, decode, latent normalisation, bad input."""

import copy
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxKontextPipeline
from safetensors.torch import save_file

from jaxdit import vae
from jaxdit.convert import CheckpointError, UnsafeFormatError, read_vae_folder
from jaxdit.parity import randomize_weights
from twins import rel_err

# Tiny twins of the two released layouts: SD-style with quant convs over 2 blocks, and FLUX-style
# (no quant convs, repeated last width, 2 resnets per block) over 3 blocks.
TWINS = {
    "quant": dict(block_out_channels=(8, 16), layers_per_block=1, use_quant_conv=True, use_post_quant_conv=True,
                  scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(block_out_channels=(8, 16, 16), layers_per_block=2, use_quant_conv=False,
                 use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    "no_attention": dict(block_out_channels=(8, 16), layers_per_block=1, use_quant_conv=False,
                         use_post_quant_conv=True, mid_block_add_attention=False, shift_factor=None),
}
HEIGHT, WIDTH, BATCH = 24, 40, 2


def _torch_vae(name: str, seed: int = 0) -> AutoencoderKL:
    n = len(TWINS[name]["block_out_channels"])
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                          up_block_types=("UpDecoderBlock2D",) * n, latent_channels=16, norm_num_groups=4,
                          **TWINS[name])
    return randomize_weights(model.eval(), seed)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (name, torch model, its saved folder, our config, our params), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _torch_vae(name, seed=len(name))
            path = tmp_path_factory.mktemp(name) / "vae"
            model.save_pretrained(path)
            cache[name] = (name, model, path, *read_vae_folder(path))
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(TWINS))
def twin(request, build):
    return build(request.param)


def _images(seed=0, height=HEIGHT, width=WIDTH):
    return np.random.default_rng(seed).uniform(-1, 1, (BATCH, 3, height, width)).astype(np.float32)


def _latents(config, seed=1):
    f = config.downsample_factor
    return np.random.default_rng(seed).standard_normal((BATCH, 16, HEIGHT // f, WIDTH // f)).astype(np.float32)


def test_config_from_folder(twin):
    name, model, path, config, _ = twin
    raw = json.loads((path / "config.json").read_text())
    assert config == vae.VAEConfig.from_diffusers(raw)
    assert config.block_out_channels == TWINS[name]["block_out_channels"]
    assert config.use_quant_conv == TWINS[name]["use_quant_conv"]
    assert config.shift_factor == TWINS[name]["shift_factor"]
    assert AutoencoderKL(**config.to_diffusers()).state_dict().keys() == model.state_dict().keys()


def test_sharded_and_pipeline_folders(build, tmp_path):
    """A sharded `vae/` (safetensors index) inside a pipeline folder loads to the same parameters."""
    _, model, _, config, params = build("quant")
    model.save_pretrained(tmp_path / "vae", max_shard_size="10KB")
    assert list((tmp_path / "vae").glob("*.safetensors.index.json"))
    index = {"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    config2, params2 = read_vae_folder(tmp_path)
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_encode_matches_diffusers(twin):
    _, model, _, config, params = twin
    x = _images()
    mean, logvar = vae.encode(params, config, x)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x)).latent_dist
    assert mean.shape == logvar.shape == (BATCH, 16, HEIGHT // config.downsample_factor,
                                          WIDTH // config.downsample_factor)
    assert mean.dtype == logvar.dtype == jnp.float32
    errs = rel_err(mean, dist.mean.numpy()), rel_err(logvar, dist.logvar.numpy())
    print(f"encode fp32 rel err: mean {errs[0]:.2e} logvar {errs[1]:.2e}")
    assert max(errs) <= 1e-5, errs


def test_decode_matches_diffusers(twin):
    _, model, _, config, params = twin
    z = _latents(config)
    out = vae.decode(params, config, z)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(z)).sample.numpy()
    assert out.shape == ref.shape == (BATCH, 3, HEIGHT, WIDTH)
    err = rel_err(out, ref)
    print(f"decode fp32 rel err: {err:.2e}")
    assert err <= 1e-5, err


def test_query_chunked_attention(build):
    """Mid-block attention over blocks of queries (the last one padded) equals diffusers."""
    _, model, _, config, params = build("quant")
    config = config.replace(attention_query_chunk=64)  # 12 x 20 = 240 positions: 4 blocks, 16 padded
    z = _latents(config, seed=6)
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(z)).sample.numpy()
    assert rel_err(vae.decode(params, config, z), ref) <= 1e-5


def test_latent_normalisation_matches_pipelines(twin):
    """The Kontext context latents (`_encode_vae_image`, argmax sampling) and the decode-side formula."""
    _, model, _, config, params = twin
    x = _images(seed=2)
    ours = vae.encode_mean_normalized(params, config, x)
    if config.shift_factor is not None:  # the pipelines assume a shift factor (FLUX / SD3 VAEs)
        with torch.no_grad():
            ref = FluxKontextPipeline._encode_vae_image(types.SimpleNamespace(vae=model), torch.from_numpy(x), None)
        assert rel_err(ours, ref.numpy()) <= 1e-5

    z = _latents(config, seed=3)
    sf, shift = model.config.scaling_factor, model.config.shift_factor or 0.0
    np.testing.assert_allclose(vae.denormalize_latents(z, config), (z / sf) + shift, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.normalize_latents(z, config), (z - shift) * sf, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.normalize_latents(vae.denormalize_latents(z, config), config), z,
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_error(build):
    """bf16 compute (bf16 weights, float32 norm statistics and softmax) against torch float32, printed
    beside torch's own bf16 error; on the FLUX-layout twin."""
    _, model, path, config, _ = build("flux")
    _, params16 = read_vae_folder(path, dtype="bfloat16")
    config16 = config.replace(dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params16))
    x, z = _images(seed=4), _latents(config, seed=5)
    mean, logvar = vae.encode(params16, config16, x)
    out = vae.decode(params16, config16, z)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        dist, ref = model.encode(torch.from_numpy(x)).latent_dist, model.decode(torch.from_numpy(z)).sample
        dist16 = model16.encode(torch.from_numpy(x).bfloat16()).latent_dist
        ref16 = model16.decode(torch.from_numpy(z).bfloat16()).sample
    ours = {"mean": rel_err(mean, dist.mean), "logvar": rel_err(logvar, dist.logvar), "decode": rel_err(out, ref)}
    theirs = {"mean": rel_err(dist16.mean.float(), dist.mean), "logvar": rel_err(dist16.logvar.float(), dist.logvar),
              "decode": rel_err(ref16.float(), ref)}
    print("bf16 vs torch fp32 rel err (jax | torch bf16): "
          + ", ".join(f"{k} {ours[k]:.2e} | {theirs[k]:.2e}" for k in ours))
    assert max(ours.values()) < 5e-2, ours


def test_sample():
    """`sample` draws mean + exp(logvar / 2) * N(0, 1) noise (diffusers `latent_dist.sample`)."""
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(480).astype(np.float32)  # any shape; 1-D keeps threefry's compile short
    logvar = rng.uniform(-3, 1, mean.shape).astype(np.float32)
    key = jax.random.key(0)
    draw = vae.sample(mean, logvar, key)
    noise = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
    assert draw.dtype == jnp.float32 and 0.5 < noise.std() < 1.5
    np.testing.assert_allclose(draw, mean + np.exp(0.5 * logvar) * noise, rtol=1e-6, atol=1e-6)


def test_bad_input_shapes(twin):
    _, _, _, config, params = twin
    f = config.downsample_factor
    with pytest.raises(ValueError, match=f"not divisible by the VAE's downsampling factor {f}"):
        vae.encode(params, config, _images(height=HEIGHT + 1))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        vae.encode(params, config, _images()[:, :2])
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, H, W\]"):
        vae.decode(params, config, _latents(config)[:, :4])


# --- bad checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state():
    model = _torch_vae("quant", seed=7)
    return dict(model.config), {k: v.contiguous() for k, v in model.state_dict().items()}


def _folder(tmp_path, cfg, sd):
    path = tmp_path / "vae"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **cfg}))
    save_file(sd, path / "diffusion_pytorch_model.safetensors")
    return path


def test_missing_key(tmp_path, state):
    cfg, sd = state
    sd = {k: v for k, v in sd.items() if k != "decoder.mid_block.attentions.0.to_q.weight"}
    with pytest.raises(CheckpointError, match="missing.*decoder.mid_block.attentions.0.to_q.weight"):
        read_vae_folder(_folder(tmp_path, cfg, sd))


def test_unexpected_key(tmp_path, state):
    cfg, sd = state
    sd = {**sd, "encoder.down_blocks.0.resnets.0.conv3.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(CheckpointError, match="unexpected.*encoder.down_blocks.0.resnets.0.conv3.weight"):
        read_vae_folder(_folder(tmp_path, cfg, sd))


def test_wrong_shape(tmp_path, state):
    cfg, sd = state
    sd = {**sd, "encoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}
    with pytest.raises(CheckpointError) as info:
        read_vae_folder(_folder(tmp_path, cfg, sd))
    msg = str(info.value)
    for needle in ("encoder.conv_in.weight", "(8, 4, 3, 3)", "(8, 3, 3, 3)", "diffusion_pytorch_model.safetensors"):
        assert needle in msg, (needle, msg)


def test_quant_conv_mismatch(tmp_path, state):
    """Weights with quant convs under a config that says there are none: named, not silently dropped."""
    cfg, sd = state
    with pytest.raises(CheckpointError, match=r"unexpected.*quant_conv\.(weight|bias)"):
        read_vae_folder(_folder(tmp_path, {**cfg, "use_quant_conv": False, "use_post_quant_conv": False}, sd))


def test_pickle_refused(tmp_path, state):
    cfg, sd = state
    path = tmp_path / "vae"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **cfg}))
    torch.save(sd, path / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeFormatError, match="diffusion_pytorch_model.bin"):
        read_vae_folder(path)
    with pytest.raises(UnsafeFormatError, match="diffusion_pytorch_model.bin"):
        read_vae_folder(path / "diffusion_pytorch_model.bin")


def test_bad_config(tmp_path, state):
    cfg, sd = state
    with pytest.raises(CheckpointError, match="UpDecoderBlock2D"):
        read_vae_folder(_folder(tmp_path, {**cfg, "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}, sd))


def test_released_layouts():
    """FLUX and SD3 presets have the released VAEs' parameter count (diffusers: 83,819,683) and 8x
    downsampling."""
    assert vae.FLUX_VAE.replace(scaling_factor=1.5305, shift_factor=0.0609) == vae.SD3_VAE
    assert sum(x.size for x in jax.tree_util.tree_leaves(vae.abstract_params(vae.FLUX_VAE))) == 83_819_683
    assert vae.FLUX_VAE.downsample_factor == 8
