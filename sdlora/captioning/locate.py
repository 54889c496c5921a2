"""Which folder a model spec names. Never downloads: a folder on disk, kohya's layout (MODEL_DIR/OWNER_NAME for the
hub id OWNER/NAME, as its tag_images_by_wd14_tagger.py saves them), or files already in the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from .options import CaptioningError

WD14_MODEL = "model.onnx"
WD14_TAGS = "selected_tags.csv"
CONFIG = "config.json"
KOHYA_MODEL_DIR = "wd14_tagger_model"  # kohya's default --model_dir: the CLI's default, relative to the working folder


def kohya_folder_name(repo_id: str) -> str:
    return repo_id.strip().replace("/", "_")


def _how_to_get(repo_id: str, kind: str, where: str) -> str:
    target = f"{where}/{kohya_folder_name(repo_id)}"
    files = f" {WD14_MODEL} {WD14_TAGS}" if kind == "wd14" else ""
    return (f"On a machine with network run `hf download {repo_id}{files} --local-dir {target}` and copy that folder "
            f"here, then pass the folder (or keep it there and pass the id)")


def _from_hub_cache(repo_id: str, kind: str) -> Path | None:
    """The snapshot folder in the local hub cache holding the files this kind needs, without any network access."""
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache
    except ImportError:
        return None
    try:
        if kind == "wd14":
            found = [try_to_load_from_cache(repo_id, name) for name in (WD14_MODEL, WD14_TAGS)]
            paths = [Path(p) for p in found if isinstance(p, str)]
            return paths[0].parent if len(paths) == 2 and paths[0].parent == paths[1].parent else None
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError and friends): say so below
        return None


def in_hub_cache(folder: Path) -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return Path(folder).resolve().is_relative_to(Path(constants.HF_HUB_CACHE).expanduser().resolve())


def model_folder(spec: str, kind: str, model_dirs=()) -> tuple[Path, Path | None]:
    """(folder, the model file when the spec named a file). A hub id is looked for as DIR/OWNER_NAME in each of
    model_dirs, then in the local hub cache. Raises CaptioningError with what to do instead."""
    spec = (spec or "").strip()
    path = Path(spec).expanduser()
    if spec.startswith("builtin:"):
        raise CaptioningError(f"model '{spec}': captioning uses a tagger or caption model folder, not a built-in "
                              "Stable Diffusion model.")
    if path.is_dir():
        return path.resolve(), None
    if path.is_file():
        if kind == "wd14" and path.suffix.lower() == ".onnx":
            return path.resolve().parent, path.resolve()
        wanted = f"the folder holding {WD14_MODEL} and {WD14_TAGS}" if kind == "wd14" else f"the folder holding {CONFIG}"
        raise CaptioningError(f"model '{spec}' is a file: name {wanted}.")
    from ..models.common import hub_id_shaped  # here: the models package loads diffusers, which a folder never needs

    if hub_id_shaped(spec):
        dirs = [Path(d).expanduser() for d in model_dirs]
        for d in dirs:
            candidate = d / kohya_folder_name(spec)
            if candidate.is_dir():
                return candidate.resolve(), None
        cached = _from_hub_cache(spec, kind)
        if cached is not None:
            return cached, None
        looked = "".join(f"'{d / kohya_folder_name(spec)}', " for d in dirs)
        raise CaptioningError(f"model '{spec}' is not downloaded: captioning works offline and found it neither in {looked}"
                              f"nor in the local Hugging Face cache. "
                              f"{_how_to_get(spec, kind, str(dirs[0]) if dirs else KOHYA_MODEL_DIR)}.")
    raise CaptioningError(f"model folder '{spec}' does not exist. Name a folder holding "
                          + (f"{WD14_MODEL} and {WD14_TAGS}" if kind == "wd14" else f"the caption model ({CONFIG})")
                          + " or a hub id (owner/name) that is downloaded.")
