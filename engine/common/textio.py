r"""One line per record in text outputs, whatever a file name holds.

File names may contain newlines, tabs, backslashes, other control characters and bytes that are
not UTF-8. Every line-based output (paths.txt, errors.txt, last_run_failures.tsv, the query and
dedup text on stdout) writes a name through `escape`: a backslash becomes `\\`, newline `\n`,
carriage return `\r`, tab `\t`, any other control character `\xNN` (`\uNNNN` above 0xff), and
the bytes of a non-UTF-8 name (surrogateescape'd when decoded) are kept as they are when encoded
with `encode`. `unescape` and `decode` invert them exactly, so names round-trip.
"""

from __future__ import annotations

import re

_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SPECIAL = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPE = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4})")
_UNNAMED = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def _escape_char(m: re.Match) -> str:
  c = m.group(0)
  if c in _NAMED:
    return _NAMED[c]
  return f"\\x{ord(c):02x}" if ord(c) <= 0xFF else f"\\u{ord(c):04x}"


def escape(text: str) -> str:
  """`text` with backslashes and control characters escaped: it fits on one line."""
  return _SPECIAL.sub(_escape_char, text)


def unescape(text: str) -> str:
  """Inverts `escape`."""

  def one(m: re.Match) -> str:
    e = m.group(1)
    return _UNNAMED[e] if e in _UNNAMED else chr(int(e[1:], 16))

  return _ESCAPE.sub(one, text)


def encode(lines: list[list[str]]) -> bytes:
  """Records of fields -> tab-separated, newline-terminated lines of escaped fields, as bytes (the
  original bytes of non-UTF-8 names kept)."""
  text = "".join("\t".join(escape(f) for f in fields) + "\n" for fields in lines)
  return text.encode("utf-8", "surrogateescape")


def decode(data: bytes) -> list[list[str]]:
  """Inverts `encode`."""
  text = data.decode("utf-8", "surrogateescape")
  return [[unescape(f) for f in line.split("\t")] for line in text.split("\n")[:-1]]
