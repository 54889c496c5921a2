"""sdlora: a Stable Diffusion LoRA trainer driven from the browser, the CLI or Python."""

__version__ = "0.1.0"

import logging as _logging

# peft imports bitsandbytes (when installed) at start-up, and its CPU backend warns about optional 4-bit kernels
# that sdlora never uses; keep its real errors.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
