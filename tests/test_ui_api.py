"""The named API endpoints driven by the official gradio_client, and the web UI's safety rules."""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ui_helpers import app_in_process, make_dataset

# Third-party noise: gradio's event statistics use pandas options pandas 3 deprecates; PEFT notes reloaded adapters.
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")]

from sdlora.config.train_config import ConfigError, make_config
from sdlora.data.scan import DatasetError
from sdlora.paths import cache_dir
from sdlora.ui.fields import CONV_GROUP, config_to_form, form_to_config
from sdlora.ui.launch import launch_kwargs, parse_launch_args
from sdlora.ui.services import Services
from sdlora.ui.services.inputs import parse_lora_lines, parse_strengths, sanitize_name
from sdlora.ui.uploads import extract_zip, import_uploads


def _wait_done(client, job_id: int, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.predict(job_id, api_name="/status")
        if status["state"] in ("done", "failed", "stopped"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {status}")


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow  # the app in a subprocess, a training run through gradio_client
def test_gradio_client_train_status_generate_export(tmp_path):
    from gradio_client import Client

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "outputs"
    with app_in_process(out, ["--data-root", str(data)]) as (url, service):
        client = Client(url, verbose=False)
        started = client.predict({"data_dir": str(data), "steps": 12, "rank": 4, "batch_size": 2, "sample_every": 6,
                                  "sample_prompts": ["a white square --s 2"], "output_name": "api_lora"}, api_name="/train")
        assert started["state"] in ("queued", "running") and started["output_dir"] == str(out.resolve() / "api_lora")
        status = _wait_done(client, started["job_id"])
        assert status["state"] == "done", status
        assert status["step"] == 12 and len(status["losses"]) == 12
        assert [s[0] for s in status["samples"]] == [6, 12]
        lora = status["lora_path"]
        assert Path(lora).is_file() and Path(lora).parent == out.resolve() / "api_lora"

        def image(**kw) -> np.ndarray:
            path = client.predict(prompt="a white square", seed=5, steps=3, api_name="/generate", **kw)
            return np.asarray(Image.open(path).convert("RGB"))

        full, zero, base = image(lora=lora, strength=1.0), image(lora=lora, strength=0.0), image(lora="")
        assert full.shape == (64, 64, 3)
        assert not np.array_equal(full, zero)
        assert np.array_equal(zero, base)  # strength 0 is exactly the base model
        both = image(lora=lora, strength=0.0, more_loras=f"{lora}:1.0")  # several LoRAs, each with its strength
        assert np.array_equal(both, full)

        file, report = client.predict(source=lora, format="diffusers", precision="fp32", name="../../escape", api_name="/export")
        assert report.strip().endswith("OK"), report
        assert Path(file).name == "escape_diffusers.safetensors"
        assert (out / "exports" / "escape_diffusers.safetensors").is_file()
        file, report = client.predict(source="", format="kohya", api_name="/export")  # empty = the last job's LoRA
        assert Path(file).name == "demo_lora.safetensors" and report.strip().endswith("OK"), report

        # a bad request is a readable message, and the server stays up
        with pytest.raises(Exception, match="rank: must be at least 1"):
            client.predict({"data_dir": str(data), "rank": 0}, api_name="/train")
        with pytest.raises(Exception, match="not a JSON object"):
            client.predict("{not json", api_name="/train")
        with pytest.raises(Exception, match="unknown setting"):
            client.predict({"data_dir": str(data), "rnak": 4}, api_name="/train")
        with pytest.raises(Exception, match="not found"):
            client.predict(lora=str(out / "missing.safetensors"), prompt="x", api_name="/generate")
        with pytest.raises(Exception, match="No job 99"):
            client.predict(99, api_name="/status")
        assert client.predict(api_name="/status")["state"] == "done"

        # the server serves what sdlora wrote under the output root, never a dataset folder (the gallery shows
        # thumbnails made under OUTPUT/.thumbs)
        base_url = url.rstrip("/") + "/gradio_api/file="
        assert _http_status(base_url + lora) == 200
        assert _http_status(base_url + status["samples"][0][1]) == 200
        assert _http_status(base_url + "/etc/passwd") == 403
        service.datasets.scan(str(data))
        assert _http_status(base_url + str(data / "img0.png")) == 403
        assert _http_status(base_url + str(data / "img0.txt")) == 403
        assert _http_status(base_url + str(service.datasets.thumbnail(data / "img0.png"))) == 200
        outside = make_dataset(tmp_path / "elsewhere", n=1)
        with pytest.raises(ConfigError, match="--data-root"):
            service.datasets.scan(str(outside))


def test_open_binding_without_auth_warns(tmp_path):
    settings = parse_launch_args([])
    assert (settings.host, settings.port, settings.share, settings.auth, settings.warnings) == ("127.0.0.1", 7860, False, None, [])
    assert parse_launch_args(["--host", "localhost"]).warnings == []
    settings = parse_launch_args(["--host", "0.0.0.0"])
    assert len(settings.warnings) == 1 and "without --auth" in settings.warnings[0]
    assert parse_launch_args(["--host", "192.168.1.5"]).warnings
    settings = parse_launch_args(["--host", "0.0.0.0", "--auth", "me:secret"])
    assert settings.warnings == [] and settings.auth == ("me", "secret")
    assert launch_kwargs(settings, Services(output_root=tmp_path, presets_dir=tmp_path))["auth"] == ("me", "secret")
    assert any("public" in w for w in parse_launch_args(["--share"]).warnings)
    with pytest.raises(SystemExit):
        parse_launch_args(["--auth", "no-colon"])


def test_allowed_paths_are_only_sdlora_folders(tmp_path):
    data = make_dataset(tmp_path / "data")
    settings = parse_launch_args(["--output-root", str(tmp_path / "out"), "--data-root", str(data)])
    service = Services(output_root=Path(settings.output_root), presets_dir=tmp_path, data_roots=settings.data_roots)
    kwargs = launch_kwargs(settings, service)
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["share"] is False and kwargs["auth"] is None
    assert kwargs["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert str(cache_dir().resolve()) in kwargs["blocked_paths"]
    service.datasets.scan(str(data))
    assert kwargs["allowed_paths"] == [str((tmp_path / "out").resolve())]  # scanning never adds a folder
    with pytest.raises(DatasetError):
        service.datasets.scan(str(data / "missing"))


def test_output_names_cannot_escape(tmp_path):
    assert sanitize_name("../../x") == "x"
    assert sanitize_name("/etc/passwd") == "passwd"
    assert sanitize_name("..") == "lora"
    assert sanitize_name("") == "lora"
    assert sanitize_name("my lora.safetensors") == "my lora"
    assert sanitize_name("..\\..\\win") == "win"
    for evil in ("a/../../b", "a..b", ".hidden", "x/..", "~/x"):
        name = sanitize_name(evil)
        assert "/" not in name and ".." not in name and not name.startswith(".")
    service = Services(output_root=tmp_path / "out", presets_dir=tmp_path)
    cfg = service.configs.build({"data_dir": "d", "output_name": "../../evil", "output_dir": "/tmp/elsewhere"})
    assert cfg.output_dir == str((tmp_path / "out" / "evil").resolve())
    assert service.presets.save("../../p", form_to_config(config_to_form(make_config().model_dump()))) == tmp_path.resolve() / "p.toml"


def test_start_checks_base_model_and_dataset_first(tmp_path):
    from sdlora.models import ModelLoadError

    service = Services(output_root=tmp_path / "out", presets_dir=tmp_path, data_roots=[tmp_path], model_roots=[tmp_path])
    data = make_dataset(tmp_path / "data")
    with pytest.raises(ModelLoadError, match="not found"):
        service.jobs.start({"data_dir": str(data), "base_model": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ConfigError, match="not a folder"):
        service.jobs.start({"data_dir": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="unknown option '--zz'"):
        service.jobs.start({"data_dir": str(data), "sample_prompts": ["a cat --zz 3"]})
    with pytest.raises(ConfigError, match="choose a dataset folder"):
        service.jobs.start({"data_dir": " "})
    assert service.jobs.queue.jobs() == []


def test_caption_save_refuses_paths_outside_the_dataset(tmp_path):
    service = Services(output_root=tmp_path / "out", presets_dir=tmp_path, data_roots=[tmp_path])
    data = make_dataset(tmp_path / "data")
    Image.new("RGB", (8, 8)).save(tmp_path / "victim.png")
    (tmp_path / "victim.txt").write_text("original")
    with pytest.raises(ConfigError, match="outside the dataset folder"):
        service.captions.save(str(data), str(data / ".." / "victim.png"), "pwned")
    with pytest.raises(ConfigError, match="outside the dataset folder"):
        service.captions.save(str(data), str(data / "img0.png"), "pwned", caption_path=str(tmp_path / "victim.txt"))
    (data / "link.png").symlink_to(tmp_path / "victim.png")
    with pytest.raises(ConfigError, match="outside the dataset folder"):
        service.captions.save(str(data), str(data / "link.png"), "pwned")
    assert (tmp_path / "victim.txt").read_text() == "original"
    thumb = service.datasets.thumbnail(data / "img0.png")
    assert thumb.parent == service.output_root / ".thumbs" and Image.open(thumb).size == (64, 64)
    service.captions.save(str(data), str(data / "img0.png"), "  fine  ")
    assert (data / "img0.txt").read_text().strip() == "fine"
    assert service.captions.bulk_edit(str(data), find="white", replace="black", prepend="sks", append="") == 4
    assert (data / "img1.txt").read_text().strip() == "sks, a black square, color 1"


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_slip_and_size_limit(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    uploads = tmp_path / "out" / "uploads"
    for name, entry in (("dotdot", "../../escaped.png"), ("absolute", "/tmp/abs.png"), ("drive", "C:/x.png"),
                        ("backslash", "..\\..\\escaped.png")):
        evil = tmp_path / f"{name}.zip"
        evil.write_bytes(_zip({"ok.png": png.getvalue(), entry: png.getvalue()}))
        with pytest.raises(ConfigError, match="outside the upload folder"):
            import_uploads([str(evil)], uploads)
    assert not (tmp_path / "escaped.png").exists()
    assert not uploads.exists() or not any(uploads.iterdir())  # refused uploads leave nothing behind
    big = tmp_path / "big.zip"
    big.write_bytes(_zip({"a.png": b"\0" * 5000}))
    with pytest.raises(ConfigError, match="limit"):
        extract_zip(big, tmp_path, max_bytes=1000)
    two = [tmp_path / "one.png", tmp_path / "two.png"]
    for p in two:
        p.write_bytes(b"\0" * 600)
    with pytest.raises(ConfigError, match="limit"):
        import_uploads([str(p) for p in two], uploads, max_bytes=1000)  # the limit is for the whole upload
    good = tmp_path / "good.zip"
    good.write_bytes(_zip({"set/a.png": png.getvalue(), "set/a.txt": b"cap", "run.sh": b"rm -rf /",
                           "__MACOSX/set/._a.png": b"junk"}))
    folder = import_uploads([str(good)], uploads)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == ["set/a.png", "set/a.txt"]
    assert folder.parent == uploads
    with pytest.raises(ConfigError, match="neither an image"):
        import_uploads([str(tmp_path / "run.sh")], uploads)


def test_form_fields_map_to_a_config():
    form = config_to_form(make_config(rank=8, alpha=4, targets=["attn2", "proj_in", "proj_out"], conv_rank=2, steps=30).model_dump())
    assert form["layers"] == ["cross-attention q/k/v/out", "proj in/out", CONV_GROUP] and form["length"] == 30
    values = form_to_config(form)
    assert values["targets"] == ["attn2", "proj_in", "proj_out"] and values["conv_rank"] == 2 and values["steps"] == 30
    make_config(**values)
    form["layers"] = form["layers"][:-1]
    assert form_to_config(form)["conv_rank"] == 0
    with pytest.raises(ConfigError, match="length: enter a number"):
        form_to_config(dict(form, length=None))
    with pytest.raises(ConfigError, match="rank: use a whole number"):
        form_to_config(dict(form, rank=2.5))
    assert parse_lora_lines("/a/b.safetensors:0.5\n# note\n\n/c.safetensors") == [("/a/b.safetensors", 0.5), ("/c.safetensors", 1.0)]
    assert parse_strengths("0, 0.5;1") == [0.0, 0.5, 1.0]
    with pytest.raises(ConfigError, match="Strengths"):
        parse_strengths("zero")
    # SDXL's two text-encoder LRs survive the form both ways; one value, 0 and empty keep their meaning.
    xl = config_to_form(make_config(train_text_encoder=True, text_encoder_lr=[3e-5, 1e-5]).model_dump())
    assert xl["text_encoder_lr"] == "3e-05, 1e-05"
    assert form_to_config(xl)["text_encoder_lr"] == [3e-5, 1e-5]
    assert form_to_config(dict(xl, text_encoder_lr="5e-5"))["text_encoder_lr"] == 5e-5
    assert form_to_config(dict(xl, text_encoder_lr="0"))["text_encoder_lr"] is None
    assert form_to_config(dict(xl, text_encoder_lr=" "))["text_encoder_lr"] is None
    with pytest.raises(ConfigError, match="text_encoder_lr: 'fast'"):
        form_to_config(dict(xl, text_encoder_lr="fast"))
    assert form_to_config(dict(xl, reg_data_dir=" /r ", dataset_config=""))["reg_data_dir"] == "/r"


def test_the_form_starts_from_one_demo_definition(tmp_path):
    """A fresh page shows the demo preset; a server whose presets folder lacks it (or holds a broken one) shows the
    shipped presets/demo.toml, not a stale copy of it; the server's own demo.toml wins."""
    from sdlora.config.train_config import config_from_preset
    from sdlora.ui.layout import ROOT, demo_defaults

    shipped = config_to_form(config_from_preset(ROOT / "presets" / "demo.toml").model_dump())
    assert demo_defaults(ROOT / "presets") == shipped and shipped["data_dir"] == "builtin:demo"
    assert demo_defaults(tmp_path) == shipped  # no demo.toml there
    (tmp_path / "demo.toml").write_text("steps = 'many'\n")
    assert demo_defaults(tmp_path) == shipped
    (tmp_path / "demo.toml").write_text('base_model = "builtin:tiny"\ndata_dir = "builtin:demo"\n[training]\nsteps = 7\n')
    mine = demo_defaults(tmp_path)
    assert mine["base_model"] == "builtin:tiny" and mine["length"] == 7


def test_stop_queue_and_resume_through_the_service(tmp_path, monkeypatch):
    import sdlora.training.trainer as train_module

    monkeypatch.setattr(train_module, "_STEP_DELAY", 0.1)
    service = Services(output_root=tmp_path / "out", presets_dir=tmp_path, data_roots=[tmp_path])
    data = make_dataset(tmp_path / "data")
    values = {"data_dir": str(data), "steps": 16, "save_every": 4, "rank": 2, "resolution": 64, "output_name": "resumable"}
    with pytest.raises(ConfigError, match="Nothing to resume"):
        service.jobs.resume(values)
    job = service.jobs.start(values)
    deadline = time.time() + 240
    while job.step < 5 and time.time() < deadline:
        time.sleep(0.05)
    queued = service.jobs.start(dict(values, output_name="second", steps=2))
    assert queued.state == "queued" and service.jobs.status()["queue"][-1]["state"] == "queued"
    assert service.jobs.stop()
    while job.state == "running" and time.time() < deadline:
        assert queued.state == "queued"  # never two at once
        time.sleep(0.05)
    assert job.state == "stopped" and job.checkpoints and Path(job.lora_path).is_file()
    stopped_at = job.step
    # Try/Export offer LoRA files only: not the run's latent cache (one .safetensors per image) or training state.
    assert list((service.output_root / "resumable" / "cache" / "latents").glob("*.safetensors"))
    offered = service.loras.list_loras()
    assert job.lora_path in offered and any(Path(p).name == "lora.safetensors" for p in offered)
    assert not any("cache" in Path(p).parts or Path(p).name == "lora_state.safetensors" for p in offered)
    assert not any("cache" in Path(p).parts for p in service.loras.list_export_sources())
    checkpoint = next(p for p in service.loras.list_export_sources() if Path(p).parent.name == "checkpoints")  # newest first
    assert Path(checkpoint).name == f"step{stopped_at:06d}"
    path, report, ok = service.exporter.export(checkpoint, fmt="kohya", precision="fp16", name="from_checkpoint", base_spec="builtin:tiny")
    assert ok and path == service.output_root / "exports" / "from_checkpoint.safetensors", report
    resumed = service.jobs.resume(values)
    while resumed.state in ("queued", "running") and time.time() < deadline:
        assert not (queued.state == "running" and resumed.state == "running")
        time.sleep(0.05)
    assert queued.state == "done" and resumed.state == "done", (queued.error, resumed.error)
    assert resumed.step == 16 and resumed.progress.losses[0][0] == stopped_at + 1  # continued, not restarted
    assert Path(resumed.lora_path).is_file()


def test_ui_error_boundary_names_the_failure_and_logs_the_traceback(monkeypatch, tmp_path):
    """A bug in a handler becomes one sentence with the log file's path; the traceback is in that file, not on screen."""
    import gradio as gr

    from sdlora.config.train_config import ConfigError
    from sdlora.ui.common import guard

    monkeypatch.setenv("SDLORA_CACHE", str(tmp_path / "cache"))

    @guard
    def broken():
        raise KeyError("internal detail")

    @guard
    def refused():
        raise ConfigError("rank: must be at least 1.")

    with pytest.raises(gr.Error) as info:
        broken()
    message = str(info.value.message)
    assert "web UI: broken failed" in message and "Traceback" not in message
    log = Path(message.split("The full error is in ")[1].rstrip("."))
    assert log.is_file() and "Traceback" in log.read_text() and "internal detail" in log.read_text()
    with pytest.raises(gr.Error) as info:
        refused()
    assert str(info.value.message) == "rank: must be at least 1."


def test_validation_masked_loss_and_tensorboard_fields():
    import gradio as gr

    from sdlora.ui.tabs import training as training_tab

    defaults = config_to_form(make_config().model_dump())
    ctx = {"fields": {}}
    from types import SimpleNamespace

    service = SimpleNamespace(presets=SimpleNamespace(names=lambda: []))
    with gr.Blocks():
        training_tab.build(service, ctx, defaults)
    for key in ("validation_split", "validation_dir", "validate_every", "masked_loss", "mask_dir", "log_with"):
        assert key in ctx["fields"], key
    form = dict(defaults, validation_split="0.2", validate_every=5.0, validation_dir="", masked_loss=True,
                mask_dir=" /m ", log_with="tensorboard")
    values = form_to_config(form)
    assert values["validation_split"] == 0.2 and values["validate_every"] == 5 and values["mask_dir"] == "/m"
    cfg = make_config(**values)
    assert cfg.masked_loss and cfg.log_with == "tensorboard"
    with pytest.raises(ConfigError, match="validate_every: use a whole number"):
        form_to_config(dict(form, validate_every=2.5))
    with pytest.raises(ConfigError, match="mask_dir is set but masked_loss is off"):
        make_config(**form_to_config(dict(form, masked_loss=False)))


def test_run_preview_shows_step_plan_and_memory_before_start(tmp_path):
    """What the Run tab's 'Check steps and memory' shows: the step plan the run will follow and the traced memory
    estimate, for SD1 and SDXL, without starting anything; a bad setting is one sentence."""
    service = Services(output_root=tmp_path / "out", presets_dir=tmp_path, data_roots=[tmp_path])
    data = make_dataset(tmp_path / "data")
    values = {"data_dir": str(data), "steps": 12, "batch_size": 2, "grad_accum": 2, "resolution": 64, "rank": 4,
              "output_name": "preview"}
    text = service.configs.preview_run(values)
    assert "Step plan:" in text and "= 12 steps" in text and "/ accumulation 2" in text
    assert "SD 1.x model" in text and "estimated peak memory" in text
    xl = service.configs.preview_run(dict(values, base_model="builtin:tiny-xl", train_text_encoder=True))
    assert "SDXL model" in xl and "estimated peak memory" in xl
    assert service.jobs.status()["state"] == "idle"
    with pytest.raises(ConfigError, match="data_dir"):
        service.configs.preview_run(dict(values, data_dir=str(tmp_path / "missing")))


def test_messages_written_for_the_cli_name_the_ui_field_on_the_page(tmp_path):
    """'Point --data at ...' is right in a terminal; on the page the same sentence names the field and its tab."""
    from sdlora.data.scan import scan_dataset
    from sdlora.ui.common import user_message
    from sdlora.ui.services.progress import progress_text

    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path / "missing")
    assert "--data" in str(caught.value)
    shown = user_message(caught.value)
    assert "--data" not in shown and "Dataset folder field (Dataset tab)" in shown
    with pytest.raises(ConfigError) as caught:
        make_config(bucket_no_upscale=True)
    assert "'Aspect-ratio buckets', Training tab" in user_message(caught.value)
    snap = {"state": "failed", "losses": [], "step": 0, "total_steps": 10, "id": 1, "error": str(caught.value)}
    assert "--buckets" not in progress_text(snap) and "Aspect-ratio buckets" in progress_text(snap)
