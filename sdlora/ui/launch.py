"""Launch settings: safe defaults (loopback, no share link), a warning for open binding without a password, the
folders clients may use (--data-root, --model-root) and the request guard in front of Gradio. Plain functions, so
tests check them without starting a server."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
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
    data_roots: list[str] = field(default_factory=list)
    model_roots: list[str] = field(default_factory=list)
    allow_pickle_from_clients: bool = False
    allowed_hosts: list[str] = field(default_factory=list)

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
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a folder whose datasets the UI and API may open: read images, write captions, read prompt files "
                        "(repeatable; without it: uploads and the built-in demo datasets only)")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="a folder whose base models and LoRA files clients may load by path (repeatable; without it: "
                        "builtin:tiny, hub ids and LoRAs under the output root only)")
    p.add_argument("--allow-pickle-from-clients", action="store_true",
                   help="let clients turn on allow_pickle for .ckpt files under --model-root (runs code from those files: "
                        "only if you trust every client and every file there)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another host name browsers may use to reach this server, e.g. behind a reverse proxy "
                        "(IP addresses, localhost and this machine's name are always accepted)")
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
    from .access import resolved, too_broad

    for flag, folders in (("--data-root", args.data_root), ("--model-root", args.model_root)):
        for folder in folders:
            if not resolved(folder).is_dir():
                p.error(f"{flag} {folder}: no such folder")
            if too_broad(folder):
                warnings.append(f"WARNING: {flag} {folder} opens the filesystem root or a home folder to every client of "
                                "this server. Name the folder that holds your datasets or models instead.")
    if args.allow_pickle_from_clients and not args.model_root:
        warnings.append("NOTE: --allow-pickle-from-clients has no effect without --model-root: clients may only load "
                        "model files from a --model-root folder.")
    return LaunchSettings(args.host, args.port, auth, args.share, args.output_root, warnings,
                          data_roots=list(args.data_root), model_roots=list(args.model_root),
                          allow_pickle_from_clients=args.allow_pickle_from_clients, allowed_hosts=list(args.allowed_host))


def blocked_paths(service) -> list[str]:
    """Never served, whatever else allows it: credentials and caches no page needs (the Hugging Face folder with its
    token, ~/.ssh, sdlora's cache). Folders that hold the output root are left out."""
    from ..paths import cache_dir
    from .access import is_inside, resolved

    folders = [Path.home() / ".ssh", cache_dir()]
    try:
        from huggingface_hub import constants

        folders += [Path(constants.HF_HOME), Path(constants.HF_TOKEN_PATH)]
    except Exception:  # noqa: BLE001 - huggingface_hub is a dependency; its constants moving must not stop the UI
        folders.append(Path.home() / ".cache" / "huggingface")
    out = []
    for folder in folders:
        folder = resolved(folder)
        if not is_inside(service.output_root, folder) and str(folder) not in out:
            out.append(str(folder))
    return out


def make_service_for(settings: LaunchSettings, presets_dir=None):
    """The Services for these settings (the folders clients may use come from the flags)."""
    from .layout import make_service

    return make_service(settings.output_root, presets_dir, data_roots=settings.data_roots, model_roots=settings.model_roots,
                        pickle_from_clients=settings.allow_pickle_from_clients)


def launch_kwargs(settings: LaunchSettings, service) -> dict[str, Any]:
    """Arguments for Blocks.launch(). Gradio may serve the output root (and its own upload/cache folder); the
    request guard in front of it narrows that to the files sdlora writes there, and checks Host and Origin."""
    from starlette.middleware import Middleware

    from .http_guard import RequestGuard
    from .layout import CSS

    hosts = [*settings.allowed_hosts] + ([settings.host] if settings.host not in ("0.0.0.0", "::", "") else [])
    guard = Middleware(RequestGuard, allowed_hosts=hosts, share=settings.share, may_serve=service.access.may_serve)

    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "auth": settings.auth,
        "share": settings.share,
        "allowed_paths": service.allowed_paths(),
        "blocked_paths": blocked_paths(service),
        "app_kwargs": {"middleware": [guard]},
        "max_file_size": MAX_FILE_SIZE,
        "show_error": True,
        "quiet": True,
        "ssr_mode": False,
        "footer_links": ["api"],
        "css": CSS,
    }
