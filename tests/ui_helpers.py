"""Start the web UI in a subprocess on a free loopback port, for browser and API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from conftest import ROOT, subprocess_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts" / "ui"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(output_root: Path, *, step_delay: float = 0.0, extra_args=()):
    port = free_port()
    env = subprocess_env()
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    if step_delay:
        env["SDLORA_STEP_DELAY"] = str(step_delay)
    log = open(output_root.parent / f"app-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--output-root", str(output_root), *extra_args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited early:\n{Path(log.name).read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("app did not start in 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def make_dataset(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i in range(n):
        img = Image.new("RGB", (64, 64), colors[i % 4])
        img.paste((255, 255, 255), (16, 16, 48, 48))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a white square, color {i}\n")
    return folder


def require_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        raise AssertionError(f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver (./test.sh does).")
