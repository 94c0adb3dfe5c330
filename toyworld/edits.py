"""Edits: (source scene, instruction, target scene) triples, the Kontext-style in-context task.

Kinds: add, remove, recolour, move, replace ('turn the circle into a star') and background (a neutral
edit: 'make the background gray'). Scenes hold distinct shapes, so an instruction names an object by its
shape (and sometimes its colour too). The target is exact: untouched objects keep their pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxdit.toyworld.captions import BACKGROUND_WORDS, CELL_WORDS, COLOUR_WORDS, SHAPE_WORDS, object_phrase
from jaxdit.toyworld.scenes import BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, Obj, Scene, random_object

KINDS = ("add", "remove", "recolour", "move", "replace", "background")

TEMPLATES = {
    "add": ("add {obj}", "put {obj}", "also draw {obj}"),
    "remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}", "erase the {ref}"),
    "recolour": ("make the {ref} {colour}", "paint the {ref} {colour}", "change the colour of the {ref} to {colour}"),
    "move": ("move the {ref} {cell}", "put the {ref} {cell} instead"),
    "replace": ("turn the {ref} into {new}", "replace the {ref} with {new}", "change the {ref} into {new}"),
    "background": ("make the background {bg}", "change the background to {bg}", "use a {bg} background"),
}
INSTRUCTION_WORDS = tuple(t.format(obj="", ref="", colour="", cell="", new="", bg="")
                          for ts in TEMPLATES.values() for t in ts)


@dataclasses.dataclass(frozen=True)
class Edit:
    source: Scene
    instruction: str
    target: Scene
    kind: str
    requested: dict  # what the instruction asks for: {"shape", "colour", "cell"} of the new/changed object


def _ref(obj: Obj, rng) -> str:
    shape = str(rng.choice(SHAPE_WORDS[obj.shape]))
    return f"{rng.choice(COLOUR_WORDS[obj.colour])} {shape}" if rng.random() < 0.3 else shape


def _with(scene: Scene, old: Obj, new: Obj | None) -> Scene:
    objs = tuple(new if o is old else o for o in scene.objects if new is not None or o is not old)
    return scene.replace(objects=objs)


def make_edit(source: Scene, kind: str, rng: np.random.Generator, *, obj: Obj | None = None,
              new_shape: str | None = None, new_colour: str | None = None, new_cell: str | None = None,
              new_background: str | None = None, shapes=SHAPES) -> Edit:
    """One edit of `kind`; unspecified choices come from rng. `obj` is the object acted on (or added)."""
    fmt = str(rng.choice(TEMPLATES[kind]))
    if kind == "add":
        if not source.free_cells:
            raise ValueError("no free cell to add an object to")
        present = {o.shape for o in source.objects}
        if obj is None:
            cell = str(rng.choice(source.free_cells))
            obj = random_object(rng, cell, shapes=[s for s in shapes if s not in present])
        if obj.shape in present or obj.cell not in source.free_cells:
            raise ValueError(f"cannot add {obj.shape} at {obj.cell}")
        target = source.replace(objects=source.objects + (obj,))
        text = fmt.format(obj=object_phrase(obj, rng, colour=True, size=rng.random() < 0.5, cell=True))
        return Edit(source, text, target, kind, {"shape": obj.shape, "colour": obj.colour, "cell": obj.cell})
    if kind == "background":
        bg = new_background or str(rng.choice([b for b in BACKGROUND_NAMES if b != source.background]))
        text = fmt.format(bg=rng.choice(BACKGROUND_WORDS[bg]))
        return Edit(source, text, source.replace(background=bg), kind, {"background": bg})
    if not source.objects:
        raise ValueError(f"a {kind} edit needs an object in the source")
    old = obj if obj is not None else source.objects[int(rng.integers(len(source.objects)))]
    ref = _ref(old, rng)
    if kind == "remove":
        return Edit(source, fmt.format(ref=ref), _with(source, old, None), kind, {"shape": old.shape})
    if kind == "recolour":
        colour = new_colour or str(rng.choice([c for c in COLOUR_NAMES if c != old.colour]))
        new = old.replace(colour=colour)
        text = fmt.format(ref=ref, colour=rng.choice(COLOUR_WORDS[colour]))
    elif kind == "move":
        if not source.free_cells:
            raise ValueError("no free cell to move to")
        cell = new_cell or str(rng.choice(source.free_cells))
        new = old.replace(cell=cell)
        text = fmt.format(ref=ref, cell=rng.choice(CELL_WORDS[cell]))
    elif kind == "replace":
        present = {o.shape for o in source.objects}
        shape = new_shape or str(rng.choice([s for s in shapes if s not in present]))
        new = old.replace(shape=shape)
        text = fmt.format(ref=ref, new=object_phrase(new, rng, colour=False, cell=False))
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {KINDS}")
    return Edit(source, text, _with(source, old, new), kind,
                {"shape": new.shape, "colour": new.colour, "cell": new.cell})


def random_edit(rng: np.random.Generator, source: Scene | None = None, kinds=KINDS, kind_weights=None,
                counts=None) -> Edit:
    """A random edit of `source` (or of a random scene with object-count probabilities `counts`); the kind
    uniform over `kinds`, or drawn in proportion to `kind_weights` (one per kind)."""
    from jaxdit.toyworld.scenes import OBJECT_COUNTS, random_scene

    p = None if kind_weights is None else np.asarray(kind_weights, float) / np.sum(kind_weights)
    while True:
        src = source or random_scene(rng, counts=OBJECT_COUNTS if counts is None else counts)
        kind = str(rng.choice(kinds, p=p))
        try:
            return make_edit(src, kind, rng)
        except ValueError:
            if source is not None and len(kinds) == 1:
                raise
