"""The web server's trust boundary, attacked the way a client would: every event, hidden from the API page or not,
through `POST /gradio_api/queue/join` with its fn_index from `/config`, and the named endpoints through
gradio_client. Each attack of the original report must be refused with nothing written, read, served or blocked;
legitimate use (captions in a --data-root, the demo, sample images) keeps working."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from ui_helpers import app_in_process, make_dataset

from sdlora.config.train_config import ConfigError, make_config
from sdlora.fileio import read_text_limited
from sdlora.ui.access import AccessPolicy
from sdlora.ui.http_guard import RequestGuard
from sdlora.ui.launch import launch_kwargs, make_service_for, parse_launch_args

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning")]

SECRET = "root:$6$very-secret-hash:19000:0:99999:7:::"
CALL_TIMEOUT = 120


class _Evil:
    """Unpickling this creates the marker file: proof that a client ran code in the server."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A running server with one --data-root and one --model-root, plus files an attacker would go after."""
    base = tmp_path_factory.mktemp("security")
    data = make_dataset(base / "data")
    models = base / "models"
    models.mkdir()
    victim = base / "victim"
    victim.mkdir()
    (victim / "requirements.txt").write_text("numpy==2.0\n")
    Image.new("RGB", (8, 8)).save(victim / "requirements.png")
    secret = base / "shadow"
    secret.write_text(SECRET + "\n")
    cache = base / "home" / ".cache"
    (cache / "huggingface").mkdir(parents=True)
    (cache / "huggingface" / "token").write_text("hf_SECRETTOKEN\n")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(cache / "avatar.png")
    out = base / "outputs"
    with app_in_process(out, ["--data-root", str(data), "--model-root", str(models)]) as (url, service):
        config = httpx.get(url + "config", timeout=30).json()
        yield {"url": url, "service": service, "config": config, "data": data, "models": models, "victim": victim,
               "secret": secret, "cache": cache, "out": out.resolve(), "base": base}


# --- a raw client -------------------------------------------------------------------------------------------
def fn_index(config: dict, elem_id: str, trigger: str) -> int:
    """The fn_index of the event `trigger` on the component with this elem_id, as a browser would find it."""
    ids = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    for dep in config["dependencies"]:
        if any(t[0] in ids and t[1] == trigger for t in dep["targets"]):
            return dep["id"]
    raise AssertionError(f"no {trigger} event on #{elem_id}")


def join(url: str, fn: int, data: list, *, headers: dict | None = None, event_data=None) -> dict:
    """POST /gradio_api/queue/join and read the event's result from the SSE stream: {"data": [...]} or {"error": ...}."""
    session = uuid.uuid4().hex
    body = {"data": data, "fn_index": fn, "session_hash": session, "event_data": event_data}
    resp = httpx.post(url + "gradio_api/queue/join", json=body, headers=headers or {}, timeout=30)
    if resp.status_code != 200:
        return {"http_status": resp.status_code, "text": resp.text}
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=CALL_TIMEOUT) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg.get("output") or {}
    raise AssertionError("the event never completed")


def http_status(url: str, **kw) -> int:
    return httpx.get(url, timeout=30, **kw).status_code


def file_url(site, path) -> str:
    return site["url"] + "gradio_api/file=" + str(path)


def client(site):
    from gradio_client import Client

    return Client(site["url"], verbose=False)


def assert_idle(site) -> None:
    """Nothing was queued or started by a refused request."""
    snap = site["service"].jobs.status()
    assert all(j["state"] in ("done", "failed", "stopped") for j in snap["queue"]), snap["queue"]


# --- 1: writing any .txt/.caption file ------------------------------------------------------------------------
def test_caption_save_cannot_write_outside_a_data_root(site):
    fn = fn_index(site["config"], "caption-save", "click")
    victim, data = site["victim"], site["data"]
    payload = "evil==6.6.6 --index-url http://x"
    attempts = [
        ["/", str(victim / "requirements.png"), payload, None],  # the report's request: '/' as the dataset root
        [str(victim), str(victim / "requirements.png"), payload, None],  # an existing image outside every root
        [str(data), str(victim / "requirements.png"), payload, None],  # a real root, an image outside it
        [str(data), str(data / "requirements.png"), payload, None],  # inside the root, but no such image
        [str(data), str(data / ".." / "victim" / "requirements.png"), payload, None],
    ]
    (data / "escape").symlink_to(victim)
    attempts.append([str(data / "escape"), str(data / "escape" / "requirements.png"), payload, None])  # link out of the root
    for attempt in attempts:
        result = join(site["url"], fn, attempt)
        assert "error" in result and result["error"], (attempt, result)
    assert (victim / "requirements.txt").read_text() == "numpy==2.0\n"
    assert not (data / "requirements.txt").exists()
    assert "--data-root" in join(site["url"], fn, attempts[0])["error"]

    # the same event, used as the page uses it, still saves a caption inside the data root
    ok = join(site["url"], fn, [str(data), str(data / "img2.png"), "sks, a legitimate caption", None])
    assert "error" not in ok or not ok["error"], ok
    assert (data / "img2.txt").read_text().strip() == "sks, a legitimate caption"


def test_bulk_edit_cannot_touch_captions_outside_a_data_root(site):
    fn = fn_index(site["config"], "bulk-btn", "click")
    result = join(site["url"], fn, [str(site["victim"]), "", "", "pwned", ""])
    assert result.get("error") and "--data-root" in result["error"]
    assert (site["victim"] / "requirements.txt").read_text() == "numpy==2.0\n"


# --- 2: reading any file --------------------------------------------------------------------------------------
def test_sample_prompts_file_cannot_read_outside_the_roots(site):
    c = client(site)
    for target in (str(site["secret"]), "/etc/shadow", "/etc/passwd", str(site["data"] / ".." / "shadow")):
        with pytest.raises(Exception, match="sample_prompts_file") as info:
            c.predict({"steps": 1, "sample_prompts": [], "sample_prompts_file": target}, api_name="/train")
        assert "--data-root" in str(info.value) and SECRET not in str(info.value)
    link = site["data"] / "shadow-link.txt"
    link.symlink_to(site["secret"])
    with pytest.raises(Exception, match="outside the folders"):
        c.predict({"steps": 1, "sample_prompts_file": str(link)}, api_name="/train")
    status = c.predict(api_name="/status")
    assert SECRET not in json.dumps(status)
    assert_idle(site)


def test_data_dir_and_resume_cannot_leave_the_roots(site):
    c = client(site)
    with pytest.raises(Exception, match="data_dir: .*--data-root"):
        c.predict({"steps": 1, "data_dir": str(site["cache"])}, api_name="/train")
    with pytest.raises(Exception, match="resume: "):
        c.predict({"steps": 1, "data_dir": str(site["data"]), "resume": str(site["base"])}, api_name="/train")
    assert_idle(site)


def test_reg_folders_and_dataset_configs_cannot_leave_the_roots(site):
    """The dataset fields that came with regularization images and kohya's dataset TOML are checked like data_dir:
    the TOML itself, and every image folder it names."""
    c = client(site)
    with pytest.raises(Exception, match="reg_data_dir: .*--data-root"):
        c.predict({"steps": 1, "data_dir": str(site["data"]), "reg_data_dir": str(site["victim"])}, api_name="/train")
    outside = site["base"] / "outside.toml"
    outside.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{site["data"]}"\n')
    with pytest.raises(Exception, match="dataset_config: .*outside the folders"):
        c.predict({"steps": 1, "data_dir": "", "dataset_config": str(outside)}, api_name="/train")
    inside = site["data"] / "sneaky.toml"  # a TOML the server may read, naming a folder it may not
    inside.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{site["victim"]}"\n')
    with pytest.raises(Exception, match="dataset_config .*outside the folders this server may open"):
        c.predict({"steps": 1, "data_dir": "", "dataset_config": str(inside)}, api_name="/train")
    assert_idle(site)


# --- 3: running code ------------------------------------------------------------------------------------------
def test_uploaded_pickle_never_loads(site):
    import torch

    marker = site["base"] / "pwned"
    blob = site["base"] / "evil.ckpt"
    torch.save({"state_dict": _Evil(marker)}, blob)
    resp = httpx.post(site["url"] + "gradio_api/upload", files={"files": ("evil.ckpt", blob.read_bytes())}, timeout=30)
    assert resp.status_code == 200, resp.text
    uploaded = resp.json()[0]
    in_root = site["models"] / "evil.ckpt"  # even a file in a --model-root: clients may not turn pickle on
    in_root.write_bytes(blob.read_bytes())

    c = client(site)
    for spec in (uploaded, str(in_root)):
        with pytest.raises(Exception, match="allow_pickle: .*--allow-pickle-from-clients"):
            c.predict({"base_model": spec, "allow_pickle": True, "data_dir": str(site["data"])}, api_name="/train")
    with pytest.raises(Exception, match="base_model: .*--model-root"):
        c.predict({"base_model": uploaded, "data_dir": str(site["data"])}, api_name="/train")
    with pytest.raises(Exception, match="--model-root"):
        c.predict(base_model=uploaded, lora="", prompt="x", api_name="/generate")

    # the private events that load models: the parameter count and Start
    params = fn_index(site["config"], "allow-pickle", "change")
    for spec in (uploaded, str(in_root)):
        text = join(site["url"], params, [spec, ["self-attention q/k/v/out"], 4, 4, False, True, "lora", False, -1, False, False])["data"][0]
        assert "allow_pickle" in text, text
    start = fn_index(site["config"], "start-btn", "click")
    dep = next(d for d in site["config"]["dependencies"] if d["id"] == start)
    comps = {c["id"]: c.get("props", {}) for c in site["config"]["components"]}
    form = [comps.get(i, {}).get("value") for i in dep["inputs"]]
    elem_ids = [comps.get(i, {}).get("elem_id") for i in dep["inputs"]]
    form[elem_ids.index("base-model")] = uploaded
    form[elem_ids.index("allow-pickle")] = True
    result = join(site["url"], start, form)
    assert result.get("error") and "allow_pickle" in result["error"], result
    time.sleep(0.5)
    assert not marker.exists(), "the pickle ran"
    assert_idle(site)


def test_lora_and_export_paths_stay_inside_output_and_model_roots(site):
    c = client(site)
    with pytest.raises(Exception, match="outside the output folder"):
        c.predict(lora=str(site["secret"]), prompt="x", api_name="/generate")
    with pytest.raises(Exception, match="outside the output folder"):
        c.predict(lora="", more_loras=f"{site['secret']}:1.0", prompt="x", api_name="/generate")
    with pytest.raises(Exception, match="Export source: .*outside"):
        c.predict(source=str(site["secret"]), format="kohya", api_name="/export")
    assert not (site["out"] / "exports").exists() or not any((site["out"] / "exports").iterdir())


# --- 4: scanning serves nothing -------------------------------------------------------------------------------
def test_scanning_never_adds_a_folder_to_what_is_served(site):
    scan = fn_index(site["config"], "scan-btn", "click")
    token = site["cache"] / "huggingface" / "token"
    result = join(site["url"], scan, [str(site["cache"])])
    assert result.get("error") and "--data-root" in result["error"]
    assert http_status(file_url(site, token)) == 403
    assert http_status(file_url(site, site["cache"] / "avatar.png")) == 403

    # a folder that may be scanned: its gallery comes from OUTPUT/.thumbs, the folder itself is never served
    data = site["data"]
    (data / "secret.txt").write_text("not for the web\n")
    result = join(site["url"], scan, [str(data)])
    assert not result.get("error"), result
    gallery = result["data"][1]
    assert len(gallery) == 4
    for entry in gallery:
        assert http_status(entry["image"]["url"]) == 200
        assert str(data) not in entry["image"]["path"]
    for name in ("img0.png", "img0.txt", "secret.txt"):
        assert http_status(file_url(site, data / name)) == 403
    thumb = site["service"].datasets.thumbnail(data / "img0.png")
    assert thumb.parent == site["out"] / ".thumbs" and http_status(file_url(site, thumb)) == 200
    # selecting an image shows a preview made under the output root, not the original
    select = fn_index(site["config"], "data-gallery", "select")
    # the gallery's item list lives in server-side session state: scan and select in one session
    selected, _, _, preview = _scan_then_select(site, scan, select)["data"]
    assert Path(selected).parent == data and Path(preview["path"]).name != Path(selected).name
    assert http_status(preview["url"]) == 200

    # under the output root only images and LoRA files are served; other files and hidden ones are not
    (site["out"] / "notes.txt").write_text("x")
    Image.new("RGB", (4, 4)).save(site["out"] / ".hidden.png")
    assert http_status(file_url(site, site["out"] / "notes.txt")) == 403
    assert http_status(file_url(site, site["out"] / ".hidden.png")) == 403
    assert http_status(site["url"] + "gradio_api/file/" + str(data / "img0.png").lstrip("/")) == 403
    assert http_status(file_url(site, "/etc/passwd")) == 403


def _scan_then_select(site, scan: int, select: int) -> dict:
    session = uuid.uuid4().hex
    results = []
    for fn, data, event_data in ((scan, [str(site["data"])], None), (select, [None], {"index": 0, "value": None})):
        body = {"data": data, "fn_index": fn, "session_hash": session, "event_data": event_data}
        assert httpx.post(site["url"] + "gradio_api/queue/join", json=body, timeout=30).status_code == 200
        with httpx.stream("GET", site["url"] + "gradio_api/queue/data", params={"session_hash": session},
                          timeout=CALL_TIMEOUT) as s:
            for line in s.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                    results.append(json.loads(line[5:])["output"])
                    break
    assert not results[-1].get("error"), results[-1]
    return results[-1]


# --- 5: denial of service -------------------------------------------------------------------------------------
def test_fifo_and_devices_never_block_the_worker(site):
    fifo = site["data"] / "prompts.fifo"
    os.mkfifo(fifo)
    (site["data"] / "zero.txt").symlink_to("/dev/zero")
    c = client(site)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for target, reason in ((fifo, "not a regular file"), ("/dev/zero", "outside the folders"),
                               (site["data"] / "zero.txt", "outside the folders")):
            future = pool.submit(c.predict, {"steps": 1, "data_dir": str(site["data"]), "sample_prompts_file": str(target)},
                                 api_name="/train")
            try:
                with pytest.raises(Exception, match=reason):
                    future.result(timeout=60)
            except concurrent.futures.TimeoutError:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # release the blocked reader before failing
                os.close(fd)
                raise AssertionError(f"/train blocked on {target}") from None
    assert c.predict(api_name="/stop") is False  # nothing was left running
    assert_idle(site)


def test_bounded_read_protects_the_cli_too(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.txt"
    big.write_bytes(b"a cat\n" * 200_000)
    for target, reason in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (tmp_path, "not a regular file"),
                           (big, "larger than")):
        started = time.time()
        with pytest.raises(ConfigError, match=reason):
            make_config(sample_prompts_file=str(target)).all_sample_prompts()
        assert time.time() - started < 5
    with pytest.raises(ValueError):
        read_text_limited("/dev/zero")
    (tmp_path / "ok.txt").write_text("a cat --s 2\n# note\n")
    assert make_config(sample_prompts_file=str(tmp_path / "ok.txt")).all_sample_prompts() == ["a cat --s 2"]


# --- Host and Origin ------------------------------------------------------------------------------------------
def test_dns_rebinding_and_cross_site_requests_are_refused(site):
    fn = fn_index(site["config"], "caption-save", "click")
    data = site["data"]
    before = (data / "img3.txt").read_text()
    attempt = [str(data), str(data / "img3.png"), "written cross-site", None]
    port = site["url"].rstrip("/").rsplit(":", 1)[1]
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": f"http://127.0.0.1:{int(port) + 1}"},
                    {"Host": f"evil.example:{port}"}, {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}):
        result = join(site["url"], fn, attempt, headers=headers)
        assert result.get("http_status") == 403, (headers, result)
    assert (data / "img3.txt").read_text() == before
    upload = httpx.post(site["url"] + "gradio_api/upload", files={"files": ("a.png", b"x")},
                        headers={"Origin": "http://evil.example"}, timeout=30)
    assert upload.status_code == 403
    # a rebound name cannot read the page, its config or a served file either
    lora_like = site["out"] / "served.png"
    Image.new("RGB", (4, 4)).save(lora_like)
    assert http_status(file_url(site, lora_like)) == 200
    for path in ("", "config", "gradio_api/file=" + str(lora_like)):
        assert http_status(site["url"] + path, headers={"Host": f"evil.example:{port}"}) == 403
    # the page's own origin, and clients that send no Origin, are served
    own = join(site["url"], fn, [str(data), str(data / "img3.png"), "same origin", None],
               headers={"Origin": site["url"].rstrip("/")})
    assert not own.get("error") and (data / "img3.txt").read_text().strip() == "same origin"
    assert http_status(site["url"], headers={"Host": f"localhost:{port}"}) == 200


def test_request_guard_host_rules():
    guard = RequestGuard(None, allowed_hosts=["lora.example.org"])
    for ok in ("127.0.0.1", "::1", "localhost", "app.localhost", "192.168.1.5", "lora.example.org"):
        assert guard.host_allowed(ok), ok
    for bad in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "", None):
        assert not guard.host_allowed(bad), bad
    assert guard.origin_allowed("http://127.0.0.1:7860", "127.0.0.1:7860")
    assert guard.origin_allowed("http://[::1]:7860", "[::1]:7860")
    assert guard.origin_allowed("https://lora.example.org", "127.0.0.1:7860")  # a named reverse proxy
    for bad in ("http://127.0.0.1:7861", "http://evil.example:7860", "null", "file://", "http://localhost:7860"):
        assert not guard.origin_allowed(bad, "127.0.0.1:7860"), bad
    assert RequestGuard(None, share=True).host_allowed("abc123.gradio.live")
    assert not RequestGuard(None).host_allowed("abc123.gradio.live")


# --- flags and defaults ---------------------------------------------------------------------------------------
def test_flags_and_safe_defaults(tmp_path):
    settings = parse_launch_args(["--output-root", str(tmp_path / "out")])
    service = make_service_for(settings, presets_dir=tmp_path)
    assert service.access.data_roots == [] and service.access.model_roots == [] and not service.access.pickle_from_clients
    with pytest.raises(ConfigError, match="--data-root"):
        service.datasets.scan(str(make_dataset(tmp_path / "data", n=1)))
    assert service.datasets.scan("builtin:demo").items  # the demo datasets and uploads need no flag
    assert service.configs.checked({"data_dir": "builtin:demo-navy", "base_model": "builtin:toy"}).data_dir == "builtin:demo-navy"
    with pytest.raises(ConfigError, match="--model-root"):
        service.configs.checked({"data_dir": "builtin:demo", "base_model": str(tmp_path / "m.safetensors")})
    service.access.base_model("stable-diffusion-v1-5/stable-diffusion-v1-5")  # hub ids are fine
    kwargs = launch_kwargs(settings, service)
    assert kwargs["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert any(m.cls is RequestGuard for m in kwargs["app_kwargs"]["middleware"])
    with pytest.raises(SystemExit):
        parse_launch_args(["--data-root", str(tmp_path / "missing")])
    assert any("home folder" in w for w in parse_launch_args(["--data-root", str(Path.home())]).warnings)
    trusted = parse_launch_args(["--model-root", str(tmp_path), "--allow-pickle-from-clients"])
    assert make_service_for(trusted, presets_dir=tmp_path).access.pickle_from_clients
    with pytest.raises(ConfigError, match="Output root"):
        make_service_for(parse_launch_args(["--output-root", str(Path.home())]), presets_dir=tmp_path)


def test_may_serve_only_images_and_loras_under_the_output_root(tmp_path):
    policy = AccessPolicy(tmp_path / "out", tmp_path)
    out = tmp_path / "out"
    (out / "run" / "samples").mkdir(parents=True)
    (out / ".thumbs").mkdir()
    files = {"run/samples/s.png": True, "run/run.safetensors": True, ".thumbs/t.png": True, "run/log.txt": False,
             "run/.run.safetensors.tmp": False, ".hidden/x.png": False, "run/checkpoints/optimizer.pt": False}
    for rel, _ in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    (out / "run" / "link.png").symlink_to(tmp_path / "elsewhere.png")
    (tmp_path / "elsewhere.png").write_bytes(b"x")
    for rel, expected in files.items():
        assert policy.may_serve(out / rel) is expected, rel
    assert not policy.may_serve(out / "run" / "link.png")
    assert not policy.may_serve(tmp_path / "elsewhere.png")


def test_presets_from_clients_get_the_same_checks(tmp_path):
    from sdlora.ui.fields import config_to_form, form_to_config
    from sdlora.ui.services import Services

    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "demo.toml").write_text("# Offline demo\nsteps = 300\n")
    service = Services(output_root=tmp_path / "out", presets_dir=presets)
    form = form_to_config(config_to_form(make_config().model_dump()))
    # the command line trusts a preset file: a client must not plant pickle loading or foreign paths in one
    with pytest.raises(ConfigError, match="allow_pickle"):
        service.presets.save("evil", dict(form, allow_pickle=True))
    with pytest.raises(ConfigError, match="--model-root"):
        service.presets.save("evil", dict(form, base_model=str(tmp_path / "x.ckpt")))
    with pytest.raises(ConfigError, match="sample_prompts_file"):
        service.presets.save("evil", dict(form, sample_prompts_file="/etc/shadow"))
    with pytest.raises(ConfigError, match="data_dir"):
        service.presets.save("evil", dict(form, data_dir="/etc"))
    with pytest.raises(ConfigError, match="ships with sdlora"):
        service.presets.save("demo", form)
    assert not (presets / "evil.toml").exists()
    assert (presets / "demo.toml").read_text() == "# Offline demo\nsteps = 300\n"
    service.presets.save("mine", form)
    service.presets.save("mine", dict(form, rank=4))  # presets saved from the web UI may be replaced
    assert "rank = 4" in (presets / "mine.toml").read_text()
    with pytest.raises(ConfigError, match="NUL"):
        service.datasets.scan("/tmp/\x00evil")


# --- legitimate use -------------------------------------------------------------------------------------------
def test_training_the_demo_with_a_prompt_file_in_a_data_root_still_works(site):
    prompts = site["data"] / "prompts.txt"
    prompts.write_text("a red circle --s 2 --d 1\n")
    c = client(site)
    started = c.predict({"data_dir": "builtin:demo", "base_model": "builtin:tiny", "steps": 2, "resolution": 64, "rank": 2,
                         "batch_size": 2, "sample_prompts": [], "sample_prompts_file": str(prompts),
                         "output_name": "legit"}, api_name="/train")
    deadline = time.time() + 300
    while (status := c.predict(started["job_id"], api_name="/status"))["state"] in ("queued", "running"):
        assert time.time() < deadline, status
        time.sleep(0.5)
    assert status["state"] == "done", status["error"]
    sample = status["samples"][0][1]
    assert Path(sample).is_file() and http_status(file_url(site, sample)) == 200
    assert http_status(file_url(site, status["lora_path"])) == 200
