"""LoRA file layouts: kohya/A1111 names both ways (diffusers/PEFT layouts are diffusers' own)."""
