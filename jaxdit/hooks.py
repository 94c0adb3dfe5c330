"""The intervention contract between models and the code that studies or steers them.

Safety and training code never edit model code: they pass a `Hooks` value to the model's `apply`.

Positions
---------
Every place a hook can act has one name, used by capture, edit, harvest manifests and SAE metadata:

    "{stack}.{layer}.{stream}.{site}"      e.g. "double.3.img.resid_post", "single.10.img.attn_heads"

- stack: the block stack ("double" / "single" for FLUX, "joint" for SD3).
- layer: 0-based block index within the stack; in patterns `*` means every layer.
- stream: "img" (image tokens: generated patches, then context patches for Kontext) or "txt".
  Attention-level sites use the stream "joint".
- site: see `SITES`. A model lists the sites each stack offers in its `POSITIONS` table.

| site           | value                                                       | shape              |
| -------------- | ----------------------------------------------------------- | ------------------ |
| resid_pre      | residual stream entering the block                           | [B, T, D]          |
| attn_heads     | per-head attention output, before the output projection      | [B, T, H, Dh]      |
| attn_out       | attention output after its projection, before the gate       | [B, T, D]          |
| mlp_act        | activated MLP hidden units                                   | [B, T, F]          |
| mlp_out        | MLP output, before the gate                                  | [B, T, D]          |
| update         | the block's gated update (single-stream blocks)              | [B, T, D]          |
| resid_post     | residual stream leaving the block                            | [B, T, D]          |
| attn_probs_txt_to_img | softmax weights from text queries to image keys (after any attention mask) | [B, H, T_txt, T_img] |
| attn_img_sources | where image queries read from (head mean, after any mask): weight on each text token, then the total on context tokens | [B, T_img, T_txt + 1] |
| pooled         | the pooled text vector the timestep embedding adds to every block's modulation (stack "embed", one layer: "embed.0.txt.pooled") | [B, D_pooled] |

Attention masks
---------------
An `AttentionMask` describes a transformation of the joint-attention weights over token *groups*: each
token of the joint sequence carries a small integer group id (text, generated patches, context patches,
each optionally split further by a per-token label, see `token_groups`). For query group a and key group
b, `bias[a, b]` is added to the logits before the softmax and `scale[a, b]` multiplies the weights after
it, without renormalising. Matrices are tiny ([B|1, H|1, G, G]); the dense [T x T] matrix is only built by
the attention backend that materialises logits anyway. An empty `Hooks()` adds nothing to the program.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Callable, Iterable, Protocol

import jax
import jax.numpy as jnp
from flax import struct

SITES = (
    "resid_pre",
    "attn_heads",
    "attn_out",
    "mlp_act",
    "mlp_out",
    "update",
    "resid_post",
    "attn_probs_txt_to_img",
    "attn_img_sources",
    "pooled",
)
ATTENTION_SITES = ("attn_probs_txt_to_img", "attn_img_sources")  # stream "joint"; captured, never edited
STREAMS = ("img", "txt", "joint")
_POSITION = re.compile(r"^(?P<stack>[a-z]+)\.(?P<layer>\*|\d+)\.(?P<stream>[a-z]+)\.(?P<site>[a-z_]+)$")


@dataclasses.dataclass(frozen=True)
class Position:
    stack: str
    layer: int | None  # None: every layer
    stream: str
    site: str

    @classmethod
    def parse(cls, name: str) -> "Position":
        m = _POSITION.match(name)
        if not m:
            raise ValueError(
                f"hook position {name!r} is not of the form 'stack.layer.stream.site' "
                f"(e.g. 'double.3.img.resid_post', 'single.*.txt.attn_heads')"
            )
        layer = None if m["layer"] == "*" else int(m["layer"])
        return cls(m["stack"], layer, m["stream"], m["site"])

    def name(self, layer: int | None = None) -> str:
        layer = self.layer if layer is None else layer
        return f"{self.stack}.{'*' if layer is None else layer}.{self.stream}.{self.site}"


def validate_position(pos: Position, table: dict[str, dict[str, tuple[str, ...]]], num_layers: dict[str, int]):
    """Raise a clear error if `pos` does not exist in a model's position table."""
    if pos.stack not in table:
        raise ValueError(f"hook position {pos.name()!r}: unknown stack {pos.stack!r}; this model has {sorted(table)}")
    streams = table[pos.stack]
    if pos.stream not in streams:
        raise ValueError(f"hook position {pos.name()!r}: unknown stream {pos.stream!r}; {pos.stack} has {sorted(streams)}")
    if pos.site not in streams[pos.stream]:
        raise ValueError(
            f"hook position {pos.name()!r}: unknown site {pos.site!r}; "
            f"{pos.stack}.{pos.stream} has {list(streams[pos.stream])}"
        )
    n = num_layers[pos.stack]
    if pos.layer is not None and not 0 <= pos.layer < n:
        raise ValueError(f"hook position {pos.name()!r}: layer {pos.layer} out of range, {pos.stack} has {n} layers")


@struct.dataclass
class HookContext:
    """What an edit function may read about where and when it runs."""

    layer: jax.Array  # traced int32 block index within the stack
    step: jax.Array  # sampling step index (0 outside a sampler)
    key: jax.Array | None  # PRNG key folded with (step, stack, layer, site), or None if Hooks.rng is None
    stack: str = struct.field(pytree_node=False)
    stream: str = struct.field(pytree_node=False)
    site: str = struct.field(pytree_node=False)
    layout: "TokenLayout" = struct.field(pytree_node=False)


@struct.dataclass
class Edit:
    """`x -> fn(params, x, ctx)` at every position matching `position` (a pattern, `*` allowed for layer)."""

    position: str = struct.field(pytree_node=False)
    fn: Callable[[Any, jax.Array, HookContext], jax.Array] = struct.field(pytree_node=False)
    params: Any = None


@struct.dataclass
class AttentionMask:
    """Group-structured transformation of joint-attention weights at the blocks `layers` selects.

    layers: "stack.layer" pattern, e.g. "double.*", "single.10", or "*" for every block.
    token_groups: int32 [B|1, T] group id of every token of the joint sequence (model order).
    bias: float [B|1, H|1, G, G] added to logits of (query group, key group), or None.
    scale: float [B|1, H|1, G, G] multiplying the softmax weights, not renormalised, or None.
    """

    token_groups: jax.Array
    bias: jax.Array | None = None
    scale: jax.Array | None = None
    layers: str = struct.field(pytree_node=False, default="*")

    def applies_to(self, stack: str) -> tuple[bool, int | None]:
        """(matches this stack, specific layer or None for all)."""
        if self.layers == "*":
            return True, None
        m = re.match(r"^([a-z]+)\.(\*|\d+)$", self.layers)
        if not m:
            raise ValueError(f"AttentionMask.layers={self.layers!r}: expected '*', 'stack.*' or 'stack.N'")
        return m[1] == stack, None if m[2] == "*" else int(m[2])


@struct.dataclass
class Hooks:
    capture: tuple[str, ...] = struct.field(pytree_node=False, default=())
    edits: tuple[Edit, ...] = ()
    attention: tuple[AttentionMask, ...] = ()
    step: Any = 0
    rng: jax.Array | None = None

    @property
    def empty(self) -> bool:
        return not (self.capture or self.edits or self.attention)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in a model's joint sequence."""

    n_txt: int
    n_img: int  # generated (noise) image tokens
    n_ctx: int = 0  # context image tokens (Kontext), placed after the generated ones
    text_first: bool = True  # FLUX: [txt, img, ctx]; SD3: [img, txt]

    @property
    def total(self) -> int:
        return self.n_txt + self.n_img + self.n_ctx

    @property
    def txt_slice(self) -> slice:
        return slice(0, self.n_txt) if self.text_first else slice(self.n_img + self.n_ctx, self.total)

    @property
    def img_slice(self) -> slice:
        """Generated and context image tokens together."""
        return slice(self.n_txt, self.total) if self.text_first else slice(0, self.n_img + self.n_ctx)


def token_groups(layout: TokenLayout, img_labels: jax.Array | None = None, ctx_labels: jax.Array | None = None,
                 num_img_labels: int = 1, num_ctx_labels: int = 1) -> jax.Array:
    """Group ids [B|1, T] for a layout: text = 0, generated patch = 1 + img_label,
    context patch = 1 + num_img_labels + ctx_label. Labels are int [B, n] in [0, num_*_labels)."""
    batch = max((l.shape[0] for l in (img_labels, ctx_labels) if l is not None), default=1)

    def part(labels, n, offset):
        if labels is None:
            return jnp.full((batch, n), offset, jnp.int32)
        return jnp.broadcast_to(offset + labels.astype(jnp.int32), (batch, n))

    txt = jnp.zeros((batch, layout.n_txt), jnp.int32)
    img = part(img_labels, layout.n_img, 1)
    ctx = part(ctx_labels, layout.n_ctx, 1 + num_img_labels)
    parts = [txt, img, ctx] if layout.text_first else [img, ctx, txt]
    return jnp.concatenate(parts, axis=1)



@dataclasses.dataclass(frozen=True)
class Geometry:
    """Token layout and patch grids of one sampling run, handed to controllers (static)."""

    layout: TokenLayout
    grid: tuple[int, int]  # generated patches (rows, cols)
    ctx_grid: tuple[int, int] | None = None  # context patches (Kontext)
    stacks: tuple[str, ...] = ("double", "single")  # the model's block stacks (SD3: ("joint",))


class Controller(Protocol):
    """What the compiled sampling loops call, for a method that carries state across steps (UVR).

    At step i (timestep t): `hooks(state, i, t, geometry)` gives the Hooks of this step (merged with the
    user's), the model runs, then `update(state, captures, i, t, geometry)` returns the next state from
    this step's captures. `init(batch, geometry)` is the state before step 0. The state is a pytree of
    arrays of fixed shapes (it is the loop carry); the controller itself is static or a pytree.
    """

    def init(self, batch: int, geometry: Geometry) -> Any: ...

    def hooks(self, state: Any, step: jax.Array, t: jax.Array, geometry: Geometry) -> "Hooks": ...

    def update(self, state: Any, captures: dict, step: jax.Array, t: jax.Array, geometry: Geometry) -> Any: ...


@struct.dataclass
class ControllerGroup:
    """Several controllers in one sampling run (a `Controller`): their states side by side, their hooks
    merged in order, each updated from the same captures."""

    controllers: tuple

    def init(self, batch: int, geometry: Geometry) -> tuple:
        return tuple(c.init(batch, geometry) for c in self.controllers)

    def hooks(self, state, step, t, geometry: Geometry) -> "Hooks":
        return merge(*(c.hooks(s, step, t, geometry) for c, s in zip(self.controllers, state)))

    def update(self, state, captures: dict, step, t, geometry: Geometry) -> tuple:
        return tuple(c.update(s, captures, step, t, geometry) for c, s in zip(self.controllers, state))


# --- runtime used inside model blocks -----------------------------------------------------------

def combine_masks(masks: Iterable[tuple[AttentionMask, jax.Array]]):
    """Merge the masks active at one block into one (groups, bias, scale).

    Each entry is (mask, on) where `on` is a traced bool (layer selection). Group ids are combined as
    g = g1 * G2 + g2 so every transformation stays exact; biases add, scales multiply.
    """
    groups = bias = scale = None
    n = 1
    for mask, on in masks:
        g_new = mask.token_groups.astype(jnp.int32)
        m = (mask.bias if mask.bias is not None else mask.scale).shape[-1]
        b_new = None if mask.bias is None else jnp.where(on, mask.bias, 0.0)
        s_new = None if mask.scale is None else jnp.where(on, mask.scale, 1.0)
        if groups is None:
            groups, bias, scale, n = g_new, b_new, s_new, m
            continue

        def outer(a, b, fill, op):
            if a is None and b is None:
                return None
            a = jnp.full((1, 1, n, n), fill) if a is None else a
            b = jnp.full((1, 1, m, m), fill) if b is None else b
            c = op(a[..., :, None, :, None], b[..., None, :, None, :])
            return c.reshape(*c.shape[:-4], n * m, n * m)

        bias = outer(bias, b_new, 0.0, jnp.add)
        scale = outer(scale, s_new, 1.0, jnp.multiply)
        groups = groups * m + g_new
        n = n * m
    return groups, bias, scale


class BlockHooks:
    """Applies a `Hooks` value at the sites of one block of one stack (inside `nn.scan`).

    Captures for selected layers are written into carry buffers, one slot per selected layer, so
    capturing one layer of a 38-block stack costs one activation, not 38.
    """

    def __init__(self, hooks: Hooks | None, stack: str, layer: jax.Array, layout: TokenLayout,
                 buffers: dict[str, jax.Array] | None, capture_slots: dict[str, tuple[int, ...] | None]):
        self.hooks = hooks
        self.stack = stack
        self.layer = layer
        self.layout = layout
        self.buffers = dict(buffers or {})
        self.capture_slots = capture_slots  # "stream.site" -> selected layers (None: all)
        self._edits = []
        if hooks is not None:
            for e in hooks.edits:
                p = Position.parse(e.position)
                if p.stack == stack:
                    self._edits.append((p, e))

    @property
    def active(self) -> bool:
        return self.hooks is not None and not self.hooks.empty

    def wants(self, stream: str, site: str) -> bool:
        if not self.active:
            return False
        key = f"{stream}.{site}"
        return key in self.capture_slots or any(p.stream == stream and p.site == site for p, _ in self._edits)

    def _ctx(self, stream: str, site: str) -> HookContext:
        key = None
        if self.hooks.rng is not None:
            key = jax.random.fold_in(self.hooks.rng, jnp.asarray(self.hooks.step, jnp.int32))
            key = jax.random.fold_in(key, zlib.crc32(f"{self.stack}.{stream}.{site}".encode()) % (2**31))
            key = jax.random.fold_in(key, self.layer)
        return HookContext(layer=self.layer, step=jnp.asarray(self.hooks.step, jnp.int32), key=key,
                           stack=self.stack, stream=stream, site=site, layout=self.layout)

    def site(self, stream: str, site: str, x: jax.Array) -> jax.Array:
        """Capture the model's value at this site, then apply the edits at it.

        Captures see edits made upstream but not those at the same site, so a controller can read a
        site (e.g. to localize) and edit it in the same forward pass.
        """
        if not self.active:
            return x
        self.record(stream, site, x)
        for p, e in self._edits:
            if p.stream != stream or p.site != site:
                continue
            ctx = self._ctx(stream, site)
            if p.layer is None:
                x = e.fn(e.params, x, ctx)
            else:
                x = jax.lax.cond(self.layer == p.layer, lambda v: e.fn(e.params, v, ctx).astype(v.dtype),
                                 lambda v: v, x)
        return x

    def record(self, stream: str, site: str, x: jax.Array) -> None:
        key = f"{stream}.{site}"
        if not self.active or key not in self.capture_slots:
            return
        layers = self.capture_slots[key]
        buf = self.buffers[key]
        if layers is None:
            self.buffers[key] = buf.at[self.layer].set(x.astype(buf.dtype))
            return
        table = jnp.asarray(layers, jnp.int32)
        hit = table == self.layer
        slot = jnp.argmax(hit)
        new = jnp.where(jnp.any(hit), x.astype(buf.dtype), buf[slot])
        self.buffers[key] = buf.at[slot].set(new)

    def attention_mask(self):
        """(groups, bias, scale) active at this block, or None."""
        if not self.active or not self.hooks.attention:
            return None
        active = []
        for mask in self.hooks.attention:
            matches, layer = mask.applies_to(self.stack)
            if matches:
                active.append((mask, jnp.bool_(True) if layer is None else self.layer == layer))
        if not active:
            return None
        return combine_masks(active)


def attention_site_shape(site: str, batch: int, heads: int, layout: TokenLayout) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype (float32) of an attention-level capture site."""
    n_img = layout.n_img + layout.n_ctx
    if site == "attn_probs_txt_to_img":
        return (batch, heads, layout.n_txt, n_img), jnp.float32
    if site == "attn_img_sources":
        return (batch, n_img, layout.n_txt + 1), jnp.float32
    raise ValueError(f"{site!r} is not an attention-level site")


def capture_plan(hooks: Hooks | None, stack: str, num_layers: int,
                 table: dict[str, dict[str, tuple[str, ...]]], all_layers: dict[str, int]):
    """For one stack: {"stream.site": selected layers (tuple) or None for all} from `hooks.capture`."""
    plan: dict[str, set[int] | None] = {}
    if hooks is None:
        return {}
    for name in hooks.capture:
        p = Position.parse(name)
        validate_position(p, table, all_layers)
        if p.stack != stack:
            continue
        key = f"{p.stream}.{p.site}"
        if p.layer is None or plan.get(key, set()) is None:
            plan[key] = None
        else:
            plan.setdefault(key, set()).add(p.layer)
    out = {}
    for key, layers in plan.items():
        out[key] = None if layers is None or len(layers) == num_layers else tuple(sorted(layers))
    return out


def unpack_captures(stack: str, plan, buffers: dict[str, jax.Array], num_layers: int) -> dict[str, jax.Array]:
    """Carry buffers -> {"stack.layer.stream.site": value}."""
    out = {}
    for key, layers in plan.items():
        stream, site = key.split(".")
        buf = buffers[key]
        for slot, layer in enumerate(range(num_layers) if layers is None else layers):
            out[f"{stack}.{layer}.{stream}.{site}"] = buf[slot]
    return out


def model_site(hooks: Hooks | None, stack: str, stream: str, site: str, x: jax.Array, layout: TokenLayout,
               table, all_layers: dict[str, int]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A site outside the scanned block stacks (a stack of one layer, e.g. "embed.0.txt.pooled"): its
    captures, then its edits, as `BlockHooks.site` does inside a block. Returns (x, captures)."""
    if hooks is None or hooks.empty:
        return x, {}
    plan = capture_plan(hooks, stack, 1, table, all_layers)
    if not plan and not any(Position.parse(e.position).stack == stack for e in hooks.edits):
        return x, {}
    buffers = {key: jnp.zeros((1, *x.shape), x.dtype) for key in plan}
    bh = BlockHooks(hooks, stack, jnp.zeros((), jnp.int32), layout, buffers, plan)
    x = bh.site(stream, site, x)
    return x, unpack_captures(stack, plan, bh.buffers, 1)


def validate_hooks(hooks: Hooks | None, table, num_layers: dict[str, int]) -> None:
    if hooks is None:
        return
    for e in hooks.edits:
        p = Position.parse(e.position)
        validate_position(p, table, num_layers)
        if p.site in ATTENTION_SITES:
            raise ValueError(f"edit at {e.position!r}: attention probabilities can be captured, not edited; "
                             "use an AttentionMask")
    for m in hooks.attention:
        m.applies_to("")  # validates the pattern
        if m.bias is None and m.scale is None:
            raise ValueError("AttentionMask needs a bias or a scale")


def merge(*hooks: Hooks | None) -> Hooks | None:
    """One Hooks value doing what all of `hooks` do (captures united, edits and masks in order).

    The step is the first value's (samplers set it on the merged value); rng the first one given.
    """
    given = [h for h in hooks if h is not None]
    if not given:
        return None
    capture = tuple(dict.fromkeys(c for h in given for c in h.capture))
    rng = next((h.rng for h in given if h.rng is not None), None)
    return Hooks(capture=capture, edits=tuple(e for h in given for e in h.edits),
                 attention=tuple(m for h in given for m in h.attention), step=given[0].step, rng=rng)
