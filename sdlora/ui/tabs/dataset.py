"""Dataset tab: folder or upload, scan report, gallery with editable captions, trigger word, bulk caption edits."""

from __future__ import annotations

import gradio as gr

from ..common import guard, user_message
from ..services.datasets import GALLERY_LIMIT
from ..uploads import import_uploads
from . import autocaption


def _gallery(items: list[dict]) -> list[tuple[str, str]]:
    return [(i["thumb"], (i["caption"] or "(no caption)")[:80]) for i in items[:GALLERY_LIMIT]]


def build(services, ctx: dict, defaults: dict) -> None:
    f = ctx["fields"]
    roots = ", ".join(f"`{p}`" for p in services.access.data_roots)
    where = (f"This server opens folders under {roots}." if roots else
             "This server opens no folders of its own: upload, or restart it with `--data-root DIR`.")
    gr.Markdown("Point sdlora at a folder of images with same-named `.txt` captions (kohya `N_name` subfolders set "
                "repeats), or upload images / a `.zip`. `builtin:demo` is a small generated set for the offline demo. "
                + where)
    with gr.Row(equal_height=True):
        f["data_dir"] = gr.Textbox(label="Dataset folder", value=defaults.get("data_dir") or "builtin:demo", scale=5,
                                   elem_id="data-folder", placeholder="/path/to/images or builtin:demo")
        scan_btn = gr.Button("Scan", variant="primary", scale=1, elem_id="scan-btn")
    with gr.Accordion("…or upload images / a .zip (unpacked into the output folder)", open=False):
        upload = gr.File(label="Images, caption .txt files or a .zip", file_count="multiple",
                         file_types=["image", ".zip", ".txt", ".caption"], elem_id="upload")
    report = gr.Textbox(label="Scan report", lines=4, max_lines=12, interactive=False, elem_id="scan-report")
    with gr.Row():
        gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=340, elem_id="data-gallery",
                             allow_preview=False, object_fit="contain", scale=3)
        with gr.Column(scale=2):
            preview = gr.Image(label="Selected image", type="filepath", height=200, interactive=False, elem_id="caption-image",
                               show_label=False)
            selected = gr.Textbox(label="Selected image", interactive=False, elem_id="caption-path")
            caption = gr.Textbox(label="Caption", lines=3, elem_id="caption-edit", placeholder="select an image first")
            save_btn = gr.Button("Save caption", elem_id="caption-save")
            caption_msg = gr.Markdown(elem_id="caption-msg")
    f["trigger_word"] = gr.Textbox(label="Trigger word (put at the front of every caption while training)",
                                   value=defaults["trigger_word"], elem_id="trigger-word", placeholder="e.g. sks_style")
    with gr.Accordion("Regularization images, or a kohya dataset config (optional)", open=False):
        gr.Markdown("Class (prior-preservation) images in kohya's `N_class` folders are mixed in with the same count as "
                    "the training images; their loss is weighted by *Prior loss weight* (Training tab). A kohya dataset "
                    "TOML (`[[datasets]]` / `[[datasets.subsets]]`) names its own folders: clear the dataset folder "
                    "above to use it. Both must lie in a folder this server may open.")
        f["reg_data_dir"] = gr.Textbox(label="Regularization folder", value=defaults.get("reg_data_dir") or "",
                                       elem_id="reg-data-dir", placeholder="/path/to/reg (e.g. 1_person/ inside)")
        f["dataset_config"] = gr.Textbox(label="kohya dataset config (.toml)", value=defaults.get("dataset_config") or "",
                                         elem_id="dataset-config", placeholder="/path/to/dataset.toml")
    with gr.Accordion("Edit all captions", open=False):
        with gr.Row():
            find = gr.Textbox(label="Find", elem_id="bulk-find")
            replace = gr.Textbox(label="Replace with", elem_id="bulk-replace")
            prepend = gr.Textbox(label="Prepend", elem_id="bulk-prepend")
            append = gr.Textbox(label="Append", elem_id="bulk-append")
        bulk_btn = gr.Button("Apply to all captions", elem_id="bulk-btn")
    items_state = gr.State([])
    auto_panel = gr.Column()  # the "Caption automatically" accordion, filled in below once the gallery's outputs exist

    def scan_outputs(folder: str, check_images: bool = True):
        rep = services.datasets.scan(folder, check_images=check_images)
        items = [{"path": str(i.path), "caption": i.caption, "caption_path": str(i.caption_path) if i.caption_path else "",
                  "thumb": str(services.datasets.thumbnail(i.path)) if n < GALLERY_LIMIT else ""} for n, i in enumerate(rep.items)]
        text = rep.summary()
        if len(items) > GALLERY_LIMIT:
            text += f"\n(the gallery shows the first {GALLERY_LIMIT} images)"
        return text, _gallery(items), items, "", "", "", None

    scan_outs = [report, gallery, items_state, selected, caption, caption_msg, preview]

    @guard
    def do_scan(folder):
        return scan_outputs(folder)

    def do_scan_quiet(folder):
        """On page load: show the dataset if it scans, say why not otherwise (no pop-up)."""
        try:
            return scan_outputs(folder, check_images=False)  # headers only: fast on every page load
        except Exception as exc:  # noqa: BLE001 - shown in the report box
            return f"⚠️ {user_message(exc)}", [], [], "", "", "", None

    @guard
    def do_upload(files):
        paths = [x if isinstance(x, str) else getattr(x, "name", str(x)) for x in (files or [])]
        dest = import_uploads(paths, services.access.uploads_dir)
        gr.Info(f"Unpacked into {dest}.")
        return str(dest)

    def do_select(items, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else (evt.index or [None])[0]
        if not items or not isinstance(index, int) or not 0 <= index < len(items):
            return "", "", "", None
        item = items[index]
        # A preview made under OUTPUT/.thumbs: the dataset folder itself is never handed to the web server.
        return item["path"], item["caption"], "", str(services.datasets.preview(item["path"]))

    @guard
    def do_save(folder, image, text, items):
        if not image:
            raise gr.Error("Select an image in the gallery first.")
        item = next((i for i in items if i["path"] == image), {})
        written = services.captions.save(folder, image, text, item.get("caption_path") or None)
        new_text = (text or "").replace("\x00", "").strip()
        items = [dict(i, caption=new_text, caption_path=str(written)) if i["path"] == image else i for i in items]
        return f"Saved `{written.name}`.", _gallery(items), items

    @guard
    def do_bulk(folder, fnd, rep, pre, app):
        n = services.captions.bulk_edit(folder, find=fnd, replace=rep, prepend=pre, append=app)
        gr.Info(f"{n} caption file(s) changed.")
        return scan_outputs(folder)

    with auto_panel:
        autocaption.build(services, f["data_dir"], f["trigger_word"], scan_outputs, scan_outs)
    scan_btn.click(do_scan, f["data_dir"], scan_outs, api_visibility="private")
    f["data_dir"].submit(do_scan, f["data_dir"], scan_outs, api_visibility="private")
    upload.upload(do_upload, upload, f["data_dir"], api_visibility="private").success(
        do_scan, f["data_dir"], scan_outs, api_visibility="private")
    gallery.select(do_select, items_state, [selected, caption, caption_msg, preview], api_visibility="private")
    save_btn.click(do_save, [f["data_dir"], selected, caption, items_state], [caption_msg, gallery, items_state],
                   api_visibility="private")
    bulk_btn.click(do_bulk, [f["data_dir"], find, replace, prepend, append], scan_outs, api_visibility="private")
    ctx["on_load"].append((do_scan_quiet, f["data_dir"], scan_outs))
