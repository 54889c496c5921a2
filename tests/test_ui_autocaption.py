"""The Dataset tab's automatic captions through the UI service: a background run that reports progress and can be
stopped, undo, and the access policy (datasets under the data roots, model folders under --model-root)."""

from __future__ import annotations

import time

import pytest
from caption_helpers import REPO_ID, build_tagger, colour_dataset, kohya_tagger

from sdlora.captioning import CaptioningError
from sdlora.captioning.wd14 import WD14Tagger
from sdlora.config.train_config import ConfigError
from sdlora.ui.services import Services
from sdlora.ui.services.autocaption import progress_text

RED_TAGS = "hatsune miku, red background, ^_^"
# Third-party noise: gradio's event statistics use pandas options pandas 3 deprecates.
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning")]


def services(tmp_path, **kw) -> Services:
    return Services(output_root=tmp_path / "out", presets_dir=tmp_path, data_roots=[tmp_path / "data_root"],
                    model_roots=[tmp_path / "models"], **kw)


def wait(service, timeout=120):
    job = service.autocaption.wait(timeout)
    assert job is not None and job.state != "running", "the captioning run did not end in time"
    return job


def test_the_service_runs_in_the_background_and_the_gallery_sees_the_captions(tmp_path):
    s = services(tmp_path)
    data = colour_dataset(tmp_path / "data_root" / "set", {f"red{i}": (255, 0, 0) for i in range(3)})
    kohya_tagger(tmp_path / "models")
    assert s.autocaption.status()["state"] == "idle" and "No captioning" in progress_text(s.autocaption.status())
    s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": REPO_ID, "batch_size": 2, "trigger_word": "sks"})
    job = wait(s)
    assert job.state == "done", job.error
    status = s.autocaption.status()
    assert status["done"] == status["total"] == 3 and status["images"] == 3
    assert status["tags"][:3] == [["hatsune miku", 3], ["red background", 3], ["^_^", 3]]
    assert "3/3 images" in progress_text(status) and "captioned 3 of 3" in progress_text(status)
    assert [i.caption for i in s.datasets.scan(str(data)).items] == [RED_TAGS] * 3
    assert "3 removed" in s.autocaption.undo(str(data))
    assert all(i.caption_source == "default" for i in s.datasets.scan(str(data)).items)


def test_progress_is_reported_and_stop_ends_the_run_after_its_batch(tmp_path, monkeypatch):
    original = WD14Tagger.caption_batch
    seen_running = []

    def slow(self, images):
        time.sleep(0.3)  # a tagger slow enough to be stopped part-way
        return original(self, images)

    monkeypatch.setattr(WD14Tagger, "caption_batch", slow)
    s = services(tmp_path)
    data = colour_dataset(tmp_path / "data_root" / "many", {f"img{i:02d}": (255, 0, 0) for i in range(12)})
    build_tagger(tmp_path / "models" / "tagger")
    s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": str(tmp_path / "models" / "tagger"),
                         "batch_size": 1})
    with pytest.raises(ConfigError, match="captioning run is going on"):
        s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": str(tmp_path / "models" / "tagger")})
    deadline = time.time() + 60
    while s.autocaption.status()["done"] < 2 and time.time() < deadline:
        seen_running.append(s.autocaption.status()["done"])
        time.sleep(0.05)
    assert s.autocaption.status()["state"] == "running" and s.autocaption.status()["total"] == 12
    assert seen_running == sorted(seen_running)  # progress only goes forward
    assert s.autocaption.stop()
    job = wait(s)
    status = s.autocaption.status()
    assert job.state == "stopped" and 2 <= status["done"] < 12
    written = sorted(p.stem for p in data.glob("*.txt"))
    assert len(written) == status["done"] and "Stopped" in status["summary"][0]
    assert not s.autocaption.stop()  # nothing running any more
    assert f"{len(written)} removed" in s.autocaption.undo(str(data)) and not list(data.glob("*.txt"))


def test_the_access_policy_applies_to_model_folders_and_datasets(tmp_path):
    s = services(tmp_path)
    data = colour_dataset(tmp_path / "data_root" / "set", {"red": (255, 0, 0)})
    outside_model = build_tagger(tmp_path / "elsewhere" / "tagger")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "link").symlink_to(outside_model)
    for model in (outside_model, tmp_path / "models" / "link", tmp_path / "models" / ".." / "elsewhere" / "tagger"):
        with pytest.raises(ConfigError, match="Model folder: .* outside the folders this server may load models from"):
            s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": str(model)})
    (tmp_path / "models" / REPO_ID.replace("/", "_")).symlink_to(outside_model)  # a hub id found through a link
    with pytest.raises(ConfigError, match="Model folder: .* outside the folders this server may load models from"):
        s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": REPO_ID})
    inside = build_tagger(tmp_path / "models" / "tagger")
    outside_data = colour_dataset(tmp_path / "elsewhere" / "data", {"red": (255, 0, 0)})
    with pytest.raises(ConfigError, match="outside the folders this server may open"):
        s.autocaption.start({"data_dir": str(outside_data), "kind": "wd14", "model": str(inside)})
    with pytest.raises(ConfigError, match="outside the folders this server may open"):
        s.autocaption.undo(str(outside_data))
    # bad values and broken models are refused before anything runs, naming the setting or the file
    with pytest.raises(CaptioningError, match="threshold: must be between 0 and 1"):
        s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": str(inside), "threshold": 3})
    (inside / "selected_tags.csv").write_text("wrong\n")
    with pytest.raises(CaptioningError, match="selected_tags.csv' does not start with the header"):
        s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": str(inside)})
    with pytest.raises(CaptioningError, match="Nothing to undo"):
        s.autocaption.undo(str(data))
    assert s.autocaption.status()["state"] == "idle" and not list(outside_data.glob("*.txt"))


def test_a_failing_run_is_a_sentence_in_the_status_and_the_panel_is_on_the_page(tmp_path, monkeypatch):
    from sdlora.ui.layout import build_app

    s = services(tmp_path)
    data = colour_dataset(tmp_path / "data_root" / "set", {"red": (255, 0, 0)})
    build_tagger(tmp_path / "models" / "tagger")

    def broken(self, images):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(WD14Tagger, "caption_batch", broken)
    s.autocaption.start({"data_dir": str(data), "kind": "wd14", "model": str(tmp_path / "models" / "tagger")})
    job = wait(s)
    assert job.state == "failed" and "the device fell over" in job.error and "Traceback" not in job.error
    assert "**Error:**" in progress_text(s.autocaption.status())
    assert not (data / "red.txt").exists()
    app = build_app(s)
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"autocaption", "autocap-model", "autocap-start", "autocap-stop", "autocap-undo", "autocap-tags"} <= ids


@pytest.mark.slow  # a browser and a web server
def test_the_panel_in_a_browser(tmp_path):
    import re

    from playwright.sync_api import expect, sync_playwright
    from ui_helpers import CHROMIUM, CHROMIUM_ARGS, require_chromium, running_app

    require_chromium()
    data = colour_dataset(tmp_path / "data_root" / "set", {"red0": (255, 0, 0), "red1": (255, 0, 0)})
    (data / "red1.txt").write_text("mine\n")
    kohya_tagger(tmp_path / "models")
    args = ["--data-root", str(tmp_path / "data_root"), "--model-root", str(tmp_path / "models")]
    with running_app(tmp_path / "out", extra_args=args) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        expect.set_options(timeout=120_000)
        page.goto(url)
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found \d+ images"))
        box = page.locator("#data-folder textarea, #data-folder input").first
        box.fill(str(data))
        page.click("#scan-btn")
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found 2 images .*1 captioned"))
        page.get_by_text("Caption automatically").first.click()
        model = page.locator("#autocap-model textarea, #autocap-model input").first
        model.fill(REPO_ID)
        model.press("Tab")
        page.click("#autocap-start")
        expect(page.locator("#autocap-progress")).to_contain_text("Captioning done")
        expect(page.locator("#autocap-progress")).to_contain_text("captioned 1 of 2")
        expect(page.locator("#autocap-tags")).to_contain_text("hatsune miku")
        expect(page.locator("#data-gallery")).to_contain_text("hatsune miku, red background")  # the rescanned gallery
        assert (data / "red0.txt").read_text().strip() == RED_TAGS and (data / "red1.txt").read_text() == "mine\n"
        page.click("#autocap-undo")
        expect(page.locator("#scan-report textarea")).to_have_value(re.compile(r"Found 2 images .*1 captioned"))
        assert not (data / "red0.txt").exists()
        browser.close()


def test_a_raw_client_cannot_caption_outside_the_roots(tmp_path):
    """What a client posting straight to the queue (no page) gets: refusals, and no caption written anywhere."""
    import httpx
    from test_ui_security import fn_index, join
    from ui_helpers import app_in_process

    from sdlora.ui.tabs.autocaption import KEYS

    data = colour_dataset(tmp_path / "data_root" / "set", {"red": (255, 0, 0)})
    victim = colour_dataset(tmp_path / "victim", {"red": (255, 0, 0)})
    outside_model = build_tagger(tmp_path / "elsewhere" / "tagger")
    inside_model = build_tagger(tmp_path / "models" / "tagger")
    args = ["--data-root", str(tmp_path / "data_root"), "--model-root", str(tmp_path / "models")]
    with app_in_process(tmp_path / "out", args) as (url, service):
        config = httpx.get(url + "config", timeout=30).json()
        fn = fn_index(config, "autocap-start", "click")
        values = {"kind": "wd14", "mode": "overwrite", "extension": ".txt", "batch_size": 1, "threshold": 0.35,
                  "character_threshold": 0.85, "max_tags": 0, "max_length": 40, "num_beams": 3}
        for folder, model in ((victim, inside_model), (data, outside_model), ("/", inside_model)):
            row = [str(folder), ""] + [dict(values, model=str(model)).get(k, "") for k in KEYS]
            result = join(url, fn, row)
            assert "outside the folders this server may" in str(result.get("error")), result
            assert service.autocaption.status()["state"] == "idle"
        assert not list(victim.glob("*.txt")) and not list(data.glob("*.txt"))
        row = [str(data), ""] + [dict(values, model=str(inside_model)).get(k, "") for k in KEYS]
        assert "error" not in join(url, fn, row)
        assert wait(service).state == "done" and (data / "red.txt").read_text().strip() == RED_TAGS
