#!/usr/bin/env bash
# The test suite: installs the project with its test and cpu extras (OpenVINO fast path), a CPU
# PyTorch (an independent reference) and the ONNX exporter, checks lint, then runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,cpu
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# The exporter (scripts/setup.sh installs it where the default install has OpenVINO; the `cpu`
# extra brings OpenVINO everywhere). It pins an older orbax-checkpoint; it runs fine without it.
python -c "import jax2onnx" 2>/dev/null || python -m pip install -q --no-deps "jax2onnx==0.17.1"
ruff check . && ruff format --check . >/dev/null
# The layering of the engine (pyproject.toml, [tool.importlinter]).
lint-imports --no-cache >/dev/null || lint-imports --no-cache
python -m pytest -q "$@"
