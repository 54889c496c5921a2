#!/usr/bin/env bash
# Set everything up and start the sdlora web UI (http://127.0.0.1:7860 by default). Extra flags go to app.py.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
