"""Single files the weights alone do not describe: SD3 without qk-norm, all-in-one FLUX files (transformer,
VAE and text encoders in one file), and the output size of a Kontext edit left to the pipeline."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import jax

from jaxdit import load_transformer, sd3, vae
from jaxdit.configs import FluxConfig, SD3Config, get_config
from jaxdit.convert import CheckpointError, convert, load_vae, read_vae_folder
from jaxdit.convert.tree import flatten
from jaxdit.pipeline import FluxKontextPipeline
from sd3_twins import sd3_inputs, sd3_twin, to_sai, torch_forward
from twins import flux_twin, rel_err, to_bfl

FP32_TOL = 1e-5
# The transformer of diffusers' SD3 pipeline tests: one block of 4 heads x 8, no qk-norm. Its width (32)
# is not SAI's 64 x depth, so a file of it does not say how the width splits into heads.
PIPELINE_TEST_SD3 = SD3Config(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                              pooled_projection_dim=64, out_channels=4)


def _assert_same_tree(a, b):
    a, b = flatten(a), flatten(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))


# --- SD3 without qk-norm --------------------------------------------------------------------------------

def test_sd3_file_without_qk_norm_needs_its_heads(tmp_path):
    cfg = PIPELINE_TEST_SD3
    model = sd3_twin(cfg, seed=3)
    file = tmp_path / "sd3-pipeline-test.safetensors"
    save_file(to_sai({k: v.contiguous() for k, v in model.state_dict().items()}, cfg), file)

    with pytest.raises(CheckpointError) as info:
        load_transformer(file)
    msg = str(info.value)
    assert str(file) in msg and "x_embedder.proj.weight (32, 4, 1, 1)" in msg, msg
    assert "not 64 x depth 1 = 64" in msg and "config=" in msg, msg
    with pytest.raises(CheckpointError, match="heads are unknown"):
        convert(file, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    other_family = f"{re.escape(str(file))}: holds a transformer of family 'sd3'.*FluxConfig"
    with pytest.raises(CheckpointError, match=other_family):
        load_transformer(file, config=FluxConfig())

    loaded, params = load_transformer(file, config=cfg)
    assert loaded == cfg
    inputs = sd3_inputs(cfg, 2, 8, 6, 5, seed=2)
    ours = np.asarray(jax.jit(lambda p, x: sd3.forward(p, cfg, **x)[0])(params, inputs))
    err = rel_err(ours, torch_forward(model, inputs))
    print(f"\nfp32 rel err SD3 pipeline-test transformer, config given: {err:.2e}")
    assert err <= FP32_TOL, err


def test_sd3_file_without_qk_norm_converts_with_a_config_file(tmp_path, capsys):
    import json

    from jaxdit.cli import main
    from jaxdit.convert.checkpoint import load_config

    cfg = PIPELINE_TEST_SD3
    file = tmp_path / "sd3.safetensors"
    save_file(to_sai({k: v.contiguous() for k, v in sd3_twin(cfg, seed=4).state_dict().items()}, cfg), file)
    diffusers_json = tmp_path / "config.json"
    diffusers_json.write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **cfg.to_diffusers()}))
    assert main(["convert", str(file), str(tmp_path / "a"), "--config", str(diffusers_json)]) == 0
    assert load_config(tmp_path / "a") == cfg
    jaxdit_json = tmp_path / "jaxdit.json"
    jaxdit_json.write_text(json.dumps(cfg.to_json()))
    assert main(["convert", str(file), str(tmp_path / "b"), "--config", str(jaxdit_json)]) == 0
    assert load_config(tmp_path / "b") == cfg
    capsys.readouterr()
    assert main(["convert", str(file), str(tmp_path / "c")]) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert main(["convert", str(file), str(tmp_path / "c"), "--config", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--config JSON" in err[0] and "bad.json" in err[1] and not (tmp_path / "c").exists()


def test_sd3_file_of_sai_width_is_read_without_config(tmp_path):
    cfg = get_config("tiny-sd3").replace(num_layers=1, num_attention_heads=1, attention_head_dim=64,
                                         caption_projection_dim=64)
    file = tmp_path / "sd3-sai-width.safetensors"
    save_file(to_sai({k: v.contiguous() for k, v in sd3_twin(cfg).state_dict().items()}, cfg), file)
    inferred, _ = load_transformer(file)
    assert inferred == cfg.replace(sample_size=SD3Config.sample_size)


# --- all-in-one FLUX files --------------------------------------------------------------------------------

def _ldm_vae(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM / BFL layout (`ae.safetensors` names), written
    independently of `jaxdit.convert.keymaps.vae`."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
        if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k):
            k = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if t.ndim == 2:  # LDM keeps these as 1x1 convolutions
                t = t[:, :, None, None]
        out[k] = t.contiguous()
    return out


@pytest.fixture(scope="module")
def all_in_one(tmp_path_factory):
    """A FLUX all-in-one file (BFL transformer, LDM VAE, two text encoders' tensors) and its parts as
    diffusers folders."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    tmp = tmp_path_factory.mktemp("all_in_one")
    # FLUX.1's head size (128) so the config is read off the file; one block of each kind.
    cfg = get_config("tiny-flux").replace(attention_head_dim=128, axes_dims_rope=(16, 56, 56), num_layers=1,
                                          num_single_layers=1, num_attention_heads=1)
    model = flux_twin(cfg, seed=4)
    model.save_pretrained(tmp / "transformer")
    # 32 groups and FLUX.1's latent normalisation, what a single file implies (neither is in the weights)
    ae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=16,
                       norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False)
    ae.save_pretrained(tmp / "vae")
    ldm = _ldm_vae(ae.state_dict(), 2)
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, ae.config)
    assert back.keys() == ae.state_dict().keys()  # diffusers reads our LDM names back exactly
    for k, v in ae.state_dict().items():
        assert torch.equal(back[k], v), k
    text = {"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4),
            "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(8, 4)}
    file = tmp / "flux1-all-in-one.safetensors"
    save_file({**to_bfl(model.state_dict(), cfg), **{"first_stage_model." + k: v for k, v in ldm.items()}, **text},
              file)
    save_file(ldm, tmp / "ae.safetensors")
    return cfg, tmp, file, len(ldm)


def test_all_in_one_flux_file_loads_the_transformer(all_in_one):
    cfg, tmp, file, n_vae = all_in_one
    with pytest.warns(UserWarning, match="skipped") as record:
        loaded, params = load_transformer(file)
    [msg] = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert msg == (f"{file}: skipped {n_vae + 3} tensors of other components (first_stage_model.* ({n_vae}), "
                   "text_encoders.clip_l.* (2), text_encoders.t5xxl.* (1)); only the transformer is read")
    assert loaded == cfg
    _assert_same_tree(params, load_transformer(tmp / "transformer")[1])


def test_all_in_one_flux_file_loads_the_vae_when_asked(all_in_one):
    _, tmp, file, _ = all_in_one
    ref_cfg, ref_params = read_vae_folder(tmp / "vae")
    for source in (file, tmp / "ae.safetensors", tmp / "vae"):  # all-in-one, BFL's bare file, a folder
        config, params = load_vae(source)
        assert config == ref_cfg, source
        _assert_same_tree(params, ref_params)
    # beside an SD3 transformer (SAI's files), the latent normalisation is SD3's
    from safetensors.torch import load_file

    sd3_cfg = get_config("tiny-sd3.5-large")
    sai = to_sai({k: v.contiguous() for k, v in sd3_twin(sd3_cfg).state_dict().items()}, sd3_cfg)
    ldm = load_file(tmp / "ae.safetensors")
    save_file({**sai, **{"first_stage_model." + k: v for k, v in ldm.items()}}, tmp / "sd3-all-in-one.safetensors")
    config, params = load_vae(tmp / "sd3-all-in-one.safetensors")
    assert config == ref_cfg.replace(scaling_factor=vae.SD3_VAE.scaling_factor, shift_factor=vae.SD3_VAE.shift_factor)
    _assert_same_tree(params, ref_params)


def test_file_without_a_vae_says_so(all_in_one, tmp_path):
    cfg, tmp, _, _ = all_in_one
    file = tmp_path / "flux1-transformer-only.safetensors"
    save_file(to_bfl(flux_twin(cfg).state_dict(), cfg), file)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(file))}: no autoencoder tensors"):
        load_vae(file)


# --- Kontext output size when height and width are left to the pipeline --------------------------------------

def _sizes_only_pipeline(vae_config):
    """A Kontext pipeline holding only what `edit_sizes` reads (the VAE factor)."""
    fields = {f.name: None for f in dataclasses.fields(FluxKontextPipeline) if f.name != "default_max_sequence_length"}
    return FluxKontextPipeline(**{**fields, "vae_config": vae_config})


def test_kontext_default_size_keeps_the_context_aspect_or_is_square():
    pipe = _sizes_only_pipeline(vae.FLUX_VAE)  # factor 8: sides are multiples of 16
    # a 1000x600 photo: the context is the preferred 1328x800 either way; the output about 1024^2 pixels
    assert pipe.edit_sizes((1000, 600)) == ((1328, 800), (1312, 784))  # BFL: the edit keeps its shape
    assert pipe.edit_sizes((1000, 600), keep_aspect=False) == ((1328, 800), (1024, 1024))  # diffusers
    for keep_aspect in (True, False):  # sizes given are used as they are
        assert pipe.edit_sizes((1000, 600), height=512, width=768, max_area=512 * 768,
                               keep_aspect=keep_aspect)[1] == (768, 512)


def test_kontext_square_default_is_diffusers(tmp_path):
    """diffusers' own pipeline, height and width None, on a 40x24 image: the output size it picks."""
    from PIL import Image

    from pipeline_twins import flux_pipeline_folder

    ref = flux_pipeline_folder(tmp_path / "kontext", guidance=True, seed=5, kontext=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        out = ref(image=image, prompt="blue", num_inference_steps=1, max_sequence_length=4, max_area=32 * 32,
                  _auto_resize=False, output_type="pil").images[0]
    pipe = _sizes_only_pipeline(vae.VAEConfig.from_diffusers(dict(ref.vae.config)))
    context, square = pipe.edit_sizes(image.size, max_area=32 * 32, auto_resize=False, keep_aspect=False)
    assert square == out.size == (32, 32)
    assert pipe.edit_sizes(image.size, max_area=32 * 32, auto_resize=False) == (context, (40, 24)) == ((40, 24),) * 2
