"""The toy-world detector: a small fully convolutional net trained on rendered ground truth.

For a 32x32 image it predicts, per 2x2-pixel patch (a 16x16 map), the shape class (background or one of
SHAPES) and the colour class (background or one of COLOURS). `read` turns the maps into objects:
connected foreground patches form one object whose shape and colour are the majority votes of its
patches and whose cell comes from its centroid.

    det = Detector.load(weights_dir)           # or Detector.train(...)
    readings = det.read(images)                # per image: [{"shape", "colour", "cell", "patches", ...}]
    det.present(images, shape="star")          # [B] bool
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage
from tqdm import tqdm

from jaxdit.toyworld.scenes import CELLS, COLOUR_NAMES, GRID, SHAPES, SIZE, ground_truth, random_scene, render

PATCH = 2
MAP = SIZE // PATCH
MIN_PATCHES = 3  # smaller foreground blobs are noise, not objects
SPLIT_FRACTION = 0.25


class DetectorNet(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, images):  # [B, 32, 32, 3] float in [-1, 1]
        w = self.width
        x = nn.gelu(nn.Conv(w // 2, (3, 3), name="conv0")(images))
        x = nn.gelu(nn.Conv(w // 2, (3, 3), name="conv1")(x))
        x = nn.gelu(nn.Conv(w // 2, (3, 3), name="conv1b")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))  # 16x16
        x = nn.gelu(nn.Conv(w, (3, 3), name="conv2")(x))
        x = nn.gelu(nn.Conv(w, (3, 3), kernel_dilation=(2, 2), name="conv3")(x))
        x = nn.gelu(nn.Conv(w, (3, 3), kernel_dilation=(2, 2), name="conv4")(x))
        x = nn.gelu(nn.Conv(w, (3, 3), name="conv5")(x))
        return nn.Conv(1 + len(SHAPES), (1, 1), name="shape")(x), nn.Conv(1 + len(COLOUR_NAMES), (1, 1), name="colour")(x)


def _patch_labels(label_map: np.ndarray) -> np.ndarray:
    """[32, 32] pixel labels -> [16, 16] patch labels: the object covering >= 2 of the 4 pixels, else 0."""
    p = label_map.reshape(MAP, PATCH, MAP, PATCH).transpose(0, 2, 1, 3).reshape(MAP, MAP, PATCH * PATCH)
    fg = (p > 0).sum(-1) >= 2
    return np.where(fg, p.max(-1), 0).astype(np.int32)


def labelled_batch(rng: np.random.Generator, n: int, augment: bool = True):
    images, shapes, colours = [], [], []
    for _ in range(n):
        scene = random_scene(rng)
        img = render(scene).astype(np.float32)
        if augment:  # generated images are noisy and a little blurred: train on such images too
            if rng.random() < 0.5:
                img = ndimage.gaussian_filter(img, (rng.uniform(0, 0.8),) * 2 + (0,))
            img = img + rng.normal(0, rng.uniform(0, 12), img.shape) + rng.normal(0, 8, (1, 1, 3))
        gt = ground_truth(scene)
        images.append(np.clip(img, 0, 255) / 127.5 - 1)
        shapes.append(_patch_labels(gt["shape_map"]))
        colours.append(_patch_labels(gt["colour_map"]))
    return np.stack(images).astype(np.float32), np.stack(shapes), np.stack(colours)


@dataclasses.dataclass
class Detector:
    params: dict
    net: DetectorNet = dataclasses.field(default_factory=DetectorNet)

    def __post_init__(self):
        self._apply = jax.jit(lambda p, x: self.net.apply({"params": p}, x))

    @classmethod
    def load(cls, weights_dir=None) -> "Detector":
        from jaxdit.toyworld.weights import DEFAULT_DIR, load_tree

        folder = Path(weights_dir or DEFAULT_DIR) / "detector"
        cfg = json.loads((folder / "detector.json").read_text())
        net = DetectorNet(cfg["width"])
        abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"])
        return cls(load_tree(folder, abstract), net)

    @staticmethod
    def _prepare(images) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        return x.astype(np.float32) / 127.5 - 1 if x.dtype == np.uint8 else x.astype(np.float32)

    def maps(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Per-patch (shape, colour) class maps [B, 16, 16] int (0 = background, else 1 + index)."""
        s, c = self._apply(self.params, self._prepare(images))
        return np.asarray(s.argmax(-1)), np.asarray(c.argmax(-1))

    def features(self, images) -> np.ndarray:
        """Per-patch class probabilities [B, 16, 16, 9 + 7], for feature distances between images."""
        s, c = self._apply(self.params, self._prepare(images))
        return np.concatenate([np.asarray(jax.nn.softmax(s)), np.asarray(jax.nn.softmax(c))], -1)

    def read(self, images) -> list[list[dict]]:
        """Per image, the objects found: shape, colour, cell, patch count, and the per-patch shape map."""
        shape_maps, colour_maps = self.maps(images)
        out = []
        for sm, cm in zip(shape_maps, colour_maps):
            comps, n = ndimage.label(sm > 0, structure=np.ones((3, 3)))
            objs = []
            for k in range(1, n + 1):
                blob = comps == k
                if blob.sum() < MIN_PATCHES:
                    continue
                # Touching objects form one blob: split it by predicted shape, keeping the shapes that hold
                # enough of the blob (a few stray patches of another shape are not an object).
                for cls in np.unique(sm[blob]):
                    where = blob & (sm == cls)
                    size = int(where.sum())
                    if size < MIN_PATCHES or size < SPLIT_FRACTION * blob.sum():
                        continue
                    colour = np.bincount(cm[where], minlength=1 + len(COLOUR_NAMES))[1:]
                    ys, xs = np.nonzero(where)
                    row = min(int((ys.mean() + 0.5) * PATCH / (SIZE / GRID)), GRID - 1)
                    col = min(int((xs.mean() + 0.5) * PATCH / (SIZE / GRID)), GRID - 1)
                    objs.append({"shape": SHAPES[int(cls) - 1], "colour": COLOUR_NAMES[int(colour.argmax())],
                                 "cell": CELLS[row * GRID + col], "patches": size,
                                 "shape_confidence": round(size / float(blob.sum()), 3)})
            out.append(objs)
        return out

    def present(self, images, shape: str | None = None, colour: str | None = None) -> np.ndarray:
        """[B] bool: an object with this shape (and/or colour) is in the image."""
        return np.array([any((shape is None or o["shape"] == shape) and (colour is None or o["colour"] == colour)
                             for o in objs) for objs in self.read(images)])


def object_set(objs) -> list[tuple[str, str]]:
    return sorted((o["shape"], o["colour"]) for o in objs)


def accuracy(detector: Detector, n: int = 500, seed: int = 12345) -> dict:
    """On freshly rendered scenes (no augmentation): exact set match, per-object and per-patch accuracy."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    readings = detector.read(images)
    exact = np.mean([object_set(r) == sorted((o.shape, o.colour) for o in s.objects)
                     for r, s in zip(readings, scenes)])
    hits = total = 0
    for r, s in zip(readings, scenes):
        for o in s.objects:
            total += 1
            hits += any(x["shape"] == o.shape and x["colour"] == o.colour and x["cell"] == o.cell for x in r)
    sm, _ = detector.maps(images)
    truth = np.stack([_patch_labels(ground_truth(s)["shape_map"]) for s in scenes])
    return {"n_images": n, "exact_set_accuracy": float(exact), "object_accuracy": hits / total,
            "patch_shape_accuracy": float((sm == truth).mean())}


def train_detector(out, *, seed: int = 0, steps: int = 3000, batch: int = 64, lr: float = 2e-3, width: int = 64,
                   progress: bool = True, command: str = "") -> dict:
    """Train on rendered ground truth and write `out`/detector (orbax tree + detector.json)."""
    from jaxdit.toyworld.weights import save_tree

    net = DetectorNet(width)
    params = net.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.02))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, ys, yc):
        def loss_fn(p):
            s, c = net.apply({"params": p}, x)
            return (optax.softmax_cross_entropy_with_integer_labels(s, ys).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(c, yc).mean())

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state, loss

    t0 = time.time()
    bar = tqdm(range(steps), disable=not progress, desc="toyworld detector")
    for i in bar:
        x, ys, yc = labelled_batch(np.random.default_rng([seed, i]), batch)
        params, opt_state, loss = step(params, opt_state, x, ys, yc)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    seconds = time.time() - t0
    det = Detector(params, net)
    acc = accuracy(det)
    folder = Path(out) / "detector"
    save_tree(folder, params)
    info = {"width": width, "seed": seed, "steps": steps, "batch": batch, "lr": lr, "train_seconds": round(seconds, 1),
            "accuracy": acc, "command": command}
    (folder / "detector.json").write_text(json.dumps(info, indent=2))
    return info
