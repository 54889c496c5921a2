"""What a LoRA adapts: target groups and shorthands (`targets.py`, the only copy; config, injection and the UI use
it). Pure Python, so reading a config never imports torch."""
