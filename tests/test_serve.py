"""engine.serve end to end: the binary in a subprocess, asked over HTTP on loopback."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from engine.app import sample, service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--weights=random:5", "--config=tiny", "--image_size=64", "--batch_size=4", "--backend=xla"]
HOSTILE = "<img src=x onerror=window.pwned=1>&amp;.jpg"  # a legal file name, and markup


def _env():
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def index_folder(photos, index, *extra):
  proc = subprocess.run(
    [sys.executable, "-m", "engine.index", f"--images={photos}", f"--index={index}", *TINY, *extra],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=_env(),
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def write_scene(path, seed, size=(96, 80)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sample.scene(np.random.default_rng(seed), *size).save(path)
  return str(path)


class Server:
  """`python -m engine.serve` on a free loopback port, stopped on exit."""

  def __init__(self, index, *flags):
    self.proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "engine.serve",
        f"--index={index}",
        "--port=0",
        "--backend=xla",
        *flags,
      ],
      cwd=ROOT,
      stderr=subprocess.PIPE,
      stdout=subprocess.DEVNULL,
      text=True,
      env=_env(),
    )
    self.log: list[str] = []
    found = threading.Event()

    def read():
      for line in self.proc.stderr:
        self.log.append(line)
        m = re.search(r" on (http://\S+/)$", line.strip())
        if m:
          self.url = m.group(1)
          found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 600
    while not found.wait(0.2):
      if self.proc.poll() is not None or time.monotonic() > deadline:
        self.stop()
        pytest.fail("engine.serve did not start:\n" + "".join(self.log))

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()

  def request(self, path, data=None, headers=None, method=None):
    """(status, headers, body bytes) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(self.url.rstrip("/") + path, data, headers or {}, method=method)
    try:
      with urllib.request.urlopen(req, timeout=300) as resp:
        return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
      return e.code, e.headers, e.read()

  def json(self, path, data=None, headers=None):
    status, _, body = self.request(path, data, headers)
    return status, json.loads(body)

  def upload(self, path_or_bytes, query="", field="image"):
    data = path_or_bytes
    if not isinstance(data, bytes):
      with open(path_or_bytes, "rb") as f:
        data = f.read()
    boundary = uuid.uuid4().hex
    body = (
      (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
      ).encode()
      + data
      + f"\r\n--{boundary}--\r\n".encode()
    )
    return self.json(
      "/search" + query, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  photos = root / "photos"
  for i in range(6):
    write_scene(photos / f"p{i}.jpg", seed=300 + i)
  write_scene(photos / HOSTILE, seed=400)
  shutil.copy(photos / "p0.jpg", photos / "copy_of_p0.jpg")
  outside = write_scene(root / "outside" / "secret.jpg", seed=500)
  os.symlink(outside, photos / "link_out.jpg")
  index = root / "idx"
  index_folder(photos, index)
  return root, photos, index, outside


@pytest.fixture(scope="module")
def server(collection):
  _, photos, index, _ = collection
  srv = Server(index, f"--allow_root={photos}", "--max_upload_mb=1", "--warmup=square")
  yield srv
  srv.stop()


def test_search_similar_stats_thumbs(server, collection):
  _, photos, _, _ = collection
  status, health = server.json("/healthz")
  assert status == 200 and health == {"ok": True}

  status, out = server.upload(photos / "p0.jpg", "?k=3")
  assert status == 200, out
  assert out["model"] == "tiny" and out["weights"] == "random" and out["random_weights"]
  assert out["rows"] == 9 and len(out["matches"]) == 3
  top2 = {m["key"] for m in out["matches"][:2]}
  assert top2 == {str(photos / "p0.jpg"), str(photos / "copy_of_p0.jpg")}
  assert out["matches"][0]["score"] > 0.99
  assert [m["rank"] for m in out["matches"]] == [1, 2, 3]
  scores = [m["score"] for m in out["matches"]]
  assert scores == sorted(scores, reverse=True)

  # The same image as a raw body, and by path under --allow_root, answers the same.
  with open(photos / "p0.jpg", "rb") as f:
    raw = f.read()
  status, same = server.json("/search?k=3", raw, {"Content-Type": "image/jpeg"})
  assert status == 200 and same["matches"] == out["matches"]
  status, by_path = server.json(
    "/search?k=3", json.dumps({"path": "p0.jpg"}).encode(), {"Content-Type": "application/json"}
  )
  assert status == 200 and [m["key"] for m in by_path["matches"]] == [
    m["key"] for m in out["matches"]
  ]

  status, cut = server.upload(photos / "p0.jpg", f"?k=9&min_score={scores[2] + 1e-6}")
  assert status == 200 and len(cut["matches"]) == 2

  # k=3 and k=20 take different compiled shapes (K_BUCKETS): the same ranking, cut at k.
  status, wide = server.upload(photos / "p0.jpg", "?k=20")
  assert status == 200 and len(wide["matches"]) == 9
  assert [m["key"] for m in wide["matches"][:3]] == [m["key"] for m in out["matches"]]
  np.testing.assert_allclose([m["score"] for m in wide["matches"][:3]], scores, rtol=0, atol=1e-6)

  key = str(photos / "p0.jpg")
  status, sim = server.json("/similar?" + urllib.parse.urlencode({"key": key, "k": 8}))
  assert status == 200 and sim["key"] == key
  assert [m["key"] for m in sim["matches"]][0] == str(photos / "copy_of_p0.jpg")
  assert key not in {m["key"] for m in sim["matches"]} and len(sim["matches"]) == 8

  hostile = str(photos / HOSTILE)
  status, hdrs, jpeg = server.request("/thumb?" + urllib.parse.urlencode({"key": hostile}))
  assert status == 200 and hdrs["Content-Type"] == "image/jpeg"
  assert Image.open(io.BytesIO(jpeg)).size[0] <= 160

  status, stats = server.json("/stats")
  assert status == 200
  assert stats["rows"] == 9 and stats["dtype"] == "int8" and stats["model"] == "tiny"
  assert stats["queries"]["search"]["served"] >= 4 and stats["queries"]["similar"]["served"] >= 1
  assert stats["queries"]["search"]["p99_ms"] >= stats["queries"]["search"]["p50_ms"] > 0
  assert stats["uptime_s"] > 0

  status, hdrs, page = server.request("/")
  assert status == 200 and b"<title>" in page
  assert "script-src 'self'" in hdrs["Content-Security-Policy"]
  assert hdrs["X-Content-Type-Options"] == "nosniff"


def test_paths_and_keys_outside_give_the_same_404(server, collection):
  root, photos, _, outside = collection
  missing = server.json(
    "/search", json.dumps({"path": "no_such.jpg"}).encode(), {"Content-Type": "application/json"}
  )
  assert missing == (404, {"error": "not found"})
  for path in [outside, "../outside/secret.jpg", "link_out.jpg", str(root / "nothing.jpg"), "."]:
    got = server.json(
      "/search", json.dumps({"path": path}).encode(), {"Content-Type": "application/json"}
    )
    assert got == missing, path
  # Keys: only what the index holds (the symlink is indexed under its own name, the file it
  # points to is not a key).
  for key in [outside, "/etc/passwd", str(photos / "nothing.jpg")]:
    q = urllib.parse.urlencode({"key": key})
    assert server.json("/similar?" + q) == missing, key
    status, _, body = server.request("/thumb?" + q)
    assert (status, json.loads(body)) == missing, key


def test_bad_requests(server, collection):
  _, photos, _, _ = collection
  status, out = server.json("/search", b"not an image", {"Content-Type": "image/jpeg"})
  assert status == 422 and "not a recognised image format" in out["error"]

  # A PNG header claiming 40000 x 40000 pixels: refused by the indexer's size guard, not decoded.
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  data = (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    + chunk(b"IEND", b"")
  )
  status, out = server.json("/search", bytes(data), {"Content-Type": "image/png"})
  assert status == 422 and "too large" in out["error"]

  big = os.urandom(1_200_000)
  status, out = server.json("/search", big, {"Content-Type": "image/jpeg"})
  assert status == 413 and "limit" in out["error"]
  status, out = server.upload(big)
  assert status == 413

  assert server.json("/search", b"x", {"Content-Type": "text/plain"})[0] == 415
  assert server.upload(photos / "p0.jpg", field="other")[0] == 400
  for query in ["?k=0", "?k=101", "?k=x", "?min_score=nan"]:
    assert server.upload(photos / "p0.jpg", query)[0] == 400, query
  assert server.json("/similar")[0] == 400
  status, _, _ = server.request("/healthz", headers={"Host": "attacker.example"})
  assert status == 400  # DNS rebinding: a loopback service answers its own names only


def test_concurrent_clients_get_their_own_answers(server, collection):
  _, photos, _, _ = collection
  names = ["p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg"] * 4
  answers = [None] * len(names)

  def ask(i):
    answers[i] = server.upload(photos / names[i], "?k=1")

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for name, (status, out) in zip(names, answers, strict=True):
    assert status == 200 and out["matches"][0]["key"] == str(photos / name), out


def test_token_loopback_and_admission(collection, tmp_path):
  _, photos, index, _ = collection
  token = base64.urlsafe_b64encode(os.urandom(18)).decode()
  (tmp_path / "token").write_text(token + "\n")

  # Another address without a token is refused before anything loads.
  proc = subprocess.run(
    [sys.executable, "-m", "engine.serve", f"--index={index}", "--host=0.0.0.0"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=_env(),
    timeout=300,
  )
  assert proc.returncode != 0 and "--token_file" in proc.stderr, proc.stderr

  srv = Server(index, f"--token_file={tmp_path / 'token'}", "--max_pending=1", "--warmup=none")
  try:
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": token}]:
      for path in ["/healthz", "/stats", "/", "/similar?key=x"]:
        status, _, body = srv.request(path, headers=headers)
        assert status == 401 and json.loads(body) == {"error": "unauthorized"}, (path, headers)
    assert srv.request("/?token=wrong")[0] == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert srv.json("/healthz", headers=auth) == (200, {"ok": True})

    # The page's sign-in: /?token= sets an HttpOnly cookie and redirects to a clean address.
    conn = socket.create_connection(srv.url[len("http://") :].rstrip("/").split(":"))
    host = srv.url[len("http://") :].rstrip("/")
    conn.sendall(f"GET /?token={token} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = conn.recv(65536).decode()
    conn.close()
    assert head.startswith("HTTP/1.1 303") and "location: /\r\n" in head.lower()
    cookie = re.search(r"set-cookie: (vgg_retrieval_token=[^;]+);.*httponly", head, re.I)
    assert cookie and "samesite=strict" in head.lower()
    assert srv.request("/stats", headers={"Cookie": cookie.group(1)})[0] == 200

    # One place only (--max_pending=1): a search still sending its body holds it.
    addr = host.split(":")
    slow = socket.create_connection((addr[0], int(addr[1])))
    slow.sendall(
      (
        f"POST /search HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\nxx"
      ).encode()
    )
    deadline = time.monotonic() + 60
    while srv.json("/stats", headers=auth)[1]["pending"] < 1 and time.monotonic() < deadline:
      time.sleep(0.05)
    with open(photos / "p0.jpg", "rb") as f:
      status, hdrs, body = srv.request(
        "/search", f.read(), {**auth, "Content-Type": "image/jpeg"}, method="POST"
      )
    assert status == 503 and hdrs["Retry-After"] == "1", body
    slow.close()
    assert srv.json("/stats", headers=auth)[1]["rejected"] == 1
  finally:
    srv.stop()


def test_answers_stay_consistent_while_the_index_grows(tmp_path):
  photos = tmp_path / "photos"
  first = [write_scene(photos / f"a{i}.jpg", seed=600 + i) for i in range(4)]
  index = tmp_path / "idx"
  index_folder(photos, index)
  later = [write_scene(photos / f"b{i:02d}.jpg", seed=700 + i) for i in range(14)]
  known = set(first) | set(later)
  srv = Server(index, "--warmup=square")
  try:
    errors, seen = [], []
    stop = threading.Event()
    with open(first[0], "rb") as f:
      query = f.read()

    def ask():
      while not stop.is_set():
        status, out = srv.json("/search?k=20", query, {"Content-Type": "image/jpeg"})
        status2, sim = srv.json("/similar?" + urllib.parse.urlencode({"key": first[1], "k": 20}))
        if status != 200 or status2 != 200:
          errors.append((status, out, status2, sim))
          continue
        keys = [m["key"] for m in out["matches"]]
        if keys[0] != first[0] or not out["matches"][0]["score"] > 0.99:
          errors.append(("not itself first", out))
        if (
          not set(keys) <= known or len(keys) != min(20, out["rows"]) or len(set(keys)) != len(keys)
        ):
          errors.append(("bad keys", out))
        if len(sim["matches"]) != min(20, sim["rows"] - 1) or first[1] in {
          m["key"] for m in sim["matches"]
        }:
          errors.append(("bad neighbours", sim))
        seen.append((out["generation"], out["rows"]))

    client = threading.Thread(target=ask)
    client.start()
    try:
      # Many small commits, the merges they trigger, then a compaction rewriting every segment.
      index_folder(photos, index, "--commit_every=2", "--compact")
    finally:
      deadline = time.monotonic() + 120
      while time.monotonic() < deadline:
        status, stats = srv.json("/stats")
        if stats["rows"] == len(known):
          break
        time.sleep(0.2)
      stop.set()
      client.join()
    assert not errors, errors[:3]
    assert stats["rows"] == len(known) and stats["reloads"] >= 1, stats
    assert seen and seen == sorted(seen)  # generations and rows only move forward
    assert len({g for g, _ in seen}) >= 2  # the client saw the index grow under it
    status, out = srv.json("/search?k=20", query, {"Content-Type": "image/jpeg"})
    assert status == 200 and len(out["matches"]) == len(known)
  finally:
    srv.stop()


def _chromium() -> str | None:
  for name in ("chromium", "chromium-browser", "google-chrome"):
    if shutil.which(name):
      return shutil.which(name)
  return None


def test_page_in_a_headless_browser(server, collection):
  sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
  browser_path = _chromium()
  if browser_path is None:
    pytest.skip("no Chromium on this machine (apt-get install chromium)")
  _, photos, _, _ = collection
  with sync_api.sync_playwright() as p:
    try:
      browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
    except Exception as e:  # noqa: BLE001 - a browser that does not start is a skip, with why
      pytest.skip(f"Chromium does not start here: {str(e).splitlines()[0]}")
    try:
      # The page runs under its CSP; bypass_csp only lets the test evaluate its own probes (and
      # makes the escaping check stricter: nothing but textContent keeps markup out).
      page = browser.new_page(bypass_csp=True)
      page.goto(server.url)
      page.wait_for_function("document.getElementById('info').textContent.includes('9 images')")
      assert "RANDOM" in page.text_content("#note")

      # Pick a file.
      page.fill("#k", "9")
      page.set_input_files("#file", str(photos / "p0.jpg"))
      page.wait_for_function("document.querySelectorAll('figure.match').length === 9")
      captions = page.eval_on_selector_all(
        "figure.match figcaption", "els => els.map(e => e.textContent)"
      )
      assert captions[0].startswith("#1 ") and captions[0].endswith(("p0.jpg", "copy_of_p0.jpg"))
      assert any(c.endswith(HOSTILE) for c in captions), captions  # shown as text, not markup
      page.wait_for_function(
        "[...document.querySelectorAll('figure img')].every(i => i.complete && i.naturalWidth > 0)"
      )
      assert page.evaluate("window.pwned") is None
      assert page.eval_on_selector_all("img", "els => els.length") == 10  # query + 9, no injected

      # Drop a file on the page.
      with open(photos / "p3.jpg", "rb") as f:
        b64 = base64.b64encode(f.read()).decode()
      page.evaluate(
        """b64 => {
          const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
          document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        b64,
      )
      page.wait_for_function(
        "document.querySelector('figure.query figcaption').textContent === 'query: dropped.jpg'"
        " && document.querySelectorAll('figure.match').length === 9"
      )
      first = page.text_content("figure.match figcaption")
      assert first.startswith("#1 ") and first.endswith("p3.jpg")

      # A bad file says why.
      bad = collection[0] / "bad.jpg"
      bad.write_bytes(b"not an image")
      page.set_input_files("#file", str(bad))
      page.wait_for_selector("#status.error")
      assert "not a recognised image format" in page.text_content("#status")
    finally:
      browser.close()


def test_loopback_names():
  assert service.is_loopback("127.0.0.1") and service.is_loopback("::1")
  assert service.is_loopback("localhost") and service.is_loopback("127.3.4.5")
  assert not service.is_loopback("0.0.0.0") and not service.is_loopback("192.168.1.2")
  assert not service.is_loopback("example.com")


def test_batcher_collects_waiting_items_into_one_call():
  gate, calls = threading.Event(), []

  def double(items):
    calls.append(list(items))
    if len(calls) == 1:
      gate.wait(60)
    if -1 in items:
      raise ValueError("bad item")
    return [2 * x for x in items]

  batcher = service.Batcher(double, max_batch=8, window_s=0.0)
  try:
    first = batcher.submit(0)
    deadline = time.monotonic() + 60
    while not calls and time.monotonic() < deadline:
      time.sleep(0.01)
    rest = [batcher.submit(i) for i in range(1, 11)]  # they wait while the first call runs
    gate.set()
    assert [f.result(60) for f in [first, *rest]] == [2 * i for i in range(11)]
    assert [len(c) for c in calls] == [1, 8, 2]
    bad = batcher.submit(-1)
    with pytest.raises(ValueError, match="bad item"):
      bad.result(60)
    assert batcher.submit(5).result(60) == 10  # the thread outlives a failed batch
    assert batcher.batches == 4 and batcher.items == 12
  finally:
    gate.set()
    batcher.close()


def test_live_index_follows_commits_and_keeps_the_last_good_state(tmp_path, tiny_weights):
  from engine import store
  from engine.features.extractor import Extractor

  ex = Extractor(tiny_weights, "gem", image_size=64, config="tiny", batch_size=2)
  rng = np.random.default_rng(0)
  path = tmp_path / "idx"
  writer = store.Index.create(path, dim=ex.dim, metadata=ex.index_metadata())
  try:
    writer.add(rng.standard_normal((3, ex.dim)), ["a", "b", "c"])
    live = service.LiveIndex(str(path), ex)
    with live.snapshot() as old:
      assert len(old) == 3
      writer.add(rng.standard_normal((2, ex.dim)), ["d", "e"])
      with live.snapshot() as new:
        assert len(new) == 5 and new.generation == old.generation + 1 and live.reloads == 1
      assert len(old) == 3 and np.size(old.search(rng.standard_normal((1, ex.dim)), k=5)[1]) == 3
    assert old._closed  # released by its last user, after the new state took over
    writer.compact()
    with live.snapshot() as idx:
      assert sorted(idx.keys()) == ["a", "b", "c", "d", "e"]
    # A manifest that does not load: the last good state goes on serving.
    manifest = path / store.MANIFEST
    good = manifest.read_bytes()
    manifest.write_bytes(b"{not json")
    with live.snapshot() as idx:
      assert len(idx) == 5
    manifest.write_bytes(good)
  finally:
    writer.close()


def test_bad_flags_are_one_line_errors(tmp_path, collection):
  index = collection[2]
  cases = [
    ([f"--index={tmp_path / 'nothing'}"], "no index"),
    ([f"--index={index}", f"--allow_root={tmp_path / 'nowhere'}"], "is not a folder"),
    ([f"--index={index}", "--token=a", f"--token_file={tmp_path / 't'}"], "not both"),
    ([f"--index={index}", f"--token_file={tmp_path / 'missing'}"], "No such file"),
  ]

  def run(args):
    return subprocess.run(
      [sys.executable, "-m", "engine.serve", *args, "--backend=xla"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=_env(),
      timeout=600,
    )

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for (args, expect), proc in zip(cases, pool.map(run, [a for a, _ in cases]), strict=True):
      assert proc.returncode == 1 and expect in proc.stderr, (args, proc.stderr)
      assert "Traceback" not in proc.stderr, proc.stderr
