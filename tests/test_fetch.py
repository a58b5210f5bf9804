"""weights.fetch without the internet: a dead port, and a file served from 127.0.0.1."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.app import extraction
from engine.features import checkpoint
from engine.features import model as model_lib
from weights import convert, fetch, sources


def _use(monkeypatch, source: sources.Source) -> None:
  monkeypatch.setitem(sources.SOURCES, source.name, source)


@pytest.fixture
def server(tmp_path):
  """Serves `tmp_path/www` on 127.0.0.1; yields (folder, base URL, list of requested paths)."""
  root = tmp_path / "www"
  root.mkdir()
  requested = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      requested.append(self.path)

  httpd = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
  )
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requested
  finally:
    httpd.shutdown()
    httpd.server_close()


def _tiny_timm_file(path) -> bytes:
  config = model_lib.ModelConfig.tiny()
  rng = np.random.default_rng(0)
  shapes = convert._expected_shapes(convert.timm_table(config), config)
  save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}, str(path))
  return path.read_bytes()


def test_offline_fails_fast_naming_url_and_convert_command(monkeypatch, tmp_path):
  url = "http://127.0.0.1:9/vgg16-397923af.pth"  # discard port: nothing listens
  _use(monkeypatch, dataclasses.replace(sources.TORCHVISION, url=url))
  start = time.monotonic()
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch("torchvision", tmp_path / "cache")
  assert time.monotonic() - start < fetch.CONNECT_TIMEOUT_S + 5
  msg = str(e.value)
  assert "\n" not in msg
  assert url in msg
  assert "python -m weights.convert --source=torchvision --input=FILE --output=DIR" in msg
  leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
  assert not leftovers


def test_wrong_sha256_is_rejected(monkeypatch, tmp_path, server):
  root, base, _ = server
  data = _tiny_timm_file(root / "model.safetensors")
  wrong = hashlib.sha256(data + b"x").hexdigest()
  _use(
    monkeypatch, dataclasses.replace(sources.TIMM, url=f"{base}/model.safetensors", sha256=wrong)
  )
  with pytest.raises(fetch.FetchError, match=f"sha256 {hashlib.sha256(data).hexdigest()}"):
    fetch.fetch("timm", tmp_path / "cache")
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_wrong_prefix_and_md5_are_rejected(monkeypatch, tmp_path, server):
  root, base, _ = server
  _tiny_timm_file(root / "model.safetensors")
  url = f"{base}/model.safetensors"
  _use(
    monkeypatch, dataclasses.replace(sources.TIMM, url=url, sha256=None, sha256_prefix="00000000")
  )
  with pytest.raises(fetch.FetchError, match="expected one starting with 00000000"):
    fetch.fetch("timm", tmp_path / "cache")
  _use(monkeypatch, dataclasses.replace(sources.TIMM, url=url, sha256=None, md5="0" * 32))
  with pytest.raises(fetch.FetchError, match="md5"):
    fetch.fetch("timm", tmp_path / "cache")


def test_download_verify_convert_then_cached(monkeypatch, tmp_path, server, capsys):
  root, base, requested = server
  data = _tiny_timm_file(root / "model.safetensors")
  digest = hashlib.sha256(data).hexdigest()
  # No published sha256 (the Keras case): the md5 is checked and the computed sha256 printed.
  _use(
    monkeypatch,
    dataclasses.replace(
      sources.TIMM,
      url=f"{base}/model.safetensors",
      sha256=None,
      md5=hashlib.md5(data).hexdigest(),
      size=len(data),
    ),
  )
  path = fetch.fetch("timm", tmp_path / "cache")
  assert path == str(tmp_path / "cache" / "timm-vgg16")
  info = checkpoint.read_info(path)
  assert (info.source, info.source_sha256, info.convention) == ("timm", digest, "torch")
  assert digest in capsys.readouterr().err
  assert len(requested) == 1
  assert fetch.fetch("timm", tmp_path / "cache") == path
  assert len(requested) == 1  # already converted: nothing downloaded


def test_fetch_writes_to_the_engine_cache_where_auto_weights_are_found(
  monkeypatch, tmp_path, server
):
  root, base, _ = server
  data = _tiny_timm_file(root / "model.safetensors")
  url = f"{base}/model.safetensors"
  _use(
    monkeypatch,
    dataclasses.replace(
      sources.TIMM, url=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    ),
  )
  cache = tmp_path / "engine-cache"
  monkeypatch.setenv("VGG_RETRIEVAL_CACHE", str(cache))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache must not be used
  path = fetch.fetch("timm")
  assert path == str(cache / "timm-vgg16")
  assert not (tmp_path / "home").exists()
  assert extraction.find_cached_weights() == path
  assert extraction.resolve_weights("auto") == path
  ex = extraction.build("gem", extraction.Settings(image_size=64, batch_size=2))
  assert ex.weights_info.source == "timm" and ex.weights_spec == path


def test_sources_are_consistent():
  for name, src in sources.SOURCES.items():
    assert name == src.name and src.url.startswith("https://") and src.url.endswith(src.filename)
    assert src.convention in ("caffe", "torch")
    assert src.sha256 or src.md5 or src.sha256_prefix, name
    if src.sha256 and src.sha256_prefix:
      assert src.sha256.startswith(src.sha256_prefix)
  assert set(sources.SOURCES) == set(convert.TABLES)
  assert sources.TORCHVISION.sha256_prefix in sources.TORCHVISION.filename
