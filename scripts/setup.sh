#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it. Usage: scripts/setup.sh [EXTRAS]
# EXTRAS is a pip extras list such as "test" or "test,bench".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
spec="."
[ -n "$extras" ] && spec=".[$extras]"
# Versions the project is tested with (scripts/constraints.txt).
python -m pip install -q -c scripts/constraints.txt -e "$spec"
# The ONNX exporter of the OpenVINO backend, where the install above brought OpenVINO (x86-64,
# Python 3.11+; pyproject.toml). It pins an older orbax-checkpoint than the engine needs and runs
# fine without it, hence --no-deps. Without it the engine extracts with XLA and says why.
if python -c "import openvino" 2>/dev/null && ! python -c "import jax2onnx" 2>/dev/null; then
  python -m pip install -q --no-deps "jax2onnx==0.17.1" \
    || echo "warning: jax2onnx did not install; extraction will run on XLA (slower on CPU)" >&2
fi
# NNCF, which calibrates --precision=int8 (pyproject's `int8` extra), wherever OpenVINO installed:
# the default set-up can then build int8 indexes. Without it int8 calibration says how to get it.
if python -c "import openvino" 2>/dev/null && ! python -c "import nncf" 2>/dev/null; then
  python -m pip install -q -c scripts/constraints.txt "nncf>=3.4" \
    || echo "warning: nncf did not install; --precision=int8 cannot calibrate new indexes" >&2
fi
# The native search kernels (engine/kernels/native): built here, never while searching; the search
# falls back to XLA (one warning says why) where they are not built or the CPU has neither AVX2 nor
# AVX-512 (then nothing is compiled).
python -m engine.kernels.native || true
