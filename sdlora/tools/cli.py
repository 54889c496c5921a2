"""`python -m sdlora merge|resize|combine|extract`: the LoRA tools' subcommands (registered by sdlora/cli.py).

Like `train`, each prints progress on stderr and the written file's path as the last line of stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import METHODS

PRECISION_CHOICES = ["fp16", "bf16", "fp32"]


def _weighted(value: str) -> tuple[Path, float]:
    from ..inference.loras import parse_lora_arg

    return parse_lora_arg(value)


def _rank_options(p, *, required: bool, what: str) -> None:
    p.add_argument("--rank", type=int, required=required, help=f"{what} (the cap for a dynamic --method)")
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 convolutions (default: --rank)")
    p.add_argument("--method", choices=METHODS, default="rank",
                   help="rank: keep --rank; sv_ratio/sv_fro/sv_cumulative: kohya's dynamic rules with --param")
    p.add_argument("--param", type=float, help="sv_ratio: largest/smallest kept singular value (e.g. 4); sv_fro, "
                                               "sv_cumulative: the fraction to keep (e.g. 0.9)")


def _common(p, precision_default: str | None) -> None:
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--save-precision", choices=PRECISION_CHOICES, default=precision_default,
                   help="precision of the written weights" + ("" if precision_default else " (default: the input's)"))
    p.add_argument("--verbose", action="store_true", help="one line per module: ranks and kept energy")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout (before the path)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parsers(sub) -> None:
    m = sub.add_parser("merge", help="bake LoRAs into a base model: a single-file checkpoint for A1111/ComfyUI",
                       description="Bake one or more LoRAs (LoRA, LoCon, LoHa, LoKr, DoRA) at given strengths into a "
                                   "base model and write one .safetensors checkpoint in the original layout.")
    m.add_argument("--base-model", required=True, help="builtin:tiny, a diffusers folder or a single-file checkpoint")
    m.add_argument("--lora", action="append", required=True, type=_weighted, metavar="FILE[:STRENGTH]",
                   help="repeatable; applied in the order given")
    m.add_argument("--allow-pickle", action="store_true", help="load a .ckpt base model that holds pickled objects")
    _common(m, "fp16")

    r = sub.add_parser("resize", help="lower a LoRA's rank by SVD (fixed, or kohya's sv_ratio/sv_fro/sv_cumulative)")
    r.add_argument("file", help="the LoRA to resize")
    _rank_options(r, required=True, what="new rank of linear and 1x1 modules")
    r.add_argument("--base-model", help="needed for LoHa/LoKr files (their factors do not tell kernel sizes)")
    _common(r, None)

    c = sub.add_parser("combine", help="several LoRAs with weights into one (exact, or SVD to a rank)")
    c.add_argument("files", nargs="+", type=_weighted, metavar="FILE[:WEIGHT]")
    c.add_argument("--mode", choices=["concat", "svd"], default="concat",
                   help="concat: exact, ranks add up; svd: each module cut to --rank")
    _rank_options(c, required=False, what="rank for --mode svd")
    c.add_argument("--base-model", help="needed for LoHa/LoKr files (their factors do not tell kernel sizes)")
    _common(c, None)

    e = sub.add_parser("extract", help="a LoRA from a fine-tuned checkpoint minus its base model")
    e.add_argument("--tuned", required=True, help="the fine-tuned model (file, folder or builtin name)")
    e.add_argument("--base-model", required=True, help="the model it was fine-tuned from")
    _rank_options(e, required=True, what="rank of linear and 1x1 modules")
    e.add_argument("--min-diff", type=float, default=0.0,
                   help="leave out modules whose largest change is at most this (default 0: only unchanged ones)")
    e.add_argument("--unet-only", action="store_true", help="leave the text encoders out")
    e.add_argument("--allow-pickle", action="store_true", help="load .ckpt models that hold pickled objects")
    _common(e, "fp16")


class _Bar:
    """A tqdm bar on stderr over the modules; stdout is kept for the result."""

    def __init__(self, quiet: bool, label: str):
        self.quiet, self.label, self.bar = quiet, label, None

    def __call__(self, done: int, total: int, what: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label, unit="module", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def _finish(args, result) -> int:
    text = result.summary(per_module=args.verbose)
    print(text, file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict()))
    print(str(Path(result.path).resolve()))
    return 0


def _out(args) -> Path:
    from ..outputs import check_output_file

    return check_output_file(args.out, what="--out")


def cmd_merge(args) -> int:
    from ..models import load_base_model
    from .merge import merge_loras

    out = _out(args)
    base = load_base_model(args.base_model, allow_pickle=args.allow_pickle)
    result = merge_loras(base, args.lora, out, precision=args.save_precision, progress=_Bar(args.quiet, "merge"))
    return _finish(args, result)


def _base(args):
    if not getattr(args, "base_model", None):
        return None
    from ..models import load_base_model

    return load_base_model(args.base_model)


def cmd_resize(args) -> int:
    from .resize import resize_lora

    out = _out(args)
    result = resize_lora(args.file, out, rank=args.rank, conv_rank=args.conv_rank, method=args.method, param=args.param,
                         precision=args.save_precision, base_model=_base(args), progress=_Bar(args.quiet, "resize"))
    return _finish(args, result)


def cmd_combine(args) -> int:
    from .combine import combine_loras

    out = _out(args)
    result = combine_loras(args.files, out, mode=args.mode, rank=args.rank, conv_rank=args.conv_rank, method=args.method,
                           param=args.param, precision=args.save_precision, base_model=_base(args),
                           progress=_Bar(args.quiet, "combine"))
    return _finish(args, result)


def cmd_extract(args) -> int:
    from ..models import load_base_model
    from .extract import extract_lora

    out = _out(args)
    tuned = load_base_model(args.tuned, allow_pickle=args.allow_pickle)
    base = load_base_model(args.base_model, allow_pickle=args.allow_pickle)
    result = extract_lora(tuned, base, out, rank=args.rank, conv_rank=args.conv_rank or 0, method=args.method,
                          param=args.param, min_diff=args.min_diff, text_encoders=not args.unet_only,
                          precision=args.save_precision, progress=_Bar(args.quiet, "extract"))
    return _finish(args, result)


COMMANDS = {"merge": cmd_merge, "resize": cmd_resize, "combine": cmd_combine, "extract": cmd_extract}


def context(args) -> str | None:
    """The start of an error sentence for a tool command, naming its inputs and output."""
    if args.command == "merge":
        loras = ", ".join(f"'{p}'" for p, _ in args.lora)
        return f"merge ({loras} into '{args.base_model}', to '{args.out}')"
    if args.command == "resize":
        return f"resize '{args.file}' to '{args.out}'"
    if args.command == "combine":
        return f"combine ({', '.join(repr(str(p)) for p, _ in args.files)} to '{args.out}')"
    if args.command == "extract":
        return f"extract ('{args.tuned}' minus '{args.base_model}', to '{args.out}')"
    return None
