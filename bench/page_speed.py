"""Training speed of the offline demo started from the web page (headless Chromium on the Run tab) against the same
run from the CLI, on the same machine.

Both runs train presets/demo.toml (600 steps of builtin:toy); the figure is steps per second of training, from the
run's own train_log.jsonl (the sum of each step's time, previews excluded), and the whole run's wall time.

    python bench/page_speed.py                  # both, one after the other
    python bench/page_speed.py --only page      # the page run only
Needs Debian's chromium and Playwright from PyPI (scripts/setup.sh --browser).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def step_figures(log: Path) -> dict:
    steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip().startswith('{"step"')]
    seconds = sum(s["seconds"] for s in steps)
    return {"steps": len(steps), "it_per_s": round(len(steps) / seconds, 2)}


def cli_run(out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdlora", "train", "--config", str(ROOT / "presets" / "demo.toml"),
                    "--output", str(out), "--quiet"], cwd=ROOT, env=_env(), check=True)
    return {"wall_s": round(time.perf_counter() - start, 1), **step_figures(out / "train_log.jsonl")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_run(out: Path) -> dict:
    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    log = open(out.parent / "app.log", "w")
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--output-root", str(out)], cwd=ROOT,
                           env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="4 · Run").click()
            start = time.perf_counter()
            page.click("#start-btn")
            expect(page.locator("#progress")).to_contain_text("Job 1: done", timeout=1800_000)
            wall = time.perf_counter() - start
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=60)
    (run_log,) = out.rglob("train_log.jsonl")
    return {"wall_s": round(wall, 1), **step_figures(run_log)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["cli", "page"])
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sdlora-page-bench-"))
    results = {}
    if args.only in (None, "cli"):
        results["cli"] = cli_run(work / "cli")
        print(f"CLI : {results['cli']}", flush=True)
    if args.only in (None, "page"):
        results["page"] = page_run(work / "page")
        print(f"page: {results['page']}", flush=True)
    if len(results) == 2:
        print(f"page / CLI training speed: {results['page']['it_per_s'] / results['cli']['it_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
