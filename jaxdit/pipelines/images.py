"""Decoded images out of the pipelines: PIL images (a list that answers `.images`), numpy arrays, PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxdit.io import atomic_file


class Images(list):
    """The generated PIL images: a list, which also answers diffusers' `output.images`."""

    @property
    def images(self) -> list:
        return self


def to_pil(images: np.ndarray):
    """[B, 3, H, W] float in [-1, 1] -> PIL images (diffusers' postprocess: round(x * 255))."""
    from PIL import Image

    x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in x]


def postprocess(images, output_type: str):
    if output_type == "pil":
        return Images(to_pil(images))
    if output_type == "np":  # [B, H, W, 3] in [0, 1], like diffusers' output_type="np"
        return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    raise ValueError(f"output_type={output_type!r}: expected 'pil', 'np' or 'latent'")


def save_png(image, path) -> Path:
    """Write a PIL image as PNG atomically (temporary file, then rename)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: output must be a .png file")
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path
