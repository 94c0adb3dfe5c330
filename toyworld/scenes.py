"""Procedural scenes: one to three shapes on a plain background, rendered with numpy, exact ground truth.

A scene is a background name plus objects, each a (shape, colour, size, cell), optionally with a sub-pixel
jitter. Objects sit in the cells of a 2x2 grid, at most one per cell, so they never overlap and every
object's mask, box and class are exact. Rendering supersamples 4x4 per pixel for anti-aliased edges.

The world is sized for training on two CPU cores within an hour: 5 shapes x 4 colours x 2 backgrounds x
4 cells, one object size that fills most of its 16-pixel cell (a shape spans about 3x3 of the model's
4x4-pixel tokens), objects centred in their cells (jitter spreads a shape over different token
boundaries, which the model must then learn separately; see docs/toyworld.md for the measurements).

    scene = random_scene(np.random.default_rng(0))
    image = render(scene)                # [32, 32, 3] uint8
    truth = ground_truth(scene)          # per-object class, colour, box, mask + per-pixel label maps
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

SIZE = 32  # image side in pixels
GRID = 2  # objects sit in the cells of a GRID x GRID layout
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLOURS = {  # name -> RGB
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 20),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
}
SIZES = {"big": 6.5}  # object radius in pixels (cells are 16 px wide)
CELLS = ("top left", "top right", "bottom left", "bottom right")
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str = "big"
    cell: str = "top left"
    jitter: tuple[float, float] = (0.0, 0.0)  # (dy, dx) pixels off the cell centre (random ones: 1/4 px steps)

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.size, SIZES, "size"), (self.cell, CELLS, "cell")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")

    @property
    def centre(self) -> tuple[float, float]:
        r, c = divmod(CELLS.index(self.cell), GRID)
        step = SIZE / GRID
        return (r + 0.5) * step + self.jitter[0], (c + 0.5) * step + self.jitter[1]

    def replace(self, **changes) -> "Obj":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str = "black"

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {list(BACKGROUNDS)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects in the same cell: {cells}")

    def find(self, shape: str) -> Obj | None:
        return next((o for o in self.objects if o.shape == shape), None)

    @property
    def free_cells(self) -> list[str]:
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]

    def replace(self, **changes) -> "Scene":
        return dataclasses.replace(self, **changes)


# --- shape masks in object coordinates (u right, v down, both in [-1, 1]) ---------------------------

def _polygon(u, v, pts) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the sample points."""
    inside = np.zeros(u.shape, bool)
    n = len(pts)
    for i in range(n):
        (x1, y1), (x2, y2) = pts[i], pts[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / np.where(y2 == y1, 1e-9, y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _star_points(k=5, outer=1.0, inner=0.42):
    ang = -np.pi / 2 + np.arange(2 * k) * np.pi / k
    rad = np.where(np.arange(2 * k) % 2 == 0, outer, inner)
    return list(zip(rad * np.cos(ang), rad * np.sin(ang) + 0.08))


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 0.92
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "triangle":
        return _polygon(u, v, [(0.0, -0.95), (0.95, 0.8), (-0.95, 0.8)])
    if shape == "star":
        return _polygon(u, v, _star_points())
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.95) & (r2 >= 0.3)
    if shape == "heart":
        x, y = u * 1.25, -(v * 1.25 + 0.1)
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "arrow":  # pointing right
        shaft = (u >= -0.95) & (u <= 0.1) & (np.abs(v) <= 0.28)
        return shaft | _polygon(u, v, [(0.1, -0.8), (0.95, 0.0), (0.1, 0.8)])
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=None)
def _sample_grid():
    s = (np.arange(SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    return np.meshgrid(s, s, indexing="ij")  # (y, x) sample coordinates in pixels


def object_coverage(obj: Obj) -> np.ndarray:
    """Fraction of each pixel the object covers: [SIZE, SIZE] float32 in [0, 1] (cached, read-only)."""
    return _coverage(obj.shape, obj.size, obj.centre)


@lru_cache(maxsize=32768)
def _coverage(shape: str, size: str, centre: tuple[float, float]) -> np.ndarray:
    ys, xs = _sample_grid()
    cy, cx = centre
    r = SIZES[size]
    hit = shape_mask(shape, (xs - cx) / r, (ys - cy) / r).astype(np.float32)
    out = hit.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    out.flags.writeable = False
    return out


def render(scene: Scene) -> np.ndarray:
    """[SIZE, SIZE, 3] uint8 RGB."""
    img = np.broadcast_to(np.asarray(BACKGROUNDS[scene.background], np.float32), (SIZE, SIZE, 3)).copy()
    for obj in scene.objects:
        a = object_coverage(obj)[..., None]
        img = img * (1 - a) + a * np.asarray(COLOURS[obj.colour], np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ObjectTruth:
    shape: str
    colour: str
    cell: str
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1), pixel bounds, end exclusive
    mask: np.ndarray  # [SIZE, SIZE] bool, pixels at least half covered


def ground_truth(scene: Scene) -> dict:
    """Per-object truth and per-pixel label maps (0 = background, else 1 + index into SHAPES / COLOURS)."""
    objects, shape_map, colour_map = [], np.zeros((SIZE, SIZE), np.int32), np.zeros((SIZE, SIZE), np.int32)
    for obj in scene.objects:
        mask = object_coverage(obj) >= 0.5
        ys, xs = np.nonzero(mask)
        box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        objects.append(ObjectTruth(obj.shape, obj.colour, obj.cell, box, mask))
        shape_map[mask] = 1 + SHAPES.index(obj.shape)
        colour_map[mask] = 1 + COLOUR_NAMES.index(obj.colour)
    return {"objects": objects, "shape_map": shape_map, "colour_map": colour_map, "background": scene.background}


JITTER = 0.0  # default sub-pixel jitter of random objects (pixels); 0 = centred in the cell


def random_object(rng: np.random.Generator, cell: str, shapes=SHAPES, colours=COLOUR_NAMES, jitter=JITTER) -> Obj:
    shape, colour, size = str(rng.choice(shapes)), str(rng.choice(colours)), str(rng.choice(list(SIZES)))
    offset = (0.0, 0.0) if not jitter else tuple(float(j) for j in np.round(rng.uniform(-jitter, jitter, 2) * 4) / 4)
    return Obj(shape=shape, colour=colour, size=size, cell=cell, jitter=offset)


OBJECT_COUNTS = (0.4, 0.35, 0.25)  # probability of 1 / 2 / 3 objects in a random scene


def random_scene(rng: np.random.Generator, n_objects: int | None = None, shapes=SHAPES, colours=COLOUR_NAMES,
                 backgrounds=BACKGROUND_NAMES, must_include: Obj | None = None, jitter=JITTER,
                 counts=OBJECT_COUNTS) -> Scene:
    """1-3 objects with distinct shapes in distinct cells. `must_include` fixes one object's shape/colour."""
    n = int(rng.choice([1, 2, 3], p=list(counts))) if n_objects is None else n_objects
    cells = [str(c) for c in rng.permutation(CELLS)[:n]]
    pool = [s for s in shapes if must_include is None or s != must_include.shape]
    chosen = [str(s) for s in rng.permutation(pool)[: n - (must_include is not None)]]
    objs = [random_object(rng, c, shapes=[s], colours=colours, jitter=jitter) for c, s in zip(cells, chosen)]
    if must_include is not None:
        objs.insert(int(rng.integers(0, n)), must_include.replace(cell=cells[-1]))
    return Scene(tuple(objs), str(rng.choice(backgrounds)))
