"""The whole flow in a real browser (Debian Chromium driven by Playwright), with a screenshot per stage."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from conftest import ROOT, subprocess_env
from ui_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, make_dataset, require_chromium, running_app

from playwright.sync_api import expect, sync_playwright

TIMEOUT = 120_000
expect.set_options(timeout=TIMEOUT)


def fill(page, elem_id: str, value, *, kind: str = "textarea, input") -> None:
    box = page.locator(f"#{elem_id}").locator(kind).first
    box.fill(str(value))
    box.press("Tab")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def image_from(page, selector: str) -> np.ndarray:
    img = page.locator(selector).locator("img").first
    expect(img).to_be_visible(timeout=TIMEOUT)
    src = img.get_attribute("src")
    data = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def wait_image_change(page, selector: str, before: str | None) -> str:
    loc = page.locator(selector).locator("img").first
    deadline = time.time() + TIMEOUT / 1000
    while time.time() < deadline:
        if loc.count() and loc.get_attribute("src") and loc.get_attribute("src") != before:
            return loc.get_attribute("src")
        time.sleep(0.3)
    raise AssertionError(f"no new image in {selector}")


def test_full_flow_in_browser(tmp_path):
    require_chromium()
    data = make_dataset(tmp_path / "dataset")
    out = tmp_path / "outputs"
    with running_app(out, step_delay=0.12) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        expect(page.locator("#scan-btn")).to_be_visible()
        shot(page, "01-opened")

        # Dataset: scan, edit a caption, see the file change
        fill(page, "data-folder", str(data))
        page.click("#scan-btn")
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found 4 images"))
        page.locator("#data-gallery button.thumbnail-item").first.click()
        expect(page.locator("#caption-edit textarea")).to_have_value(re.compile("white square"))
        fill(page, "caption-edit", "sks, an edited caption")
        page.click("#caption-save")
        expect(page.locator("#caption-msg")).to_contain_text("Saved")
        edited = [p for p in data.glob("*.txt") if "edited" in p.read_text()]
        assert len(edited) == 1 and edited[0].read_text().strip() == "sks, an edited caption"
        shot(page, "02-dataset")

        # Model & LoRA: rank/alpha, layers, live parameter count
        open_tab(page, "2 · Model & LoRA")
        expect(page.locator("#param-count")).to_contain_text("Trainable parameters")
        before = page.locator("#param-count").inner_text()
        fill(page, "rank", 4, kind="input")
        fill(page, "alpha", 2, kind="input")
        expect(page.locator("#lora-scale")).to_contain_text("0.5")
        page.locator("#layers label", has_text="feed-forward").click()
        expect(page.locator("#param-count")).not_to_have_text(before)
        shot(page, "03-model")

        # Training settings
        open_tab(page, "3 · Training")
        fill(page, "length", 60, kind="input")
        fill(page, "sample-every", 20, kind="input")
        fill(page, "sample-steps", 3, kind="input")
        fill(page, "sample-prompts", "sks, a white square --d 1")
        fill(page, "output-name", "ui_lora")
        fill(page, "trigger-word", "sks")
        expect(page.locator("#config-check")).to_contain_text("valid")
        shot(page, "04-training")

        # Run: progress, loss plot, a preview; reload mid-run and re-attach
        open_tab(page, "4 · Run")
        page.click("#start-btn")
        expect(page.locator("#progress")).to_contain_text(re.compile(r"running|done"))
        expect(page.locator("#previews img").first).to_be_visible()
        expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
        shot(page, "05-running")
        step_before = int(re.search(r"step (\d+)/", page.locator("#progress").inner_text()).group(1))
        page.reload()
        open_tab(page, "4 · Run")
        expect(page.locator("#progress")).to_contain_text("Job 1")
        deadline = time.time() + 120
        while time.time() < deadline:
            m = re.search(r"step (\d+)/", page.locator("#progress").inner_text())
            if m and int(m.group(1)) > step_before:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("progress did not continue after reload")
        shot(page, "06-reattached")
        expect(page.locator("#progress")).to_contain_text("done", timeout=300_000)
        lora = out / "ui_lora" / "ui_lora.safetensors"
        assert lora.is_file()
        shot(page, "07-done")

        # Try: strength 0 equals the base model, strength 1 differs
        open_tab(page, "5 · Try")
        fill(page, "try-lora", str(lora), kind="input")
        fill(page, "try-prompt", "sks, a white square")
        fill(page, "try-seed", 3, kind="input")
        fill(page, "try-steps", 4, kind="input")
        fill(page, "try-strength", 0, kind="input[type=number]")
        page.click("#try-generate")
        src0 = wait_image_change(page, "#try-image", None)
        img0 = image_from(page, "#try-image")
        fill(page, "try-strength", 1, kind="input[type=number]")
        page.click("#try-generate")
        wait_image_change(page, "#try-image", src0)
        img1 = image_from(page, "#try-image")
        page.click("#grid-btn")
        grid = image_from(page, "#grid-image")
        assert grid.shape[1] == 5 * 64  # one column per strength
        shot(page, "08-try")
        assert img0.shape == img1.shape and not np.array_equal(img0, img1)
        base_img = _base_image(prompt="sks, a white square", seed=3, steps=4)
        assert np.array_equal(img0, base_img)

        # Export: write, verify on the page, download, verify again from the CLI
        open_tab(page, "6 · Export")
        fill(page, "export-source", str(lora), kind="input")
        fill(page, "export-name", "exported")
        page.click("#export-btn")
        expect(page.locator("#export-report textarea")).to_have_value(re.compile(r"OK$"), timeout=TIMEOUT)
        with page.expect_download() as dl:
            page.locator("#export-file a").first.click()
        target = tmp_path / "downloaded.safetensors"
        dl.value.save_as(target)
        shot(page, "09-export")
        browser.close()
    res = subprocess.run([sys.executable, "-m", "sdlora", "verify", str(target), "--base-model", "builtin:tiny"], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    print(f"screenshots in {ARTIFACTS}")


def _base_image(prompt: str, seed: int, steps: int) -> np.ndarray:
    from sdlora.models import load_base_model
    from sdlora.sampling import SamplePrompt, generate

    base = load_base_model("builtin:tiny")
    pipe = base.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    img = generate(pipe, SamplePrompt(prompt=prompt, seed=seed, steps=steps, cfg=7.0), default_size=base.default_resolution)
    return np.asarray(img.convert("RGB"))
