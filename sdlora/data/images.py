"""Open any image people put in a dataset folder as upright RGB, then resize/crop it for training."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Pillow's guard stops at ~89 MP; real photo sets contain panoramas and scans above that. Allow up to
# 250 MP (decoded with draft()/reduce where possible), refuse beyond with a clear message.
MAX_PIXELS = 250_000_000
_WORK_SIZE = 4096  # big images are reduced to about this before any further work


class ImageLoadError(ValueError):
    pass


def _open(path: Path) -> Image.Image:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError:
        raise ImageLoadError(f"{Path(path).name}: image is larger than {MAX_PIXELS // 1_000_000} megapixels; downscale it first.") from None
    except OSError as exc:
        raise ImageLoadError(f"{Path(path).name}: not a readable image ({exc}).") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _to_rgb(img: Image.Image, background) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1 else 1.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        canvas = Image.new("RGB", img.size, tuple(background))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    if img.mode != "RGB":
        return img.convert("RGB")  # CMYK, L, YCbCr, 1 ...
    return img


def open_image_rgb(path, *, background=(255, 255, 255), max_side: int | None = _WORK_SIZE) -> Image.Image:
    """Upright RGB: EXIF orientation applied, first frame of animations, transparency on `background`."""
    path = Path(path)
    img = _open(path)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if max_side and img.format == "JPEG" and max(img.size) > 2 * max_side:
            img.draft("RGB", (max_side, max_side))  # decode at 1/2..1/8 scale: no 12000x12000 buffer
        img.load()
        if max_side and max(img.size) > 2 * max_side:
            factor = max(img.size) // max_side
            img = img.reduce(max(1, factor))
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, background)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{path.name}: truncated or corrupt image ({exc}).") from None


def resize_and_crop(img: Image.Image, size: tuple[int, int], *, crop: str = "center", rng: random.Random | None = None):
    """Scale so the image covers `size` (w, h), then crop. Returns (image, (left, top))."""
    tw, th = size
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.LANCZOS)
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th)), (left, top)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_training_image(path, size, *, crop: str = "center", flip: bool = False, rng: random.Random | None = None) -> torch.Tensor:
    img, _ = resize_and_crop(open_image_rgb(path), tuple(size), crop=crop, rng=rng)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return image_to_tensor(img)
