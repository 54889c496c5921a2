"""Preview images: kohya-style prompt lines, fixed seeds, strength grids."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..config.train_config import ConfigError
from ..fileio import atomic_path


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float = 7.0
    steps: int | None = None

    def __post_init__(self):
        import math

        from ..config.train_config import MAX_SEED

        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{name} {value}: image sizes must be multiples of 8 (e.g. 512), or unset for the model's size.")
            if value is not None and value > MAX_SAMPLE_SIDE:
                raise ConfigError(f"{name} {value}: at most {MAX_SAMPLE_SIDE} pixels.")
        if self.steps is not None and not 1 <= self.steps <= MAX_SAMPLE_STEPS:
            raise ConfigError(f"steps {self.steps}: sampling takes 1 to {MAX_SAMPLE_STEPS} steps.")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed {self.seed}: seeds are whole numbers from 0 to {MAX_SEED}.")
        if not math.isfinite(self.cfg) or abs(self.cfg) > 1000:
            raise ConfigError(f"CFG scale {self.cfg}: give a number such as 7 (at most 1000).")


MAX_SAMPLE_SIDE = 4096
MAX_SAMPLE_STEPS = 1000
_OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "cfg", "s": "steps"}


def parse_prompt_line(line: str) -> SamplePrompt:
    """`a cat --n blurry --w 512 --h 512 --d 1 --l 7.5 --s 28` (kohya's sample prompt syntax)."""
    parts = line.split(" --")
    sample = SamplePrompt(prompt=parts[0].strip())
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        field = _OPTIONS.get(key)
        if field is None:
            raise ConfigError(f"Sample prompt '{line}': unknown option '--{key}' (use --n --w --h --d --l --s).")
        try:
            if field in ("width", "height", "seed", "steps"):
                parsed = int(value)
            elif field == "cfg":
                parsed = float(value)
            else:
                parsed = value
        except ValueError:
            raise ConfigError(f"Sample prompt '{line}': --{key} needs a number, got '{value}'.") from None
        if field in ("width", "height") and (parsed < 8 or parsed % 8):
            raise ConfigError(f"Sample prompt '{line}': --{key} must be a multiple of 8.")
        try:  # range checks (seed, size, steps, CFG) live in SamplePrompt; name the line they came from
            sample = replace(sample, **{field: parsed})
        except ConfigError as exc:
            raise ConfigError(f"Sample prompt '{line}': --{key} {exc}") from None
    return sample


def sample_filename(step: int, index: int) -> str:
    return f"step{step:06d}_{index:02d}.png"


@torch.no_grad()
def generate(pipe, sample: SamplePrompt, *, default_size: int, default_steps: int = 20, default_seed: int = 0,
             device: str | torch.device = "cpu", prompt_embeds: dict | None = None, clip_skip: int = 1,
             family=None) -> Image.Image:
    """One image. `prompt_embeds`: the pipeline's embedding arguments for the already-encoded prompt and negative
    (the family's prompt_embeds_kwargs), replacing the text encoders when given. `clip_skip` > 1 (kohya's numbering,
    with the model's `family`): the prompts are encoded by the family as training encodes captions."""
    seed = sample.seed if sample.seed is not None else default_seed
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if prompt_embeds is None and clip_skip > 1:
        prompt_embeds = encode_prompts(pipe, family, sample, clip_skip)
    if prompt_embeds is None:
        text = dict(prompt=sample.prompt, negative_prompt=sample.negative or None)
    else:
        text = dict(prompt_embeds)
    latents = pipe(
        **text,
        width=sample.width or default_size,
        height=sample.height or default_size,
        num_inference_steps=sample.steps or default_steps,
        guidance_scale=sample.cfg,
        generator=generator,
        output_type="latent",
    ).images
    return decode_latents(pipe, latents)[0]


def encode_prompts(pipe, family, sample: SamplePrompt, clip_skip: int) -> dict:
    """The pipeline's embedding arguments for `sample`'s prompt and negative, encoded through the family's own
    encode (the conditioning training used) with its pipeline's text encoders and tokenizers."""
    if family is None:
        raise ValueError("clip_skip > 1 needs the model's family to encode the prompts")
    problem = family.clip_skip_problem(clip_skip, [getattr(pipe, n) for n in family.text_encoder_names])
    if problem:
        raise ConfigError(problem)
    encoders = [getattr(pipe, n) for n in family.text_encoder_names]
    tokenizers = [getattr(pipe, n) for n in family.tokenizer_names]
    device = encoders[0].device

    def encode(text: str):
        return family.encode(encoders, tokenizers, [text], device, clip_skip)

    return family.prompt_embeds_kwargs(encode(sample.prompt), encode(sample.negative))


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Decode in the VAE's own precision even inside a training run's fp16/bf16 autocast: an SD VAE decoding in
    fp16 can overflow into black (NaN) images, which is why sdlora keeps the VAE in fp32."""
    vae = pipe.vae
    with torch.autocast(latents.device.type, enabled=False):
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * images.shape[0])


def label_image(img: Image.Image, text: str) -> Image.Image:
    """Image with a caption strip under it (for grids)."""
    strip = 14
    out = Image.new("RGB", (img.width, img.height + strip), "white")
    out.paste(img, (0, 0))
    ImageDraw.Draw(out).text((2, img.height + 1), text, fill="black")
    return out


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    if not images:
        raise ValueError("no images to put in a grid")
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (w * columns, h * rows), "white")
    for n, img in enumerate(images):
        grid.paste(img, ((n % columns) * w, (n // columns) * h))
    return grid


def save_png_atomic(img: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
