"""jaxdit.safety.safedig.dictionary: the on-disk dictionary (atomic, safetensors + JSON, one-line errors),
harmful latents chosen from contrasts, and steering hooks built from dictionaries or their directories."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import hooks as hk
from jaxdit.safety.safedig import core
from jaxdit.safety.safedig.dictionary import Dictionary, DictionaryError, steering_edit, steering_hooks
from jaxdit.train import sae as sae_lib

POSITION = "single.1.img.resid_post"


def _dictionary(adapted=True):
    cfg = sae_lib.SAEConfig(d_in=8, n_latents=16, k=4, position=POSITION)
    src = {k: np.asarray(v) for k, v in sae_lib.init_params(cfg, jax.random.key(0)).items()}
    tgt = dict(src)
    if adapted:
        tgt["W_dec"] = src["W_dec"][::-1].copy()
        tgt["b_dec"] = src["b_dec"] + 1
    return Dictionary(POSITION, cfg, src, tgt, [3, 1], {"adapted": adapted, "note": "x"})


@pytest.mark.parametrize("adapted", [False, True])
def test_save_load_round_trip(tmp_path, adapted):
    d = _dictionary(adapted)
    path = d.save(tmp_path / "dict")
    assert (path / "source_decoder.safetensors").is_file() == adapted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    meta = json.loads((path / "safedig.json").read_text())
    assert list(meta)[:2] == ["harmful_latents", "position"] and meta["harmful_latents"] == [3, 1]
    back = Dictionary.load(path)
    assert back.position == POSITION and back.cfg == d.cfg and back.harmful.tolist() == [3, 1]
    assert back.meta == {"adapted": adapted, "note": "x"} and back.adapted == adapted
    for side in ("src", "tgt"):
        for k, v in getattr(d, side).items():
            np.testing.assert_array_equal(getattr(back, side)[k], v)
    with pytest.raises(FileExistsError, match="already exists"):
        d.save(path)
    dataclasses.replace(d, harmful=[0]).save(path, overwrite=True)
    assert Dictionary.load(path).harmful.tolist() == [0]


def test_bad_directories_fail_in_one_line_naming_file_and_key(tmp_path):
    path = _dictionary().save(tmp_path / "dict")
    meta_file = path / "safedig.json"
    good = meta_file.read_text()

    def fails(match, exc=DictionaryError):
        with pytest.raises(exc, match=match) as e:
            Dictionary.load(path)
        assert "\n" not in str(e.value)

    meta_file.write_text("{not json")
    fails("safedig.json: not valid JSON")
    meta_file.write_text(json.dumps({"position": POSITION}))
    fails("safedig.json: missing key 'harmful_latents'")
    meta_file.write_text(json.dumps({"harmful_latents": [99], "position": POSITION}))
    fails(r"'harmful_latents' must be a list of latent indices in \[0, 16\)")
    meta_file.write_text(json.dumps({"harmful_latents": [1], "position": "nowhere"}))
    fails("'position' 'nowhere' is not a hook position")
    meta_file.write_text(good)
    from jaxdit.train.interop import write_safetensors

    write_safetensors(path / "source_decoder.safetensors", {"W_dec": np.zeros((16, 8), np.float32)})
    fails("source_decoder.safetensors: missing tensor 'b_dec'")
    (path / "source_decoder.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    fails("source_decoder.safetensors")
    meta_file.unlink()
    fails("no safedig.json", FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Dictionary.load(tmp_path / "missing")


def test_choose_from_contrasts():
    d = _dictionary()
    rng = np.random.default_rng(0)
    safe = rng.normal(size=(64, 8)).astype(np.float32)
    unsafe = safe + 3 * np.asarray(d.src["W_dec"][5]) / float(d.cfg.input_scale)
    d = dataclasses.replace(d, contrasts={"a": (unsafe, safe), "b": (safe[::-1] + 1, safe)}, max_safe_rate=1.0)
    a = core.harmful_latents(d.src, d.cfg, jnp.asarray(unsafe), jnp.asarray(safe), 16)
    np.testing.assert_array_equal(d.ranked("a"), a)
    both = d.choose(2)
    assert both.tolist()[:2] == a[:2].tolist() and set(d.choose(2, ["b"]).tolist()) <= set(both.tolist())
    strict = dataclasses.replace(d, max_safe_rate=0.0)
    rate = np.asarray(jnp.mean(sae_lib.encode_dense(d.src, d.cfg, jnp.asarray(safe)) > 0, axis=0))
    assert (rate[strict.ranked("a")] == 0).all()
    with pytest.raises(KeyError, match="no contrast activations for domain 'c'"):
        d.ranked("c")


def test_steering_hooks_from_dictionaries_and_directories(tmp_path):
    d = _dictionary()
    path = d.save(tmp_path / "dict")
    config = core.SteerConfig(mode="repel", strength=2.0, gate=-1.0)
    edit = steering_edit(d, config)
    assert edit is steering_edit(d, config) and edit is not steering_edit(d, config, [1])  # cached per setting
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 8)), jnp.float32)
    ctx = hk.HookContext(layer=jnp.int32(1), step=jnp.int32(0), key=None, stack="single", stream="img",
                         site="resid_post", layout=hk.TokenLayout(3, 5))
    want = core.steer(x, jax.tree.map(jnp.asarray, d.src), jax.tree.map(jnp.asarray, d.tgt), d.cfg,
                      jnp.asarray([3, 1]), config, jnp.int32(0))
    for hooks in (steering_hooks([d], config), steering_hooks([path], [config]), steering_hooks([str(path)], config)):
        (e,) = hooks.edits
        assert e.position == POSITION
        np.testing.assert_array_equal(np.asarray(e.fn(e.params, x, ctx)), np.asarray(want))
    with pytest.raises(ValueError, match="2 dictionaries, 1 steering configs"):
        steering_hooks([d, d], [config])
