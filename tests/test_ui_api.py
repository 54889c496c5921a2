"""The named API endpoints driven by the official gradio_client, and the UI's safety rules."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.config import ConfigError
from sdlora.ui.launch import parse_launch_args
from sdlora.ui.service import Service, sanitize_name
from sdlora.ui.uploads import extract_zip, import_uploads
from ui_helpers import make_dataset, running_app


def test_gradio_client_train_status_generate_export(tmp_path):
    from gradio_client import Client

    data = make_dataset(tmp_path / "data")
    with running_app(tmp_path / "outputs") as url:
        client = Client(url, verbose=False)
        started = client.predict(json.dumps({"data_dir": str(data), "steps": 12, "rank": 4, "sample_every": 0,
                                             "sample_prompts": ["x --s 2"], "sample_steps": 2, "output_name": "api_lora"}),
                                 api_name="/train")
        assert started["job_id"] == 1
        deadline = time.time() + 300
        while time.time() < deadline:
            status = client.predict(api_name="/status")
            if status["state"] in ("done", "failed", "stopped"):
                break
            time.sleep(1)
        assert status["state"] == "done", status
        assert status["step"] == 12 and len(status["losses"]) == 12 and status["samples"]
        lora = status["lora_path"]
        assert Path(lora).is_file()
        args = dict(prompt="x", negative="", seed=1, steps=3, cfg=7.0, width=0, height=0)
        img1 = client.predict("builtin:tiny", lora, 1.0, "", *args.values(), api_name="/generate")
        img0 = client.predict("builtin:tiny", lora, 0.0, "", *args.values(), api_name="/generate")
        a1, a0 = np.asarray(Image.open(img1)), np.asarray(Image.open(img0))
        assert a1.shape == (64, 64, 3) and not np.array_equal(a0, a1)
        file, report = client.predict("builtin:tiny", lora, "diffusers", "fp32", "../../escape", api_name="/export")
        assert report.strip().endswith("OK"), report
        assert Path(file).name == "escape_diffusers.safetensors"
        assert (tmp_path / "outputs" / "exports" / "escape_diffusers.safetensors").is_file()
        # a bad request is a message, and the server stays up
        with pytest.raises(Exception, match="rank"):
            client.predict(json.dumps({"data_dir": str(data), "rank": 0}), api_name="/train")
        assert client.predict(api_name="/status")["state"] == "done"


def test_open_binding_without_auth_warns():
    settings, _ = parse_launch_args([])
    assert settings.host == "127.0.0.1" and not settings.share and not settings.warnings
    settings, _ = parse_launch_args(["--host", "0.0.0.0"])
    assert settings.warnings and "without --auth" in settings.warnings[0]
    settings, _ = parse_launch_args(["--host", "0.0.0.0", "--auth", "me:secret"])
    assert settings.warnings == [] and settings.auth == ("me", "secret")
    settings, _ = parse_launch_args(["--share"])
    assert any("public" in w for w in settings.warnings)


def test_allowed_paths_are_only_sdlora_folders(tmp_path):
    service = Service(output_root=tmp_path / "out", presets_dir=tmp_path)
    data = make_dataset(tmp_path / "data")
    allowed = service.allowed_paths()
    assert str((tmp_path / "out").resolve()) in allowed and str(data.resolve()) not in allowed
    service.scan(str(data))
    assert str(data.resolve()) in allowed  # the same list object Gradio holds
    assert "/" not in allowed and str(Path.home()) not in allowed


def test_output_names_cannot_escape():
    assert sanitize_name("../../x") == "x"
    assert sanitize_name("/etc/passwd") == "passwd"
    assert sanitize_name("..") == "lora"
    assert sanitize_name("my lora.safetensors") == "my lora"
    assert "/" not in sanitize_name("a/../../b") and ".." not in sanitize_name("a..b")


def test_caption_save_refuses_paths_outside_the_dataset(tmp_path):
    service = Service(output_root=tmp_path / "out", presets_dir=tmp_path)
    data = make_dataset(tmp_path / "data")
    outside = tmp_path / "victim.png"
    Image.new("RGB", (8, 8)).save(outside)
    with pytest.raises(ConfigError, match="outside the dataset folder"):
        service.save_caption(str(data), str(data / ".." / "victim.png"), "pwned")
    assert not (tmp_path / "victim.txt").exists()
    service.save_caption(str(data), str(data / "img0.png"), "fine")
    assert (data / "img0.txt").read_text().strip() == "fine"


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_slip_and_size_limit(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    evil = tmp_path / "evil.zip"
    evil.write_bytes(_zip({"ok.png": png.getvalue(), "../../escaped.txt": b"x"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ConfigError, match="outside the upload folder"):
        extract_zip(evil, dest)
    assert not list(dest.iterdir()) and not (tmp_path / "escaped.txt").exists()
    absolute = tmp_path / "abs.zip"
    absolute.write_bytes(_zip({"/tmp/abs.png": png.getvalue()}))
    with pytest.raises(ConfigError, match="outside"):
        extract_zip(absolute, dest)
    big = tmp_path / "big.zip"
    big.write_bytes(_zip({"a.png": b"\0" * 5000}))
    with pytest.raises(ConfigError, match="limit"):
        extract_zip(big, dest, max_bytes=1000)
    good = tmp_path / "good.zip"
    good.write_bytes(_zip({"set/a.png": png.getvalue(), "set/a.txt": b"cap", "run.sh": b"rm -rf /"}))
    folder = import_uploads([str(good)], tmp_path / "uploads")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == ["set/a.png", "set/a.txt"]
    assert folder.parent == tmp_path / "uploads"


def test_stop_then_resume_through_the_service(tmp_path, monkeypatch):
    import sdlora.train as train_module

    monkeypatch.setattr(train_module, "_STEP_DELAY", 0.05)
    service = Service(output_root=tmp_path / "out", presets_dir=tmp_path)
    data = make_dataset(tmp_path / "data")
    values = {"data_dir": str(data), "base_model": "builtin:tiny", "steps": 40, "save_every": 5, "rank": 2, "resolution": 64,
              "output_name": "resumable"}
    job = service.start(values)
    deadline = time.time() + 120
    while job.step < 12 and time.time() < deadline:
        time.sleep(0.05)
    assert service.stop()
    while job.state == "running" and time.time() < deadline:
        time.sleep(0.1)
    assert job.state == "stopped" and job.checkpoints
    # a second start while one runs is queued, not run concurrently
    resumed = service.resume(values)
    queued = service.start(dict(values, output_name="second", steps=2))
    assert queued.state == "queued"
    while queued.state in ("queued", "running") and time.time() < deadline + 120:
        assert not (resumed.state == "running" and queued.state == "running")
        time.sleep(0.05)
    assert resumed.state == "done" and resumed.step == 40 and queued.state == "done"
    assert resumed.losses[0][0] > 1  # continued from the checkpoint, not from step 1
    assert Path(resumed.lora_path).is_file()
