"""sdlora web UI: `python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--share] [--output-root DIR]`."""

import sys

from sdlora.ui import build_app, make_service
from sdlora.ui.launch import launch_kwargs, parse_launch_args


def main(argv=None) -> int:
    settings = parse_launch_args(argv)
    for warning in settings.warnings:
        print(warning, file=sys.stderr, flush=True)
    service = make_service(settings.output_root)
    demo = build_app(service)
    bound = "" if settings.url.startswith(f"http://{settings.host}:") else f", listening on {settings.host}"
    print(f"sdlora UI: {settings.url}  (outputs in {service.output_root}{bound})", flush=True)
    try:
        demo.queue(default_concurrency_limit=2).launch(**launch_kwargs(settings, service))
    except OSError as exc:
        reason = str(exc).rstrip(".")
        print(f"Cannot start the web server on {settings.host}:{settings.port}: {reason}. Pick another --port.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
