"""Launch settings: safe defaults (loopback, no share link), a warning for open binding without a password, and
the folders the web server may serve. Plain functions, so tests check them without starting a server."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from typing import Any

MAX_FILE_SIZE = "2gb"  # one uploaded file (zips are limited again when unpacked)


@dataclass
class LaunchSettings:
    host: str
    port: int
    auth: tuple[str, str] | None
    share: bool
    output_root: str
    warnings: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="sdlora web UI: train a Stable Diffusion LoRA in the browser")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login (needed whenever --host is not loopback)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live share link (off by default)")
    p.add_argument("--output-root", default="outputs", help="where trained LoRAs, uploads and exports go (default ./outputs)")
    return p


def parse_launch_args(argv: list[str] | None = None) -> LaunchSettings:
    p = build_parser()
    args = p.parse_args(argv)
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            p.error("--auth must be USER:PASS, e.g. --auth me:a-long-password")
        auth = (user, password)
    if not 0 < args.port < 65536:
        p.error("--port must be between 1 and 65535")
    warnings = []
    if not is_loopback(args.host) and auth is None:
        warnings.append(f"WARNING: binding to {args.host} without --auth: anyone who can reach this machine can use sdlora, "
                        "start jobs and read its output folder. Add --auth USER:PASS.")
    if args.share and auth is None:
        warnings.append("WARNING: --share without --auth publishes sdlora on a public link with no password. "
                        "Add --auth USER:PASS.")
    return LaunchSettings(args.host, args.port, auth, args.share, args.output_root, warnings)


def launch_kwargs(settings: LaunchSettings, service) -> dict[str, Any]:
    """Arguments for Blocks.launch(). allowed_paths is the service's own list: the output root, the sdlora cache,
    and each dataset folder once the user scans it (appended later; Gradio reads the same list object)."""
    from .layout import CSS

    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "auth": settings.auth,
        "share": settings.share,
        "allowed_paths": service.allowed_paths(),
        "max_file_size": MAX_FILE_SIZE,
        "show_error": True,
        "quiet": True,
        "ssr_mode": False,
        "footer_links": ["api"],
        "css": CSS,
    }
