"""Dataset folders for the web UI: which folder a client means (checked against the access policy), its scan, and
the gallery's thumbnails (made under OUTPUT/.thumbs: the web server never serves a dataset folder)."""

from __future__ import annotations

from pathlib import Path

from ...config.train_config import ConfigError
from ...paths import BUILTIN_DATA, DEMO_DATA, resolve_data_dir
from ..access import THUMBS_DIR, AccessPolicy, is_inside

GALLERY_LIMIT = 500  # images shown in the dataset gallery; the scan report still counts all of them
THUMB_SIZE = 192  # gallery thumbnails, pixels on the long side
PREVIEW_SIZE = 512  # the selected image next to the caption editor


class DatasetService:
    def __init__(self, access: AccessPolicy):
        self.access = access

    def root(self, folder: str, *, what: str = "data_dir") -> Path:
        """The dataset folder, resolved, if it lies under a dataset root (--data-root, uploads, builtin:demo)."""
        folder = (folder or "").strip()
        if not folder:
            raise ConfigError(f"Dataset folder: enter the path of a folder of images, or {DEMO_DATA}.")
        if folder in BUILTIN_DATA:
            return resolve_data_dir(folder).expanduser().resolve()
        return self.access.dataset_folder(resolve_data_dir(folder), folder, what=what)

    def scan(self, folder: str, *, check_images: bool = False):
        from ...data.scan import scan_dataset

        return scan_dataset(self.root(folder), check_images=check_images)

    def thumbnail(self, image: Path, size: int = THUMB_SIZE) -> Path:
        """A small upright copy for the gallery, cached under OUTPUT/.thumbs: the web server serves these, never the
        dataset folder. A grey placeholder if the image cannot be read or lies outside the dataset roots."""
        import hashlib

        from ...data.images import open_image_rgb
        from ...inference.sampling import save_png_atomic

        try:
            image = Path(image).resolve()
            if not any(is_inside(image, root) for root in self.access.dataset_roots()):
                return self._placeholder()
            st = image.stat()
            key = hashlib.sha1(f"{image}|{st.st_size}|{st.st_mtime_ns}|{size}".encode()).hexdigest()
            thumb = self.access.output_root / THUMBS_DIR / f"{key}.png"
            if not thumb.is_file():
                img = open_image_rgb(image, max_side=size)
                img.thumbnail((size, size))
                save_png_atomic(img, thumb)
            return thumb
        except Exception:  # noqa: BLE001 - a thumbnail is a nicety; the scan report already names broken images
            return self._placeholder()

    def preview(self, image: Path) -> Path:
        """The selected image, larger, made the same way as the gallery's thumbnails."""
        return self.thumbnail(image, size=PREVIEW_SIZE)

    def _placeholder(self) -> Path:
        from PIL import Image

        from ...inference.sampling import save_png_atomic

        path = self.access.output_root / THUMBS_DIR / "unreadable.png"
        if not path.is_file():
            save_png_atomic(Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (128, 128, 128)), path)
        return path
