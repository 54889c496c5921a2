"""Try tab: generate with one or several LoRAs at chosen strengths, and strength grids."""

from __future__ import annotations

import gradio as gr

from .common import guard
from .service import parse_lora_lines


def build(service, ctx: dict) -> None:
    with gr.Row():
        lora = gr.Dropdown(service.list_loras(), label="LoRA", allow_custom_value=True, scale=4, elem_id="try-lora")
        refresh = gr.Button("↻", scale=0, elem_id="try-refresh")
        strength = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Strength", elem_id="try-strength")
    extra = gr.Textbox(label="More LoRAs (one `path:strength` per line)", lines=2, elem_id="try-extra")
    prompt = gr.Textbox(label="Prompt", value="sdlora_mascot, a red circle", lines=2, elem_id="try-prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id="try-negative")
    with gr.Row():
        seed = gr.Number(label="Seed", value=1, precision=0, elem_id="try-seed")
        steps = gr.Number(label="Steps", value=10, precision=0, minimum=1, elem_id="try-steps")
        cfg = gr.Number(label="CFG", value=7.0, elem_id="try-cfg")
        width = gr.Number(label="Width (0 = model default)", value=0, precision=0, elem_id="try-width")
        height = gr.Number(label="Height (0 = model default)", value=0, precision=0, elem_id="try-height")
    generate = gr.Button("Generate", variant="primary", elem_id="try-generate")
    image = gr.Image(label="Result", type="pil", format="png", elem_id="try-image", height=320)
    with gr.Accordion("Strength grid", open=True):
        strengths = gr.Textbox(label="Strengths", value="0, 0.25, 0.5, 0.75, 1.0", elem_id="grid-strengths")
        grid_prompts = gr.Textbox(label="Prompts for the grid (one per line; empty = the prompt above)", lines=2)
        grid_btn = gr.Button("Render grid", elem_id="grid-btn")
        grid = gr.Image(label="Strength grid (same seed per row)", type="pil", format="png", elem_id="grid-image")

    base = ctx["fields"]["base_model"]

    def _loras(lora_path, strength_value, extra_text):
        loras = [(lora_path, float(strength_value))] if lora_path else []
        return loras + parse_lora_lines(extra_text)

    @guard
    def do_generate(spec, lora_path, strength_value, extra_text, p, n, s, st, c, w, h):
        return service.generate(spec, _loras(lora_path, strength_value, extra_text), p, negative=n, seed=int(s), steps=int(st),
                                cfg=float(c), width=int(w or 0), height=int(h or 0))

    @guard
    def do_grid(spec, lora_path, extra_text, p, n, s, st, c, w, h, strengths_text, prompts_text):
        try:
            values = [float(x) for x in strengths_text.replace(";", ",").split(",") if x.strip()]
        except ValueError:
            raise gr.Error("Strengths must be numbers separated by commas, e.g. 0, 0.5, 1.") from None
        if not values:
            raise gr.Error("Give at least one strength.")
        loras = _loras(lora_path, 1.0, extra_text)
        if not loras:
            raise gr.Error("Pick a LoRA first.")
        prompts = [l.strip() for l in (prompts_text or "").splitlines() if l.strip()] or [p]
        return service.generate(spec, loras, p, negative=n, seed=int(s), steps=int(st), cfg=float(c), width=int(w or 0),
                                height=int(h or 0), grid_strengths=values, prompts=prompts)

    common = [prompt, negative, seed, steps, cfg, width, height]
    generate.click(do_generate, [base, lora, strength, extra] + common, image, api_name="generate")
    grid_btn.click(do_grid, [base, lora, extra] + common + [strengths, grid_prompts], grid, api_name="strength_grid")
    refresh.click(lambda: gr.update(choices=service.list_loras()), None, lora)
    ctx["try_lora"] = lora
