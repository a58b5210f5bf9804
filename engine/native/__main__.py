"""`python -m engine.native`: builds the native kernel and says whether it is usable (exit 1 if not)."""

import sys

from engine import native

print(native.status())
sys.exit(0 if native.available() else 1)
