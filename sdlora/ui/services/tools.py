"""The Tools tab's work: resize, combine, merge and extract for the web UI and its API.

Every LoRA path a client sends must lie under the output root or a --model-root, every base model path under a
--model-root, and results are always written to OUTPUT/tools/NAME.safetensors.
"""

from __future__ import annotations

from pathlib import Path

from ...config.train_config import ConfigError
from ..access import AccessPolicy
from .inputs import sanitize_name
from .model_cache import ModelCache

TOOLS_DIR = "tools"


def _no_progress(done: int, total: int, what: str) -> None:
    pass


def _needs_base(paths) -> bool:
    """Whether a file has LoHa/LoKr modules, whose shapes only the base model tells: the tab's base-model field is
    always filled, and a plain LoRA is resized or combined without it."""
    from ...tools.common import lora_shape, read_lora_file

    return any(lora_shape(parts) is None for p in paths for parts in read_lora_file(p).modules.values())


class ToolsService:
    def __init__(self, access: AccessPolicy, models: ModelCache):
        self.access = access
        self.models = models

    def output(self, name: str, default: str) -> Path:
        return self.access.output_root / TOOLS_DIR / f"{sanitize_name(name, default=default)}.safetensors"

    def _lora(self, path: str, what: str = "LoRA") -> Path:
        text = str(path or "").strip()
        if not text:
            raise ConfigError(f"{what}: pick a LoRA file.")
        p = self.access.lora_file(text, what=what)
        if not p.is_file():
            raise ConfigError(f"{what} '{text}' not found. Pick one from the list or give a full path.")
        return p

    def _base(self, spec: str, *, what: str = "base model", required: bool = True):
        spec = str(spec or "").strip()
        if not spec:
            if required:
                raise ConfigError(f"{what}: choose a base model (builtin:tiny, a file under --model-root, or a hub id).")
            return None
        self.access.base_model(spec)
        return self.models.base_model(spec)

    def resize(self, source: str, *, rank: int, conv_rank: int = 0, method: str = "rank", param: float | None = None,
               precision: str = "", name: str = "", base_spec: str = "", progress=_no_progress):
        """Resize a LoRA (under the output root or a model root); LoHa/LoKr files need base_spec. Returns the result."""
        from ...tools import resize_lora

        src = self._lora(source)
        out = self.output(name, f"{src.stem}_resized")
        with self.models.lock:
            base = self._base(base_spec, required=False) if _needs_base([src]) else None
            return resize_lora(src, out, rank=int(rank), conv_rank=int(conv_rank) or None, method=method,
                               param=param if method != "rank" else None, precision=precision or None,
                               base_model=base, progress=progress)

    def combine(self, sources: list[tuple[str, float]], *, mode: str = "concat", rank: int = 0, conv_rank: int = 0,
                method: str = "rank", param: float | None = None, precision: str = "", name: str = "",
                base_spec: str = "", progress=_no_progress):
        """Σ weight·LoRA as one file (exact concatenation, or SVD to `rank`)."""
        from ...tools import combine_loras

        if not sources:
            raise ConfigError("Combine: add LoRA files, one `path:weight` per line.")
        paths = [(self._lora(p), float(w)) for p, w in sources]
        out = self.output(name, "combined")
        with self.models.lock:
            base = self._base(base_spec, required=False) if _needs_base([p for p, _ in paths]) else None
            return combine_loras(paths, out, mode=mode, rank=int(rank) or None, conv_rank=int(conv_rank) or None,
                                 method=method, param=param if method != "rank" else None, precision=precision or None,
                                 base_model=base, progress=progress)

    def merge(self, base_spec: str, loras: list[tuple[str, float]], *, precision: str = "fp16", name: str = "",
              progress=_no_progress):
        """base + Σ strength·LoRA written as a single-file checkpoint (the loaded model itself is not changed)."""
        from ...tools import merge_loras

        if not loras:
            raise ConfigError("Merge: add LoRA files, one `path:strength` per line.")
        paths = [(self._lora(p), float(s)) for p, s in loras]
        out = self.output(name, "merged")
        with self.models.lock:  # Try may be loading adapters into the same cached model
            base = self._base(base_spec)
            return merge_loras(base, paths, out, precision=precision or "fp16", progress=progress)

    def extract(self, tuned_spec: str, base_spec: str, *, rank: int, conv_rank: int = 0, method: str = "rank",
                param: float | None = None, min_diff: float = 0.0, text_encoders: bool = True,
                precision: str = "fp16", name: str = "", progress=_no_progress):
        """A LoRA from a fine-tuned model minus its base; both must be models the server may load."""
        from ...tools import extract_lora

        out = self.output(name, "extracted")
        with self.models.lock:
            tuned = self._base(tuned_spec, what="fine-tuned model")
            base = self._base(base_spec)
            return extract_lora(tuned, base, out, rank=int(rank), conv_rank=int(conv_rank or 0), method=method,
                                param=param if method != "rank" else None, min_diff=float(min_diff or 0),
                                text_encoders=bool(text_encoders), precision=precision or "fp16", progress=progress)
