"""What the web UI can do, as plain Python over the library (no Gradio here): tabs and API endpoints call this.

One `Service` per server process: it owns the job queue (so training outlives a closed tab), caches loaded
models, and knows which folders the UI may read and write.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig, make_config, save_preset
from ..jobs import JobQueue, smooth
from ..paths import cache_dir, resolve_data_dir

SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


def sanitize_name(name: str, *, default: str = "lora") -> str:
    """A file-name stem that cannot leave its folder: no separators, no '..', no leading dots."""
    stem = Path(str(name or "").replace("\\", "/")).name
    stem = SAFE_NAME.sub("_", stem).strip(" .")
    stem = stem.replace("..", "_")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    return stem[:100] or default


def is_inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


@dataclass
class Service:
    output_root: Path
    presets_dir: Path
    queue: JobQueue = field(default_factory=JobQueue)
    dataset_roots: set[Path] = field(default_factory=set)
    _models: dict[str, Any] = field(default_factory=dict)
    _pipes: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # The list handed to Gradio's launch(allowed_paths=...): Gradio reads it on every file request, so
    # dataset folders scanned later are added to the same list object.
    _allowed: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.output_root = Path(self.output_root).expanduser().resolve()
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.presets_dir = Path(self.presets_dir).resolve()
        self._allowed[:] = [str(self.output_root), str(cache_dir().resolve())]

    # folders the server may touch -----------------------------------------------------------------
    def allowed_paths(self) -> list[str]:
        return self._allowed

    def _allow(self, folder: Path) -> None:
        folder = str(Path(folder).resolve())
        if folder not in self._allowed:
            self._allowed.append(folder)

    def uploads_dir(self) -> Path:
        return self.output_root / "uploads"

    # dataset ---------------------------------------------------------------------------------------
    def scan(self, folder: str, *, check_images: bool = False):
        from ..data.scan import scan_dataset

        root = resolve_data_dir(folder or "")
        report = scan_dataset(root, check_images=check_images)
        self.dataset_roots.add(report.root)
        self._allow(report.root)
        return report

    def save_caption(self, folder: str, image_path: str, text: str) -> Path:
        from ..data.captions import write_caption

        root = resolve_data_dir(folder).resolve()
        image = Path(image_path)
        if not is_inside(image, root):
            raise ConfigError(f"Refusing to save a caption for '{image}': it is outside the dataset folder '{root}'.")
        return write_caption(image.with_suffix(".txt"), text, root=root)

    def bulk_edit(self, folder: str, *, find: str, replace: str, prepend: str, append: str) -> int:
        from ..data.captions import bulk_edit_captions

        report = self.scan(folder)
        return bulk_edit_captions(report.items, find=find, replace=replace, prepend=prepend, append=append, root=report.root)

    # models ----------------------------------------------------------------------------------------
    def base_model(self, spec: str):
        from ..models import load_base_model

        with self._lock:
            if spec not in self._models:
                self._models[spec] = load_base_model(spec)
            return self._models[spec]

    def count_parameters(self, spec: str, targets: list[str], rank: int, conv_rank: int, train_te: bool) -> tuple[int, int, int]:
        """(trainable parameters, UNet modules, text-encoder modules) for these choices, without injecting anything."""
        from ..lora import count_lora_parameters, resolve_text_encoder_targets, resolve_unet_targets

        base = self.base_model(spec)
        unet_mods = resolve_unet_targets(base.unet, targets, conv_rank=conv_rank) if targets else []
        te_mods = resolve_text_encoder_targets(base.text_encoder) if train_te else []
        total = count_lora_parameters(unet_mods, rank, conv_rank) + count_lora_parameters(te_mods, rank)
        return total, len(unet_mods), len(te_mods)

    # config, presets ---------------------------------------------------------------------------------
    def build_config(self, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        values["output_name"] = sanitize_name(values.get("output_name", "lora"))
        out = values.get("output_dir") or str(self.output_root / values["output_name"])
        if not is_inside(Path(out), self.output_root):
            out = str(self.output_root / sanitize_name(Path(out).name))
        values["output_dir"] = out
        return make_config(**values)

    def list_presets(self) -> list[str]:
        return sorted(p.stem for p in self.presets_dir.glob("*.toml"))

    def load_preset(self, name: str) -> dict[str, Any]:
        from ..config import load_preset

        path = self.presets_dir / f"{sanitize_name(name)}.toml"
        values = load_preset(path)
        return make_config(**values).model_dump()

    def save_preset(self, name: str, values: dict[str, Any]) -> Path:
        cfg = self.build_config(values)
        stem = sanitize_name(name, default="my-preset")
        return save_preset(cfg, self.presets_dir / f"{stem}.toml", header=f"{stem}: saved from the sdlora web UI")

    # jobs --------------------------------------------------------------------------------------------
    def start(self, values: dict[str, Any]):
        return self.queue.submit(self.build_config(values))

    def resume(self, values: dict[str, Any]):
        values = dict(values, resume="latest")
        return self.queue.submit(self.build_config(values))

    def stop(self) -> bool:
        return self.queue.stop()

    def status(self) -> dict[str, Any]:
        job = self.queue.current()
        snap = job.snapshot() if job else {"id": None, "state": "idle", "step": 0, "total_steps": 0, "losses": [], "samples": [],
                                           "checkpoints": [], "log": [], "error": "", "lora_path": "", "it_per_s": None, "eta_s": None}
        snap["queue"] = [{"id": j.id, "state": j.state, "output_name": j.config.output_name, "step": j.step,
                          "total_steps": j.total_steps} for j in self.queue.jobs()]
        return snap

    @staticmethod
    def loss_table(snap: dict[str, Any]):
        import pandas as pd

        steps = [s for s, _ in snap["losses"]]
        raw = [v for _, v in snap["losses"]]
        rows = [{"step": s, "loss": v, "series": "raw"} for s, v in zip(steps, raw)]
        rows += [{"step": s, "loss": v, "series": "smoothed"} for s, v in zip(steps, smooth(raw))]
        return pd.DataFrame(rows, columns=["step", "loss", "series"])

    def list_loras(self) -> list[str]:
        found = [p for p in self.output_root.rglob("*.safetensors") if "cache" not in p.parts and not p.name.startswith(".")]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [str(p) for p in found]

    # try ------------------------------------------------------------------------------------------------
    def check_lora_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"LoRA file '{path}' not found. Pick one from the list or give a full path.")
        if p.suffix.lower() != ".safetensors":
            raise ConfigError(f"'{p.name}' is not a .safetensors file: sdlora only loads LoRAs in safetensors format.")
        return p

    def generate(self, spec: str, loras: list[tuple[str, float]], prompt: str, *, negative: str = "", seed: int = 0,
                 steps: int = 20, cfg: float = 7.0, width: int | None = None, height: int | None = None,
                 grid_strengths: list[float] | None = None, prompts: list[str] | None = None):
        """One image, or a strength grid (one row per prompt) when grid_strengths is given."""
        from ..inference import load_loras, set_strengths, strength_grid
        from ..sampling import SamplePrompt, generate

        base = self.base_model(spec)
        paths = [(self.check_lora_path(p), float(s)) for p, s in loras]
        with self._lock:
            pipe = self._pipes.get(spec)
            if pipe is None:
                pipe = base.make_pipeline()
                pipe.set_progress_bar_config(disable=True)
                self._pipes[spec] = pipe
            # Fresh adapters every call: files may have been re-exported since the last one.
            if getattr(pipe.unet, "peft_config", None):
                pipe.unload_lora_weights()
            names = load_loras(pipe, paths)
            sample = SamplePrompt(prompt=prompt, negative=negative, width=width or None, height=height or None, seed=int(seed),
                                  cfg=float(cfg), steps=int(steps))
            if grid_strengths:
                all_prompts = [SamplePrompt(prompt=p, negative=negative, width=width or None, height=height or None, seed=int(seed),
                                            cfg=float(cfg), steps=int(steps)) for p in (prompts or [prompt])]
                return strength_grid(pipe, names, all_prompts, grid_strengths, default_size=base.default_resolution,
                                     default_steps=int(steps), seed=int(seed))
            if names:
                set_strengths(pipe, names, [s for _, s in paths])
            return generate(pipe, sample, default_size=base.default_resolution, default_steps=int(steps), default_seed=int(seed))

    # export ------------------------------------------------------------------------------------------------
    def export(self, source: str, *, fmt: str, precision: str, name: str, base_spec: str) -> tuple[Path, str, bool]:
        from ..convert import reexport
        from ..verify import verify_lora

        src = Path(source)
        if not src.exists():
            raise ConfigError(f"Nothing to export: '{source}' does not exist. Train first, or pick a LoRA file.")
        target = self.output_root / "exports" / f"{sanitize_name(name)}{'_diffusers' if fmt == 'diffusers' else ''}.safetensors"
        out = reexport(src, target, fmt=fmt, precision=precision, base_model=base_spec)
        report = verify_lora(out, self.base_model(base_spec))
        return out, report.summary(), report.ok


def parse_lora_lines(text: str, default_strength: float = 1.0) -> list[tuple[str, float]]:
    """`path:strength` per line (strength optional)."""
    from ..inference import parse_lora_arg

    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, strength = parse_lora_arg(line)
        if ":" not in line.rsplit("/", 1)[-1]:
            strength = default_strength
        out.append((str(path), strength))
    return out


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_text(snap: dict[str, Any]) -> str:
    state = snap["state"]
    if state == "idle":
        return "No training job yet. Press **Start**."
    loss = f"{snap['losses'][-1][1]:.4f}" if snap["losses"] else "–"
    speed = f"{snap['it_per_s']:.2f} it/s" if snap.get("it_per_s") else "– it/s"
    text = (f"**Job {snap['id']}: {state}** — step {snap['step']}/{snap['total_steps'] or '?'} · loss {loss} · {speed} · "
            f"time left {format_eta(snap.get('eta_s'))}")
    if snap.get("error"):
        text += f"\n\n**Error:** {snap['error']}"
    if snap.get("lora_path"):
        text += f"\n\nLoRA: `{snap['lora_path']}`"
    return text


def now() -> float:
    return time.time()
