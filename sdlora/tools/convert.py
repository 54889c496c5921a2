"""Re-export an existing LoRA (file or checkpoint) in another format or precision."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters.layers import has_peft_adapters
from ..fileio import read_user_bytes
from ..formats import lycoris
from ..formats.diffusers_lora import diffusers_to_kohya
from ..formats.export import PRECISIONS, ExportError, export_diffusers, export_kohya, save_safetensors_atomic, with_hashes
from ..formats.lora_file import LoraLoadError, detect_format, read_lora, refuse_broken


def _source_file(source: Path) -> Path:
    if source.is_dir():
        candidate = source / "lora.safetensors"
        if not candidate.is_file():
            raise ExportError(f"'{source}' holds no lora.safetensors: pass a LoRA file or an sdlora checkpoint folder.")
        return candidate
    return source


def reexport(source: Path, out: Path, *, fmt: str = "kohya", precision: str = "fp16", base_model: str | None = None) -> Path:
    from ..outputs import check_output_file

    check_output_file(out, what="export destination")  # never a folder, a device or a pipe
    src = _source_file(Path(source))
    tensors, metadata = read_lora(src)
    src_fmt = detect_format(tensors)
    if src_fmt == "unknown":
        raise ExportError(f"'{src}' is not a LoRA in kohya or diffusers format.")
    _refuse_broken(src, tensors, metadata, src_fmt)
    metadata["ss_save_precision"] = precision
    if fmt == src_fmt:
        cast = {k: v.to(PRECISIONS[precision]).contiguous() for k, v in tensors.items()}
        if fmt == "kohya":
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            metadata = with_hashes(Path(out), cast, metadata)
        return save_safetensors_atomic(cast, Path(out), metadata)
    groups = lycoris.group_modules(tensors)
    if not lycoris.diffusers_reads_all(groups):
        raise ExportError(f"'{src}' holds {lycoris.describe_algos(groups)} modules; the diffusers/PEFT format holds plain LoRA only. "
                          "Keep the kohya/LyCORIS file: ComfyUI and A1111 load it.")
    # Format change: let diffusers load the file onto the base model, then write from the injected modules.
    from ..models import load_base_model

    spec = base_model or _base_from_metadata(src, metadata)
    base = load_base_model(spec)
    pipe = base.make_pipeline()
    try:
        pipe.load_lora_weights(str(src), adapter_name="default")
    except Exception as exc:  # noqa: BLE001 - whatever diffusers trips over in a file that passed the checks above
        from ..errorlog import what_went_wrong

        raise ExportError(f"diffusers could not load '{src}' onto {spec} ({what_went_wrong(exc)}). Check it with "
                          "python -m sdlora verify, or pass the right --base-model.") from None
    # The components diffusers put a LoRA into: the UNet and each text encoder the file adapts.
    modules = {"unet": pipe.unet}
    modules.update({n: getattr(pipe, n) for n in base.family.text_encoder_names
                    if has_peft_adapters(getattr(pipe, n))})
    keep = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.", "sshs_"))}
    writer = export_diffusers if fmt == "diffusers" else export_kohya
    return writer(Path(out), base.family, modules, metadata=keep, precision=precision)


def _refuse_broken(src: Path, tensors: dict, metadata: dict, src_fmt: str) -> None:
    """A file with NaN weights, integer tensors, odd ranks/alpha shapes or damaged diffusers metadata is not exported."""
    try:
        kohya = diffusers_to_kohya(tensors, metadata, source=src) if src_fmt == "diffusers" else tensors
    except LoraLoadError as exc:
        raise ExportError(str(exc)) from None
    refuse_broken(kohya, src, ExportError)


def _base_from_metadata(src: Path, metadata: dict) -> str:
    state = src.parent / "state.json"
    if state.is_file():
        try:
            base = json.loads(read_user_bytes(state).decode("utf-8"))["config"]["base_model"]
            if isinstance(base, str) and base:
                return base
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass  # a damaged state.json: fall back to the file's own metadata
    name = metadata.get("ss_sd_model_name", "")
    if name.startswith("builtin:"):
        return name
    raise ExportError(f"Changing the format of '{src}' needs its base model: pass --base-model.")
