"""Try tab: generate with one or several LoRAs at chosen strengths, and strength grids (same seed per row)."""

from __future__ import annotations

import gradio as gr

from ..common import guard
from ..services.inputs import parse_lora_lines, parse_strengths


def build(services, ctx: dict, defaults: dict) -> None:
    with gr.Row(equal_height=True):
        lora = gr.Dropdown(services.loras.list_loras(), value="", label="LoRA (trained here, or type a path)", allow_custom_value=True,
                           scale=5, elem_id="try-lora")
        refresh = gr.Button("↻ Refresh list", scale=1, elem_id="try-refresh")
        strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Strength", scale=3, elem_id="try-strength")
    with gr.Row(equal_height=True):
        add_lora = gr.Dropdown(services.loras.list_loras(), value=None, label="Another LoRA to use at the same time",
                               allow_custom_value=True, scale=5, elem_id="try-add-lora")
        add_strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Its strength", scale=3, elem_id="try-add-strength")
        add_btn = gr.Button("Add to the list below", scale=1, elem_id="try-add")
    more = gr.Textbox("", label="More LoRAs at once: one `path:strength` per line", lines=2, elem_id="try-more",
                      placeholder="/path/to/style.safetensors:0.6")
    sample_lines = defaults.get("sample_prompts_text", "").splitlines()
    first_prompt = sample_lines[0].split(" --")[0].strip() if sample_lines else ""
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value=first_prompt, lines=2, elem_id="try-prompt", scale=3)
        negative = gr.Textbox("", label="Negative prompt", lines=2, elem_id="try-negative", scale=2)
    with gr.Row():
        seed = gr.Number(label="Seed", value=1, precision=0, elem_id="try-seed")
        steps = gr.Number(label="Steps", value=20, precision=0, elem_id="try-steps")
        cfg = gr.Number(label="CFG scale", value=7.0, elem_id="try-cfg")
        width = gr.Number(label="Width (0 = model default)", value=0, precision=0, elem_id="try-width")
        height = gr.Number(label="Height (0 = model default)", value=0, precision=0, elem_id="try-height")
        clip_skip = gr.Number(label="Clip skip (as the LoRA was trained; SD1/SD2)", value=1, precision=0,
                              elem_id="try-clip-skip")
    generate_btn = gr.Button("Generate", variant="primary", elem_id="try-generate")
    image = gr.Image(label="Result", type="pil", format="png", elem_id="try-image", height=320, interactive=False)
    with gr.Accordion("Strength grid: the same seed at several strengths, side by side", open=True):
        with gr.Row():
            strengths = gr.Textbox(label="Strengths", value="0, 0.25, 0.5, 0.75, 1.0", elem_id="grid-strengths", scale=2)
            grid_prompts = gr.Textbox("", label="Prompts, one per row (empty = the prompt above)", lines=2, elem_id="grid-prompts",
                                      scale=3)
        grid_btn = gr.Button("Render strength grid", elem_id="grid-btn")
        grid = gr.Image(label="Strength grid (columns: strengths, rows: prompts)", type="pil", format="png",
                        elem_id="grid-image", interactive=False)

    base = ctx["fields"]["base_model"]

    def lora_list(lora_path, lora_strength, more_text):
        loras = [(lora_path.strip(), float(lora_strength))] if lora_path and lora_path.strip() else []
        return loras + parse_lora_lines(more_text)

    @guard
    def generate(base_model: str, lora: str, strength: float, more_loras: str, prompt: str, negative_prompt: str,
                 seed: int, steps: int, cfg: float, width: int, height: int, clip_skip: int = 1):
        """One image from the base model with the LoRA at `strength` (0 = the base model alone), plus any
        `path:strength` lines in more_loras. width/height 0 = the model's default size."""
        return services.tryout.generate(base_model, lora_list(lora, strength, more_loras), prompt, negative=negative_prompt,
                                seed=int(seed or 0), steps=int(steps or 20), cfg=float(cfg), width=int(width or 0),
                                height=int(height or 0), clip_skip=int(clip_skip or 1))

    @guard
    def strength_grid(base_model: str, lora: str, more_loras: str, prompt: str, negative_prompt: str, seed: int, steps: int,
                      cfg: float, width: int, height: int, strengths: str, prompts: str, clip_skip: int = 1):
        """A grid: one column per strength (all LoRAs scaled together), one row per prompt line, the same seed."""
        values = parse_strengths(strengths)
        loras = lora_list(lora, 1.0, more_loras)
        if not loras:
            raise gr.Error("Pick a LoRA first (or add `path:strength` lines).")
        rows = [line.strip() for line in (prompts or "").splitlines() if line.strip()] or [prompt]
        if len(rows) * len(values) > 48:
            raise gr.Error("That grid has more than 48 images; use fewer prompts or strengths.")
        return services.tryout.generate(base_model, loras, prompt, negative=negative_prompt, seed=int(seed or 0),
                                steps=int(steps or 20), cfg=float(cfg), width=int(width or 0), height=int(height or 0),
                                grid_strengths=values, prompts=rows, clip_skip=int(clip_skip or 1))

    common = [prompt, negative, seed, steps, cfg, width, height]
    generate_btn.click(generate, [base, lora, strength, more] + common + [clip_skip], image, api_name="generate", concurrency_id="model",
                       concurrency_limit=1)
    grid_btn.click(strength_grid, [base, lora, more] + common + [strengths, grid_prompts, clip_skip], grid, api_name="strength_grid",
                   concurrency_id="model", concurrency_limit=1)

    def add_line(path: str, strength: float, text: str) -> str:
        if not (path or "").strip():
            raise gr.Error("Pick the LoRA to add first (or type its path).")
        services.loras.check_path(path)
        lines = [line for line in (text or "").splitlines() if line.strip()]
        return "\n".join(lines + [f"{path.strip()}:{float(strength):g}"])

    add_btn.click(guard(add_line), [add_lora, add_strength, more], more, api_visibility="private", queue=False)
    refresh.click(lambda current, other: (gr.update(choices=services.loras.list_loras(), value=current),
                                          gr.update(choices=services.loras.list_loras(), value=other)),
                  [lora, add_lora], [lora, add_lora], api_visibility="private", queue=False)
    ctx["try_lora"] = lora
    ctx["try_add_lora"] = add_lora
