"""T5 feed-forward variants: every `feed_forward_proj` transformers' T5Config accepts, against T5EncoderModel.

T5 v1.0 and many small checkpoints use the plain "relu" FFN (`wi`, `wo`); v1.1 (FLUX / SD3's T5-XXL) the
gated one (`wi_0`, `wi_1`, `wo`). The structure is tested end to end per variant; every activation name is
also checked on its own against transformers' ACT2FN.
"""

import json

import numpy as np
import pytest
import torch

import jax
from jax.sharding import PartitionSpec as P

from jaxdit import sharding
from jaxdit.convert import CheckpointError, load_text_encoder
from jaxdit.text import t5
from jaxdit.text.common import ACTIVATIONS
from text_twins import t5_twin, torch_t5
from twins import rel_err

FP32_TOL = 1e-5
VOCAB = 64
# v1.0, v1.1, and the other forms T5Config derives (`{act}` / `gated-{act}`; "gated-gelu" means gelu_new)
VARIANTS = ["relu", "gated-gelu", "gated-silu", "gelu", "silu", "gated-relu", "gelu_new", "gated-gelu_fast"]

_t5_fwd = jax.jit(t5.forward, static_argnums=1)


@pytest.mark.parametrize("proj", VARIANTS)
def test_ffn_variant_matches_transformers(tmp_path, proj):
    model = t5_twin(tmp_path, vocab_size=VOCAB, seed=len(proj), feed_forward_proj=proj, num_layers=2)
    cfg, params = load_text_encoder(tmp_path)
    assert (cfg.dense_act_fn, cfg.is_gated_act) == (model.config.dense_act_fn, model.config.is_gated_act)
    ffn = params["block"]["layer"]["1"]["DenseReluDense"]
    assert sorted(ffn) == (["wi_0", "wi_1", "wo"] if cfg.is_gated_act else ["wi", "wo"])
    ids = np.random.default_rng(1).integers(2, VOCAB, (2, 24))
    err = rel_err(_t5_fwd(params, cfg, ids), torch_t5(model, ids))
    print(f"\nfp32 rel err T5 {proj}: {err:.2e}")
    assert err <= FP32_TOL, (proj, err)


def test_every_activation_matches_act2fn():
    from transformers.activations import ACT2FN

    x = np.concatenate([np.linspace(-30, 30, 6001), np.random.default_rng(0).standard_normal(500) * 3])
    x = x.astype(np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
        assert rel_err(np.asarray(fn(x)), ref) <= 1e-6, name
    # the names left out carry learned parameters, which a T5 FFN checkpoint has no tensors for
    assert sorted(set(ACT2FN) - set(ACTIVATIONS)) == ["prelu", "xielu"]


def test_config_is_derived_as_t5config_derives_it():
    import transformers as tf

    base = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4}
    for proj in VARIANTS + ["gated-mish", "tanh", "gated-gelu_pytorch_tanh"]:
        ref = tf.T5Config(**base, feed_forward_proj=proj)
        ours = t5.T5EncoderConfig.from_transformers({**base, "feed_forward_proj": proj})
        assert (ours.dense_act_fn, ours.is_gated_act) == (ref.dense_act_fn, ref.is_gated_act), proj
    # no feed_forward_proj: T5Config's default, "relu"
    assert t5.T5EncoderConfig.from_transformers(base).is_gated_act is False
    # stored derived fields win over feed_forward_proj, as in T5Config
    stored = {**base, "feed_forward_proj": "gated-gelu", "dense_act_fn": "relu", "is_gated_act": False}
    ref = tf.T5Config.from_dict(stored)
    ours = t5.T5EncoderConfig.from_transformers(stored)
    assert (ours.dense_act_fn, ours.is_gated_act) == (ref.dense_act_fn, ref.is_gated_act) == ("relu", False)
    for bad, match in [("gelu-gated", "gated-"), ("gated-gelu-new", "gated-"), ("gated-prelu", "prelu")]:
        with pytest.raises(ValueError, match=match):
            t5.T5EncoderConfig.from_transformers({**base, "feed_forward_proj": bad})


def test_refused_variant_names_the_file(tmp_path):
    t5_twin(tmp_path, vocab_size=VOCAB, feed_forward_proj="relu", num_layers=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "dense_act_fn": "xielu"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'xielu' is not supported"):
        load_text_encoder(tmp_path)


def test_plain_ffn_is_sharded_like_the_gated_one():
    cfg = t5.T5EncoderConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                             dense_act_fn="relu", is_gated_act=False)
    specs = sharding.param_specs(t5.abstract_params(cfg), sharding.make_mesh(data=1, fsdp=2, tensor=4),
                                 t5.logical_axes(cfg))
    ffn = specs["block"]["layer"]["1"]["DenseReluDense"]
    assert ffn["wi"]["kernel"] == P(None, "fsdp", "tensor")
    assert ffn["wo"]["kernel"] == P(None, "tensor", "fsdp")
