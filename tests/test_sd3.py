"""SD3 / SD3.5 MMDiT: parity with diffusers, original-layout conversion, sharding, bad inputs, hooks."""

import functools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdit import hooks as hk
from jaxdit import load_transformer, sd3, sharding
from jaxdit.configs import config_from_json, get_config
from jaxdit.convert import CheckpointError, convert
from jaxdit.convert.keymaps import sd3 as sd3_keys
from jaxdit.convert.tree import flatten, to_param
from sd3_twins import sd3_inputs, sd3_twin, to_sai, torch_forward
from twins import rel_err

FP32_TOL = 1e-5
BF16_TOL = 5e-2
CASES = {
    "sd3": get_config("tiny-sd3"),  # no qk-norm
    "sd3.5-large": get_config("tiny-sd3.5-large"),  # qk RMSNorm
    "sd3.5-medium": get_config("tiny-sd3.5-medium"),  # MMDiT-X: segments dual | plain | last
    # dual layers in the middle: segments plain | dual dual | last
    "dual-middle": get_config("tiny-sd3.5-medium").replace(num_layers=4, dual_attention_layers=(1, 2)),
}


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """name -> (config, diffusers twin, its `save_pretrained` folder), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            cfg = CASES[name]
            model = sd3_twin(cfg, seed=list(CASES).index(name) + 1)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = cfg, model, path
        return built[name]

    return get


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, inputs, hooks=None):
    return sd3.forward(params, cfg, **inputs, hooks=hooks)


def _ours(cfg, params, inputs):
    return np.asarray(_forward(params, cfg, inputs)[0])


# --- parity with diffusers ---------------------------------------------------------------------------

@pytest.mark.parametrize("case,batch,latent_hw,n_txt", [
    ("sd3", 1, (16, 16), 6),  # the whole 8x8 position table
    ("sd3", 2, (8, 12), 5),  # batch 2, non-square, a crop of the table
    ("sd3.5-large", 2, (10, 6), 7),
    ("sd3.5-medium", 2, (12, 8), 4),
])  # "dual-middle" parity is asserted by test_captures_match_torch_block_outputs
def test_parity(twin, case, batch, latent_hw, n_txt):
    cfg, model, path = twin(case)
    loaded_cfg, params = load_transformer(path)
    assert loaded_cfg == cfg
    inputs = sd3_inputs(cfg, batch, *latent_hw, n_txt, seed=batch)
    err = rel_err(_ours(cfg, params, inputs), torch_forward(model, inputs))
    print(f"\nfp32 rel err {case} batch={batch} latent={latent_hw}: {err:.2e}")
    assert err <= FP32_TOL, err


@pytest.mark.parametrize("case", ["sd3", "sd3.5-large", "sd3.5-medium"])
def test_bfloat16_error_is_small(twin, case):
    """bf16 weights and compute against the float32 diffusers reference (torch bf16 printed beside it)."""
    cfg, model, path = twin(case)
    _, params = load_transformer(path, dtype="bfloat16")
    inputs = sd3_inputs(cfg, 2, 8, 12, 5, seed=7)
    ref = torch_forward(model, inputs)
    ours = rel_err(_ours(cfg.replace(dtype="bfloat16"), params, inputs), ref)
    theirs = rel_err(torch_forward(model, inputs, torch.bfloat16), ref)
    print(f"\nbf16 rel err {case}: jaxdit {ours:.2e}, diffusers bf16 {theirs:.2e}")
    assert ours < BF16_TOL, ours


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_presets_hold_every_diffusers_tensor(name):
    """Each real-size diffusers model (meta device, no memory) maps tensor for tensor onto our tree."""
    from diffusers import SD3Transformer2DModel

    cfg = get_config(name)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg.to_diffusers())
    expected, stacks = flatten(sd3.abstract_params(cfg)), sd3.stacks(cfg)
    rename, seen = sd3_keys.diffusers_renamer(cfg), Counter()
    for key, t in model.state_dict().items():
        [(name_in_tree, _)] = rename(key, None)
        path, layer, arr = to_param(name_in_tree, np.broadcast_to(np.float32(0), tuple(t.shape)), stacks)
        want = expected[path].shape
        assert arr.shape == (want if layer is None else want[1:]), key
        seen[path] += 1
    assert seen == {p: (s.shape[0] if p[0] in stacks else 1) for p, s in expected.items()}


def test_segments_of_the_presets():
    assert sd3.stacks(get_config("sd3-medium")) == {"transformer_blocks": 23, "transformer_blocks_23": 1}
    assert sd3.stacks(get_config("sd3.5-large")) == {"transformer_blocks": 37, "transformer_blocks_37": 1}
    assert sd3.stacks(get_config("sd3.5-medium")) == {"transformer_blocks": 13, "transformer_blocks_13": 10,
                                                      "transformer_blocks_23": 1}
    assert get_config("sd3.5-large-turbo") == get_config("sd3.5-large")
    for name in ("sd3-medium", "sd3.5-medium", "tiny-sd3.5-medium"):
        cfg = get_config(name)
        assert config_from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


# --- original (SAI) single-file layout ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["sd3", "sd3.5-large", "sd3.5-medium", "dual-middle"])
def test_original_layout_converts_to_identical_tree(twin, case, tmp_path):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    cfg, model, path = twin(case)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sai = to_sai(sd, cfg)
    # diffusers' own converter maps our file back exactly: it is a faithful original-layout file.
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    file = tmp_path / "sd3-tiny.safetensors"
    # A VAE tensor beside the transformer, as in SAI files. The metadata moves the header length off a value
    # whose first byte is 0x80, which `refuse_pickle` currently mistakes for a pickle (reported).
    save_file({**sai, "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 3)}, file, metadata={"format": "pt"})
    cfg_a, params_a = load_transformer(path)
    # Without qk-norm a file does not say its heads, and tiny-sd3 is not SAI's 64 x depth wide: given here.
    given = cfg if cfg.qk_norm is None else None
    cfg_b, params_b = load_transformer(file, config=given)
    assert cfg_b == (given or cfg_a.replace(sample_size=128))  # sample_size: the field weights do not set
    a, b = flatten(params_a), flatten(params_b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))


# --- sharding and checkpoints ------------------------------------------------------------------------

def test_sharded_forward_equals_single_device(twin):
    cfg, _, path = twin("sd3.5-medium")
    assert len(jax.devices()) == 8
    _, params = load_transformer(path)
    inputs = sd3_inputs(cfg, 4, 8, 8, 6, seed=4)
    single = _ours(cfg, params, inputs)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, sharding.param_shardings(params, mesh, sd3.logical_axes(cfg)))
    for segment in sd3.stacks(cfg):  # every segment is sharded as a stack
        assert sharded[segment]["attn"]["to_q"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    _, on_mesh = load_transformer(path, mesh=mesh)  # the loader's default rules agree
    assert jax.tree.map(lambda x: x.sharding.spec, on_mesh) == jax.tree.map(lambda x: x.sharding.spec, sharded)
    batch_inputs = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.shape)) for k, v in inputs.items()}
    out, _ = _forward(sharded, cfg, batch_inputs)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_orbax_round_trip(twin, tmp_path):
    cfg, _, path = twin("sd3.5-medium")
    out = convert(path, tmp_path / "ckpt")
    _, params = load_transformer(path)
    cfg2, restored = load_transformer(out)
    assert cfg2 == cfg
    a, b = flatten(params), flatten(restored)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


# --- bad checkpoints and inputs ----------------------------------------------------------------------

def _folder(tmp_path, cfg, sd):
    path = tmp_path / "transformer"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **cfg.to_diffusers()}))
    save_file(sd, path / "diffusion_pytorch_model.safetensors")
    return path


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _put(key, shape):
    return lambda sd: {**sd, key: torch.zeros(shape)}


@pytest.mark.parametrize("edit,needles", [
    (_drop("transformer_blocks.0.attn.to_q.weight"), ["missing", "transformer_blocks.0.attn.to_q.weight"]),
    # layer 1 is slot 0 of the segment `transformer_blocks_1`
    (_drop("transformer_blocks.1.attn.to_k.bias"), ["missing", "transformer_blocks_1.0.attn.to_k.bias"]),
    (_put("transformer_blocks.1.attn.to_add_out.weight", (32, 32)),  # the last block has none
     ["unexpected", "transformer_blocks.1.attn.to_add_out.weight"]),
    (_put("transformer_blocks.5.attn.to_q.weight", (32, 32)),
     ["transformer_blocks.5.attn.to_q.weight", "2 transformer"]),
    (_put("transformer_blocks.1.norm1_context.linear.weight", (192, 32)),
     ["shape mismatch", "transformer_blocks.1.norm1_context.linear.weight", "(192, 32)", "(64, 32)"]),
    (_put("pos_embed.pos_embed", (1, 49, 32)), ["shape mismatch", "pos_embed.pos_embed", "(1, 49, 32)", "(1, 64, 32)"]),
])
def test_bad_diffusers_checkpoint_names_the_key(twin, tmp_path, edit, needles):
    cfg, model, _ = twin("sd3")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_transformer(_folder(tmp_path, cfg, edit(sd)))
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_bad_original_checkpoint_names_the_key(twin, tmp_path):
    cfg, model, _ = twin("sd3")
    sai = to_sai({k: v.contiguous() for k, v in model.state_dict().items()}, cfg)
    key = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.bias"
    for bad, needle in [({**sai, key: torch.zeros(95)}, "not divisible by 3"),
                        ({**sai, "model.diffusion_model.joint_blocks.0.x_block.ada.weight": torch.zeros(1)},
                         "joint_blocks.0.x_block.ada.weight")]:
        save_file(bad, tmp_path / "bad.safetensors")
        with pytest.raises(CheckpointError, match=needle):
            load_transformer(tmp_path / "bad.safetensors", config=cfg)


def test_bad_inputs_fail_clearly(twin):
    cfg, _, path = twin("sd3")
    _, params = load_transformer(path)
    good = sd3_inputs(cfg, 1, 8, 8, 3)
    for change, needle in [
        ({"hidden_states": np.zeros((1, 4, 18, 16), np.float32)}, "larger than the 8x8 position table"),
        ({"hidden_states": np.zeros((1, 4, 7, 8), np.float32)}, "multiples of patch_size"),
        ({"hidden_states": np.zeros((1, 3, 8, 8), np.float32)}, "hidden_states must be"),
        ({"encoder_hidden_states": np.zeros((1, 3, 5), np.float32)}, "encoder_hidden_states must be"),
        ({"pooled_projections": np.zeros((2, 12), np.float32)}, "pooled_projections must be"),
        ({"timestep": np.ones(3, np.float32)}, "timestep must have"),
    ]:
        with pytest.raises(ValueError, match=needle):
            _ours(cfg, params, {**good, **change})


# --- hooks -------------------------------------------------------------------------------------------

def test_captures_match_torch_block_outputs(twin):
    cfg, model, path = twin("dual-middle")
    _, params = load_transformer(path)
    inputs = sd3_inputs(cfg, 2, 8, 6, 5, seed=9)
    blocks = {}
    handles = [block.register_forward_hook(lambda mod, args, out, i=i: blocks.__setitem__(i, out))
               for i, block in enumerate(model.transformer_blocks)]
    try:
        torch_out = torch_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    hooks = hk.Hooks(capture=("joint.*.img.resid_post", "joint.*.txt.resid_post"))
    out, caps = _forward(params, cfg, inputs, hooks)
    err = rel_err(out, torch_out)
    print(f"\nfp32 rel err dual-middle (layers {cfg.dual_attention_layers} of {cfg.num_layers}): {err:.2e}")
    assert err <= FP32_TOL, err
    last = cfg.num_layers - 1
    # diffusers blocks return (text, image); the last block's text output is None.
    assert set(caps) == ({f"joint.{i}.img.resid_post" for i in range(last + 1)}
                         | {f"joint.{i}.txt.resid_post" for i in range(last)})
    for i, (txt, img) in blocks.items():
        assert rel_err(caps[f"joint.{i}.img.resid_post"], img.numpy()) <= FP32_TOL, i
        if i < last:
            assert rel_err(caps[f"joint.{i}.txt.resid_post"], txt.numpy()) <= FP32_TOL, i
    with pytest.raises(ValueError, match="context pre-only"):
        sd3.forward(params, cfg, **inputs, hooks=hk.Hooks(capture=(f"joint.{last}.txt.resid_post",)))


def test_pooled_site_edit_equals_torch_on_the_edited_vector(twin):
    cfg, model, path = twin("sd3")
    _, params = load_transformer(path)
    inputs = sd3_inputs(cfg, 2, 8, 8, 5, seed=11)
    edited = dict(inputs, pooled_projections=np.asarray(inputs["pooled_projections"]) * -0.5 + 0.25)
    edit = hk.Edit("embed.0.txt.pooled", lambda p, x, ctx: x * -0.5 + 0.25)
    out, caps = _forward(params, cfg, inputs, hk.Hooks(capture=("embed.*.txt.pooled",), edits=(edit,)))
    assert rel_err(out, torch_forward(model, edited)) <= FP32_TOL
    np.testing.assert_array_equal(np.asarray(caps["embed.0.txt.pooled"]), np.asarray(inputs["pooled_projections"]))


def test_attention_mask_groups_follow_image_first_order(twin):
    """Blocking text <-> image attention makes the image stream, hence the output, blind to the text."""
    cfg, _, path = twin("sd3.5-large")
    _, params = load_transformer(path)
    inputs = sd3_inputs(cfg, 1, 8, 8, 5, seed=11)
    layout = hk.TokenLayout(n_txt=5, n_img=16, text_first=False)
    block = jnp.array([[0.0, -1e9], [-1e9, 0.0]])[None, None]  # groups: text 0, image 1
    hooks = hk.Hooks(attention=(hk.AttentionMask(hk.token_groups(layout), bias=block),),
                     capture=("joint.*.joint.attn_probs_txt_to_img",))
    other = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"] + 1.0}
    masked, caps = _forward(params, cfg, inputs, hooks)
    masked_other, _ = _forward(params, cfg, other, hooks)
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(masked_other))
    assert caps["joint.0.joint.attn_probs_txt_to_img"].shape == (1, cfg.num_attention_heads, 5, 16)
    assert all(float(jnp.max(v)) == 0.0 for v in caps.values())
    assert not np.allclose(_ours(cfg, params, inputs), _ours(cfg, params, other))
