r"""Serves similarity search over HTTP: for photo managers, scripts and a page in the browser.

  python -m engine.serve --index=DIR [--host=127.0.0.1] [--port=8765] [--allow_root=DIR]
      [--token_file=FILE | --token=TOKEN | --insecure]

Loads the index's extractor once, compiles the shapes it serves at start-up, and answers until
interrupted; the index may keep growing (another process running engine.index): each request sees
the last commit. The API is in README.md. Listens on loopback unless told otherwise; another
address needs a token (or an explicit --insecure).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from engine import cli
from engine.app import extraction, service

_INDEX = flags.DEFINE_string("index", None, "Index folder built by engine.index.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (loopback by default).")
_PORT = flags.DEFINE_integer("port", 8765, "Port (0: any free one, printed at start).")
_TOKEN = flags.DEFINE_string(
  "token", None, "Every request must carry it (Authorization: Bearer TOKEN). Prefer --token_file."
)
_TOKEN_FILE = flags.DEFINE_string("token_file", None, "Read the token from this file.")
_INSECURE = flags.DEFINE_bool(
  "insecure", False, "Allow a non-loopback --host without a token (anyone who reaches it may ask)."
)
_ALLOW_ROOT = flags.DEFINE_string(
  "allow_root", None, 'Folder whose files POST /search {"path": ...} may read (off by default).'
)
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 32.0, "Largest request body, in MB.")
_MAX_K = flags.DEFINE_integer("max_k", 100, "Largest k a request may ask for.", lower_bound=1)
_BATCH_WINDOW_MS = flags.DEFINE_float(
  "batch_window_ms", 2.0, "How long a query waits for others to share its extraction call."
)
_MAX_PENDING = flags.DEFINE_integer(
  "max_pending", 64, "Searches admitted at once; more get 503 with Retry-After.", lower_bound=1
)
_WARMUP = flags.DEFINE_enum(
  "warmup",
  "all",
  ["all", "square", "none"],
  "Shapes compiled at start-up: every batch size of every input bucket, of the square bucket "
  "only, or none (the first queries of each shape then compile).",
)
cli.define_extractor_flags()
flags.adopt_module_key_flags(cli)
flags.mark_flag_as_required("index")


def _token() -> str | None:
  if _TOKEN.value is not None and _TOKEN_FILE.value is not None:
    raise app.UsageError("give --token or --token_file, not both")
  if _TOKEN_FILE.value is None:
    return _TOKEN.value
  with open(os.path.expanduser(_TOKEN_FILE.value), encoding="utf-8") as f:
    token = f.read().strip()
  if not token:
    raise cli.UserError(f"the token file {_TOKEN_FILE.value} is empty")
  return token


def _host_header(host: str) -> str:
  """`host` as a Host header names it (IPv6 literals in brackets)."""
  host = host.strip("[]")
  return f"[{host}]" if ":" in host else host


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.user_errors():
    token = _token()
    loopback = service.is_loopback(_HOST.value)
    if not loopback and token is None and not _INSECURE.value:
      raise app.UsageError(
        f"--host={_HOST.value} is reachable from other machines: give --token_file (or --token), "
        "or --insecure to serve anyone who reaches it"
      )
    config = service.ServiceConfig(
      index_path=_INDEX.value,
      allow_root=os.path.expanduser(_ALLOW_ROOT.value) if _ALLOW_ROOT.value else None,
      token=token,
      trusted_hosts=(*service.LOOPBACK_NAMES, _host_header(_HOST.value)) if loopback else None,
      max_upload_bytes=int(_MAX_UPLOAD_MB.value * (1 << 20)),
      max_k=_MAX_K.value,
      batch_window_s=_BATCH_WINDOW_MS.value / 1e3,
      max_pending=_MAX_PENDING.value,
      warmup=_WARMUP.value,
    )
    extractor = extraction.for_index(_INDEX.value, cli.settings(), explicit=cli.explicit_settings())
    sock = service.bind(_HOST.value, _PORT.value)
    svc = service.Service(config, extractor)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"serving {_INDEX.value} on http://{host}:{port}/", file=sys.stderr, flush=True)
    service.serve(svc, sock)


if __name__ == "__main__":
  app.run(main)
