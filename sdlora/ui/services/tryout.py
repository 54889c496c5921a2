"""The Try tab's images: the cached base model with LoRAs at chosen strengths, one image or a strength grid."""

from __future__ import annotations

from ...config.train_config import ConfigError
from .lora_files import LoraFiles
from .model_cache import ModelCache


class TryOut:
    def __init__(self, models: ModelCache, loras: LoraFiles):
        self.models = models
        self.loras = loras

    def generate(self, spec: str, loras: list[tuple[str, float]], prompt: str, *, negative: str = "", seed: int = 0,
                 steps: int = 20, cfg: float = 7.0, width: int | None = None, height: int | None = None,
                 grid_strengths: list[float] | None = None, prompts: list[str] | None = None, clip_skip: int = 1):
        """One image, or a strength grid (one row per prompt, one column per strength) when grid_strengths is given.
        `clip_skip`: the text-encoder layer the LoRA was trained on (kohya's clip_skip)."""
        from ...inference.loras import load_loras, set_strengths, strength_grid, unload_loras
        from ...inference.sampling import SamplePrompt, generate

        if int(steps) < 1 or int(steps) > 200:
            raise ConfigError("Steps: use 1 to 200 sampling steps.")
        for name, value in (("Width", width), ("Height", height)):
            if value and (int(value) < 64 or int(value) % 8 or int(value) > 2048):
                raise ConfigError(f"{name}: use a multiple of 8 between 64 and 2048, or 0 for the model's default.")
        paths = [(self.loras.check_path(p), float(s)) for p, s in loras]

        def sample(text: str) -> SamplePrompt:
            return SamplePrompt(prompt=text, negative=negative or "", width=int(width or 0) or None,
                                height=int(height or 0) or None, seed=int(seed), cfg=float(cfg), steps=int(steps))

        with self.models.lock:
            base, pipe = self.models.pipeline(spec)
            # Fresh adapters every call: files may have been re-trained or re-exported since the last one.
            unload_loras(pipe)
            names = load_loras(pipe, paths)
            if grid_strengths:
                return strength_grid(pipe, names, [sample(p) for p in (prompts or [prompt])], grid_strengths,
                                     default_size=base.default_resolution, default_steps=int(steps), seed=int(seed),
                                     clip_skip=int(clip_skip), family=base.family)
            if names:
                set_strengths(pipe, names, [s for _, s in paths])
            return generate(pipe, sample(prompt), default_size=base.default_resolution, default_steps=int(steps),
                            default_seed=int(seed), clip_skip=int(clip_skip), family=base.family)
