"""`python -m sdlora train|generate|export|verify|scan|demo-data|caption`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .paths import BUILTIN_DATA


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA", description="Train a LoRA. Flags override values from --config.")
    p.add_argument("--config", help="TOML preset (see presets/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key; repeatable")
    for dest, flag, annotation in _train_flags():
        p.add_argument(flag.name, dest=dest, default=None, **_argparse_options(flag, annotation))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_flags():
    """(field name, Flag, field type) of every TrainConfig field that has a `train` flag, in field order."""
    from .config.flags import Flag
    from .config.train_config import TrainConfig

    for name, info in TrainConfig.model_fields.items():
        flag = next((m for m in info.metadata if isinstance(m, Flag)), None)
        if flag is not None:
            yield name, flag, info.annotation


def _argparse_options(flag, annotation) -> dict:
    """How argparse reads a flag, from the field's type: int/float values, a Literal's choices, switches."""
    from types import UnionType
    from typing import Literal, Union, get_args, get_origin

    if flag.sets is not None:
        return {"action": "store_const", "const": flag.sets}
    kw: dict = {"help": flag.help} if flag.help else {}
    if flag.metavar:
        kw["metavar"] = flag.metavar
    if flag.repeat:
        kw["action"] = "append"
    # `int | None` reads as int; a union of several types (`float | list[float]`) needs its own `parse`.
    union = get_origin(annotation) in (Union, UnionType)
    args = [a for a in get_args(annotation) if a is not type(None)] if union else [annotation]
    if flag.parse is not None:
        kw["type"] = flag.parse
    elif get_origin(annotation) is Literal:
        if flag.offer_choices:
            kw["choices"] = list(get_args(annotation))
    elif args[0] in (int, float):
        kw["type"] = args[0]
    return kw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdlora", description="Stable Diffusion LoRA trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)

    g = sub.add_parser("generate", help="generate an image with LoRAs at chosen strengths")
    g.add_argument("--base-model", default="builtin:tiny")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="repeatable; strength 0 = base model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--grid", help="comma-separated strengths for a strength grid, e.g. 0,0.25,0.5,0.75,1")
    g.add_argument("--clip-skip", type=int, default=1, help="condition on the text encoder's k-th layer from the end, as "
                   "the LoRA was trained (kohya's clip_skip; SD1/SD2)")
    g.add_argument("--out", required=True)
    g.add_argument("--allow-pickle", action="store_true")

    v = sub.add_parser("verify", help="check a LoRA file against a base model")
    v.add_argument("file")
    v.add_argument("--base-model", default="builtin:tiny")
    v.add_argument("--json", action="store_true")
    v.add_argument("--allow-pickle", action="store_true")

    e = sub.add_parser("export", help="re-export a LoRA file or a checkpoint in another format or precision")
    e.add_argument("source", help="a .safetensors LoRA or a checkpoint folder")
    e.add_argument("--out", required=True)
    e.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    e.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    e.add_argument("--base-model", default=None, help="needed for diffusers format (default: the one in the file's metadata/config)")

    s = sub.add_parser("scan", help="scan a dataset folder and print the report")
    s.add_argument("folder")
    s.add_argument("--json", action="store_true")

    k = sub.add_parser("import-kohya", help="turn a kohya_ss GUI LoRA config (.json) into an sdlora TOML preset")
    k.add_argument("file", help="the .json file kohya_ss's Save button wrote")
    k.add_argument("--out", required=True, help="preset to write, e.g. presets/mine.toml")

    d = sub.add_parser("demo-data", help="write a generated demo dataset")
    d.add_argument("folder", nargs="?", default="demo_data")
    d.add_argument("--which", default="builtin:demo", choices=list(BUILTIN_DATA),
                   help="the mascot (builtin:demo) or shapes on navy (builtin:demo-navy)")

    from .tools.cli import add_parsers as add_tool_parsers  # merge, resize, combine, extract
    from .captioning.cli import add_parser as add_caption_parser

    add_tool_parsers(sub)
    add_caption_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    from .config.train_config import ConfigError, TrainConfig, format_validation_error, load_preset, parse_set_value

    values = load_preset(args.config) if args.config else {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set '{item}': use KEY=VALUE, e.g. --set rank=8")
        values[key.strip()] = parse_set_value(raw.strip())
    for dest, _, _ in _train_flags():
        if getattr(args, dest) is not None:
            values[dest] = getattr(args, dest)
    if isinstance(values.get("targets"), str):
        values["targets"] = [t.strip() for t in values["targets"].split(",")]
    from pydantic import ValidationError

    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        where = f" (preset {args.config})" if args.config else ""
        raise ConfigError(format_validation_error(exc) + where) from None


class _Progress:
    """Progress bar on stderr; stdout is kept for results (its last line is the LoRA path)."""

    def __init__(self, quiet: bool):
        from .training.progress import JobSnapshot

        self.quiet = quiet
        self.bar = None
        self.snapshot = JobSnapshot()

    def __call__(self, event) -> None:
        from tqdm import tqdm

        from .training.events import DoneEvent, StartEvent, StepEvent

        snap = self.snapshot
        snap.apply(event)
        if isinstance(event, StartEvent):
            if not self.quiet:
                self.bar = tqdm(total=snap.total_steps, initial=snap.step, unit="step", file=sys.stderr, dynamic_ncols=True)
        elif isinstance(event, StepEvent):
            if self.bar is not None:
                self.bar.update(snap.step - self.bar.n)
                self.bar.set_postfix(loss=f"{snap.loss:.4f}", lr=f"{snap.lr:.2e}")
        elif isinstance(event, DoneEvent) and self.bar is not None:
            self.bar.close()
        line = event.console_line()
        if line is not None:
            (self.bar.write(line, file=sys.stderr) if self.bar else print(line, file=sys.stderr))


def cmd_train(args) -> int:
    from .training.trainer import train

    config = config_from_args(args)
    result = train(config, on_event=_Progress(args.quiet))
    if result.lora_path is not None:
        print(str(result.lora_path.resolve()))
    return 0


def _grid_strengths(text: str) -> list[float]:
    import math

    from .config.train_config import ConfigError

    try:
        strengths = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        strengths = []
    if not strengths or len(strengths) > 64 or not all(math.isfinite(s) for s in strengths):
        raise ConfigError(f"--grid '{text}': give 1 to 64 strengths as numbers separated by commas, e.g. 0,0.5,1.")
    return strengths


def cmd_generate(args) -> int:
    from .inference.loras import load_loras, parse_lora_arg, strength_grid
    from .models import load_base_model
    from .outputs import check_output_file
    from .safetext import clean_text
    from .inference.sampling import SamplePrompt, generate, save_png_atomic

    check_output_file(args.out, what="--out")  # before any model loads: never a folder or a device
    # Checked before any model loads: seed, size, steps and CFG ranges (SamplePrompt), the prompt's text.
    prompt = SamplePrompt(prompt=clean_text(args.prompt), negative=clean_text(args.negative_prompt), width=args.width,
                          height=args.height, seed=args.seed, cfg=args.cfg, steps=args.steps)
    strengths = _grid_strengths(args.grid) if args.grid else None
    loras = [parse_lora_arg(a) for a in args.lora]
    base = load_base_model(args.base_model, allow_pickle=args.allow_pickle)
    pipe = base.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    names = load_loras(pipe, loras)
    if strengths:
        img = strength_grid(pipe, names, [prompt], strengths, default_size=base.default_resolution, default_steps=args.steps,
                            seed=args.seed, clip_skip=args.clip_skip, family=base.family)
    else:
        img = generate(pipe, prompt, default_size=base.default_resolution, default_steps=args.steps, default_seed=args.seed,
                       clip_skip=args.clip_skip, family=base.family)
    out = save_png_atomic(img, Path(args.out))
    print(str(out.resolve()))
    return 0


def cmd_verify(args) -> int:
    from .models import load_base_model
    from .tools.verify import verify_lora

    base = load_base_model(args.base_model, allow_pickle=args.allow_pickle)
    report = verify_lora(args.file, base)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_export(args) -> int:
    from .tools.convert import reexport
    from .outputs import check_output_file

    check_output_file(args.out, what="--out")
    out = reexport(Path(args.source), Path(args.out), fmt=args.format, precision=args.save_precision, base_model=args.base_model)
    print(str(out.resolve()))
    return 0


def cmd_scan(args) -> int:
    from .data.scan import scan_dataset

    report = scan_dataset(args.folder)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report.summary())
    return 0 if report.items else 1


def cmd_demo_data(args) -> int:
    from .data.demo import make_demo_dataset
    from .outputs import check_output_dir

    check_output_dir(args.folder, what="demo-data folder")

    print(str(Path(make_demo_dataset(args.folder, which=args.which)).resolve()))
    return 0


def cmd_caption(args) -> int:
    from .captioning.cli import cmd_caption as caption

    return caption(args)


def cmd_import_kohya(args) -> int:
    from .config.train_config import save_preset
    from .config.kohya_import import import_kohya_json
    from .outputs import check_output_file

    check_output_file(args.out, what="--out")
    result = import_kohya_json(args.file)
    out = save_preset(result.config, args.out, header=result.header())
    for line in result.report_lines():
        print(line, file=sys.stderr)
    print(str(Path(out).resolve()))
    return 0


COMMANDS = {"import-kohya": cmd_import_kohya, "train": cmd_train, "generate": cmd_generate, "verify": cmd_verify, "export": cmd_export, "scan": cmd_scan,
            "demo-data": cmd_demo_data, "caption": cmd_caption}


def _tool_commands() -> dict:
    from .tools.cli import COMMANDS as TOOL_COMMANDS

    return TOOL_COMMANDS


COMMANDS.update(_tool_commands())


def _context(args) -> str:
    """What the command was doing, naming its file or folder: the start of an error sentence."""
    from .safetext import shown
    from .tools.cli import context as tool_context

    if tool_context(args) is not None:
        return shown(tool_context(args))
    if args.command == "train":
        where = f" into '{args.output_dir}'" if getattr(args, "output_dir", None) else ""
        preset = f" with preset '{args.config}'" if getattr(args, "config", None) else ""
        return shown(f"Training{preset}{where}")
    if args.command == "generate":
        loras = ", ".join(f"'{a}'" for a in args.lora) or "no LoRA"
        return shown(f"generate ({loras} on '{args.base_model}', to '{args.out}')")
    if args.command == "verify":
        return shown(f"verify '{args.file}'")
    if args.command == "export":
        return shown(f"export '{args.source}' to '{args.out}'")
    if args.command == "import-kohya":
        return shown(f"import-kohya '{args.file}'")
    if args.command in ("scan", "demo-data", "caption"):
        return shown(f"{args.command} '{args.folder}'")
    return args.command


def main(argv: list[str] | None = None) -> int:
    """The CLI's error boundary: whatever goes wrong ends as one sentence on stderr (exit 2 for a problem with the input,
    1 for anything else, whose traceback goes to a log file named in the sentence)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from .safetext import make_streams_safe

    make_streams_safe(sys.stdout, sys.stderr)  # names and captions that are not UTF-8 must never end a command
    args = build_parser().parse_args(argv)
    from .errorlog import describe
    from .errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: one sentence, the traceback in a log file
        user = isinstance(exc, USER_ERRORS)
        out_dir = getattr(args, "output_dir", None) if args.command == "train" else None
        print(f"error: {describe(exc, context=_context(args), out_dir=out_dir)}", file=sys.stderr)
        return 2 if user else 1
