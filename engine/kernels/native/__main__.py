"""`python -m engine.kernels.native`: builds the native kernels and says which are usable.

Exits 1 when none is (the search then runs XLA's products): no compiler, an untrusted cache, or a
CPU that runs none of them (then nothing is compiled).
"""

import sys

from engine.kernels import native

try:
  print(f"built {native.build()}")
except RuntimeError as e:
  print(e)
print(native.status())
sys.exit(0 if any(native.available(d) for d in native.DTYPES) else 1)
