"""Toy-world SafeDIG inputs: the examples of each domain (source, the few target samples, the
paraphrase/seed shift) and their exact per-token labels (image tokens from the scenes' ground-truth masks,
text tokens from the concept's words)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxdit.safety.uvr.anchors import concept_token_positions
from jaxdit.toyworld import model as M
from jaxdit.toyworld.captions import caption, object_phrase
from jaxdit.toyworld.edits import KINDS, make_edit
from jaxdit.toyworld.scenes import SIZE, Scene, ground_truth, random_scene
from jaxdit.toyworld.suites import Concept

HARVEST_SEED = 7_000_001  # scenes, captions and noise of the harvest; disjoint from training and the suites
TOKEN_GRID = M.GRID  # 8x8 image tokens
PATCH = SIZE // TOKEN_GRID  # 4: pixels per image token side


# --- examples ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """One harvest input: a caption (or edit instruction), the scene whose rendering is noised, the edit's
    source scene (clean context tokens) or None, and the noise seed."""

    text: str
    scene: Scene
    context: Scene | None
    seed: int


def _concept(c) -> Concept:
    return Concept.parse(c) if isinstance(c, str) else c


def _has(scene: Scene | None, concept: Concept) -> bool:
    return scene is not None and any(concept.in_object(o.shape, o.colour) for o in scene.objects)


def _scene(rng, concept: Concept, with_concept: bool, exclude: Sequence[Concept] = ()) -> Scene:
    """A random scene holding the concept (or not), never holding a concept of `exclude`."""
    shapes = [s for s in concept.allowed_shapes if not any(e.kind == "shape" and e.value == s for e in exclude)]
    colours = [c for c in concept.allowed_colours if not any(e.kind == "colour" and e.value == c for e in exclude)]
    must = None
    if with_concept:
        while True:
            must = concept.forbidden_object(rng)
            if not any(e.in_object(must.shape, must.colour) for e in exclude):
                break
    return random_scene(rng, shapes=shapes, colours=colours, must_include=must)


def _edit_example(rng, scene: Scene, concept: Concept, with_concept: bool, exclude=()) -> Example:
    """An edit whose target is `scene`-like: adding the concept, keeping it, or (without it) any safe edit."""
    seed = int(rng.integers(0, 2**31 - 1))
    if with_concept:
        bad = next(o for o in scene.objects if concept.in_object(o.shape, o.colour))
        if rng.random() < 0.5:
            source = scene.replace(objects=tuple(o for o in scene.objects if o is not bad))
            e = make_edit(source, "add", rng, obj=bad)
        else:
            kinds = ["background", "move"] + (["recolour"] if concept.kind == "shape" else [])
            while True:
                kind = str(rng.choice(kinds))
                try:
                    e = make_edit(scene, kind, rng, obj=None if kind == "background" else bad,
                                  new_colour=str(rng.choice([c for c in concept.allowed_colours if c != bad.colour]))
                                  if kind == "recolour" else None)
                except ValueError:
                    continue
                break
        return Example(e.instruction, e.target, e.source, seed)
    while True:
        try:
            e = make_edit(scene, str(rng.choice(KINDS)), rng, shapes=[
                s for s in concept.allowed_shapes if not any(x.kind == "shape" and x.value == s for x in exclude)])
        except ValueError:
            continue
        if not _has(e.target, concept) and not any(_has(e.target, x) for x in exclude):
            return Example(e.instruction, e.target, e.source, seed)


def source_examples(concept, n: int, seed: int = 0, edit_fraction: float = 1 / 3,
                    exclude: Sequence = ()) -> list[Example]:
    """Source domain: n examples, alternately with and without the concept; a fraction are edits."""
    concept, exclude = _concept(concept), [_concept(e) for e in exclude]
    rng = np.random.default_rng([HARVEST_SEED, seed, 0])
    out = []
    for i in range(n):
        with_concept = i % 2 == 0
        scene = _scene(rng, concept, with_concept, exclude)
        if rng.random() < edit_fraction:
            out.append(_edit_example(rng, scene, concept, with_concept, exclude))
        else:
            text, _ = caption(scene, rng)
            out.append(Example(text, scene, None, int(rng.integers(0, 2**31 - 1))))
    return out


def target_examples(concept, n: int, seed: int = 0, edits: bool = True) -> list[Example]:
    """Target domain: n scenes with the concept, each as a t2i example and (edits) as the source of a
    neutral background edit, so the few scenes also show the concept as clean context tokens."""
    concept = _concept(concept)
    rng = np.random.default_rng([HARVEST_SEED, seed, 1])
    out = []
    for _ in range(n):
        scene = _scene(rng, concept, True)
        text, _ = caption(scene, rng)
        out.append(Example(text, scene, None, int(rng.integers(0, 2**31 - 1))))
        if edits:
            e = make_edit(scene, "background", rng)
            out.append(Example(e.instruction, e.target, e.source, int(rng.integers(0, 2**31 - 1))))
    return out


def shift_examples(concept, n: int, seed: int = 0) -> list[Example]:
    """The paraphrase/seed shift: scenes with and without the concept, the concept named by a synonym
    where it has one, other prefixes and joiners, fresh noise seeds."""
    concept = _concept(concept)
    rng = np.random.default_rng([HARVEST_SEED, seed, 2])
    words = concept.words()
    out = []
    for i in range(n):
        scene = _scene(rng, concept, i % 2 == 0)
        parts = []
        for o in scene.objects:
            if concept.in_object(o.shape, o.colour):
                word = str(rng.choice(words[1:] or words))
                if concept.kind == "shape":
                    parts.append(object_phrase(o, rng, shape_word=word, cell=rng.random() < 0.7))
                else:
                    base = object_phrase(o, rng, colour=False, cell=rng.random() < 0.7).split(" ", 1)[1]
                    parts.append(f"{'an' if word[0] in 'aeiou' else 'a'} {word} {base}")
            else:
                parts.append(object_phrase(o, rng, cell=rng.random() < 0.7))
        order = rng.permutation(len(parts))
        text = str(rng.choice(("show ", "draw ", "a picture of ", ""))) + \
            str(rng.choice((" with ", ", ", " and "))).join(parts[k] for k in order)
        out.append(Example(text, scene, None, int(rng.integers(0, 2**31 - 1))))
    return out


# --- labels -------------------------------------------------------------------------------------------------

def image_token_labels(scene: Scene, concept) -> np.ndarray:
    """[64] int8 per image token (row-major 8x8 grid of 4x4-pixel patches): 2 = overlaps the concept
    object's mask, 1 = overlaps another object's mask, 0 = background."""
    concept = _concept(concept)
    labels = np.zeros(TOKEN_GRID * TOKEN_GRID, np.int8)
    for truth in ground_truth(scene)["objects"]:
        hit = truth.mask.reshape(TOKEN_GRID, PATCH, TOKEN_GRID, PATCH).any(axis=(1, 3)).reshape(-1)
        if concept.in_object(truth.shape, truth.colour):
            labels[hit] = 2
        else:
            labels[hit & (labels == 0)] = 1
    return labels


def text_token_labels(text: str, tokenizer, concept) -> np.ndarray:
    """[max_length] int8 per text token: 2 = a word of the concept's name (any synonym, multi-word ones
    whole), 1 = another word or the end token, 0 = padding."""
    concept = _concept(concept)
    ids, _ = tokenizer([text])
    labels = (ids[0] != 0).astype(np.int8)
    labels[concept_token_positions(tokenizer, text, concept.words())] = 2
    return labels

