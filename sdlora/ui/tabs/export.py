"""Export tab: pick the LoRA (final file or a checkpoint), format, precision and name; write, verify, download."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..common import guard


def build(services, ctx: dict, defaults: dict) -> None:
    with gr.Row(equal_height=True):
        source = gr.Dropdown(services.loras.list_export_sources(), value="", label="LoRA to export (empty = the last job's LoRA)",
                             allow_custom_value=True, scale=5, elem_id="export-source",
                             info="a .safetensors file, or a checkpoint folder OUTPUT/NAME/checkpoints/stepNNNNNN")
        refresh = gr.Button("↻ Refresh list", scale=1, elem_id="export-refresh")
    with gr.Row():
        fmt = gr.Radio([("kohya: AUTOMATIC1111 / Forge / ComfyUI", "kohya"), ("diffusers / PEFT", "diffusers")], value="kohya",
                       label="Format", elem_id="export-format")
        precision = gr.Radio(["fp16", "bf16", "fp32"], value="fp16", label="Precision", elem_id="export-precision")
        name = gr.Textbox(label="Output name (letters, digits, . _ - and spaces)", value=defaults["output_name"],
                          elem_id="export-name")
    export_btn = gr.Button("Export and verify", variant="primary", elem_id="export-btn")
    with gr.Row():
        file = gr.File(label="Download", elem_id="export-file", interactive=False, scale=2)
        report = gr.Textbox(label="Verify report (loads the file back onto the base model)", lines=7, interactive=False,
                            elem_id="export-report", scale=3)

    @guard
    def export(base_model: str, source: str, format: str, precision: str, name: str):
        """Write the LoRA (empty source = the last job's LoRA) as OUTPUT/exports/NAME.safetensors in `format`
        (kohya or diffusers) and `precision` (fp16, bf16, fp32); returns the file and the verify report."""
        if not (source or "").strip():
            snap = services.jobs.status()
            source = snap.get("lora_path") or ""
            if not source:
                raise gr.Error("Nothing to export yet: train a LoRA first, or pick a file or checkpoint.")
        path, text, ok = services.exporter.export(source, fmt=format, precision=precision, name=name, base_spec=base_model)
        if not ok:
            gr.Warning("The exported file did not pass verification: see the report.")
        return str(path), text

    export_btn.click(export, [ctx["fields"]["base_model"], source, fmt, precision, name], [file, report], api_name="export",
                     concurrency_id="model", concurrency_limit=1)
    def name_for(src: str, current: str):
        """The export name follows the chosen source: NAME for OUTPUT/NAME/NAME.safetensors, NAME_stepN for a checkpoint."""
        from ...training.checkpoints import CHECKPOINT_DIR

        p = Path(src or "")
        if not src:
            return current
        if p.parent.name == CHECKPOINT_DIR:
            return f"{p.parent.parent.name}_{p.name}"
        if p.parent.parent.name == CHECKPOINT_DIR:
            return f"{p.parent.parent.parent.name}_{p.parent.name}"
        return p.stem

    source.change(name_for, [source, name], name, api_visibility="private", queue=False)
    refresh.click(lambda current: gr.update(choices=services.loras.list_export_sources(), value=current), source, source,
                  api_visibility="private", queue=False)
    ctx["export_source"] = source
