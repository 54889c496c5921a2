"""Export tab: pick format, precision and name; write, verify and download."""

from __future__ import annotations

import gradio as gr

from .common import guard


def build(service, ctx: dict) -> None:
    with gr.Row():
        source = gr.Dropdown(service.list_loras(), label="LoRA to export", allow_custom_value=True, scale=4, elem_id="export-source")
        refresh = gr.Button("↻", scale=0)
    with gr.Row():
        fmt = gr.Radio([("kohya (AUTOMATIC1111 / Forge / ComfyUI)", "kohya"), ("diffusers", "diffusers")], value="kohya",
                       label="Format", elem_id="export-format")
        precision = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="Precision", elem_id="export-precision")
        name = gr.Textbox(label="Output name", value="my_lora", elem_id="export-name")
    export = gr.Button("Export and verify", variant="primary", elem_id="export-btn")
    file = gr.File(label="Download", elem_id="export-file")
    report = gr.Textbox(label="Verify report", lines=8, interactive=False, elem_id="export-report")

    @guard
    def do_export(spec, src, f, p, n):
        if not src:
            last = service.status().get("lora_path")
            if not last:
                raise gr.Error("Nothing to export yet: train a LoRA or pick a file.")
            src = last
        path, text, ok = service.export(src, fmt=f, precision=p, name=n, base_spec=spec)
        return str(path), text

    export.click(do_export, [ctx["fields"]["base_model"], source, fmt, precision, name], [file, report], api_name="export")
    refresh.click(lambda: gr.update(choices=service.list_loras()), None, source)
    ctx["export_source"] = source
