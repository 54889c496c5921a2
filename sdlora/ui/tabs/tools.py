"""Tools tab: resize, combine, merge into a checkpoint, extract from a fine-tune. The work is the tools service's
(services/tools.py); results land in OUTPUT/tools/ and can be downloaded."""

from __future__ import annotations

import gradio as gr

from ...tools import METHODS
from ..common import guard
from ..services.inputs import parse_lora_lines

PRECISIONS = [("same as the input", ""), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32")]
# The labels of sdlora.tools.METHODS, in its order.
METHOD_CHOICES = [("fixed rank", "rank"), ("sv_ratio: largest/smallest kept ≤ value", "sv_ratio"),
                  ("sv_fro: keep this fraction of the Frobenius norm", "sv_fro"),
                  ("sv_cumulative: keep this fraction of the singular-value sum", "sv_cumulative")]


def _param(method: str, value):
    return None if method == "rank" or value in (None, "") else float(value)


def _bar(progress):
    def report(done: int, total: int, what: str) -> None:
        progress((done, max(total, 1)), desc=what, unit="modules")

    return report


def _result(result):
    return str(result.path), result.summary(per_module=True)


def build(services, ctx: dict, defaults: dict) -> None:
    gr.Markdown("LoRA tools. Results are written to `OUTPUT/tools/NAME.safetensors`. The base model is the one on the "
                "**Model & LoRA** tab.")
    base = ctx["fields"]["base_model"]
    loras = services.loras.list_loras()
    with gr.Tabs():
        with gr.Tab("Resize", elem_id="tools-resize-tab"):
            with gr.Row():
                r_source = gr.Dropdown(loras, value="", label="LoRA to resize", allow_custom_value=True, scale=4,
                                       elem_id="tools-resize-source")
                r_name = gr.Textbox("", label="Output name (empty = NAME_resized)", scale=2, elem_id="tools-resize-name")
            with gr.Row():
                r_rank = gr.Number(8, label="Rank (the cap for a dynamic method)", precision=0, elem_id="tools-resize-rank")
                r_conv = gr.Number(0, label="3x3 conv rank (0 = same)", precision=0, elem_id="tools-resize-conv")
                r_method = gr.Dropdown(METHOD_CHOICES, value="rank", label="Method", elem_id="tools-resize-method")
                r_param = gr.Number(0.9, label="Method value", elem_id="tools-resize-param")
                r_prec = gr.Radio(PRECISIONS, value="", label="Precision", elem_id="tools-resize-precision")
            r_btn = gr.Button("Resize", variant="primary", elem_id="tools-resize-btn")
        with gr.Tab("Combine", elem_id="tools-combine-tab"):
            c_sources = gr.Textbox("", label="LoRAs: one `path:weight` per line", lines=3, elem_id="tools-combine-sources",
                                   placeholder="/path/to/style.safetensors:0.6")
            with gr.Row():
                c_mode = gr.Radio([("exact (ranks add up)", "concat"), ("SVD to a rank", "svd")], value="concat",
                                  label="Mode", elem_id="tools-combine-mode")
                c_rank = gr.Number(16, label="Rank (SVD mode)", precision=0, elem_id="tools-combine-rank")
                c_prec = gr.Radio(PRECISIONS, value="", label="Precision", elem_id="tools-combine-precision")
                c_name = gr.Textbox("combined", label="Output name", elem_id="tools-combine-name")
            c_btn = gr.Button("Combine", variant="primary", elem_id="tools-combine-btn")
        with gr.Tab("Merge into checkpoint", elem_id="tools-merge-tab"):
            m_loras = gr.Textbox("", label="LoRAs to bake in: one `path:strength` per line", lines=3,
                                 elem_id="tools-merge-loras")
            with gr.Row():
                m_prec = gr.Radio(PRECISIONS[1:], value="fp16", label="Precision", elem_id="tools-merge-precision")
                m_name = gr.Textbox("merged", label="Checkpoint name", elem_id="tools-merge-name")
            m_btn = gr.Button("Merge and write checkpoint", variant="primary", elem_id="tools-merge-btn")
        with gr.Tab("Extract", elem_id="tools-extract-tab"):
            e_tuned = gr.Textbox("", label="Fine-tuned model (a checkpoint under --model-root); the base model is the "
                                           "Model tab's", elem_id="tools-extract-tuned")
            with gr.Row():
                e_rank = gr.Number(32, label="Rank", precision=0, elem_id="tools-extract-rank")
                e_conv = gr.Number(0, label="3x3 conv rank (0 = none)", precision=0, elem_id="tools-extract-conv")
                e_method = gr.Dropdown(METHOD_CHOICES, value="rank", label="Method", elem_id="tools-extract-method")
                e_param = gr.Number(0.9, label="Method value", elem_id="tools-extract-param")
                e_te = gr.Checkbox(True, label="Text encoders too", elem_id="tools-extract-te")
                e_name = gr.Textbox("extracted", label="Output name", elem_id="tools-extract-name")
            e_btn = gr.Button("Extract", variant="primary", elem_id="tools-extract-btn")
    with gr.Row():
        file = gr.File(label="Download", interactive=False, elem_id="tools-file", scale=2)
        report = gr.Textbox(label="Report: ranks and kept energy per module", lines=8, interactive=False,
                            elem_id="tools-report", scale=3)

    @guard
    def resize(base_model: str, source: str, rank: int, conv_rank: int, method: str, param: float, precision: str,
               name: str, progress=gr.Progress()):
        """Resize a LoRA by SVD: fixed `rank`, or method sv_ratio/sv_fro/sv_cumulative with `param` (rank = cap).
        base_model is used only for LoHa/LoKr files. Returns the file and the per-module report."""
        return _result(services.tools.resize(source, rank=int(rank or 0), conv_rank=int(conv_rank or 0), method=method,
                                           param=_param(method, param), precision=precision or "", name=name,
                                           base_spec=base_model, progress=_bar(progress)))

    @guard
    def combine(base_model: str, sources: str, mode: str, rank: int, precision: str, name: str, progress=gr.Progress()):
        """Combine LoRAs (`path:weight` lines) exactly (mode concat) or by SVD to `rank` (mode svd)."""
        return _result(services.tools.combine(parse_lora_lines(sources), mode=mode, rank=int(rank or 0),
                                            precision=precision or "", name=name, base_spec=base_model,
                                            progress=_bar(progress)))

    @guard
    def merge(base_model: str, loras: str, precision: str, name: str, progress=gr.Progress()):
        """Bake LoRAs (`path:strength` lines) into the base model; writes a single-file checkpoint."""
        return _result(services.tools.merge(base_model, parse_lora_lines(loras), precision=precision, name=name,
                                          progress=_bar(progress)))

    @guard
    def extract(base_model: str, tuned: str, rank: int, conv_rank: int, method: str, param: float, text_encoders: bool,
                name: str, progress=gr.Progress()):
        """A LoRA from `tuned` minus the base model (SVD per module, fixed rank or a dynamic method)."""
        return _result(services.tools.extract(tuned, base_model, rank=int(rank or 0), conv_rank=int(conv_rank or 0),
                                            method=method, param=_param(method, param), text_encoders=bool(text_encoders),
                                            name=name, progress=_bar(progress)))

    outs = [file, report]
    model_queue = {"concurrency_id": "model", "concurrency_limit": 1}
    r_btn.click(resize, [base, r_source, r_rank, r_conv, r_method, r_param, r_prec, r_name], outs, api_name="tool_resize",
                **model_queue)
    c_btn.click(combine, [base, c_sources, c_mode, c_rank, c_prec, c_name], outs, api_name="tool_combine", **model_queue)
    m_btn.click(merge, [base, m_loras, m_prec, m_name], outs, api_name="tool_merge", **model_queue)
    e_btn.click(extract, [base, e_tuned, e_rank, e_conv, e_method, e_param, e_te, e_name], outs, api_name="tool_extract",
                **model_queue)
    ctx["tools_source"] = r_source
