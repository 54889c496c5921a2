"""Automatic captions for a dataset folder: WD14-style ONNX taggers and transformers caption models (BLIP, GIT, BLIP-2), read
from local folders only.

    options.py           what a run is asked to do (CaptionOptions, TagOptions, TextOptions), checked on creation
    locate.py            which folder a model spec names: a folder, kohya's OWNER_NAME layout, the local hub cache
    images.py            opening images and the taggers' preprocessing
    wd14.py              the tag list (selected_tags.csv), the ONNX session, choosing tags from probabilities
    vision_captioner.py  caption models through transformers
    writer.py            modes (skip, overwrite, append, prepend), atomic writes, the backup and undo of the last run
    run.py               the orchestration: scan, batch, caption, write, yielding typed progress events
    cli.py               `python -m sdlora caption`

Nothing here imports Gradio; the web UI drives run.py from sdlora/ui/services/autocaption.py.
"""

from .options import CaptionOptions, CaptioningError, TagOptions, TextOptions

__all__ = ["CaptionOptions", "CaptioningError", "TagOptions", "TextOptions"]
