"""The Dataset tab's "Caption automatically" panel: a tagger or caption model, its settings, Start / Stop / Undo, a
polled progress bar, and afterwards the tag frequencies (and a dry run's changes). The work is done by
services.autocaption; this module only lays out widgets and wires them."""

from __future__ import annotations

import logging

import gradio as gr

from ...captioning.options import EXTENSIONS
from ..common import guard
from ..services.autocaption import progress_text

log = logging.getLogger("sdlora.ui")
MODE_CHOICES = [("skip images that have a caption", "skip"), ("overwrite", "overwrite"),
                ("append to the caption", "append"), ("prepend to the caption", "prepend")]
KEYS = ["kind", "model", "mode", "extension", "batch_size", "dry_run", "threshold", "character_threshold",
        "include_ratings", "keep_underscores", "max_tags", "undesired_tags", "tag_replacement", "max_length",
        "num_beams", "sample", "prefix", "suffix"]


def build(services, folder, trigger, rescan, rescan_outputs: list) -> None:
    """`folder` / `trigger`: the tab's dataset folder and trigger word boxes; `rescan(folder)` gives rescan_outputs'
    values, so the gallery shows the new captions when a run ends."""
    roots = ", ".join(f"`{p}`" for p in services.access.model_roots)
    where = (f"Model folders must lie under {roots}" if roots else
             "This server loads models from no folder: restart it with `--model-root DIR`")
    with gr.Accordion("Caption automatically", open=False, elem_id="autocaption"):
        gr.Markdown("A **WD14 tagger** folder holds `model.onnx` and `selected_tags.csv` (kohya keeps them as "
                    "`MODEL_DIR/SmilingWolf_wd-v1-4-moat-tagger-v2/`; a hub id is found there or in the local Hugging "
                    "Face cache). A **caption model** folder is a BLIP, GIT or BLIP-2 download (`config.json`, weights, processor). "
                    f"{where}. Replaced captions are backed up in the dataset's `.sdlora-caption-backup/`: "
                    "**Undo** puts them back.")
        w = {}
        with gr.Row():
            w["kind"] = gr.Radio([("WD14 tagger (ONNX)", "wd14"), ("Caption model (BLIP / GIT / BLIP-2)", "captioner")],
                                 value="wd14", label="Model type", elem_id="autocap-kind", scale=2)
            w["model"] = gr.Textbox(label="Model folder or downloaded hub id", elem_id="autocap-model", scale=4,
                                    placeholder="/models/SmilingWolf_wd-v1-4-moat-tagger-v2 or owner/name")
        with gr.Row():
            w["mode"] = gr.Radio(MODE_CHOICES, value="skip", label="Images that already have a caption", elem_id="autocap-mode",
                                 scale=4)
            w["extension"] = gr.Dropdown(list(EXTENSIONS), value=".txt", label="Caption files", elem_id="autocap-ext", scale=1)
            w["batch_size"] = gr.Number(8, precision=0, minimum=1, label="Batch size", elem_id="autocap-batch", scale=1)
            w["dry_run"] = gr.Checkbox(False, label="Dry run (show, write nothing)", elem_id="autocap-dry", scale=1)
        with gr.Group(visible=True) as tagger_box:
            with gr.Row():
                w["threshold"] = gr.Slider(0, 1, 0.35, step=0.01, label="Threshold (general tags)", elem_id="autocap-threshold")
                w["character_threshold"] = gr.Slider(0, 1, 0.85, step=0.01, label="Character threshold",
                                                     elem_id="autocap-char-threshold")
                w["max_tags"] = gr.Number(0, precision=0, minimum=0, label="Max tags (0: no limit)", elem_id="autocap-max-tags")
            with gr.Row():
                w["include_ratings"] = gr.Checkbox(False, label="Add the rating tag", elem_id="autocap-ratings")
                w["keep_underscores"] = gr.Checkbox(False, label="Keep underscores (long_hair)", elem_id="autocap-underscores")
                w["undesired_tags"] = gr.Textbox(label="Undesired tags (comma-separated)", elem_id="autocap-undesired")
                w["tag_replacement"] = gr.Textbox(label="Replace tags (old,new;old2,new2)", elem_id="autocap-replace")
        with gr.Group(visible=False) as captioner_box:
            with gr.Row():
                w["max_length"] = gr.Number(40, precision=0, minimum=1, label="Max length (tokens)", elem_id="autocap-max-length")
                w["num_beams"] = gr.Number(3, precision=0, minimum=1, label="Beams", elem_id="autocap-beams")
                w["sample"] = gr.Checkbox(False, label="Sample (instead of beam search)", elem_id="autocap-sample")
                w["prefix"] = gr.Textbox(label="Prefix", elem_id="autocap-prefix", placeholder="e.g. photo of ")
                w["suffix"] = gr.Textbox(label="Suffix", elem_id="autocap-suffix")
        with gr.Row():
            start = gr.Button("Caption automatically", variant="primary", elem_id="autocap-start")
            stop = gr.Button("■ Stop", variant="stop", elem_id="autocap-stop")
            undo = gr.Button("Undo the last captioning run", elem_id="autocap-undo")
        progress = gr.Markdown(progress_text(services.autocaption.status()), elem_id="autocap-progress")
        with gr.Row():
            tags = gr.Dataframe(headers=["tag", "images"], label="Tag frequency (the run's captions)", interactive=False,
                                elem_id="autocap-tags")
            changes = gr.Dataframe(headers=["caption file", "now", "would become"], label="Dry run: what would change",
                                   interactive=False, elem_id="autocap-changes", wrap=True)
        timer = gr.Timer(1.0)  # always on (an unchanged poll sends nothing), so a reloaded page finds a run again
        seen = gr.State("")  # what this page last showed: id|state|done|log lines

    inputs = [folder, trigger] + [w[k] for k in KEYS]

    def show_kind(kind):
        return gr.update(visible=kind == "wd14"), gr.update(visible=kind != "wd14")

    def signature(status) -> str:
        return f"{status['id']}|{status['state']}|{status['done']}|{len(status['log'])}"

    def poll(folder_value, last):
        """Progress while a run goes on; when this page saw it end, the rescanned gallery (once)."""
        try:
            status = services.autocaption.status()
        except Exception:  # noqa: BLE001 - polling must never break the page
            log.exception("captioning status poll failed")
            return [gr.skip()] * (3 + len(rescan_outputs)) + [last]
        sig = signature(status)
        if sig == last:
            return [gr.skip()] * (3 + len(rescan_outputs)) + [last]
        head = [progress_text(status), status["tags"] or None, status["changes"] or None]
        was_running = last.split("|")[1:2] == ["running"]
        if status["state"] in ("running", "idle") or not was_running:
            return head + [gr.skip()] * len(rescan_outputs) + [sig]
        try:
            gallery = list(rescan(folder_value))
        except Exception:  # noqa: BLE001 - the run's own summary already says what happened
            gallery = [gr.skip()] * len(rescan_outputs)
        return head + gallery + [sig]

    @guard
    def do_start(folder_value, trigger_value, *values):
        settings = dict(zip(KEYS, values), data_dir=folder_value, trigger_word=trigger_value)
        services.autocaption.start(settings)
        status = services.autocaption.status()
        return progress_text(status), signature(dict(status, state="running"))

    def do_stop():
        if services.autocaption.stop():
            gr.Info("Stopping after the current batch.")

    @guard
    def do_undo(folder_value):
        message = services.autocaption.undo(folder_value)
        gr.Info(message)
        return list(rescan(folder_value))

    w["kind"].change(show_kind, w["kind"], [tagger_box, captioner_box], api_visibility="private", queue=False)
    start.click(do_start, inputs, [progress, seen], api_visibility="private")
    stop.click(do_stop, None, None, api_visibility="private", queue=False)
    undo.click(do_undo, folder, rescan_outputs, api_visibility="private")
    timer.tick(poll, [folder, seen], [progress, tags, changes, *rescan_outputs, seen], show_progress="hidden",
               api_visibility="private")
