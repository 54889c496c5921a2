"""The LoRA tools people reach for after training: merge into a checkpoint, resize, combine, extract.

  common.py   reading/checking inputs, ΔW as factors or dense, SVD with kohya's rank rules, writing with metadata
  merge.py    LoRAs baked into a single-file checkpoint (original layout)
  resize.py   lower rank by SVD, fixed or dynamic (sv_ratio, sv_fro, sv_cumulative)
  combine.py  several LoRAs with weights into one (exact concatenation, or SVD to a rank)
  extract.py  a LoRA from a fine-tuned model minus its base

Each returns a ToolResult (the path, per-module ranks and kept energy) and takes a `progress(done, total, what)`
callback; failures a user can fix raise ToolError (a UserError) naming the file.
"""

from .combine import combine_loras
from .common import METHODS, ModuleReport, ToolError, ToolResult
from .extract import extract_lora
from .merge import merge_loras
from .resize import resize_lora

__all__ = ["METHODS", "ModuleReport", "ToolError", "ToolResult", "combine_loras", "extract_lora", "merge_loras",
           "resize_lora"]
