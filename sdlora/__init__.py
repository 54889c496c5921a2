"""sdlora: a Stable Diffusion LoRA trainer driven from the browser, the CLI or Python."""

__version__ = "0.1.0"
