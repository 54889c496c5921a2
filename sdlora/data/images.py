"""Open any image people put in a dataset folder as upright RGB, then resize/crop it for training."""

from __future__ import annotations

import random
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from ..errors import UserError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # what counts as a training image
# Pillow refuses images above ~179 MP; photo sets hold panoramas and scans beyond that. We allow up to
# 250 MP and refuse larger files with a message that says what to do.
MAX_PIXELS = 250_000_000
# Big images are reduced (by an integer factor, never below this side) before any further work.
WORK_SIZE = 4096

_PILLOW_LIMIT_LOCK = threading.Lock()
_REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}
# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class ImageLoadError(UserError, ValueError):
    """A file that cannot be used as a training image. `reason` is the short why; the message names the file."""

    def __init__(self, message: str, *, path=None, reason: str | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.reason = reason or message


def _fail(path: Path, reason: str) -> ImageLoadError:
    from ..safetext import shown

    return ImageLoadError(f"Cannot use image '{shown(path)}': {reason}. Re-save it as PNG or JPEG, or remove it from the "
                          "dataset folder.", path=path, reason=reason)


def too_large_reason(width: int, height: int) -> str:
    return (f"image {width}x{height} ({width * height / 1e6:.0f} megapixels) is larger than the "
            f"{MAX_PIXELS // 1_000_000} megapixel limit; downscale it first")


@contextmanager
def _pillow_limit_raised():
    # Pillow errors above 2x its limit and warns above 1x. Image.open reads headers only, and open_image checks
    # MAX_PIXELS itself right after, so Pillow's error only catches the absurd. The limit is a global, hence the
    # lock (other threads meanwhile still get a bomb check, at this higher limit).
    with _PILLOW_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def open_image(path) -> Image.Image:
    """Image.open (headers only) with every failure turned into an ImageLoadError, and the MAX_PIXELS limit."""
    path = Path(path)
    try:
        with _pillow_limit_raised():
            img = Image.open(path)
    except Image.DecompressionBombError:
        raise _fail(path, f"image is far larger than the {MAX_PIXELS // 1_000_000} megapixel limit; downscale it first") from None
    except UnidentifiedImageError:
        raise _fail(path, "not an image (cannot identify image file)") from None
    except PermissionError:
        raise _fail(path, "unreadable (permission denied)") from None
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _fail(path, f"truncated or corrupt image: {exc}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise _fail(path, too_large_reason(w, h))
    if w < 1 or h < 1:
        img.close()
        raise _fail(path, f"image has no pixels ({w}x{h})")
    return img


def exif_orientation(img: Image.Image, *, headers_only: bool = False) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable). headers_only never decodes pixels: Pillow decodes a
    whole PNG to look for an eXIf chunk stored after the image data, so such late chunks are then not seen."""
    if headers_only and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF must not make an otherwise good picture unusable
        return 1
    return value if value in _UPRIGHT else 1


def _to_rgb(img: Image.Image, background) -> Image.Image:
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        # 16-bit: scale 0..65535 to 0..255 (a plain convert("L") clips everything above 255 to white).
        return img.point(lambda v: v / 257 + 0.5, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, tuple(background))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")  # CMYK, L, 1, I, YCbCr ...


def open_image_rgb(path, *, background=(255, 255, 255), max_side: int | None = WORK_SIZE) -> Image.Image:
    """Upright RGB: EXIF orientation applied, first frame of animations, transparency composited on `background`,
    16-bit scaled to 8-bit. Images with a side above 2*max_side are reduced to between max_side and 2*max_side
    (JPEGs are decoded at reduced scale, so a 12000x12000 photo never needs a full-size buffer)."""
    path = Path(path)
    img = open_image(path)
    try:
        w, h = img.size
        if max_side and max(w, h) > 2 * max_side:
            # JPEG only: decode at 1/2..1/8 scale. draft() scales by the smaller ratio of the two sides, so ask for
            # the image's own aspect ratio or a panorama would not be reduced at all.
            f = max(w, h) / max_side
            img.draft(img.mode, (max(1, int(w / f)), max(1, int(h / f))))
        img.load()  # first frame of an animation
        orientation = exif_orientation(img)  # read before reducing: reduced copies carry no EXIF
        out = img
        if max_side and max(out.size) > 2 * max_side:
            if out.mode not in _REDUCIBLE_MODES:
                out = _to_rgb(out, background)
            out = out.reduce(max(out.size) // max_side)
        if orientation in _UPRIGHT:
            out = out.transpose(_UPRIGHT[orientation])
        out = _to_rgb(out, background)
    except MemoryError:
        img.close()
        raise _fail(path, "not enough memory to decode it; downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        img.close()
        raise _fail(path, f"truncated or corrupt image: {exc}") from None
    if out is img:  # still tied to the open file (animations keep it open): detach before closing
        if getattr(img, "is_animated", False):
            out = img.copy()
            img.close()
    else:
        img.close()
    return out


_CROP_FIRST_FACTOR = 16  # scaled image this many times the crop: crop in source coordinates instead


def resize_and_crop(img: Image.Image, size: tuple[int, int], *, crop: str = "center", rng: random.Random | None = None):
    """Scale so the image covers `size` (w, h) - small images are upscaled - then crop "center" or "random".

    Returns (image, (left, top)) where (left, top) is the crop offset in the scaled image (SDXL-style crop
    conditioning needs it)."""
    tw, th = int(size[0]), int(size[1])
    (nw, nh), (left, top) = crop_box(img.size, (tw, th), crop=crop, rng=rng)
    if nw * nh > _CROP_FIRST_FACTOR * tw * th:
        # An extreme aspect ratio (a 1x100000 strip) would scale to gigapixels only to keep a sliver: resample just the
        # part that is kept, straight from the source.
        sx, sy = img.width / nw, img.height / nh
        box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
        return img.resize((tw, th), Image.Resampling.LANCZOS, box=box), (left, top)
    if (nw, nh) != img.size:
        # reducing_gap: Pillow first shrinks by an integer factor, then LANCZOS - same look, much faster for big inputs
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.crop((left, top, left + tw, top + th)), (left, top)


def crop_box(image_size: tuple[int, int], size: tuple[int, int], *, crop: str = "center",
             rng: random.Random | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((scaled w, scaled h), (left, top)) of resize_and_crop, from sizes alone: the same numbers without decoding
    the image (SDXL's crop conditioning is computed from them)."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}.")
    tw, th = int(size[0]), int(size[1])
    w, h = image_size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    return (nw, nh), (left, top)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """float32 3xHxW in [-1, 1], the range the VAE expects."""
    import torch  # here, not at import time: `sdlora scan` never needs torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_training_image(path, size, *, crop: str = "center", flip: bool = False, rng: random.Random | None = None) -> torch.Tensor:
    img, _ = resize_and_crop(open_image_rgb(path), tuple(size), crop=crop, rng=rng)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image_to_tensor(img)


MASK_EXTENSIONS = (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def find_mask_file(image_path, mask_dir) -> Path | None:
    """The mask of `image_path` in `mask_dir`: the file with the same name (any image extension), or None."""
    if not mask_dir:
        return None
    image_path, mask_dir = Path(image_path), Path(mask_dir)
    for ext in (image_path.suffix,) + MASK_EXTENSIONS:
        cand = mask_dir / (image_path.stem + ext)
        if cand.is_file():
            return cand
    return None


def mask_size_error(mask_path, mask_size, image_path, image_size) -> ImageLoadError:
    from ..safetext import shown

    reason = (f"mask is {mask_size[0]}x{mask_size[1]} but its image '{shown(Path(image_path).name)}' is "
              f"{image_size[0]}x{image_size[1]}")
    return ImageLoadError(f"Mask file '{shown(mask_path)}' does not fit its image: {reason}. Save the mask at the size of "
                          "its image, or remove it from mask_dir.", path=mask_path, reason=reason)


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info)


def open_mask(path, mask_path=None, *, max_side: int | None = WORK_SIZE) -> Image.Image | None:
    """The loss mask of an image as an upright "L" image (255 = learn, 0 = ignore) at the size open_image_rgb gives the
    pixels: the image's alpha channel if it has one, else `mask_path` (a grayscale image of the same size), else None.
    A mask file whose size differs from its image is refused (ImageLoadError naming both files)."""
    path = Path(path)
    img = open_image(path)
    try:
        size = img.size
        orientation = exif_orientation(img)
        if has_alpha(img):
            img.load()
            mask = img.convert("RGBA").getchannel("A")
        elif mask_path is not None:
            m = open_image(mask_path)
            try:
                if m.size != size:
                    raise mask_size_error(mask_path, m.size, path, size)
                m.load()
                mask = m.convert("L") if not m.mode.startswith("I;16") else m.point(lambda v: v / 257 + 0.5, "L")
            finally:
                m.close()
        else:
            return None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageLoadError):
            raise
        raise _fail(path, f"truncated or corrupt image: {exc}") from None
    finally:
        img.close()
    if max_side and max(mask.size) > 2 * max_side:  # as open_image_rgb reduces the pixels
        mask = mask.reduce(max(mask.size) // max_side)
    if orientation in _UPRIGHT:
        mask = mask.transpose(_UPRIGHT[orientation])
    return mask


def load_training_mask(path, size, *, mask_path=None, crop: str = "center", flip: bool = False,
                       rng: random.Random | None = None) -> torch.Tensor | None:
    """float32 1xHxW in [0, 1]: the mask of `path` resized, cropped and flipped exactly as load_training_image does
    the pixels (same crop_box, same rng draws), or None when the image has neither alpha nor a mask file."""
    mask = open_mask(path, mask_path)
    if mask is None:
        return None
    mask, _ = resize_and_crop(mask, tuple(size), crop=crop, rng=rng)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    import torch  # here, not at import time: `sdlora scan` never needs torch

    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0).contiguous()
