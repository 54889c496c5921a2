"""sdlora web UI: `python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--share] [--output-root DIR]`."""

import sys

from sdlora.ui import build_app, make_service
from sdlora.ui.launch import parse_launch_args


def main(argv=None) -> None:
    settings, args = parse_launch_args(argv)
    for warning in settings.warnings:
        print(warning, file=sys.stderr)
    service = make_service(args.output_root)
    demo = build_app(service)
    print(f"sdlora UI on http://{settings.host}:{settings.port}", flush=True)
    demo.queue(default_concurrency_limit=2).launch(
        server_name=settings.host, server_port=settings.port, auth=settings.auth, share=settings.share,
        allowed_paths=service.allowed_paths(), show_error=True, quiet=True)


if __name__ == "__main__":
    main()
