"""Logical axes declared where parameters are created, and the one RULES table.

Every parameter of every model family declares logical axes of its rank; the resulting specs are the
Megatron layout (column-parallel q/k/v and MLP inputs over heads / MLP units, row-parallel output
projections, the model width over fsdp); the SAE trainer's specs come from the same table.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxdit import flux, sd3, sharding
from jaxdit.configs import get_config
from jaxdit.layers import dense
from jaxdit.text import clip, t5
from jaxdit.train import sae, trainer

TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
MODELS = {
    "tiny-flux": (flux, get_config("tiny-flux")),
    "tiny-flux-schnell": (flux, get_config("tiny-flux-schnell")),
    "tiny-sd3": (sd3, get_config("tiny-sd3")),
    "tiny-sd3.5-large": (sd3, get_config("tiny-sd3.5-large")),
    "tiny-sd3.5-medium": (sd3, get_config("tiny-sd3.5-medium")),
    "t5-gated": (t5, t5.T5EncoderConfig(**TINY_T5)),
    "t5-plain": (t5, t5.T5EncoderConfig(**TINY_T5, dense_act_fn="relu", is_gated_act=False)),
    "clip-projection": (clip, clip.ClipTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  max_position_embeddings=16, projection_dim=24)),
}
STACKS = ("transformer_blocks", "single_transformer_blocks", "block", "layers")  # + SD3 segments

# The expected layout, by the Linear's name inside its block (or at the top level).
COLUMN = {  # kernel [in, out]: (embed, split), bias (split,)
    "attn/to_q": "heads", "attn/to_k": "heads", "attn/to_v": "heads",
    "attn2/to_q": "heads", "attn2/to_k": "heads", "attn2/to_v": "heads",
    "attn/add_q_proj": "heads", "attn/add_k_proj": "heads", "attn/add_v_proj": "heads",
    "ff/net/0/proj": "mlp", "ff_context/net/0/proj": "mlp", "proj_mlp": "mlp",
    "norm1/linear": "mlp", "norm1_context/linear": "mlp", "norm/linear": "mlp", "norm_out/linear": "mlp",
    "self_attn/q_proj": "heads", "self_attn/k_proj": "heads", "self_attn/v_proj": "heads", "mlp/fc1": "mlp",
    "layer/0/SelfAttention/q": "heads", "layer/0/SelfAttention/k": "heads", "layer/0/SelfAttention/v": "heads",
    "layer/1/DenseReluDense/wi": "mlp", "layer/1/DenseReluDense/wi_0": "mlp", "layer/1/DenseReluDense/wi_1": "mlp",
}
ROW = {  # kernel [in, out]: (split, embed), bias replicated
    "attn/to_out/0": "heads", "attn2/to_out/0": "heads", "attn/to_add_out": "heads",
    "ff/net/2": "mlp", "ff_context/net/2": "mlp", "proj_out": "mlp",  # FLUX single block: [heads | mlp] in
    "self_attn/out_proj": "heads", "mlp/fc2": "mlp",
    "layer/0/SelfAttention/o": "heads", "layer/1/DenseReluDense/wo": "mlp",
}
WIDTH_OUT = ("x_embedder", "context_embedder", "linear_1")  # narrow input -> model width: (None, embed)
WIDTH_IN = ("proj_out", "linear_2", "text_projection")  # model width -> narrow output: (embed, None)
TABLES = ("embeddings/token_embedding", "embeddings/position_embedding", "shared")  # (vocab, embed)
REPLICATED = ("relative_attention_bias", "pos_embed/proj", "pos_embed/pos_embed")  # small: every axis None


def _flat(tree, is_leaf=None):
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _is_stack(top: str) -> bool:
    return top in STACKS or top.rpartition("_")[0] == "transformer_blocks"


def expected_axes(path: str, rank: int) -> tuple:
    """The layout this project promises for one parameter, from its name (a test oracle only)."""
    top, _, inner = path.partition("/")
    lead = ("layers",) if _is_stack(top) else ()
    name = inner if lead else path
    module, _, leaf = name.rpartition("/")
    if module in COLUMN and leaf == "kernel":
        return lead + ("embed", COLUMN[module])
    if module in COLUMN and leaf == "bias":
        return lead + (COLUMN[module],)
    if module in ROW and lead and leaf == "kernel":
        return lead + (ROW[module], "embed")
    if module.rpartition("/")[2] in WIDTH_OUT and leaf == "kernel":
        return lead + (None, "embed")
    if module.rpartition("/")[2] in WIDTH_IN and leaf == "kernel":
        return lead + ("embed", None)
    if module in TABLES and leaf == "embedding":
        return lead + ("vocab", "embed")
    if leaf == "scale" or (leaf == "bias" and ("layer_norm" in module or module == "final_layer_norm")):
        return lead + ("norm",)
    assert leaf == "bias" or name.startswith(REPLICATED), f"{path}: not in the expected layout"
    return lead + (None,) * (rank - len(lead))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_declares_axes_of_its_rank(name):
    mod, cfg = MODELS[name]
    axes = _flat(mod.logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    shapes = _flat(mod.abstract_params(cfg))
    assert axes.keys() == shapes.keys()
    for path, a in axes.items():
        assert len(a) == len(shapes[path].shape), path
        assert all(n is None or n in sharding.RULES for n in a), path
        assert a == expected_axes(path, len(a)), path


@pytest.mark.parametrize("name", list(MODELS))
def test_specs_are_the_megatron_layout(name):
    mod, cfg = MODELS[name]
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    specs = _flat(sharding.param_specs(mod.abstract_params(cfg), mesh, mod.logical_axes(cfg)),
                  is_leaf=lambda x: isinstance(x, P))
    for path, spec in specs.items():
        top, _, inner = path.partition("/")
        module, _, leaf = (inner if _is_stack(top) else path).rpartition("/")
        if not _is_stack(top):
            continue
        if module in COLUMN:
            assert spec == (P(None, "fsdp", "tensor") if leaf == "kernel" else P(None, "tensor")), path
        elif module in ROW:
            assert spec == (P(None, "tensor", "fsdp") if leaf == "kernel" else P(None, None)), path
        else:  # norms
            assert spec == P(None, None), path
    column = sum(1 for p in specs if p.rpartition("/")[0].partition("/")[2] in COLUMN)
    row = sum(1 for p in specs if p.rpartition("/")[0].partition("/")[2] in ROW)
    assert column and row


def test_init_params_are_plain_arrays_and_axes_cost_nothing():
    for mod, cfg in MODELS.values():  # init_params unboxes: users hold plain arrays
        params = jax.eval_shape(lambda: mod.init_params(cfg, jax.random.key(0)))
        leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    # a 12 B-parameter model: the axes come from an abstract init, nothing is allocated
    axes = flux.logical_axes(get_config("flux-dev"))
    assert axes["transformer_blocks"]["attn"]["to_q"]["kernel"] == ("layers", "embed", "heads")
    assert axes["single_transformer_blocks"]["proj_out"]["kernel"] == ("layers", "mlp", "embed")


def test_undeclared_parameters_and_mismatched_trees_are_refused():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="plain")(dense(4, "declared", jnp.float32, axes=("embed", "mlp"))(x))

    boxed = jax.eval_shape(lambda: Bare().init(jax.random.key(0), jnp.zeros((1, 2)))["params"])
    with pytest.raises(ValueError, match="parameter plain/(bias|kernel) declares no logical axes"):
        sharding.declared_axes(boxed)
    cfg = get_config("tiny-flux")
    params, axes = flux.abstract_params(cfg), flux.logical_axes(cfg)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    params["extra"] = params.pop("x_embedder")
    with pytest.raises(ValueError, match=r"missing \['x_embedder/bias', 'x_embedder/kernel'\], unexpected "
                                         r"\['extra/bias', 'extra/kernel'\]"):
        sharding.param_specs(params, mesh, axes)
    with pytest.raises(ValueError, match="logical axis 'embedding' has no rule"):
        sharding.mesh_spec(("embedding",), (4,), mesh)


@pytest.mark.parametrize("arch", sae.ARCHS)
def test_sae_specs_come_from_the_rules(arch):
    cfg = sae.SAEConfig(d_in=24, n_latents=64, k=4, arch=arch)
    specs = trainer.param_specs(cfg)
    expected = {"W_enc": P(None, "tensor"), "b_enc": P("tensor"), "W_dec": P("tensor", None), "b_dec": P()}
    if arch in ("jumprelu", "batchtopk"):
        expected["threshold"] = P("tensor")
    assert specs == expected
    assert all(len(a) == len(s) for a, s in zip(sae.param_axes(cfg).values(), sae.param_shapes(cfg).values()))
    assert trainer.BATCH_SPEC == P(("data", "fsdp"), None)
    assert (trainer.BATCH_AXES, trainer.LATENT_AXIS) == (("data", "fsdp"), "tensor")
