"""`python -m sdlora caption DATA_DIR --wd14 MODEL | --captioner MODEL | --undo`: the parser and the command."""

from __future__ import annotations

import sys

from .options import DEVICES, EXTENSIONS, MODES


def add_parser(sub) -> None:
    c = sub.add_parser("caption", help="caption a dataset with a WD14 tagger or a caption model (BLIP, GIT)",
                       description="Write captions for the images of DATA_DIR with a local WD14 tagger (ONNX) or caption "
                                   "model (transformers). Replaced captions are backed up; --undo restores them.")
    c.add_argument("folder", metavar="DATA_DIR")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--wd14", metavar="MODEL", help="tagger folder (model.onnx + selected_tags.csv), or a hub id found in "
                       "--model-dir or the local hub cache")
    which.add_argument("--captioner", metavar="MODEL", help="caption model folder (BLIP, GIT, BLIP-2), or a downloaded hub id")
    which.add_argument("--undo", action="store_true", help="restore the captions the last run replaced, remove those it created")
    c.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                   help="where hub ids are looked for in kohya's layout, DIR/OWNER_NAME (default: wd14_tagger_model)")
    c.add_argument("--mode", choices=MODES, default="skip", help="images that already have a caption: skip (default), "
                   "overwrite it, append or prepend the new tags")
    c.add_argument("--extension", choices=[e.lstrip(".") for e in EXTENSIONS] + list(EXTENSIONS), default=".txt")
    c.add_argument("--trigger-word", default="",
                   help="a caption that starts with it keeps it first (training adds it in front anyway)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--device", choices=DEVICES, default="auto")
    c.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    t = c.add_argument_group("WD14 tagger")
    t.add_argument("--threshold", type=float, default=0.35, help="general tags (default 0.35)")
    t.add_argument("--character-threshold", type=float, default=0.85, help="character tags (default 0.85)")
    t.add_argument("--include-ratings", action="store_true", help="add the most likely rating tag (off by default)")
    t.add_argument("--undesired-tags", default="", metavar="TAG,TAG", help="tags never written")
    t.add_argument("--tag-replacement", default="", metavar="OLD,NEW;OLD2,NEW2", help="replace tags (\\, and \\; escape)")
    t.add_argument("--keep-underscores", action="store_true", help="write long_hair, not long hair")
    t.add_argument("--max-tags", type=int, default=0, help="at most this many tags per image (0: no limit)")
    m = c.add_argument_group("caption model")
    m.add_argument("--max-length", type=int, default=40, help="new tokens at most (default 40)")
    m.add_argument("--min-length", type=int, default=5)
    m.add_argument("--num-beams", type=int, default=3)
    m.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    m.add_argument("--top-p", type=float, default=0.9)
    m.add_argument("--prefix", default="", help="text before each caption")
    m.add_argument("--suffix", default="", help="text after each caption")
    c.add_argument("--top", type=int, default=20, help="tags listed in the frequency report")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def options_from_args(args):
    from .locate import KOHYA_MODEL_DIR
    from .options import CaptionOptions, TagOptions, TextOptions

    tags = TagOptions(threshold=args.threshold, character_threshold=args.character_threshold,
                      include_ratings=args.include_ratings, undesired=args.undesired_tags,
                      replacements=args.tag_replacement, underscores_to_spaces=not args.keep_underscores,
                      max_tags=args.max_tags)
    text = TextOptions(max_length=args.max_length, min_length=args.min_length, num_beams=args.num_beams,
                       sample=args.sample, top_p=args.top_p, prefix=args.prefix, suffix=args.suffix)
    kind = "wd14" if args.wd14 else "captioner"
    return CaptionOptions(kind=kind, model=args.wd14 or args.captioner, mode=args.mode, extension=args.extension,
                          batch_size=args.batch_size, dry_run=args.dry_run, trigger_word=args.trigger_word,
                          device=args.device, model_dirs=args.model_dir or [KOHYA_MODEL_DIR], tags=tags, text=text)


def cmd_caption(args) -> int:
    """Results (the summary, a dry run's changes) on stdout; the progress bar and warnings on stderr."""
    from pathlib import Path

    from ..data.scan import DatasetError
    from .writer import undo_last_run

    if not Path(args.folder).is_dir():  # the shared scan message names train's --data flag; here DATA_DIR is positional
        raise DatasetError(f"caption: '{args.folder}' is not a folder. Give the dataset folder (the images and their "
                           "caption files) as DATA_DIR.")
    if args.undo:
        print(undo_last_run(args.folder).summary())
        return 0
    from tqdm import tqdm

    from .run import CaptionDone, CaptionImage, CaptionStart, CaptionWarning, caption_dataset

    bar, summary = None, None
    try:
        for event in caption_dataset(args.folder, options_from_args(args)):
            if isinstance(event, CaptionStart) and not args.quiet and event.to_caption:
                bar = tqdm(total=event.to_caption, unit="img", file=sys.stderr, dynamic_ncols=True, desc=event.device)
            elif isinstance(event, CaptionWarning):
                (bar.write if bar else lambda s, file: print(s, file=file))(f"warning: {event.message}", file=sys.stderr)
            elif isinstance(event, CaptionImage):
                if args.dry_run and event.action.startswith("would"):
                    line = f"{event.caption_file}: {event.old!r} -> {event.new!r}"
                    (bar.write(line, file=sys.stdout) if bar else print(line))
            elif isinstance(event, CaptionDone):
                summary = event.summary
            if bar is not None and getattr(event, "done", None) is not None:
                bar.update(event.done - bar.n)
    finally:
        if bar is not None:
            bar.close()
    for line in summary.lines(top=args.top):
        print(line)
    return 0
