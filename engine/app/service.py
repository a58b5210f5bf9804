"""The similarity service behind `engine.serve`: an ASGI app (Starlette) over the library calls the
other binaries make.

One extractor (the index's own, loaded and compiled once), one read-only view of the index that
follows the writer's commits, and a micro-batcher: concurrent `/search` requests are decoded in
their own threads, then collected for a short window into one extraction call and one search call.

Routes (JSON unless said otherwise; errors are `{"error": "..."}`):

  POST /search?k=&min_score=   an image: multipart field `image`, or a raw `image/*` or
                               `application/octet-stream` body; or `{"path": ...}` (JSON) for a
                               file under the configured `allow_root`
  GET  /similar?key=&k=&min_score=   neighbours of an indexed image, without re-extraction
  GET  /thumb?key=             a JPEG thumbnail of an indexed image (keys only, never other paths)
  GET  /healthz, GET /stats    liveness; rows, model, dtype, uptime, queries, latency percentiles
  GET  /, /page.js             the page: drop or pick an image, see the ranked thumbnails
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import http.cookies
import importlib.resources
import io
import ipaddress
import json
import math
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from engine import store
from engine.app import report
from engine.common.errors import UserError
from engine.features import images
from engine.features.extractor import Extractor, IncompatibleExtractorError, check_compatible
from engine.features.preprocess import bucket_shapes
from engine.store import manifest as manifest_lib

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")  # as Host headers name them
TOKEN_COOKIE = "vgg_retrieval_token"
_LATENCY_WINDOW = 2048  # the latest requests the percentiles are taken over
# The k a search asks the index for: the smallest of these (capped at max_k) that covers the
# request, each a shape compiled at start-up.
K_BUCKETS = (10, 100)


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
  """How the service answers.

  Attributes:
    index_path: the index folder (built by `engine.index`).
    allow_root: folder whose files `POST /search {"path": ...}` may read; None refuses paths.
    token: if set, every request must carry it (`Authorization: Bearer TOKEN`, or the cookie the
      page sets after `/?token=TOKEN`).
    trusted_hosts: Host header values accepted (guards a loopback service against DNS
      rebinding); None accepts any.
    max_upload_bytes: largest request body.
    max_k: largest k. A search asks the index for the smallest of `K_BUCKETS` (and max_k) that
      covers its k, so a few shapes are compiled and k=10 does not pay for k=100.
    batch_window_s: how long the batcher waits for more requests after the first.
    max_batch: most queries in one extraction call (default: the extractor's batch size).
    max_pending: most `/search` requests admitted at once (reading, decoding, waiting or being
      served); beyond it, 503 with Retry-After.
    warmup: `all` compiles every batch shape of every input bucket at start-up, `square` those
      of the square bucket only, `none` nothing.
  """

  index_path: str
  allow_root: str | None = None
  token: str | None = None
  trusted_hosts: tuple[str, ...] | None = LOOPBACK_NAMES
  max_upload_bytes: int = 32 << 20
  max_k: int = 100
  batch_window_s: float = 0.002
  max_batch: int | None = None
  max_pending: int = 64
  warmup: str = "all"

  def __post_init__(self):
    if self.max_k < 1:
      raise UserError(f"max_k must be positive, got {self.max_k}")
    if self.max_upload_bytes < 1:
      raise UserError(f"max_upload_bytes must be positive, got {self.max_upload_bytes}")
    if self.max_pending < 1:
      raise UserError(f"max_pending must be positive, got {self.max_pending}")
    if not 0 <= self.batch_window_s <= 1:
      raise UserError(f"the batch window must be within [0, 1] s, got {self.batch_window_s}")
    if self.warmup not in ("all", "square", "none"):
      raise UserError(f"warmup must be all, square or none, got {self.warmup!r}")
    if self.token is not None and not self.token:
      raise UserError("the token is empty")
    if self.allow_root is not None and not os.path.isdir(self.allow_root):
      raise UserError(f"allow_root {self.allow_root} is not a folder")


def is_loopback(host: str) -> bool:
  """Whether binding `host` listens on this machine only."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


# ---------------------------------------------------------------- the index as last committed


class _Snapshot:
  def __init__(self, index: store.Index, signature: tuple):
    self.index = index
    self.signature = signature
    self.users = 0
    self.retired = False


class LiveIndex:
  """A read-only view of an index that follows another process's commits.

  Each `snapshot()` first checks whether the manifest (the commit point, replaced atomically) has
  changed and, if so, opens the index again; a request works on one opened state from start to end,
  and a state is closed once the last request using it is done. A reopen that fails (a damaged
  commit, another extractor) keeps the last good state and is retried on the next request.
  """

  def __init__(self, path: str, extractor: Extractor):
    self.path = path
    self._extractor = extractor
    self._lock = threading.Lock()
    self._reload_lock = threading.Lock()
    self._failed_signature: tuple | None = None
    self._current = self._open(self._signature())
    self.reloads = 0

  def _signature(self) -> tuple:
    try:
      st = os.stat(manifest_lib.path_of(self.path))
    except OSError:
      return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)

  def _open(self, signature: tuple) -> _Snapshot:
    idx = store.Index.open(self.path, readonly=True)
    try:
      check_compatible(idx.metadata, self._extractor)
    except BaseException:
      idx.close()
      raise
    return _Snapshot(idx, signature)

  def _refresh(self) -> None:
    sig = self._signature()
    if sig == self._current.signature or sig == self._failed_signature or not sig:
      return
    with self._reload_lock:
      if sig == self._current.signature:
        return
      try:
        # The signature is read before the open: a commit landing during it is seen next time.
        new = self._open(sig)
      except (store.StoreError, IncompatibleExtractorError, OSError) as e:
        self._failed_signature = sig
        logging.warning("keeping the last good state of %s: %s", self.path, e)
        return
      with self._lock:
        old, self._current = self._current, new
        old.retired = True
        if old.users == 0:
          old.index.close()
      self.reloads += 1

  @contextlib.contextmanager
  def snapshot(self) -> Iterator[store.Index]:
    """The index as last committed, held open until the block ends."""
    self._refresh()
    with self._lock:
      snap = self._current
      snap.users += 1
    try:
      yield snap.index
    finally:
      with self._lock:
        snap.users -= 1
        if snap.retired and snap.users == 0:
          snap.index.close()

  def close(self) -> None:
    with self._lock:
      self._current.retired = True
      if self._current.users == 0:
        self._current.index.close()


# ---------------------------------------------------------------- micro-batching


class Batcher:
  """Runs `fn(items) -> results` on batches of concurrently submitted items, in one thread.

  The first item waits at most `window_s` for company; a batch holds at most `max_batch` items.
  Items that arrive while a batch runs form the next one, so the batch size grows with the load.
  """

  _STOP = object()

  def __init__(self, fn: Callable[[list], Sequence], *, max_batch: int, window_s: float):
    self._fn = fn
    self._max_batch = max_batch
    self._window_s = window_s
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self.batches = 0
    self.items = 0
    self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
    self._thread.start()

  def submit(self, item) -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put((item, fut))
    return fut

  def _collect(self) -> list | None:
    first = self._queue.get()
    if first is self._STOP:
      return None
    batch = [first]
    deadline = time.monotonic() + self._window_s
    while len(batch) < self._max_batch:
      try:
        nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if nxt is self._STOP:
        self._queue.put(nxt)
        break
      batch.append(nxt)
    return batch

  def _run(self) -> None:
    while (batch := self._collect()) is not None:
      futures = [fut for _, fut in batch]
      try:
        results = self._fn([item for item, _ in batch])
      except Exception as e:  # noqa: BLE001 - each waiting request gets the error, the thread lives
        logging.exception("a batch of %d queries failed", len(batch))
        for fut in futures:
          fut.set_exception(e)
        continue
      self.batches += 1
      self.items += len(batch)
      for fut, res in zip(futures, results, strict=True):
        fut.set_result(res)

  def close(self) -> None:
    self._queue.put(self._STOP)
    self._thread.join()


# ---------------------------------------------------------------- the service


@dataclasses.dataclass
class Answer:
  """One query's matches, best first, and the index state they come from."""

  matches: list[tuple[str, float]]
  rows: int
  generation: int


class _Latency:
  def __init__(self):
    self.served = 0
    self.recent: collections.deque = collections.deque(maxlen=_LATENCY_WINDOW)

  def add(self, seconds: float) -> None:
    self.served += 1
    self.recent.append(seconds)

  def summary(self) -> dict:
    out = {"served": self.served}
    if self.recent:
      ms = np.array(list(self.recent)) * 1e3
      out |= {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "window": len(ms),
      }
    return out


def _json(content, status: int = 200, headers: dict | None = None) -> Response:
  # ensure_ascii: keys that are not UTF-8 (surrogate escapes) stay valid JSON.
  body = json.dumps(content, ensure_ascii=True, allow_nan=False).encode("ascii")
  return Response(body, status, headers, media_type="application/json")


def _error(status: int, message: str, headers: dict | None = None) -> HTTPException:
  return HTTPException(status, message, headers)


_NOT_FOUND = "not found"


class Service:
  """The model, the index and the batcher behind the routes; `app()` is the ASGI application."""

  def __init__(self, config: ServiceConfig, extractor: Extractor):
    self.config = config
    self.extractor = extractor
    self.index = LiveIndex(config.index_path, extractor)
    self.started = time.monotonic()
    self.latency = {"search": _Latency(), "similar": _Latency()}
    self.rejected = 0
    self._pending = threading.BoundedSemaphore(config.max_pending)
    self._pending_count = 0
    self._count_lock = threading.Lock()
    self.k_buckets = sorted({min(b, config.max_k) for b in K_BUCKETS} | {config.max_k})
    self._warm_up()
    self._batcher = Batcher(
      self._run_batch,
      max_batch=config.max_batch or extractor.batch_size,
      window_s=config.batch_window_s,
    )

  def close(self) -> None:
    self._batcher.close()
    self.index.close()

  # -- start-up

  def input_shapes(self, which: str = "all") -> list[tuple[int, int]]:
    """(height, width) of every input bucket the extractor can be fed."""
    pre = self.extractor.preprocessing
    if pre.resize != "keep_aspect":
      return [(pre.size, pre.size)]
    if which == "square":
      return [(pre.size, pre.size)]
    return bucket_shapes(pre.size)

  def batch_sizes(self) -> list[int]:
    max_batch = self.config.max_batch or self.extractor.batch_size
    return sorted({self.extractor.padded_batch(n) for n in range(1, max_batch + 1)})

  def _warm_up(self) -> None:
    """Compiles the extraction of every batch shape, and the search of every query count."""
    if self.config.warmup == "none":
      return
    t0 = time.monotonic()
    rng = np.random.default_rng(0)
    for h, w in self.input_shapes(self.config.warmup):
      for b in self.batch_sizes():
        jax.block_until_ready(
          self.extractor.run_batch(rng.integers(0, 256, (b, h, w, 3), np.uint8))
        )
    with self.index.snapshot() as idx:
      if len(idx):
        for kk in self.k_buckets:
          for b in self.batch_sizes():
            idx.search(rng.standard_normal((b, idx.dim)).astype(np.float32), k=kk)
          idx.search(rng.standard_normal((1, idx.dim)).astype(np.float32), k=kk + 1)
    logging.info("compiled the service's shapes in %.1f s", time.monotonic() - t0)

  # -- the work

  def k_bucket(self, k: int) -> int:
    """How many results a search for the best `k` asks the index for (a compiled shape)."""
    return next(b for b in self.k_buckets if b >= k)

  def _run_batch(
    self, items: list[tuple[np.ndarray, int]]
  ) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """One extraction call and one search call for a batch of (decoded query, k)."""
    pixels = [p for p, _ in items]
    feats = self.extractor.extract_arrays(pixels)
    with self.index.snapshot() as idx:
      rows, gen = len(idx), idx.generation
      if not rows:
        empty = np.zeros((0,))
        return [(empty, empty, rows, gen)] * len(pixels)
      scores, keys = idx.search(feats, k=self.k_bucket(max(k for _, k in items)))
    return [(scores[i], keys[i], rows, gen) for i in range(len(pixels))]

  @staticmethod
  def _matches(scores, keys, k: int, min_score: float | None, exclude: str | None = None):
    out = []
    for key, s in zip(keys, scores, strict=True):
      if key is None or not np.isfinite(s) or key == exclude:
        continue
      if min_score is not None and s < min_score:
        break
      out.append((str(key), float(s)))
      if len(out) == k:
        break
    return out

  def similar(self, key: str, k: int, min_score: float | None = None) -> Answer | None:
    """Neighbours of an indexed image (itself left out), or None when the key is not indexed."""
    with self.index.snapshot() as idx:
      if key not in idx.live_rows():
        return None
      vec = idx.get_vectors([key])
      scores, keys = idx.search(vec, k=self.k_bucket(k) + 1)  # a shape compiled at start-up
      rows, gen = len(idx), idx.generation
    return Answer(self._matches(scores[0], keys[0], k, min_score, exclude=key), rows, gen)

  def thumbnail(self, key: str) -> bytes | None:
    """A JPEG thumbnail of the file of an indexed key; None for any other key."""
    with self.index.snapshot() as idx:
      if key not in idx.live_rows():
        return None
    return report.thumbnail_jpeg(key)

  def decode(self, data: bytes) -> np.ndarray:
    """Image bytes -> the extractor's input pixels, with the indexer's size and format guards."""
    return images.load(io.BytesIO(data), self.extractor.preprocessing)

  def allowed_file(self, path: str) -> str | None:
    """The real path of a regular file under `allow_root`, or None (for whatever reason)."""
    root = self.config.allow_root
    if root is None or not path or "\0" in path:
      return None
    root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([real, root]) != root:
      return None
    try:
      return real if stat.S_ISREG(os.stat(real).st_mode) else None
    except OSError:
      return None

  def stats(self) -> dict:
    with self.index.snapshot() as idx:
      meta = idx.metadata
      rows, gen, dtype, dim = len(idx), idx.generation, idx.dtype, idx.dim
    fp = meta.get("extractor", {})
    return {
      "index": os.path.abspath(self.config.index_path),
      "rows": rows,
      "generation": gen,
      "reloads": self.index.reloads,
      "dim": dim,
      "dtype": dtype,
      "model": fp.get("model"),
      "weights": fp.get("weights_source"),
      "random_weights": self.extractor.weights_info.is_random,
      "descriptor": fp.get("descriptor", {}).get("name"),
      "backend": self.extractor.backend,
      "uptime_s": round(time.monotonic() - self.started, 3),
      "queries": {name: lat.summary() for name, lat in self.latency.items()},
      "batches": self._batcher.batches,
      "mean_batch": round(self._batcher.items / self._batcher.batches, 3)
      if self._batcher.batches
      else None,
      "pending": self._pending_count,
      "max_pending": self.config.max_pending,
      "rejected": self.rejected,
    }

  @contextlib.contextmanager
  def admitted(self) -> Iterator[None]:
    """Holds one of the `max_pending` places of a `/search` request, or raises 503."""
    if not self._pending.acquire(blocking=False):
      with self._count_lock:
        self.rejected += 1
      raise _error(503, "too many queries in progress: retry shortly", {"Retry-After": "1"})
    with self._count_lock:
      self._pending_count += 1
    try:
      yield
    finally:
      with self._count_lock:
        self._pending_count -= 1
      self._pending.release()

  def labels(self) -> dict:
    fp = self.extractor.fingerprint()
    return {
      "model": fp["model"],
      "weights": fp["weights_source"],
      "random_weights": self.extractor.weights_info.is_random,
      "descriptor": fp["descriptor"]["name"],
    }

  # -- the ASGI application

  def app(self) -> Starlette:
    routes = [
      Route("/", self._page, methods=["GET"]),
      Route("/page.js", self._page_js, methods=["GET"]),
      Route("/healthz", self._healthz, methods=["GET"]),
      Route("/stats", self._stats, methods=["GET"]),
      Route("/search", self._search, methods=["POST"]),
      Route("/similar", self._similar, methods=["GET"]),
      Route("/thumb", self._thumb, methods=["GET"]),
    ]
    middleware = []
    if self.config.trusted_hosts is not None:
      middleware.append(
        Middleware(TrustedHostMiddleware, allowed_hosts=list(self.config.trusted_hosts))
      )
    middleware.append(
      Middleware(_Guard, token=self.config.token, max_body=self.config.max_upload_bytes)
    )
    return Starlette(
      routes=routes,
      middleware=middleware,
      exception_handlers={HTTPException: _http_error},
    )

  def _k_and_min_score(self, request: Request) -> tuple[int, float | None]:
    q = request.query_params
    try:
      k = int(q.get("k", "10"))
      min_score = float(q["min_score"]) if "min_score" in q else None
    except ValueError:
      raise _error(400, "k must be an integer and min_score a number") from None
    if not 1 <= k <= self.config.max_k:
      raise _error(400, f"k must be within [1, {self.config.max_k}]")
    if min_score is not None and not math.isfinite(min_score):
      raise _error(400, "min_score must be finite")
    return k, min_score

  def _reply(self, answer: Answer, **extra) -> Response:
    return _json(
      {
        **extra,
        **self.labels(),
        "rows": answer.rows,
        "generation": answer.generation,
        "matches": [
          {"rank": r + 1, "key": key, "score": score}
          for r, (key, score) in enumerate(answer.matches)
        ],
      }
    )

  async def _query_pixels(self, request: Request) -> np.ndarray:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
      if self.config.allow_root is None:
        raise _error(403, "path queries are off: start the server with --allow_root")
      try:
        body = json.loads(await request.body())
      except ValueError:
        raise _error(400, "the body is not valid JSON") from None
      path = body.get("path") if isinstance(body, dict) else None
      if not isinstance(path, str):
        raise _error(400, 'a JSON query is {"path": "FILE"}')
      real = await run_in_threadpool(self.allowed_file, path)
      if real is None:
        raise _error(404, _NOT_FOUND)
      return await run_in_threadpool(self._decode_file, real)
    if ctype == "multipart/form-data":
      async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
          raise _error(400, "the multipart field 'image' (a file) is missing")
        data = await upload.read()
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
      data = await request.body()
    else:
      raise _error(
        415, "send an image: multipart field 'image', an image/* body, or JSON {\"path\": ...}"
      )
    if not data:
      raise _error(400, "the image is empty")
    return await run_in_threadpool(self._decode_bytes, data)

  def _decode_bytes(self, data: bytes) -> np.ndarray:
    try:
      return self.decode(data)
    except images.ImageError as e:
      raise _error(422, f"cannot use the image: {e}") from None

  def _decode_file(self, path: str) -> np.ndarray:
    try:
      return images.load(path, self.extractor.preprocessing)
    except images.ImageError as e:
      raise _error(422, f"cannot use the image: {e}") from None

  async def _search(self, request: Request) -> Response:
    t0 = time.monotonic()
    k, min_score = self._k_and_min_score(request)
    with self.admitted():
      pixels = await self._query_pixels(request)
      fut = self._batcher.submit((pixels, k))
      scores, keys, rows, gen = await asyncio.wrap_future(fut)
    answer = Answer(self._matches(scores, keys, k, min_score), rows, gen)
    self.latency["search"].add(time.monotonic() - t0)
    return self._reply(answer)

  async def _similar(self, request: Request) -> Response:
    t0 = time.monotonic()
    k, min_score = self._k_and_min_score(request)
    key = request.query_params.get("key")
    if not key:
      raise _error(400, "key is missing")
    answer = await run_in_threadpool(self.similar, key, k, min_score)
    if answer is None:
      raise _error(404, _NOT_FOUND)
    self.latency["similar"].add(time.monotonic() - t0)
    return self._reply(answer, key=key)

  async def _thumb(self, request: Request) -> Response:
    key = request.query_params.get("key")
    jpeg = await run_in_threadpool(self.thumbnail, key) if key else None
    if jpeg is None:
      raise _error(404, _NOT_FOUND)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

  async def _healthz(self, request: Request) -> Response:
    return _json({"ok": True})

  async def _stats(self, request: Request) -> Response:
    return _json(await run_in_threadpool(self.stats))

  async def _page(self, request: Request) -> Response:
    if self.config.token is not None and "token" in request.query_params:
      # Checked by _Guard already: keep it in an HttpOnly cookie and drop it from the address.
      resp = RedirectResponse("/", status_code=303)
      resp.set_cookie(TOKEN_COOKIE, request.query_params["token"], httponly=True, samesite="strict")
      return resp
    return Response(
      _asset("page.html"), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS
    )

  async def _page_js(self, request: Request) -> Response:
    return Response(
      _asset("page.js"), media_type="text/javascript; charset=utf-8", headers=_PAGE_HEADERS
    )


_PAGE_HEADERS = {
  "Content-Security-Policy": (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' blob:; "
    "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
  ),
  "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
  return importlib.resources.files("engine.app").joinpath("static", name).read_bytes()


async def _http_error(request: Request, exc: HTTPException) -> Response:
  return _json({"error": exc.detail}, exc.status_code, exc.headers)


# A refused body is read and dropped up to this many bytes before the refusal is sent: a client
# still sending when the server closes gets a reset connection instead of the 413 (browsers and
# urllib send the whole body first; curl asks `Expect: 100-continue` and is spared the upload).
_DRAIN_BYTES = 64 << 20


async def _drain(receive, received: int) -> None:
  """Reads and drops the rest of a request body, up to `_DRAIN_BYTES` in all."""
  while received <= _DRAIN_BYTES:
    message = await receive()
    if message["type"] != "http.request":
      return
    received += len(message.get("body", b""))
    if not message.get("more_body", False):
      return


class _Guard:
  """ASGI middleware: the token on every request (constant-time compare), the body size limit,
  and headers every response carries."""

  def __init__(self, app, *, token: str | None, max_body: int):
    self.app = app
    self.token = token.encode() if token else None
    self.max_body = max_body

  def _authorized(self, scope) -> bool:
    headers = dict(scope["headers"])
    given = []
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
      given.append(auth[7:].strip())
    cookie = http.cookies.SimpleCookie()
    with contextlib.suppress(http.cookies.CookieError):
      cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    if TOKEN_COOKIE in cookie:
      given.append(cookie[TOKEN_COOKIE].value.encode("latin-1"))
    if scope["path"] == "/":
      query = Request(scope).query_params
      if "token" in query:
        given = [query["token"].encode()]  # the page's sign-in: this one alone counts
    ok = False
    for g in given:
      ok |= hmac.compare_digest(g, self.token)
    return ok

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def send_headers(message):
      if message["type"] == "http.response.start":
        message["headers"] = [
          *message.get("headers", []),
          (b"x-content-type-options", b"nosniff"),
          (b"referrer-policy", b"no-referrer"),
        ]
      await send(message)

    if self.token is not None and not self._authorized(scope):
      resp = _json({"error": "unauthorized"}, 401, {"WWW-Authenticate": "Bearer"})
      return await resp(scope, receive, send_headers)
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_body):
      if length.isdigit() and b"100-continue" not in headers.get(b"expect", b"").lower():
        await _drain(receive, 0)
      resp = _json({"error": f"the body is over the limit of {self.max_body} bytes"}, 413)
      return await resp(scope, receive, send_headers)
    received = 0

    async def limited():
      nonlocal received
      message = await receive()
      if message["type"] == "http.request":
        received += len(message.get("body", b""))
        if received > self.max_body:
          if message.get("more_body", False):
            await _drain(receive, received)
          raise _error(413, f"the body is over the limit of {self.max_body} bytes")
      return message

    await self.app(scope, limited, send_headers)


# ---------------------------------------------------------------- running it


def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket on host:port (port 0 picks a free one)."""
  family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host.strip("[]"), port))
  except OSError as e:
    sock.close()
    raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  sock.listen(128)
  return sock


def serve(service: Service, sock: socket.socket) -> None:
  """Serves `service` on the bound, listening socket until interrupted (SIGINT / SIGTERM).

  Connections made before the event loop starts wait in the socket's backlog.
  """
  import uvicorn  # the server, not the app: only what serves needs it

  config = uvicorn.Config(
    service.app(), log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5
  )
  try:
    uvicorn.Server(config).run(sockets=[sock])
  finally:
    service.close()
