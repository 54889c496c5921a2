"""sdlora web UI: `python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--share] [--output-root DIR]
[--data-root DIR ...] [--model-root DIR ...] [--allow-pickle-from-clients] [--allowed-host NAME ...]`."""

import sys

from sdlora.config.train_config import ConfigError
from sdlora.ui import build_app
from sdlora.ui.launch import launch_kwargs, make_service_for, parse_launch_args


def main(argv=None) -> int:
    settings = parse_launch_args(argv)
    for warning in settings.warnings:
        print(warning, file=sys.stderr, flush=True)
    try:
        service = make_service_for(settings)
    except ConfigError as exc:
        print(f"Cannot start: {exc}", file=sys.stderr)
        return 2
    demo = build_app(service)
    bound = "" if settings.url.startswith(f"http://{settings.host}:") else f", listening on {settings.host}"
    print(f"sdlora UI: {settings.url}  (outputs in {service.output_root}{bound})", flush=True)
    print(f"Clients may use {service.access.describe()}.", flush=True)
    try:
        demo.queue(default_concurrency_limit=2).launch(**launch_kwargs(settings, service))
    except OSError as exc:
        reason = str(exc).rstrip(".")
        print(f"Cannot start the web server on {settings.host}:{settings.port}: {reason}. Pick another --port.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
