"""Launch settings: safe defaults (loopback, no share link), a warning for open binding without a password."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass


@dataclass
class LaunchSettings:
    host: str
    port: int
    auth: tuple[str, str] | None
    share: bool
    warnings: list[str]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_launch_args(argv: list[str] | None = None) -> tuple[LaunchSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python app.py", description="sdlora web UI")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASS", help="require this login")
    p.add_argument("--share", action="store_true", help="create a public share link (off by default)")
    p.add_argument("--output-root", default="outputs", help="where trained LoRAs, uploads and exports go")
    args = p.parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            p.error("--auth must be USER:PASS")
        auth = (user, password)
    warnings = []
    if not is_loopback(args.host) and auth is None:
        warnings.append(f"WARNING: binding to {args.host} without --auth: anyone who can reach this machine can use sdlora "
                        "and read its output folder. Add --auth USER:PASS.")
    if args.share and auth is None:
        warnings.append("WARNING: --share without --auth publishes sdlora on a public link with no password. Add --auth USER:PASS.")
    return LaunchSettings(args.host, args.port, auth, args.share, warnings), args
