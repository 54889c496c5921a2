"""What the web UI can do, as plain Python over the library (no Gradio here): tabs and API endpoints call this.

One `Service` per server process: it owns the job queue (so training outlives a closed tab), caches loaded
models, and its `AccessPolicy` (access.py) decides which folders a client may read and write: every method that
receives a path from a client checks it there first.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.train_config import ConfigError, TrainConfig, make_config, save_preset
from ..training.jobs import JobQueue, smooth
from ..models import MODEL_LOCK
from .wording import for_the_ui
from ..paths import BUILTIN_DATA, DEMO_DATA, resolve_data_dir
from .access import THUMBS_DIR, AccessPolicy, is_inside, resolved, too_broad
from .tools_service import ToolsService

__all__ = ["Service", "is_inside", "sanitize_name", "parse_lora_lines", "parse_strengths", "format_eta", "progress_text"]

SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
MODEL_CACHE_SIZE = 2  # loaded base models kept for parameter counts, Try and verify (an SD1.5 is ~4 GB in fp32)
GALLERY_LIMIT = 500  # images shown in the dataset gallery; the scan report still counts all of them
PLOT_POINTS = 1500  # loss points per series sent to the browser
THUMB_SIZE = 192  # gallery thumbnails, pixels on the long side
PREVIEW_SIZE = 512  # the selected image next to the caption editor


def sanitize_name(name: str, *, default: str = "lora") -> str:
    """A file-name stem that cannot leave its folder: no separators, no '..', no leading dots."""
    stem = Path(str(name or "").replace("\\", "/")).name
    stem = SAFE_NAME.sub("_", stem).strip(" .")
    stem = stem.replace("..", "_")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")].strip(" .")
    return stem[:100] or default


@dataclass
class Service(ToolsService):  # the Tools tab's methods: tools_service.py
    output_root: Path
    presets_dir: Path
    queue: JobQueue = field(default_factory=JobQueue)
    _models: OrderedDict = field(default_factory=OrderedDict)
    _pipes: dict[str, Any] = field(default_factory=dict)
    # Everything that touches a cached model (Try injects LoRAs into it, verify copies it) or builds one.
    _model_lock: threading.RLock = field(default=MODEL_LOCK)
    # What clients may use beyond the output root (app.py --data-root, --model-root, --allow-pickle-from-clients).
    data_roots: list = field(default_factory=list)
    model_roots: list = field(default_factory=list)
    pickle_from_clients: bool = False
    access: AccessPolicy = field(init=False)

    def __post_init__(self):
        self.output_root = Path(self.output_root).expanduser().resolve()
        if too_broad(self.output_root):
            raise ConfigError(f"Output root '{self.output_root}' is the filesystem root or a home folder (or above one): "
                              "the server writes and serves files there. Choose a folder of its own, e.g. --output-root outputs.")
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.presets_dir = Path(self.presets_dir).expanduser().resolve()
        self.access = AccessPolicy(self.output_root, self.presets_dir, list(self.data_roots), list(self.model_roots),
                                   self.pickle_from_clients)

    # folders the server may serve -----------------------------------------------------------------
    def allowed_paths(self) -> list[str]:
        """For Gradio's launch(allowed_paths=...): the output root only. Within it the request guard (http_guard.py)
        lets through only the files AccessPolicy.may_serve names; dataset folders are never served."""
        return [str(self.output_root)]

    def uploads_dir(self) -> Path:
        return self.access.uploads_dir

    # dataset ---------------------------------------------------------------------------------------
    def dataset_root(self, folder: str, *, what: str = "data_dir") -> Path:
        """The dataset folder, resolved, if it lies under a dataset root (--data-root, uploads, builtin:demo)."""
        folder = (folder or "").strip()
        if not folder:
            raise ConfigError(f"Dataset folder: enter the path of a folder of images, or {DEMO_DATA}.")
        if folder in BUILTIN_DATA:
            return resolve_data_dir(folder).expanduser().resolve()
        return self.access.dataset_folder(resolve_data_dir(folder), folder, what=what)

    def scan(self, folder: str, *, check_images: bool = False):
        from ..data.scan import scan_dataset

        return scan_dataset(self.dataset_root(folder), check_images=check_images)

    def thumbnail(self, image: Path, size: int = THUMB_SIZE) -> Path:
        """A small upright copy for the gallery, cached under OUTPUT/.thumbs: the web server serves these, never the
        dataset folder. A grey placeholder if the image cannot be read or lies outside the dataset roots."""
        import hashlib

        from ..data.images import open_image_rgb
        from ..inference.sampling import save_png_atomic

        try:
            image = Path(image).resolve()
            if not any(is_inside(image, root) for root in self.access.dataset_roots()):
                return self._placeholder()
            st = image.stat()
            key = hashlib.sha1(f"{image}|{st.st_size}|{st.st_mtime_ns}|{size}".encode()).hexdigest()
            thumb = self.output_root / THUMBS_DIR / f"{key}.png"
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

        from ..inference.sampling import save_png_atomic

        path = self.output_root / THUMBS_DIR / "unreadable.png"
        if not path.is_file():
            save_png_atomic(Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (128, 128, 128)), path)
        return path

    def caption_file(self, folder: str, image_path: str, caption_path: str | None = None) -> tuple[Path, Path]:
        """(dataset root, caption file) for an existing image inside a dataset root; anything else is refused."""
        from ..data.captions import CAPTION_EXTENSIONS, caption_path_for

        root = self.dataset_root(folder)
        image = self.access.caption_image(root, image_path)
        target = Path(caption_path) if caption_path else caption_path_for(image)
        if target.suffix.lower() not in CAPTION_EXTENSIONS:
            target = caption_path_for(image)  # e.g. the caption came from metadata.jsonl: a .txt takes precedence
        if not is_inside(target, root):
            raise ConfigError(f"Refusing to write caption '{target}': it is outside the dataset folder '{root}'.")
        return root, target

    def save_caption(self, folder: str, image_path: str, text: str, caption_path: str | None = None) -> Path:
        from ..data.captions import write_caption

        root, target = self.caption_file(folder, image_path, caption_path)
        try:
            return write_caption(target, text or "", root=root)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def bulk_edit(self, folder: str, *, find: str, replace: str, prepend: str, append: str) -> int:
        from ..data.captions import bulk_edit_captions

        if not (find or prepend.strip() or append.strip()):
            raise ConfigError("Bulk edit: fill in Find (with Replace), Prepend or Append first.")
        report = self.scan(folder)
        try:
            return bulk_edit_captions(report.items, find=find, replace=replace, prepend=prepend, append=append, root=report.root)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # models ----------------------------------------------------------------------------------------
    def base_model(self, spec: str, *, allow_pickle: bool = False):
        """Loaded once per spec and kept (the few most recent), for parameter counts, Try and verify."""
        from ..models import load_base_model

        spec = (spec or "").strip()
        self.access.base_model(spec, bool(allow_pickle))
        key = f"{spec}|pickle={bool(allow_pickle)}"
        with self._model_lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            base = load_base_model(spec, allow_pickle=allow_pickle)
            self._models[key] = base
            while len(self._models) > MODEL_CACHE_SIZE:
                old, _ = self._models.popitem(last=False)
                self._pipes.pop(old, None)
            return base

    def model_info(self, spec: str, *, allow_pickle: bool = False) -> dict[str, Any]:
        """The base model's family (label, name) and native resolution, shown next to the base-model field."""
        base = self.base_model(spec, allow_pickle=allow_pickle)
        return {"family": base.family.name, "label": base.family.label, "resolution": int(base.default_resolution)}

    def _pipeline(self, spec: str, allow_pickle: bool = False):
        key = f"{(spec or '').strip()}|pickle={bool(allow_pickle)}"
        base = self.base_model(spec, allow_pickle=allow_pickle)
        pipe = self._pipes.get(key)
        if pipe is None:
            pipe = base.make_pipeline()
            pipe.set_progress_bar_config(disable=True)
            self._pipes[key] = pipe
        return base, pipe

    def count_parameters(self, spec: str, targets: list[str], rank: int, conv_rank: int, train_te: bool,
                         allow_pickle: bool = False, adapter=None) -> tuple[int, int, int]:
        """(trainable parameters, UNet modules, text-encoder modules) for these choices, without injecting anything.
        `adapter`: an AdapterSpec (default: plain LoRA at this rank)."""
        from ..adapters.spec import AdapterSpec
        from ..adapters.inject import resolve_text_encoder_targets, resolve_unet_targets

        with self._model_lock:
            base = self.base_model(spec, allow_pickle=allow_pickle)
            unet_mods = resolve_unet_targets(base.unet, targets, conv_rank=conv_rank) if (targets or conv_rank) else []
            te_mods = [m for te in base.text_encoders for m in resolve_text_encoder_targets(te)] if train_te else []
        adapter = adapter or AdapterSpec(rank=int(rank), alpha=float(rank), conv_rank=int(conv_rank))
        total = adapter.parameter_count(unet_mods) + adapter.parameter_count(te_mods)
        return total, len(unet_mods), len(te_mods)

    # config, presets ---------------------------------------------------------------------------------
    def build_config(self, values: dict[str, Any]) -> TrainConfig:
        """A validated TrainConfig whose output folder is always under the output root."""
        values = dict(values)
        values["output_name"] = sanitize_name(values.get("output_name") or "lora")
        values["output_dir"] = str(self.output_root / values["output_name"])
        return make_config(**values)

    def checked_config(self, values: dict[str, Any]) -> TrainConfig:
        """build_config plus the access policy (every path in it, allow_pickle) and the cheap checks that need the disk:
        the base model resolves, the prompts parse, the dataset folder exists."""
        from ..models import resolve_model_spec
        from ..inference.sampling import parse_prompt_line

        cfg = self.build_config(values)
        self._check_access(cfg)
        if not cfg.data_dir.strip() and not cfg.dataset_config.strip():
            raise ConfigError(f"data_dir: choose a dataset folder on the Dataset tab (or {DEMO_DATA}), or a kohya dataset "
                              "config.")
        root = self.dataset_root(cfg.data_dir) if cfg.data_dir.strip() else None
        resolve_model_spec(cfg.base_model)
        for line in cfg.all_sample_prompts():
            try:
                parse_prompt_line(line)
            except ValueError as exc:
                raise ConfigError(f"sample_prompts: {exc}") from None
        if root is not None and not root.is_dir():
            raise ConfigError(f"data_dir: '{cfg.data_dir}' is not a folder. Fix the path on the Dataset tab.")
        return cfg

    def _check_access(self, cfg: TrainConfig) -> None:
        """Every path and dangerous switch in a config a client sent, against the access policy."""
        self.access.base_model(cfg.base_model, cfg.allow_pickle)
        self.access.resume(cfg.resume)
        if cfg.sample_prompts_file.strip():
            self.access.prompt_file(cfg.sample_prompts_file)
        if cfg.data_dir.strip():
            self.dataset_root(cfg.data_dir)
        if cfg.reg_data_dir.strip():
            self.access.dataset_folder(resolve_data_dir(cfg.reg_data_dir), cfg.reg_data_dir, what="reg_data_dir")
        if cfg.validation_dir.strip():
            self.access.dataset_folder(resolve_data_dir(cfg.validation_dir), cfg.validation_dir, what="validation_dir")
        if cfg.mask_dir.strip():
            self.access.dataset_folder(resolve_data_dir(cfg.mask_dir), cfg.mask_dir, what="mask_dir")
        if cfg.dataset_config.strip():
            # The TOML itself, then every image folder it names: a client must not reach other folders through it.
            from ..data.dataset_config import load_dataset_config

            self.access.prompt_file(cfg.dataset_config, what="dataset_config")
            for dataset in load_dataset_config(resolved(cfg.dataset_config)).datasets:
                for subset in dataset.subsets:
                    self.access.dataset_folder(subset.image_dir, str(subset.image_dir),
                                               what=f"dataset_config ({subset.where or 'image_dir'})")

    def list_presets(self) -> list[str]:
        return sorted(p.stem for p in self.presets_dir.glob("*.toml"))

    def load_preset(self, name: str) -> dict[str, Any]:
        from ..config.train_config import load_preset

        path = self.presets_dir / f"{sanitize_name(name, default='demo')}.toml"
        values = load_preset(path)
        return make_config(**values).model_dump()

    def save_preset(self, name: str, values: dict[str, Any]) -> Path:
        if not (name or "").strip():
            raise ConfigError("Preset name: type a name for the preset first, e.g. my-style.")
        cfg = self.build_config(values)
        # A preset is also read by the command line, which trusts it: it gets the same checks as a run.
        self._check_access(cfg)
        stem = sanitize_name(name, default="my-preset")
        path = self.presets_dir / f"{stem}.toml"
        if path.exists() and not _saved_from_web_ui(path):
            raise ConfigError(f"Preset name: '{stem}' ships with sdlora or was written outside the web UI; save under "
                              "another name.")
        return save_preset(cfg, path, header=f"{stem}: {WEB_UI_PRESET}")

    def preview_run(self, values: dict[str, Any]) -> str:
        """Before pressing Start: the step plan (images x repeats / batch / accumulation = steps) and the memory the
        run will need on this server's device, from the same code the run uses (no model is trained or changed)."""
        import torch

        from ..adapters.spec import AdapterSpec
        from ..adapters.inject import resolve_text_encoder_targets, resolve_unet_targets
        from ..training.memory import estimate_training_memory
        from ..data.plan import build_training_data, make_step_plan

        cfg = self.checked_config(values)
        data = build_training_data(cfg)
        lines = [make_step_plan(cfg, data.dataset).describe()]
        with self._model_lock:
            base = self.base_model(cfg.base_model, allow_pickle=cfg.allow_pickle)
            unet_mods = resolve_unet_targets(base.unet, cfg.targets, conv_rank=cfg.conv_rank)
            lrs = cfg.text_encoder_lrs(len(base.text_encoders))
            trained = [i for i, lr in enumerate(lrs) if cfg.train_text_encoder and lr > 0]
            adapter = AdapterSpec.from_config(cfg)
            n = adapter.parameter_count(unet_mods) + sum(
                adapter.parameter_count(resolve_text_encoder_targets(base.text_encoders[i])) for i in trained)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            # As the run does: cached latents send the VAE away, cached captions the frozen text encoders.
            est = estimate_training_memory(
                family=base.family, unet=base.unet, text_encoders=base.text_encoders, vae=base.vae, lora_params=n,
                config=cfg, device=device, trained_text_encoders=trained, vae_on_device=not cfg.cache_latents,
                text_encoders_on_device=bool(trained) or cfg.shuffle_tags)
        lines.append(f"{base.family.label} model; {n:,} trainable parameters. Memory: {est.describe()}"
                     + ("" if est.fits() else " — this may not fit: lower batch size or resolution, turn on gradient "
                        "checkpointing, bf16, or the adamw8bit optimizer."))
        return "\n\n".join(lines)

    # jobs --------------------------------------------------------------------------------------------
    def start(self, values: dict[str, Any]):
        return self.queue.submit(self.checked_config(values))

    def resume(self, values: dict[str, Any]):
        """Queue the same settings with resume='latest': the run continues from the newest checkpoint of its output."""
        from ..training.checkpoints import find_latest_checkpoint

        cfg = self.checked_config(dict(values, resume="latest"))
        pending = any(j.config.output_dir == cfg.output_dir and j.state in ("queued", "running") for j in self.queue.jobs())
        if not pending and find_latest_checkpoint(Path(cfg.output_dir)) is None:
            raise ConfigError(f"Nothing to resume: '{cfg.output_name}' has no checkpoint in {cfg.output_dir}/checkpoints. "
                              "Press Start training (set 'Checkpoint every N steps' to be able to resume later).")
        return self.queue.submit(cfg)

    def stop(self) -> bool:
        return self.queue.stop()

    def status(self) -> dict[str, Any]:
        job = self.queue.current()
        snap = job.snapshot() if job else {"id": None, "state": "idle", "step": 0, "total_steps": 0, "losses": [], "samples": [],
                                           "checkpoints": [], "val_losses": [], "log": [], "error": "", "lora_path": "", "it_per_s": None,
                                           "eta_s": None, "output_dir": "", "output_name": "", "base_model": ""}
        snap["queue"] = [{"id": j.id, "state": j.state, "output_name": j.config.output_name, "step": j.step,
                          "total_steps": j.total_steps, "resume": bool(j.config.resume)} for j in self.queue.jobs()]
        return snap

    @staticmethod
    def loss_table(snap: dict[str, Any], max_points: int = PLOT_POINTS):
        """Raw and smoothed loss, and the validation loss when there is one, as a long table for gr.LinePlot, thinned to
        at most max_points per series."""
        import pandas as pd

        steps = [s for s, _ in snap["losses"]]
        raw = [v for _, v in snap["losses"]]
        smoothed = smooth(raw)
        stride = max(1, -(-len(steps) // max_points))
        keep = list(range(0, len(steps), stride))
        if keep and keep[-1] != len(steps) - 1:
            keep.append(len(steps) - 1)
        val = list(snap.get("val_losses") or [])
        val = val[:: max(1, -(-len(val) // max_points))] + ([val[-1]] if len(val) > max_points else [])
        # Typed columns even when empty: the plot takes its axis types from the first frame it sees.
        return pd.DataFrame({
            "step": pd.Series([steps[i] for i in keep] * 2 + [s for s, _ in val], dtype="int64"),
            "loss": pd.Series([raw[i] for i in keep] + [smoothed[i] for i in keep] + [v for _, v in val], dtype="float64"),
            "series": pd.Series(["raw"] * len(keep) + ["smoothed"] * len(keep) + ["validation"] * len(val), dtype="str"),
        })

    def _safetensors_files(self) -> list[Path]:
        """LoRA files under the output root: not the latent cache (OUTPUT/run/cache/..., one file per image), not a
        checkpoint's training state, nothing hidden, and only files whose keys are a LoRA layout (header read only)."""
        found = [p for p in self.output_root.rglob("*.safetensors")
                 if not any(part.startswith(".") or part == "cache" for part in p.relative_to(self.output_root).parts)
                 and p.name != "lora_state.safetensors" and _is_lora_file(p)]
        return _newest_first(found)

    def list_loras(self) -> list[str]:
        """Trained and exported LoRA files under the output root, newest first; checkpoint copies last."""
        files = self._safetensors_files()
        finals = [p for p in files if "checkpoints" not in p.parts]
        checkpoints = [p for p in files if "checkpoints" in p.parts]
        return [str(p) for p in finals + checkpoints]

    def list_export_sources(self) -> list[str]:
        """Final LoRAs, exports and checkpoint folders (each holds a lora.safetensors), newest first."""
        from ..training.checkpoints import CHECKPOINT_DIR

        files = [p for p in self._safetensors_files() if CHECKPOINT_DIR not in p.parts]
        ckpts = _newest_first({p.parent for p in self.output_root.glob(f"*/{CHECKPOINT_DIR}/*/lora.safetensors")})
        return [str(p) for p in files] + [str(p) for p in ckpts]

    # try ------------------------------------------------------------------------------------------------
    def check_lora_path(self, path: str) -> Path:
        p = Path(str(path).strip()).expanduser()
        self.access.lora_file(str(path).strip())
        if not p.is_file():
            raise ConfigError(f"LoRA file '{path}' not found. Pick one from the list or give a full path.")
        if p.suffix.lower() != ".safetensors":
            raise ConfigError(f"'{p.name}' is not a .safetensors file: sdlora only loads LoRAs in safetensors format.")
        return p

    def generate(self, spec: str, loras: list[tuple[str, float]], prompt: str, *, negative: str = "", seed: int = 0,
                 steps: int = 20, cfg: float = 7.0, width: int | None = None, height: int | None = None,
                 grid_strengths: list[float] | None = None, prompts: list[str] | None = None):
        """One image, or a strength grid (one row per prompt, one column per strength) when grid_strengths is given."""
        from ..inference.loras import load_loras, set_strengths, strength_grid, unload_loras
        from ..inference.sampling import SamplePrompt, generate

        if int(steps) < 1 or int(steps) > 200:
            raise ConfigError("Steps: use 1 to 200 sampling steps.")
        for name, value in (("Width", width), ("Height", height)):
            if value and (int(value) < 64 or int(value) % 8 or int(value) > 2048):
                raise ConfigError(f"{name}: use a multiple of 8 between 64 and 2048, or 0 for the model's default.")
        paths = [(self.check_lora_path(p), float(s)) for p, s in loras]

        def sample(text: str) -> SamplePrompt:
            return SamplePrompt(prompt=text, negative=negative or "", width=int(width or 0) or None,
                                height=int(height or 0) or None, seed=int(seed), cfg=float(cfg), steps=int(steps))

        with self._model_lock:
            base, pipe = self._pipeline(spec)
            # Fresh adapters every call: files may have been re-trained or re-exported since the last one.
            unload_loras(pipe)
            names = load_loras(pipe, paths)
            if grid_strengths:
                return strength_grid(pipe, names, [sample(p) for p in (prompts or [prompt])], grid_strengths,
                                     default_size=base.default_resolution, default_steps=int(steps), seed=int(seed))
            if names:
                set_strengths(pipe, names, [s for _, s in paths])
            return generate(pipe, sample(prompt), default_size=base.default_resolution, default_steps=int(steps),
                            default_seed=int(seed))

    # export ------------------------------------------------------------------------------------------------
    def export(self, source: str, *, fmt: str, precision: str, name: str, base_spec: str) -> tuple[Path, str, bool]:
        """Re-export a LoRA (file or checkpoint folder) into OUTPUT/exports, then verify it against the base model."""
        from ..tools.convert import reexport
        from ..tools.verify import verify_lora

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
        target = self.output_root / "exports" / f"{sanitize_name(name)}{suffix}.safetensors"
        with self._model_lock:
            out = reexport(src, target, fmt=fmt, precision=precision, base_model=base_spec)
            report = verify_lora(out, self.base_model(base_spec))
        return out, report.summary(), report.ok


WEB_UI_PRESET = "saved from the sdlora web UI"


def _saved_from_web_ui(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return WEB_UI_PRESET in fh.readline(400)
    except OSError:
        return False


def _is_lora_file(path: Path) -> bool:
    from safetensors import safe_open

    from ..tools.verify import detect_format

    try:
        with safe_open(str(path), framework="pt") as fh:
            return detect_format(dict.fromkeys(fh.keys())) != "unknown"
    except Exception:  # noqa: BLE001 - unreadable or half-written: not offered
        return False


def _newest_first(paths) -> list[Path]:
    """Sorted by modification time, newest first; files deleted meanwhile (old checkpoints are pruned) are dropped."""
    stamped = []
    for p in paths:
        try:
            stamped.append((p.stat().st_mtime, p))
        except OSError:
            continue
    return [p for _, p in sorted(stamped, key=lambda t: t[0], reverse=True)]


def parse_lora_lines(text: str, default_strength: float = 1.0) -> list[tuple[str, float]]:
    """`path:strength` per line (strength optional); blank lines and # comments are ignored."""
    from ..inference.loras import parse_lora_arg

    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, strength = parse_lora_arg(line)
        if str(path) == line or not re.search(r":-?[\d.]+$", line):
            strength = default_strength
        out.append((str(path), float(strength)))
    return out


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(x) for x in re.split(r"[,;\s]+", text or "") if x.strip()]
    except ValueError:
        raise ConfigError("Strengths: numbers separated by commas, e.g. 0, 0.5, 1.") from None
    if not values:
        raise ConfigError("Strengths: give at least one number, e.g. 0, 0.5, 1.")
    if len(values) > 12:
        raise ConfigError("Strengths: at most 12 columns per grid.")
    return values


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_text(snap: dict[str, Any]) -> str:
    state = snap["state"]
    if state == "idle":
        return "No training job yet. Press **Start training**."
    loss = f"{snap['losses'][-1][1]:.4f}" if snap["losses"] else "–"
    speed = f"{snap['it_per_s']:.2f} it/s" if snap.get("it_per_s") else "– it/s"
    total = snap["total_steps"] or "?"
    text = (f"**Job {snap['id']}: {state}** — step {snap['step']}/{total} · loss {loss} · {speed} · "
            f"time left {format_eta(snap.get('eta_s'))}")
    if snap.get("plan"):
        text += f"\n\n{snap['plan']}"
        if snap.get("it_per_s"):
            text += f" (about {format_eta(snap['total_steps'] / snap['it_per_s'])} in all at {snap['it_per_s']:.2f} it/s)"
    waiting = [j for j in snap.get("queue", []) if j["state"] == "queued"]
    if waiting:
        text += f" · {len(waiting)} job(s) waiting"
    if snap.get("error"):
        text += f"\n\n**Error:** {for_the_ui(snap['error'])}"
    if snap.get("lora_path"):
        text += f"\n\nLoRA: `{snap['lora_path']}`"
    return text
