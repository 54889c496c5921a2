"""The Export tab's work: re-export a LoRA (file or checkpoint folder) into OUTPUT/exports, then verify it against
the base model."""

from __future__ import annotations

from pathlib import Path

from ...config.train_config import ConfigError
from ..access import AccessPolicy
from .inputs import sanitize_name
from .model_cache import ModelCache

EXPORTS_DIR = "exports"


class Exporter:
    def __init__(self, access: AccessPolicy, models: ModelCache):
        self.access = access
        self.models = models

    def export(self, source: str, *, fmt: str, precision: str, name: str, base_spec: str) -> tuple[Path, str, bool]:
        """(the written file, the verify report, whether it passed)."""
        from ...tools.convert import reexport
        from ...tools.verify import VerifyMemoryError, verify_lora

        if fmt not in ("kohya", "diffusers"):
            raise ConfigError(f"Format: choose kohya or diffusers (got '{fmt}').")
        if precision not in ("fp16", "bf16", "fp32"):
            raise ConfigError(f"Precision: choose fp16, bf16 or fp32 (got '{precision}').")
        src = Path(str(source or "").strip()).expanduser()
        if str(source or "").strip():
            self.access.lora_file(str(source).strip(), what="Export source")
        self.access.base_model(base_spec)
        if not str(source or "").strip() or not src.exists():
            raise ConfigError(f"Nothing to export: '{source}' does not exist. Train first, or pick a LoRA file or checkpoint.")
        suffix = "_diffusers" if fmt == "diffusers" else ""
        target = self.access.output_root / EXPORTS_DIR / f"{sanitize_name(name)}{suffix}.safetensors"
        with self.models.lock:
            out = reexport(src, target, fmt=fmt, precision=precision, base_model=base_spec)
            try:
                report = verify_lora(out, self.models.base_model(base_spec))
            except VerifyMemoryError as exc:  # the export stands; the server stays up without verifying it
                return out, f"Exported to {out.name}, not verified: {exc}", False
        return out, report.summary(), report.ok
