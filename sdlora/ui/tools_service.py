"""The Tools tab's work, Gradio-free: resize, combine, merge and extract for the web UI and its API.

A mixin of `Service` (service.py), so it shares the server's AccessPolicy and model cache: every LoRA path a client
sends must lie under the output root or a --model-root, every base model path under a --model-root, and results are
always written to OUTPUT/tools/NAME.safetensors.
"""

from __future__ import annotations

from pathlib import Path

from ..config.train_config import ConfigError

TOOLS_DIR = "tools"


def _no_progress(done: int, total: int, what: str) -> None:
    pass


def _needs_base(paths) -> bool:
    """Whether a file has LoHa/LoKr modules, whose shapes only the base model tells: the tab's base-model field is
    always filled, and a plain LoRA is resized or combined without it."""
    from ..tools.common import lora_shape, read_lora_file

    return any(lora_shape(parts) is None for p in paths for parts in read_lora_file(p).modules.values())


class ToolsService:
    """Methods Service gains for the Tools tab (it provides output_root, access, base_model and _model_lock)."""

    def tool_output(self, name: str, default: str) -> Path:
        from .service import sanitize_name

        return self.output_root / TOOLS_DIR / f"{sanitize_name(name, default=default)}.safetensors"

    def _tool_lora(self, path: str, what: str = "LoRA") -> Path:
        text = str(path or "").strip()
        if not text:
            raise ConfigError(f"{what}: pick a LoRA file.")
        p = self.access.lora_file(text, what=what)
        if not p.is_file():
            raise ConfigError(f"{what} '{text}' not found. Pick one from the list or give a full path.")
        return p

    def _tool_base(self, spec: str, *, what: str = "base model", required: bool = True):
        spec = str(spec or "").strip()
        if not spec:
            if required:
                raise ConfigError(f"{what}: choose a base model (builtin:tiny, a file under --model-root, or a hub id).")
            return None
        self.access.base_model(spec)
        return self.base_model(spec)

    def tool_resize(self, source: str, *, rank: int, conv_rank: int = 0, method: str = "rank", param: float | None = None,
                    precision: str = "", name: str = "", base_spec: str = "", progress=_no_progress):
        """Resize a LoRA (under the output root or a model root); LoHa/LoKr files need base_spec. Returns the result."""
        from ..tools import resize_lora

        src = self._tool_lora(source)
        out = self.tool_output(name, f"{src.stem}_resized")
        with self._model_lock:
            base = self._tool_base(base_spec, required=False) if _needs_base([src]) else None
            return resize_lora(src, out, rank=int(rank), conv_rank=int(conv_rank) or None, method=method,
                               param=param if method != "rank" else None, precision=precision or None,
                               base_model=base, progress=progress)

    def tool_combine(self, sources: list[tuple[str, float]], *, mode: str = "concat", rank: int = 0, conv_rank: int = 0,
                     method: str = "rank", param: float | None = None, precision: str = "", name: str = "",
                     base_spec: str = "", progress=_no_progress):
        """Σ weight·LoRA as one file (exact concatenation, or SVD to `rank`)."""
        from ..tools import combine_loras

        if not sources:
            raise ConfigError("Combine: add LoRA files, one `path:weight` per line.")
        paths = [(self._tool_lora(p), float(w)) for p, w in sources]
        out = self.tool_output(name, "combined")
        with self._model_lock:
            base = self._tool_base(base_spec, required=False) if _needs_base([p for p, _ in paths]) else None
            return combine_loras(paths, out, mode=mode, rank=int(rank) or None, conv_rank=int(conv_rank) or None,
                                 method=method, param=param if method != "rank" else None, precision=precision or None,
                                 base_model=base, progress=progress)

    def tool_merge(self, base_spec: str, loras: list[tuple[str, float]], *, precision: str = "fp16", name: str = "",
                   progress=_no_progress):
        """base + Σ strength·LoRA written as a single-file checkpoint (the loaded model itself is not changed)."""
        from ..tools import merge_loras

        if not loras:
            raise ConfigError("Merge: add LoRA files, one `path:strength` per line.")
        paths = [(self._tool_lora(p), float(s)) for p, s in loras]
        out = self.tool_output(name, "merged")
        with self._model_lock:  # Try may be loading adapters into the same cached model
            base = self._tool_base(base_spec)
            return merge_loras(base, paths, out, precision=precision or "fp16", progress=progress)

    def tool_extract(self, tuned_spec: str, base_spec: str, *, rank: int, conv_rank: int = 0, method: str = "rank",
                     param: float | None = None, min_diff: float = 0.0, text_encoders: bool = True,
                     precision: str = "fp16", name: str = "", progress=_no_progress):
        """A LoRA from a fine-tuned model minus its base; both must be models the server may load."""
        from ..tools import extract_lora

        out = self.tool_output(name, "extracted")
        with self._model_lock:
            tuned = self._tool_base(tuned_spec, what="fine-tuned model")
            base = self._tool_base(base_spec)
            return extract_lora(tuned, base, out, rank=int(rank), conv_rank=int(conv_rank or 0), method=method,
                                param=param if method != "rank" else None, min_diff=float(min_diff or 0),
                                text_encoders=bool(text_encoders), precision=precision or "fp16", progress=progress)
