#!/usr/bin/env bash
# Quick start 1: set up the environment, then run the main job (the built-in demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/minilab run recipes/demo.yaml "$@"
