"""`python -m engine.kernels.native`: builds the native kernels and says which are usable (exit 1 if none)."""

import sys

from engine.kernels import native

print(native.status())
sys.exit(0 if native.available("int8") or native.available("bfloat16") else 1)
