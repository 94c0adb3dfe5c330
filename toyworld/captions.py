"""The caption grammar: scenes -> prompts, with paraphrases and synonyms.

    'a red star at the top left and a blue heart at the bottom right on a gray background'

Every word any template or synonym can produce is listed by `tokenizer.vocabulary()`, which the word-
level tokenizer is built from. A caption names each object's shape, and optionally its colour, size and cell
(`detail` sets the chances), so a prompt may leave attributes to the model.
"""

from __future__ import annotations

import numpy as np

from jaxdit.toyworld.scenes import BACKGROUND_NAMES, CELLS, COLOUR_NAMES, SHAPES, SIZES, Obj, Scene

# The first synonym is the canonical name.
SHAPE_WORDS = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star", "pentagram", "five pointed shape"),
    "heart": ("heart",),
}
COLOUR_WORDS = {
    "red": ("red", "crimson"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow", "golden"),
}
SIZE_WORDS = {"big": ("big", "large")}  # one size: the words are allowed, never needed
CELL_WORDS = {
    "top left": ("at the top left", "in the top left corner"),
    "top right": ("at the top right", "in the top right corner"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
BACKGROUND_WORDS = {"black": ("black",), "gray": ("gray", "grey")}
PREFIXES = ("", "", "an image of ", "a picture of ", "draw ", "show ")
JOINERS = (" and ", " and ", ", ", " with ")

assert set(SHAPE_WORDS) == set(SHAPES) and set(COLOUR_WORDS) == set(COLOUR_NAMES)
assert set(CELL_WORDS) == set(CELLS) and set(SIZE_WORDS) == set(SIZES) and set(BACKGROUND_WORDS) == set(BACKGROUND_NAMES)


def _pick(rng, options, canonical: bool):
    return options[0] if canonical else str(rng.choice(options))


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def object_phrase(obj: Obj, rng: np.random.Generator | None = None, *, colour=True, size=False, cell=True,
                  canonical=False, shape_word: str | None = None) -> str:
    """'a small red star at the top left' (the parts asked for, synonyms drawn from rng)."""
    rng = rng or np.random.default_rng(0)
    words = []
    if size:
        words.append(_pick(rng, SIZE_WORDS[obj.size], canonical))
    if colour:
        words.append(_pick(rng, COLOUR_WORDS[obj.colour], canonical))
    words.append(shape_word or _pick(rng, SHAPE_WORDS[obj.shape], canonical))
    phrase = " ".join(words)
    phrase = f"{article(phrase)} {phrase}"
    if cell:
        phrase += " " + _pick(rng, CELL_WORDS[obj.cell], canonical)
    return phrase


def caption(scene: Scene, rng: np.random.Generator, detail=(0.85, 0.1, 0.8), background=0.5,
            canonical=False) -> tuple[str, list[dict]]:
    """(caption, requested): requested lists, per object, the attributes the caption names.

    detail = chances to name (colour, size, cell) per object; background = chance to name the background.
    """
    p_colour, p_size, p_cell = detail
    parts, requested = [], []
    for obj in scene.objects:
        flags = dict(colour=rng.random() < p_colour, size=rng.random() < p_size, cell=rng.random() < p_cell)
        parts.append(object_phrase(obj, rng, canonical=canonical, **flags))
        requested.append({"shape": obj.shape, "colour": obj.colour if flags["colour"] else None,
                          "size": obj.size if flags["size"] else None, "cell": obj.cell if flags["cell"] else None})
    text = parts[0]
    for p in parts[1:]:
        text += (JOINERS[0] if canonical else str(rng.choice(JOINERS))) + p
    text = ("" if canonical else str(rng.choice(PREFIXES))) + text
    if rng.random() < background:
        text += f" on a {_pick(rng, BACKGROUND_WORDS[scene.background], canonical)} background"
    return text, requested


def canonical_caption(scene: Scene) -> str:
    """Every attribute, canonical words: 'a big red star at the top left ... on a black background'."""
    return caption(scene, np.random.default_rng(0), detail=(1, 1, 1), background=1, canonical=True)[0]
