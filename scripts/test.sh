#!/usr/bin/env bash
# The test suite: installs the project with its test extras (and a CPU PyTorch, used as an
# independent reference), checks lint, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
ruff check . && ruff format --check . >/dev/null
python -m pytest -q "$@"
