"""An ASGI middleware in front of the Gradio app: Host and Origin checks, and which files may be fetched.

- Host (DNS rebinding): a web page on evil.example whose name is re-pointed at 127.0.0.1 talks to this server from
  the browser with `Host: evil.example`. Every request must name this machine: an IP address, `localhost`
  (`*.localhost`), this machine's host name, a `--allowed-host NAME`, or (with --share) the share link's host.
- Origin (CSRF): a state-changing request (anything but GET/HEAD/OPTIONS) that carries an Origin must come from
  the page's own origin (the same host and port as the Host header, or an allowed host); `Origin: null` (sandboxed
  frames, local files) is refused. Clients that send no Origin (gradio_client, curl) are not browsers: they pass.
- Files: `/gradio_api/file=PATH` serves only what the access policy allows (files sdlora wrote under the output
  root) and Gradio's own upload/cache folder; everything else is refused before Gradio looks at it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
FILE_ROUTE = re.compile(r"^/gradio_api/file(?:=|/)(?P<path>.*)$", re.DOTALL)
SHARE_DOMAIN = ".gradio.live"


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit(f"//{netloc}").hostname  # lower-cased, brackets of IPv6 literals removed
    except ValueError:
        return None


def _port(netloc: str, scheme: str = "http") -> int | None:
    try:
        port = urlsplit(f"//{netloc}").port
    except ValueError:
        return -1
    return port if port is not None else {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def gradio_file_folders() -> list[Path]:
    """Where Gradio keeps uploads and the copies of files handlers return (it serves those itself)."""
    from gradio import utils

    folders = [Path(utils.get_upload_folder())]
    try:
        folders.append(Path(utils.get_cache_folder()))
    except Exception:  # noqa: BLE001 - older/newer Gradio without a cache folder helper
        pass
    return [Path(os.path.abspath(f)).resolve() for f in folders]


class RequestGuard:
    """ASGI middleware; see the module docstring. `may_serve(path)` decides file requests outside Gradio's folders."""

    def __init__(self, app, *, allowed_hosts: Iterable[str] = (), share: bool = False,
                 may_serve: Callable[[str], bool] | None = None):
        self.app = app
        names = {"localhost", socket.gethostname().lower()}
        names |= {h.strip().lower().rstrip(".") for h in allowed_hosts if h and h.strip()}
        self.allowed_names = {n for n in names if n}
        self.share = share
        self.may_serve = may_serve
        self._gradio_folders: list[Path] | None = None

    def host_allowed(self, name: str | None) -> bool:
        if not name:
            return False
        name = name.rstrip(".")
        return (_is_ip(name) or name in self.allowed_names or name.endswith(".localhost")
                or (self.share and name.endswith(SHARE_DOMAIN)))

    def origin_allowed(self, origin: str, host: str) -> bool:
        if not origin or origin == "null":
            return False
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        if parts.hostname == _hostname(host) and _port(parts.netloc, parts.scheme) == _port(host, parts.scheme):
            return True
        # Behind a reverse proxy the Host may be rewritten; an origin the user named with --allowed-host is fine.
        return parts.hostname in self.allowed_names - {"localhost"} and not _is_ip(parts.hostname)

    def file_allowed(self, path: str) -> bool:
        if "://" in path or path.startswith(("http:", "https:")):
            return False  # sdlora never asks the server to fetch remote files
        try:
            target = Path(os.path.abspath(path)).resolve()
        except (OSError, RuntimeError, ValueError):
            return False
        if self._gradio_folders is None:
            self._gradio_folders = gradio_file_folders()
        if any(target.is_relative_to(folder) for folder in self._gradio_folders):
            return True  # Gradio's own copies (uploads, handler outputs); Gradio checks these itself
        return bool(self.may_serve and self.may_serve(str(target)))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.host_allowed(_hostname(host)):
            await self._refuse(scope, receive, send, 403,
                               f"Host '{host[:100]}' is not this server. Open it as http://127.0.0.1:PORT/ or start the "
                               "server with --allowed-host NAME.")
            return
        method = scope.get("method", "GET").upper() if scope["type"] == "http" else "WEBSOCKET"
        if method not in SAFE_METHODS and "origin" in headers and not self.origin_allowed(headers["origin"], host):
            await self._refuse(scope, receive, send, 403,
                               f"Cross-origin request from '{headers['origin'][:100]}' refused: only this server's own "
                               "page may change anything.")
            return
        if scope["type"] == "http" and method in ("GET", "HEAD"):
            root = scope.get("root_path", "") or ""
            path = scope.get("path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            match = FILE_ROUTE.match(path)
            if match and not self.file_allowed(match.group("path")):
                await self._refuse(scope, receive, send, 403, "File not allowed.")
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, text: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
