"""The whole flow in a real browser (Debian Chromium driven by Playwright), with a screenshot per stage.

Screenshots go to test-artifacts/ui/ in the repository (git-ignored); the path is printed at the end.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from conftest import ROOT, subprocess_env
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from toy_helpers import COMBINED_PROMPT, CONCEPT_PROMPT, STRENGTHS, grid_cells, navy_fraction, pink_fraction
from ui_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, make_dataset, require_chromium, running_app

from sdlora.ui.layout import make_service

# Third-party noise: gradio's event statistics use pandas options pandas 3 deprecates; PEFT notes reloaded adapters.
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
              pytest.mark.slow]  # a browser, a web server and real trainings: minutes

TIMEOUT = 120_000  # ms; generous: CI machines are slow and the first model load builds the tiny model
TRAIN_TIMEOUT = 300_000
STEP_DELAY = 0.25  # seconds added to each training step, so the page can be reloaded mid-run
PROMPT = "sks, a white square"


def field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def fill(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")  # commit (blur), like a user moving on


CLOCK = {"start": time.time()}


def shot(page, name: str) -> None:
    print(f"[{time.time() - CLOCK['start']:6.1f}s] {name}", flush=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.keyboard.press("Escape")  # close any open dropdown list first
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def choose(page, elem_id: str, value: str) -> None:
    """Pick `value` from a dropdown, as a user does: open it, type, click the option."""
    box = field(page, elem_id)
    box.click()
    box.fill(value)
    page.locator(f"#{elem_id}").get_by_role("option", name=value, exact=True).click()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def image_src(page, selector: str) -> str | None:
    img = page.locator(selector).locator("img").first
    return img.get_attribute("src") if img.count() else None


def wait_new_image(page, selector: str, before: str | None) -> np.ndarray:
    deadline = time.time() + TIMEOUT / 1000
    while time.time() < deadline:
        src = image_src(page, selector)
        if src and src != before:
            return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
        time.sleep(0.2)
    raise AssertionError(f"no new image appeared in {selector}")


def progress_step(page) -> int:
    m = re.search(r"step (\d+)/", page.locator("#progress").inner_text())
    return int(m.group(1)) if m else -1


def test_full_flow_in_browser(tmp_path):
    require_chromium()
    CLOCK["start"] = time.time()
    data = make_dataset(tmp_path / "dataset")
    out = tmp_path / "outputs"
    with running_app(out, step_delay=STEP_DELAY, extra_args=["--data-root", str(data)]) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(TIMEOUT)
        expect.set_options(timeout=TIMEOUT)
        page.goto(url)
        # fresh page: the offline demo is preselected and its dataset already scanned
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found \d+ images"))
        expect(field(page, "data-folder")).to_have_value("builtin:demo")
        shot(page, "01-opened")
        open_tab(page, "3 · Training")
        fill(page, "length", 7)
        page.click("#preset-load")  # a preset fills every field again
        expect(field(page, "length")).to_have_value("600")
        open_tab(page, "1 · Dataset")

        # Dataset: an uploaded zip is unpacked under the output root and scanned
        archive = tmp_path / "upload.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for name in ("img0.png", "img0.txt", "img1.png", "img1.txt"):
                zf.write(data / name, f"set/{name}")
        page.get_by_text("…or upload images").click()
        page.locator("#upload input[type=file]").set_input_files(str(archive))
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found 2 images .*2 captioned"))
        expect(field(page, "data-folder")).to_have_value(re.compile(re.escape(str(out.resolve() / "uploads")) + r"/upload-"))

        # Dataset: scan our folder, edit one caption, see the file change on disk
        fill(page, "data-folder", data)
        page.click("#scan-btn")
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found 4 images .*4 captioned"))
        expect(page.locator("#data-gallery button.thumbnail-item")).to_have_count(4)
        page.locator("#data-gallery button.thumbnail-item").nth(1).click()
        expect(field(page, "caption-path")).to_have_value(str(data / "img1.png"))
        expect(page.locator("#caption-image img")).to_be_visible()
        expect(field(page, "caption-edit")).to_have_value("a white square, color 1")
        fill(page, "caption-edit", "sks, an edited caption")
        page.click("#caption-save")
        expect(page.locator("#caption-msg")).to_contain_text("Saved img1.txt")
        assert (data / "img1.txt").read_text().strip() == "sks, an edited caption"
        assert (data / "img0.txt").read_text().strip() == "a white square, color 0"
        fill(page, "trigger-word", "sks")
        shot(page, "02-dataset")

        # Model & LoRA: base model, rank/alpha with the live scale, layers with a live parameter count
        open_tab(page, "2 · Model & LoRA")
        base_input = field(page, "base-model")
        base_input.fill("builtin:tiny")
        base_input.press("Enter")
        fill(page, "rank", 4)
        fill(page, "alpha", 2)
        expect(page.locator("#lora-scale")).to_contain_text("alpha/rank = 0.5")
        # the count the library gives for builtin:tiny at rank 4 with the demo preset's layers (every transformer layer,
        # the text encoder too): waiting for that number, not for the events to settle, rules out a stale count
        half = make_service(tmp_path / "count").models.count_parameters("builtin:tiny", ["transformer"], 4, 0, True)[0]
        expect(page.locator("#param-count")).to_contain_text(f"parameters: {half:,} (")
        fill(page, "rank", 8)  # twice the rank, twice the parameters
        expect(page.locator("#param-count")).to_contain_text(f"parameters: {2 * half:,} (")
        fill(page, "rank", 4)
        expect(page.locator("#param-count")).to_contain_text(f"parameters: {half:,} (")
        count = 2 * half
        ff = page.locator("#layers label", has_text="feed-forward")
        had_ff = ff.locator("input").is_checked()  # the demo preset adapts every transformer layer
        ff.click()
        expect(page.locator("#param-count")).to_contain_text(re.compile(rf"parameters: (?!{count // 2:,} )[\d,]+ \("))
        after = int(re.search(r"parameters: ([\d,]+)", page.locator("#param-count").inner_text()).group(1).replace(",", ""))
        assert (after < count // 2) if had_ff else (after > count // 2)
        shot(page, "03-model")

        # Training: a short run; a bad value is reported on the page, then fixed
        open_tab(page, "3 · Training")
        fill(page, "length", 0)
        expect(page.locator("#config-check")).to_contain_text("steps: must be at least 1")
        fill(page, "length", 40)
        fill(page, "batch-size", 1)
        fill(page, "sample-every", 10)
        fill(page, "sample-steps", 2)
        fill(page, "sample-prompts", f"{PROMPT} --d 1")
        fill(page, "output-name", "ui_lora")
        expect(page.locator("#config-check")).to_contain_text("Settings are valid")
        shot(page, "04-training")

        # Run: progress, loss plot, previews; reload mid-run and re-attach to the same job
        open_tab(page, "4 · Run")
        page.click("#start-btn")
        expect(page.locator("#progress")).to_contain_text(re.compile(r"Job 1: (running|done)"))
        expect(page.locator("#previews img").first).to_be_visible(timeout=TRAIN_TIMEOUT)
        expect(page.locator("#previews")).to_contain_text(re.compile(r"step \d+: sks"))
        expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
        expect(page.locator("#log textarea")).to_have_value(re.compile(r"step \d+/40"))
        expect(page.locator("#queue")).to_contain_text("ui_lora")
        shot(page, "05-running")
        step_before = progress_step(page)
        assert 0 < step_before < 40, f"the run ended before the reload could be tested (step {step_before})"
        page.reload()
        open_tab(page, "4 · Run")
        expect(page.locator("#progress")).to_contain_text("Job 1")
        deadline = time.time() + TRAIN_TIMEOUT / 1000
        while progress_step(page) <= step_before and time.time() < deadline:
            time.sleep(0.3)
        assert progress_step(page) > step_before, "progress did not continue after the reload"
        expect(page.locator("#previews img").first).to_be_visible()
        shot(page, "06-reattached")
        open_tab(page, "3 · Training")  # the form kept its settings across the reload
        expect(field(page, "output-name")).to_have_value("ui_lora")
        open_tab(page, "4 · Run")
        expect(page.locator("#progress")).to_contain_text("Job 1: done", timeout=TRAIN_TIMEOUT)
        expect(page.locator("#previews img")).to_have_count(4)  # steps 10, 20, 30 and the final one
        lora = out / "ui_lora" / "ui_lora.safetensors"
        assert lora.is_file()
        shot(page, "07-done")

        # Try: the new LoRA is preselected; strength 0 is exactly the base model, strength 1 differs
        open_tab(page, "5 · Try")
        expect(field(page, "try-lora")).to_have_value(str(lora.resolve()))
        fill(page, "try-prompt", PROMPT)
        fill(page, "try-seed", 3)
        fill(page, "try-steps", 4)
        page.locator("#try-strength input[type=number]").fill("0")
        page.locator("#try-strength input[type=number]").press("Tab")
        page.click("#try-generate")
        img0 = wait_new_image(page, "#try-image", None)
        src0 = image_src(page, "#try-image")
        page.locator("#try-strength input[type=number]").fill("1")
        page.locator("#try-strength input[type=number]").press("Tab")
        page.click("#try-generate")
        img1 = wait_new_image(page, "#try-image", src0)
        assert img0.shape == img1.shape == (64, 64, 3)
        assert not np.array_equal(img0, img1)
        assert np.array_equal(img0, _base_image(PROMPT, seed=3, steps=4))
        page.click("#grid-btn")
        grid = wait_new_image(page, "#grid-image", None)
        assert grid.shape[1] == 5 * 64  # one column per default strength
        shot(page, "08-try")

        # Export: write, verify on the page, download; then verify the download with the CLI
        open_tab(page, "6 · Export")
        expect(field(page, "export-source")).to_have_value(str(lora.resolve()))
        expect(field(page, "export-name")).to_have_value("ui_lora")
        fill(page, "export-name", "../exported")
        page.click("#export-btn")
        expect(page.locator("#export-report textarea")).to_have_value(re.compile(r"mapped onto the base model: \d+.*OK$", re.DOTALL))
        with page.expect_download() as download:
            page.locator("#export-file a").first.click()
        target = tmp_path / "downloaded.safetensors"
        download.value.save_as(target)
        assert download.value.suggested_filename == "exported.safetensors"
        assert (out / "exports" / "exported.safetensors").is_file()
        shot(page, "09-export")
        browser.close()
    res = subprocess.run([sys.executable, "-m", "sdlora", "verify", str(target), "--base-model", "builtin:tiny"], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"screenshots in {ARTIFACTS}")


def test_offline_demo_in_browser(tmp_path):
    """A new user's first minutes: a fresh page, Start, previews that turn into the mascot, a strength grid from the
    base model (0) to it (1); then the second demo LoRA (navy) and both at once. The screenshots are the README's
    pictures (docs/images/)."""
    require_chromium()
    CLOCK["start"] = time.time()
    out = tmp_path / "outputs"
    with running_app(out) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        expect.set_options(timeout=TIMEOUT)
        page.goto(url)
        expect(field(page, "data-folder")).to_have_value("builtin:demo")
        open_tab(page, "2 · Model & LoRA")
        expect(field(page, "base-model")).to_have_value("builtin:toy")
        open_tab(page, "4 · Run")
        page.click("#start-btn")
        expect(page.locator("#progress")).to_contain_text("Job 1: done", timeout=TRAIN_TIMEOUT)
        expect(page.locator("#previews img")).to_have_count(6)  # 2 prompts at steps 200 and 400, and at the end (600)
        shot(page, "demo-run")
        # previews come newest first: the last of them is the mascot at step 200, the first the finished LoRA
        previews = [page.request.get(img.get_attribute("src")).body() for img in page.locator("#previews img").all()]
        pinks = [pink_fraction(Image.open(io.BytesIO(b))) for b in previews]
        assert max(pinks[:2]) > 0.04 and max(pinks[:2]) >= max(pinks[-2:]), pinks

        open_tab(page, "5 · Try")
        fill(page, "try-prompt", CONCEPT_PROMPT)
        page.click("#grid-btn")
        grid = wait_new_image(page, "#grid-image", None)
        cells = [pink_fraction(c) for c in grid_cells(grid, len(STRENGTHS))]
        assert cells[0] < 0.01 < cells[-1], cells  # base model at 0, the mascot at 1 (tests/test_toy_demo.py: monotone)
        shot(page, "demo-try")

        # a second LoRA (the word navy: its own generated dataset and preset), then both at once on the Try tab
        open_tab(page, "1 · Dataset")
        fill(page, "data-folder", "builtin:demo-navy")
        page.click("#scan-btn")
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found 16 images"))
        open_tab(page, "3 · Training")
        choose(page, "preset", "demo-navy")
        page.click("#preset-load")
        expect(field(page, "output-name")).to_have_value("demo_navy_lora")
        open_tab(page, "4 · Run")
        page.click("#start-btn")
        expect(page.locator("#progress")).to_contain_text("Job 2: done", timeout=TRAIN_TIMEOUT)
        (mascot,), (navy,) = (list(out.rglob(f"{name}.safetensors")) for name in ("demo_lora", "demo_navy_lora"))
        open_tab(page, "5 · Try")
        choose(page, "try-lora", str(mascot))
        choose(page, "try-add-lora", str(navy))  # the list offers every LoRA trained here
        page.click("#try-add")
        expect(field(page, "try-more")).to_have_value(f"{navy}:1")
        fill(page, "try-prompt", COMBINED_PROMPT)
        before = image_src(page, "#try-image")
        page.click("#try-generate")
        both = wait_new_image(page, "#try-image", before)
        assert pink_fraction(both) > 0.04 and navy_fraction(both) > 0.3, (pink_fraction(both), navy_fraction(both))
        shot(page, "demo-combine")
        browser.close()


def _base_image(prompt: str, seed: int, steps: int) -> np.ndarray:
    """The base model alone, through the library, with the Try tab's settings."""
    from sdlora.models import load_base_model
    from sdlora.inference.sampling import SamplePrompt, generate

    base = load_base_model("builtin:tiny")
    pipe = base.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    img = generate(pipe, SamplePrompt(prompt=prompt, seed=seed, steps=steps, cfg=7.0), default_size=base.default_resolution)
    return np.asarray(img.convert("RGB"))
