"""Image loading: every mode and quirk comes out as upright 8-bit RGB; huge files stay cheap; resize/crop/tensor."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sdlora.data import (
    MAX_PIXELS,
    ImageLoadError,
    image_to_tensor,
    load_training_image,
    open_image_rgb,
    resize_and_crop,
)

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def write_solid_png(path: Path, width: int, height: int, value: int = 0) -> Path:
    """A grey PNG of any size in well under a second: one compressed block of rows, repeated.

    After a full flush deflate keeps no history, so compressing the same rows again would give the same bytes.
    """
    row = b"\x00" + bytes([value]) * width  # filter byte "none" + pixels
    per_block = max(1, min(height, (8 << 20) // len(row)))
    blocks, rest = divmod(height, per_block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = row * per_block
    body = (deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)) * blocks
    body += deflate.compress(row * rest) + deflate.flush()
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\xda" + body + struct.pack(">I", adler))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def load_sizes(monkeypatch):
    """Sizes at which Pillow decoded pixels (after any draft()), to prove big images are never decoded in full."""
    sizes = []
    original = ImageFile.ImageFile.load

    def spy(self):
        if self.tile:
            sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


def _rgb(img, xy):
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


def _marked(size=(80, 40)) -> Image.Image:
    """Black image with a white 10x10 marker in the stored top-left corner."""
    img = Image.new("RGB", size, BLACK)
    img.paste(WHITE, (0, 0, 10, 10))
    return img


@pytest.mark.parametrize("orientation, corner", [(1, "top-left"), (3, "bottom-right"), (6, "top-right"), (8, "bottom-left")])
def test_exif_orientation_comes_out_upright(tmp_path, orientation, corner):
    exif = Image.Exif()
    exif[0x0112] = orientation
    _marked().save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    img = open_image_rgb(tmp_path / "photo.jpg")
    w, h = img.size
    assert (w, h) == ((40, 80) if orientation in (6, 8) else (80, 40))
    corners = {"top-left": (3, 3), "top-right": (w - 4, 3), "bottom-left": (3, h - 4), "bottom-right": (w - 4, h - 4)}
    for name, xy in corners.items():
        bright = np.mean(_rgb(img, xy)) > 200
        assert bright == (name == corner), (name, _rgb(img, xy))


def test_exif_orientation_survives_the_reduction_of_a_big_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.new("L", (9000, 90), 0)
    img.paste(255, (0, 0, 90, 90))  # marker at the stored left end
    img.save(tmp_path / "long.png", exif=exif.tobytes())
    out = open_image_rgb(tmp_path / "long.png")
    assert out.size[1] > out.size[0] and max(out.size) <= 8192  # tall: rotated; reduced from 9000
    assert np.mean(_rgb(out, (out.size[0] // 2, 5))) > 200  # marker now at the top


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    px = np.asarray(open_image_rgb(tmp_path / "g16.png"))[0, :, 0]
    assert list(px) == [0, 128, 255, 4]


def test_transparency_becomes_the_background(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "clear.png")
    img = open_image_rgb(tmp_path / "clear.png")
    assert _rgb(img, (0, 0)) == WHITE and _rgb(img, (1, 1)) == (255, 0, 0)
    assert all(120 <= v <= 135 for v in _rgb(img, (2, 2)))  # half-transparent black over white: mid grey
    assert _rgb(open_image_rgb(tmp_path / "clear.png", background=(0, 0, 255)), (0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("name, make, expected", [
    ("gray.png", lambda: Image.new("L", (8, 8), 90), (90, 90, 90)),
    ("gray_alpha.png", lambda: Image.new("LA", (8, 8), (0, 0)), WHITE),
    ("bilevel.png", lambda: Image.new("1", (8, 8), 1), WHITE),
    ("palette.png", lambda: Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 200, 30)),
    ("cmyk.jpg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    ("bitmap.bmp", lambda: Image.new("RGB", (8, 8), (1, 2, 250)), (1, 2, 250)),
    ("lossless.webp", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), WHITE),
])
def test_every_mode_becomes_rgb(tmp_path, name, make, expected):
    make().save(tmp_path / name, **({"lossless": True} if name.endswith(".webp") else {}))
    img = open_image_rgb(tmp_path / name)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert all(abs(a - b) <= 6 for a, b in zip(_rgb(img, (4, 4)), expected)), _rgb(img, (4, 4))


def test_palette_transparency_and_animation_first_frame(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9)
    for f in frames:
        f.putpalette(palette)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], transparency=0)
    assert _rgb(open_image_rgb(tmp_path / "anim.gif"), (0, 0)) == (255, 0, 0)
    Image.new("P", (8, 8), 0).save(tmp_path / "clear.gif", transparency=0)
    assert _rgb(open_image_rgb(tmp_path / "clear.gif"), (0, 0)) == WHITE
    rgb = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 250), (250, 0, 0))]
    rgb[0].save(tmp_path / "anim.webp", save_all=True, append_images=rgb[1:], lossless=True)
    assert _rgb(open_image_rgb(tmp_path / "anim.webp"), (0, 0)) == (0, 0, 250)


def test_huge_png_is_reduced(tmp_path, recwarn):
    path = write_solid_png(tmp_path / "huge.png", 12000, 12000, value=77)
    assert path.stat().st_size < 1_000_000
    limit = Image.MAX_IMAGE_PIXELS
    img = open_image_rgb(path)
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global guard is put back
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert img.mode == "RGB" and 4096 <= max(img.size) <= 8192 and img.size[0] == img.size[1]
    assert _rgb(img, (10, 10)) == (77, 77, 77)
    t = image_to_tensor(resize_and_crop(img, (64, 48))[0])
    assert t.shape == (3, 48, 64) and abs(float(t.mean()) - (77 / 127.5 - 1)) < 0.01


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path, load_sizes):
    Image.new("L", (12000, 2000), 200).save(tmp_path / "panorama.jpg", quality=50)
    img = open_image_rgb(tmp_path / "panorama.jpg")
    assert load_sizes and all(w * h < 12000 * 2000 / 3 for w, h in load_sizes), load_sizes
    assert 4096 <= max(img.size) <= 8192 and abs(img.size[0] / img.size[1] - 6) < 0.01


@pytest.mark.parametrize("side", [int(MAX_PIXELS ** 0.5) + 100, 24000])  # just above the limit; above Pillow's own
def test_images_above_the_pixel_limit_are_refused_from_the_header(tmp_path, load_sizes, side):
    path = write_solid_png(tmp_path / "enormous.png", side, side)
    with pytest.raises(ImageLoadError, match="larger than the 250 megapixel limit; downscale it first") as err:
        open_image_rgb(path)
    assert "enormous.png" in str(err.value) and not load_sizes


@pytest.mark.parametrize("name, data, needle", [
    ("text.jpg", b"hello, not an image", "not an image"),
    ("empty.png", b"", "not an image"),
    ("half.jpg", None, "truncated"),
])
def test_bad_files_raise_a_clear_image_load_error(tmp_path, name, data, needle):
    if data is None:
        buf = io.BytesIO()
        Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageLoadError) as err:
        open_image_rgb(tmp_path / name)
    assert needle in err.value.reason and name in str(err.value) and isinstance(err.value, ValueError)


def test_resize_and_crop_covers_the_target():
    img = Image.new("RGB", (300, 100), BLACK)
    out, (left, top) = resize_and_crop(img, (128, 128))
    assert out.size == (128, 128) and top == 0 and left == (384 - 128) // 2
    small, offset = resize_and_crop(Image.new("RGB", (10, 20), WHITE), (64, 32))  # upscaled to cover
    assert small.size == (64, 32) and offset == (0, (128 - 32) // 2)
    same, offset = resize_and_crop(Image.new("RGB", (64, 32)), (64, 32))
    assert same.size == (64, 32) and offset == (0, 0)
    with pytest.raises(ValueError, match="crop"):
        resize_and_crop(img, (8, 8), crop="middle")


def test_random_crop_is_deterministic_and_in_bounds():
    img = Image.effect_noise((200, 100), 40).convert("RGB")
    offsets = set()
    for seed in range(20):
        a, oa = resize_and_crop(img, (64, 64), crop="random", rng=random.Random(seed))
        b, ob = resize_and_crop(img, (64, 64), crop="random", rng=random.Random(seed))
        assert oa == ob and a.tobytes() == b.tobytes()
        assert 0 <= oa[0] <= 128 - 64 and oa[1] == 0
        offsets.add(oa)
    assert len(offsets) > 3


def test_tensor_range_and_flip(tmp_path):
    t = image_to_tensor(Image.new("RGB", (4, 2), WHITE))
    assert t.shape == (3, 2, 4) and t.dtype == torch.float32 and torch.all(t == 1)
    assert torch.all(image_to_tensor(Image.new("L", (2, 2), 0)) == -1)
    _marked((64, 64)).save(tmp_path / "m.png")
    plain = load_training_image(tmp_path / "m.png", (64, 64))
    flipped = load_training_image(tmp_path / "m.png", (64, 64), flip=True)
    assert plain[:, 2, 2].mean() > 0.9 and flipped[:, 2, 61].mean() > 0.9 and flipped[:, 2, 2].mean() < -0.9
