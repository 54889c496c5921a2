"""The web server's trust boundary: which folders a client may read, write, load models from and be served.

Every event of a Gradio app is API surface (hiding it from the API page does not stop a client posting to
`/gradio_api/queue/join`), so the server decides, not the page. Its user decides on the command line:

- dataset folders (read images and captions, write captions, read a sample-prompt file) must lie under a
  `--data-root DIR`, the upload folder OUTPUT/uploads, or a built-in demo dataset (builtin:demo, builtin:demo-navy);
- base models, LoRAs to try and export sources given as paths must lie under a `--model-root DIR` (LoRAs and
  export sources may also come from the output root); the built-in models (builtin:toy, builtin:tiny, ...) and hub
  ids (owner/name) need no root; so must tagger and caption model folders for automatic captions (a hub id is only
  looked up under the model roots and in the local hub cache);
- writes go to the output root (runs, exports, thumbnails), dataset roots (captions only) and the presets folder;
- `allow_pickle` is refused from clients unless the server was started with `--allow-pickle-from-clients`;
- the web server serves only files sdlora writes under the output root (images and LoRA files), never a dataset
  folder: galleries show thumbnails made under OUTPUT/.thumbs.

Paths are resolved (symlinks followed) before they are compared, so a link cannot lead out of a root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config.train_config import ConfigError
from ..models.common import hub_id_shaped
from ..paths import DEMO_DATA, builtin_data_dirs

# What the web server may send from under the output root: previews, grids, thumbnails, uploads' images, LoRAs.
SERVED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".safetensors")
THUMBS_DIR = ".thumbs"


def resolved(path: str | Path) -> Path:
    """Absolute, with `~` expanded and every symlink followed (also for paths that do not exist yet)."""
    if "\x00" in str(path):
        raise ConfigError(f"{_quote(str(path).replace(chr(0), '?'))} is not a valid path (it contains a NUL character).")
    return Path(os.path.abspath(Path(str(path)).expanduser())).resolve()


def is_inside(path: str | Path, root: str | Path) -> bool:
    try:
        resolved(path).relative_to(resolved(root))
        return True
    except ValueError:
        return False


def too_broad(folder: str | Path) -> bool:
    """The filesystem root, the home folder and the folders above it: never a root the server hands to clients."""
    folder = resolved(folder)
    return folder == Path(folder.anchor) or is_inside(Path.home(), folder)


def looks_like_hub_id(spec: str) -> bool:
    """owner/name with no path markers, and not an existing relative path (which the loader would take first)."""
    return hub_id_shaped(spec) and not Path(spec.strip()).exists()


def _quote(value: str, limit: int = 120) -> str:
    value = str(value)
    return f"'{value if len(value) <= limit else value[:limit] + '…'}'"


@dataclass
class AccessPolicy:
    """The folders this server lets its clients use. One per server (Services); checks raise ConfigError naming the field."""

    output_root: Path
    presets_dir: Path
    data_roots: list[Path] = field(default_factory=list)
    model_roots: list[Path] = field(default_factory=list)
    pickle_from_clients: bool = False

    def __post_init__(self):
        self.output_root = resolved(self.output_root)
        self.presets_dir = resolved(self.presets_dir)
        self.data_roots = list(dict.fromkeys(resolved(p) for p in self.data_roots))
        self.model_roots = list(dict.fromkeys(resolved(p) for p in self.model_roots))

    # the roots ---------------------------------------------------------------------------------------------
    @property
    def uploads_dir(self) -> Path:
        return self.output_root / "uploads"

    @staticmethod
    def demo_dirs() -> list[Path]:
        """Where the built-in datasets are generated (the cache may be moved with $SDLORA_CACHE, so looked up each time)."""
        return [resolved(p) for p in builtin_data_dirs()]

    def dataset_roots(self) -> list[Path]:
        return [*self.data_roots, self.uploads_dir, *self.demo_dirs()]

    def _inside_any(self, path: Path, roots) -> bool:
        return any(is_inside(path, root) for root in roots)

    # datasets --------------------------------------------------------------------------------------------
    def dataset_folder(self, folder: Path, spec: str, *, what: str = "data_dir") -> Path:
        """The resolved dataset folder, if it lies under a dataset root."""
        path = resolved(folder)
        if not self._inside_any(path, self.dataset_roots()):
            raise ConfigError(f"{what}: {_quote(spec)} is outside the folders this server may open; start the server with "
                              f"--data-root DIR (that folder or one above it), upload the images, or use {DEMO_DATA}.")
        return path

    def caption_image(self, root: Path, image_path: str) -> Path:
        """The image a caption is saved for: an existing image file inside the (already checked) dataset root."""
        from ..data.scan import IMAGE_EXTENSIONS

        image = resolved(image_path)
        if not image_path or not is_inside(image, root):
            raise ConfigError(f"Refusing to save a caption for {_quote(image_path)}: it is outside the dataset folder '{root}'.")
        if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
            raise ConfigError(f"Refusing to save a caption for {_quote(image_path)}: it is not an image in the dataset "
                              "folder. Scan the folder and select an image in the gallery.")
        return image

    def prompt_file(self, value: str, *, what: str = "sample_prompts_file") -> Path:
        """A file a run reads (sample prompts, a dataset TOML): inside a dataset root, the output root or the presets
        folder."""
        path = resolved(value)
        if not self._inside_any(path, [*self.dataset_roots(), self.output_root, self.presets_dir]):
            instead = "give the prompts as sample_prompts" if what == "sample_prompts_file" else "upload the images"
            raise ConfigError(f"{what}: {_quote(value)} is outside the folders this server may read; put the file in a "
                              f"dataset folder (start the server with --data-root DIR) or {instead}.")
        return path

    # models ----------------------------------------------------------------------------------------------
    def check_pickle(self, allow_pickle: bool) -> None:
        if allow_pickle and not self.pickle_from_clients:
            raise ConfigError("allow_pickle: this server does not let its clients turn on pickle loading; start it with "
                              "--allow-pickle-from-clients (only if you trust every client and every model file under "
                              "--model-root).")

    def base_model(self, spec: str, allow_pickle: bool = False) -> None:
        """builtin:* and hub ids pass; a path must lie under a --model-root. Checked before the path is touched."""
        self.check_pickle(allow_pickle)
        spec = (spec or "").strip()
        if not spec or spec.startswith("builtin:") or looks_like_hub_id(spec):
            return
        if not self._inside_any(resolved(spec), self.model_roots):
            raise ConfigError(f"base_model: {_quote(spec)} is outside the folders this server may load models from; "
                              "start the server with --model-root DIR (that folder or one above it), or use a built-in model "
                              "(builtin:toy, builtin:tiny) or a hub id (owner/name).")

    def caption_model(self, spec: str, *, what: str = "caption model") -> None:
        """A tagger or caption model for auto-captioning: a hub id passes (it is only looked for in the model roots'
        OWNER_NAME folders and the local hub cache, never downloaded); a path must lie under a --model-root."""
        spec = (spec or "").strip()
        if not spec or looks_like_hub_id(spec):
            return
        if not self._inside_any(resolved(spec), self.model_roots):
            raise ConfigError(f"{what}: {_quote(spec)} is outside the folders this server may load models from; put the "
                              "model folder under a --model-root DIR (start the server with one), or give a downloaded "
                              "hub id (owner/name).")

    def lora_file(self, value: str, *, what: str = "LoRA") -> Path:
        """A LoRA to load or export: under the output root or a --model-root."""
        path = resolved(value)
        if not self._inside_any(path, [self.output_root, *self.model_roots]):
            raise ConfigError(f"{what}: {_quote(value)} is outside the output folder and the model folders; pick one "
                              "from the list, or start the server with --model-root DIR to use LoRAs from elsewhere.")
        return path

    def resume(self, value: str) -> None:
        value = (value or "").strip()
        if value and value != "latest" and not is_inside(value, self.output_root):
            raise ConfigError(f"resume: {_quote(value)} is not a checkpoint under the output folder; use 'latest' "
                              "(the Resume button) or a checkpoint folder under the output root.")

    # serving ---------------------------------------------------------------------------------------------
    def may_serve(self, path: str | Path) -> bool:
        """True for files sdlora writes under the output root that a page or client may fetch: images and LoRAs
        (hidden files and folders, such as temporary files, only in OUTPUT/.thumbs)."""
        try:
            target = resolved(path)
            rel = target.relative_to(self.output_root)
        except (ValueError, OSError, RuntimeError):
            return False
        hidden = [part for part in rel.parts if part.startswith(".")]
        if hidden and (hidden != [THUMBS_DIR] or rel.parts[0] != THUMBS_DIR):
            return False
        return target.suffix.lower() in SERVED_SUFFIXES and target.is_file()

    def describe(self) -> str:
        """One line for the start-up message."""
        data = ", ".join(str(p) for p in self.data_roots) or "none (uploads and the built-in demo datasets only; add --data-root DIR)"
        models = ", ".join(str(p) for p in self.model_roots) or "none (built-in models and hub ids only; add --model-root DIR)"
        pickle = "; clients may turn on allow_pickle" if self.pickle_from_clients else ""
        return f"dataset folders: {data}; model folders: {models}{pickle}"
