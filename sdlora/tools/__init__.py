"""The LoRA tools people reach for after training: merge into a checkpoint, resize, combine, extract.

  common.py   reading/checking inputs, ΔW as factors or dense, SVD with kohya's rank rules, writing with metadata
  merge.py    LoRAs baked into a single-file checkpoint (original layout)
  resize.py   lower rank by SVD, fixed or dynamic (sv_ratio, sv_fro, sv_cumulative)
  combine.py  several LoRAs with weights into one (exact concatenation, or SVD to a rank)
  extract.py  a LoRA from a fine-tuned model minus its base

Each returns a ToolResult (the path, per-module ranks and kept energy) and takes a `progress(done, total, what)`
callback; failures a user can fix raise ToolError (a UserError) naming the file.
"""

# How resize/combine/extract choose a rank (kohya's names); here so the CLI reads it without importing torch.
METHODS = ("rank", "sv_ratio", "sv_fro", "sv_cumulative")
_EXPORTS = {"combine_loras": "combine", "extract_lora": "extract", "merge_loras": "merge", "resize_lora": "resize",
            "ModuleReport": "common", "ToolError": "common", "ToolResult": "common"}


def __getattr__(name: str):
    # Imported on first use: `python -m sdlora --help` and the tool parsers need no torch.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["METHODS", "ModuleReport", "ToolError", "ToolResult", "combine_loras", "extract_lora", "merge_loras",
           "resize_lora"]
