#!/usr/bin/env bash
# Create (or update) the project environment in .venv and install minilab into it.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# PyTorch is named with its exact pin on the install line itself, so pip never considers a CUDA build.
echo "==> installing minilab and its dependencies into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
