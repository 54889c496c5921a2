"""Dataset tab: folder or upload, scan report, gallery with editable captions, bulk caption edits."""

from __future__ import annotations

import gradio as gr

from .common import guard
from .uploads import import_uploads


def build(service, ctx: dict) -> None:
    with gr.Row():
        folder = gr.Textbox(label="Dataset folder", value="builtin:demo", scale=4, elem_id="data-folder",
                            info="A folder of images with same-named .txt captions (kohya 'N_name' subfolders set repeats), or builtin:demo")
        scan_btn = gr.Button("Scan", variant="primary", scale=1, elem_id="scan-btn")
    upload = gr.File(label="…or upload images / a .zip", file_count="multiple", file_types=["image", ".zip", ".txt"], elem_id="upload")
    report = gr.Textbox(label="Scan report", lines=6, interactive=False, elem_id="scan-report")
    with gr.Row():
        gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=320, elem_id="data-gallery",
                             allow_preview=False)
        with gr.Column():
            selected = gr.Textbox(label="Selected image", interactive=False, elem_id="caption-path")
            caption = gr.Textbox(label="Caption", lines=3, elem_id="caption-edit")
            save_btn = gr.Button("Save caption", elem_id="caption-save")
            caption_msg = gr.Markdown(elem_id="caption-msg")
    with gr.Accordion("Edit all captions", open=False):
        with gr.Row():
            find = gr.Textbox(label="Find")
            replace = gr.Textbox(label="Replace with")
            prepend = gr.Textbox(label="Prepend")
            append = gr.Textbox(label="Append")
        bulk_btn = gr.Button("Apply to all captions", elem_id="bulk-btn")
    items_state = gr.State([])

    @guard
    def do_scan(path):
        rep = service.scan(path, check_images=True)
        items = [(str(i.path), i.caption) for i in rep.items]
        return rep.summary(), [(p, c or "(no caption)") for p, c in items], items

    @guard
    def do_upload(files):
        dest = import_uploads([f if isinstance(f, str) else f.name for f in (files or [])], service.uploads_dir())
        return str(dest)

    def do_select(items, evt: gr.SelectData):
        if not items or evt.index is None or evt.index >= len(items):
            return "", ""
        path, cap = items[evt.index]
        return path, cap

    @guard
    def do_save(path, image, text, items):
        if not image:
            raise gr.Error("Select an image in the gallery first.")
        written = service.save_caption(path, image, text)
        items = [(p, text if p == image else c) for p, c in items]
        return f"Saved `{written.name}`.", [(p, c or "(no caption)") for p, c in items], items

    @guard
    def do_bulk(path, f, r, p, a):
        n = service.bulk_edit(path, find=f, replace=r, prepend=p, append=a)
        gr.Info(f"{n} caption file(s) changed.")
        return do_scan(path)

    scan_btn.click(do_scan, folder, [report, gallery, items_state])
    folder.submit(do_scan, folder, [report, gallery, items_state])
    upload.upload(do_upload, upload, folder).then(do_scan, folder, [report, gallery, items_state])
    gallery.select(do_select, items_state, [selected, caption])
    save_btn.click(do_save, [folder, selected, caption, items_state], [caption_msg, gallery, items_state])
    bulk_btn.click(do_bulk, [folder, find, replace, prepend, append], [report, gallery, items_state])
    ctx["data_dir"] = folder
