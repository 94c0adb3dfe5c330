"""Hooks on the FLUX transformer: capture, edit and attention masks against torch-side computations."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from jaxdit import flux, hooks as hk, load_transformer, sharding
from jaxdit.configs import get_config
from twins import flux_inputs, flux_twin, rel_err, torch_forward


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    cfg = get_config("tiny-flux")
    model = flux_twin(cfg, seed=7)
    path = tmp_path_factory.mktemp("hooks")
    model.save_pretrained(path)
    _, params = load_transformer(path)
    inputs, n_ctx = flux_inputs(cfg, 2, 3, 4, 5, seed=8, n_ctx_grid=(3, 4))
    return cfg, model, params, inputs, n_ctx


def _run(cfg, params, inputs, hooks, n_ctx=0):
    return flux.forward(params, cfg, **inputs, hooks=hooks, num_context_tokens=n_ctx)


def test_capture_block_outputs_match_torch_forward_hooks(twin):
    cfg, model, params, inputs, n_ctx = twin
    seen = {}

    def keep(name):
        return lambda mod, args, out: seen.__setitem__(name, (out[0].numpy(), out[1].numpy()))

    handles = [b.register_forward_hook(keep(f"double.{i}")) for i, b in enumerate(model.transformer_blocks)]
    handles += [b.register_forward_hook(keep(f"single.{i}")) for i, b in enumerate(model.single_transformer_blocks)]
    try:
        torch_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    capture = ("double.*.img.resid_post", "double.*.txt.resid_post", "single.*.img.resid_post",
               "single.*.txt.resid_post")
    out, caps = _run(cfg, params, inputs, hk.Hooks(capture=capture), n_ctx)
    assert len(caps) == 2 * (cfg.num_layers + cfg.num_single_layers)
    for name, (txt, img) in seen.items():
        assert rel_err(caps[f"{name}.img.resid_post"], img) <= 1e-5, name
        assert rel_err(caps[f"{name}.txt.resid_post"], txt) <= 1e-5, name


def test_selected_layer_capture_and_attention_probabilities(twin):
    """attn_heads and attn_probs of one single block against an explicit torch computation."""
    from diffusers.models.embeddings import apply_rotary_emb

    cfg, model, params, inputs, n_ctx = twin
    block = model.single_transformer_blocks[1]
    grabbed = {}
    block.attn.register_forward_hook(
        lambda mod, args, kwargs, out: grabbed.update(x=kwargs["hidden_states"], rope=kwargs["image_rotary_emb"],
                                                       out=out), with_kwargs=True)
    torch_forward(model, inputs)
    a, x = block.attn, grabbed["x"]
    heads = lambda y: y.unflatten(-1, (cfg.num_attention_heads, -1))  # noqa: E731
    q = apply_rotary_emb(a.norm_q(heads(a.to_q(x))), grabbed["rope"], sequence_dim=1)
    k = apply_rotary_emb(a.norm_k(heads(a.to_k(x))), grabbed["rope"], sequence_dim=1)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / cfg.attention_head_dim ** 0.5, -1)
    n_txt = inputs["encoder_hidden_states"].shape[1]

    hooks = hk.Hooks(capture=("single.1.img.attn_heads", "single.1.joint.attn_probs_txt_to_img",
                              "single.1.joint.attn_img_sources"))
    _, caps = _run(cfg, params, inputs, hooks, n_ctx)
    assert set(caps) == {"single.1.img.attn_heads", "single.1.joint.attn_probs_txt_to_img",
                         "single.1.joint.attn_img_sources"}
    n_gen = inputs["hidden_states"].shape[1] - n_ctx
    img_rows = probs[:, :, n_txt:].detach().numpy()
    ref_sources = np.concatenate([img_rows[..., :n_txt].mean(1),
                                  img_rows[..., n_txt + n_gen:].sum(-1, keepdims=True).mean(1)], -1)
    assert rel_err(caps["single.1.joint.attn_img_sources"], ref_sources) <= 1e-5
    ref_heads = heads(grabbed["out"])[:, n_txt:].detach().numpy()
    assert rel_err(caps["single.1.img.attn_heads"], ref_heads) <= 1e-5
    ref_probs = probs[:, :, :n_txt, n_txt:].detach().numpy()
    assert caps["single.1.joint.attn_probs_txt_to_img"].shape == ref_probs.shape
    assert rel_err(caps["single.1.joint.attn_probs_txt_to_img"], ref_probs) <= 1e-5


def test_no_hooks_is_the_plain_program(twin):
    cfg, _, params, inputs, _ = twin
    model = flux.FluxTransformer(cfg)
    plain = jax.make_jaxpr(lambda p: model.apply({"params": p}, **inputs))(params)
    empty = jax.make_jaxpr(lambda p: model.apply({"params": p}, **inputs, hooks=hk.Hooks()))(params)
    assert str(plain) == str(empty)


def test_identity_edits_everywhere_change_nothing(twin):
    cfg, _, params, inputs, n_ctx = twin
    ref, _ = _run(cfg, params, inputs, None, n_ctx)
    edits = tuple(hk.Edit(f"{stack}.*.{stream}.{site}", lambda p, x, ctx: x)
                  for stack, streams in flux.POSITIONS.items() for stream, sites in streams.items()
                  if stream != "joint" for site in sites)
    out, _ = _run(cfg, params, inputs, hk.Hooks(edits=edits), n_ctx)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_edit_matches_torch_output_replacement(twin):
    """Scaling one block's image stream in torch (forward hook) equals our edit at that position."""
    cfg, model, params, inputs, n_ctx = twin
    h = model.transformer_blocks[1].register_forward_hook(lambda m, a, out: (out[0], out[1] * 0.5 + 1.0))
    try:
        ref = torch_forward(model, inputs)
    finally:
        h.remove()
    edit = hk.Edit("double.1.img.resid_post", lambda p, x, ctx: x * p["a"] + p["b"], {"a": 0.5, "b": 1.0})
    out, _ = _run(cfg, params, inputs, hk.Hooks(edits=(edit,)), n_ctx)
    assert rel_err(out, ref) <= 1e-5
    plain, _ = _run(cfg, params, inputs, None, n_ctx)
    assert rel_err(plain, ref) > 1e-3  # the edit did something


def test_pooled_site_captures_and_edits_the_conditioning_vector(twin):
    """"embed.0.txt.pooled": its capture is the pooled input, and an edit there equals torch run on the
    edited pooled vector (the same edit composes with block edits in one Hooks value)."""
    cfg, model, params, inputs, n_ctx = twin
    edited = dict(inputs, pooled_projections=np.asarray(inputs["pooled_projections"]) * 0.5 + 1.0)
    ref = torch_forward(model, edited)
    edit = hk.Edit("embed.0.txt.pooled", lambda p, x, ctx: x * p["a"] + p["b"], {"a": 0.5, "b": 1.0})
    out, caps = _run(cfg, params, inputs, hk.Hooks(capture=("embed.0.txt.pooled",), edits=(edit,)), n_ctx)
    assert rel_err(out, ref) <= 1e-5
    np.testing.assert_array_equal(np.asarray(caps["embed.0.txt.pooled"]), np.asarray(inputs["pooled_projections"]))
    with pytest.raises(ValueError, match="layer 1 out of range"):
        _run(cfg, params, inputs, hk.Hooks(capture=("embed.1.txt.pooled",)), n_ctx)


def _masked_processor(groups, bias, scale, layers):
    """A torch attention processor computing softmax(QK^T/sqrt(d) + bias)[*scale] @ V explicitly."""
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.from_numpy(np.array(groups)).long()

    class Proc:
        def __init__(self, on):
            self.on = on

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            heads = lambda y: y.unflatten(-1, (attn.heads, -1))  # noqa: E731
            q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
            if encoder_hidden_states is not None:
                e = encoder_hidden_states
                cq, ck, cv = (heads(f(e)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                q = torch.cat([attn.norm_added_q(cq), q], 1)
                k = torch.cat([attn.norm_added_k(ck), k], 1)
                v = torch.cat([cv, v], 1)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
            full = lambda m: torch.stack([torch.from_numpy(np.array(m))[min(i, m.shape[0] - 1)][:, g[i]][:, :, g[i]]  # noqa: E731
                                          for i in range(q.shape[0])])
            if self.on and bias is not None:
                logits = logits + full(bias)
            w = torch.softmax(logits, -1)
            if self.on and scale is not None:
                w = w * full(scale)
            out = torch.einsum("bhqk,bkhd->bqhd", w, v).flatten(2)
            if encoder_hidden_states is None:
                return out
            n = encoder_hidden_states.shape[1]
            return attn.to_out[0](out[:, n:]), attn.to_add_out(out[:, :n])

    return Proc


@pytest.mark.parametrize("layers,backend", [("*", "xla"), ("single.2", "xla"), ("double.*", "dot_product")])
def test_attention_mask_through_the_model_matches_torch(twin, layers, backend):
    cfg, model, params, inputs, n_ctx = twin
    n_txt, n_all = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
    layout = hk.TokenLayout(n_txt, n_all - n_ctx, n_ctx)
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 2, (2, n_ctx))
    groups = hk.token_groups(layout, ctx_labels=jnp.asarray(labels), num_ctx_labels=2)  # 4 groups
    bias = rng.normal(0, 1, (2, cfg.num_attention_heads, 4, 4)).astype(np.float32)
    scale = rng.uniform(0.2, 1.05, (1, 1, 4, 4)).astype(np.float32)

    proc = _masked_processor(groups, bias, scale, layers)
    stack, _, idx = layers.partition(".")
    for s, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks)):
        for i, b in enumerate(blocks):
            b.attn.set_processor(proc(layers == "*" or (s == stack and idx in ("*", str(i)))))
    try:
        ref = torch_forward(model, inputs)
    finally:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        for b in list(model.transformer_blocks) + list(model.single_transformer_blocks):
            b.attn.set_processor(FluxAttnProcessor())
    mask = hk.AttentionMask(groups, jnp.asarray(bias), jnp.asarray(scale), layers=layers)
    out, _ = _run(cfg.replace(attention_backend=backend), params, inputs, hk.Hooks(attention=(mask,)), n_ctx)
    assert rel_err(out, ref) <= 1e-5


def test_hooks_under_jit_and_an_8_device_mesh(twin):
    cfg, _, params, inputs, n_ctx = twin
    hooks = hk.Hooks(capture=("single.*.img.attn_heads", "double.0.joint.attn_probs_txt_to_img"),
                     edits=(hk.Edit("single.0.img.attn_heads",
                                    lambda p, x, ctx: x + 0.01 * jax.random.normal(ctx.key, x.shape)),),
                     rng=jax.random.key(3), step=jnp.int32(4))
    ref, ref_caps = _run(cfg, params, inputs, hooks, n_ctx)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, sharding.param_shardings(params, mesh, flux.logical_axes(cfg)))
    fn = jax.jit(lambda p, h: _run(cfg, p, inputs, h, n_ctx))
    out, caps = fn(sharded, hooks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * np.abs(ref).max())
    for k in ref_caps:
        np.testing.assert_allclose(np.asarray(caps[k]), np.asarray(ref_caps[k]), atol=1e-5, err_msg=k)
    # The PRNG edit is a function of (rng, step, position): same inputs, same noise; another step differs.
    again, _ = fn(sharded, hooks)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
    other, _ = fn(sharded, hooks.replace(step=jnp.int32(5)))
    assert not np.allclose(np.asarray(other), np.asarray(out))


def test_bad_positions_are_named(twin):
    cfg, _, params, inputs, n_ctx = twin
    for name, match in [("double.9.img.resid_post", "out of range"), ("triple.0.img.resid_post", "unknown stack"),
                        ("single.0.img.attn_out", "unknown site"), ("double.0.img", "form")]:
        with pytest.raises(ValueError, match=match):
            _run(cfg, params, inputs, hk.Hooks(capture=(name,)), n_ctx)
    with pytest.raises(ValueError, match="captured, not edited"):
        _run(cfg, params, inputs, hk.Hooks(edits=(hk.Edit("double.0.joint.attn_probs_txt_to_img",
                                                          lambda p, x, c: x),)), n_ctx)
