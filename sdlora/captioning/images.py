"""Opening dataset images for captioning, and the preprocessing WD14 taggers were trained with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

OPEN_SIDE = 1024  # taggers look at 448 px, caption models at 384: bigger images are reduced while they are opened


def open_for_captioning(path: Path) -> Image.Image:
    """Upright RGB with transparency on white (the taggers' training images are on white); raises ImageLoadError."""
    from ..data.images import open_image_rgb

    return open_image_rgb(path, max_side=OPEN_SIDE)


def wd14_array(img: Image.Image, size: int) -> np.ndarray:
    """size x size x 3 float32 in 0..255, BGR: the image padded to a square with white (centred), then resized."""
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img.convert("RGB"), ((side - w) // 2, (side - h) // 2))
    if side != size:
        # Area-like downscaling keeps small details readable; upscaling is smooth.
        square = square.resize((size, size), Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])  # the taggers were converted from Keras models fed OpenCV's BGR


def wd14_batch(images: list[Image.Image], size: int) -> np.ndarray:
    """N x size x size x 3 (NHWC) float32."""
    return np.stack([wd14_array(img, size) for img in images])
