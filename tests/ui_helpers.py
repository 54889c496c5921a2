"""Start the web UI on a free loopback port (as `python app.py` in a subprocess, or in this process), make small
datasets, and find Chromium, for the browser and API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from conftest import ROOT, subprocess_env
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout: float = START_TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited early (code {proc.returncode}):\n{log.read_text() if log else ''}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not answer on {url} within {timeout:.0f} s:\n{log.read_text() if log else ''}")


@contextmanager
def running_app(output_root: Path, *, step_delay: float = 0.0, extra_args=()):
    """`python app.py` on a free port, with the session's SDLORA_CACHE; yields the URL. The app's output goes to
    OUTPUT_ROOT/../app-PORT.log (printed if it fails to start)."""
    port = free_port()
    env = subprocess_env()
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    if step_delay:
        env["SDLORA_STEP_DELAY"] = str(step_delay)
    output_root.parent.mkdir(parents=True, exist_ok=True)
    log_path = output_root.parent / f"app-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--output-root", str(output_root), *extra_args],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_for_http(url, proc, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@contextmanager
def app_in_process(output_root: Path, extra_args=()):
    """The same app built and launched in this process (no server subprocess), with app.py's flags in extra_args
    (e.g. --data-root DIR); yields (url, service)."""
    from sdlora.ui import build_app
    from sdlora.ui.launch import launch_kwargs, make_service_for, parse_launch_args

    settings = parse_launch_args(["--port", str(free_port()), "--output-root", str(output_root), *extra_args])
    service = make_service_for(settings)
    demo = build_app(service)
    demo.queue(default_concurrency_limit=2).launch(prevent_thread_lock=True, **launch_kwargs(settings, service))
    try:
        wait_for_http(settings.url)
        yield settings.url, service
    finally:
        service.jobs.queue.stop()
        demo.close()


def make_dataset(folder: Path, n: int = 4, size: int = 64) -> Path:
    """n small images (a white square on a coloured background) with .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i in range(n):
        img = Image.new("RGB", (size, size), colors[i % len(colors)])
        img.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a white square, color {i}\n")
    return folder


def require_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        raise AssertionError(f"{CHROMIUM} is missing: the browser test needs Debian's chromium package "
                             "(apt-get install chromium; ./test.sh installs it).")
