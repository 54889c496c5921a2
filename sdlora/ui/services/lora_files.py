"""The LoRA files a client may pick: trained and exported files under the output root, and the LoRA paths it types
(which must lie under the output root or a --model-root)."""

from __future__ import annotations

from pathlib import Path

from ...config.train_config import ConfigError
from ..access import AccessPolicy


def is_lora_file(path: Path) -> bool:
    """Whether the file's keys are a LoRA layout (the header only is read)."""
    from safetensors import safe_open

    from ...formats.lora_file import detect_format

    try:
        with safe_open(str(path), framework="pt") as fh:
            return detect_format(dict.fromkeys(fh.keys())) != "unknown"
    except Exception:  # noqa: BLE001 - unreadable or half-written: not offered
        return False


def newest_first(paths) -> list[Path]:
    """Sorted by modification time, newest first; files deleted meanwhile (old checkpoints are pruned) are dropped."""
    stamped = []
    for p in paths:
        try:
            stamped.append((p.stat().st_mtime, p))
        except OSError:
            continue
    return [p for _, p in sorted(stamped, key=lambda t: t[0], reverse=True)]


class LoraFiles:
    def __init__(self, access: AccessPolicy):
        self.access = access

    def _safetensors_files(self) -> list[Path]:
        """LoRA files under the output root: not the latent cache (OUTPUT/run/cache/..., one file per image), not a
        checkpoint's training state, nothing hidden, and only files whose keys are a LoRA layout."""
        root = self.access.output_root
        found = [p for p in root.rglob("*.safetensors")
                 if not any(part.startswith(".") or part == "cache" for part in p.relative_to(root).parts)
                 and p.name != "lora_state.safetensors" and is_lora_file(p)]
        return newest_first(found)

    def list_loras(self) -> list[str]:
        """Trained and exported LoRA files under the output root, newest first; checkpoint copies last."""
        from ...training.checkpoints import CHECKPOINT_DIR

        files = self._safetensors_files()
        finals = [p for p in files if CHECKPOINT_DIR not in p.parts]
        checkpoints = [p for p in files if CHECKPOINT_DIR in p.parts]
        return [str(p) for p in finals + checkpoints]

    def list_export_sources(self) -> list[str]:
        """Final LoRAs, exports and checkpoint folders (each holds a lora.safetensors), newest first."""
        from ...training.checkpoints import CHECKPOINT_DIR

        files = [p for p in self._safetensors_files() if CHECKPOINT_DIR not in p.parts]
        ckpts = newest_first({p.parent for p in self.access.output_root.glob(f"*/{CHECKPOINT_DIR}/*/lora.safetensors")})
        return [str(p) for p in files] + [str(p) for p in ckpts]

    def check_path(self, path: str) -> Path:
        """A LoRA file a client named: allowed by the access policy, existing, and in safetensors format."""
        p = Path(str(path).strip()).expanduser()
        self.access.lora_file(str(path).strip())
        if not p.is_file():
            raise ConfigError(f"LoRA file '{path}' not found. Pick one from the list or give a full path.")
        if p.suffix.lower() != ".safetensors":
            raise ConfigError(f"'{p.name}' is not a .safetensors file: sdlora only loads LoRAs in safetensors format.")
        return p
