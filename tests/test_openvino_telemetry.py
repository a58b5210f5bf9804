"""OpenVINO's import-time usage telemetry: declined unless the user opted in, without a fork."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("openvino_telemetry")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, os, sys
forks = []
_fork = os.fork
os.fork = lambda: forks.append(1) or _fork()
from engine.features import backends
backends.import_openvino()
from openvino_telemetry import Telemetry
print(json.dumps({"forks": len(forks), "consent": bool(Telemetry().consent)}))
"""


def _run(home):
  env = {**os.environ, "HOME": str(home), "PYTHONPATH": ROOT}
  for ci in ("CI", "TF_BUILD", "JENKINS_URL"):  # OpenVINO declines by itself on CI machines
    env.pop(ci, None)
  out = subprocess.run(
    [sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_consent_file_means_no_telemetry_and_no_fork(tmp_path):
  assert _run(tmp_path) == {"forks": 0, "consent": False}
  assert not any(tmp_path.rglob("openvino_telemetry")), "the user's consent file is not written"


def test_an_explicit_opt_in_is_kept(tmp_path):
  from openvino_telemetry.utils import opt_in_checker

  env_home = os.environ.get("HOME")
  os.environ["HOME"] = str(tmp_path)
  try:
    path = opt_in_checker.OptInChecker().consent_file()
  finally:
    if env_home is None:
      del os.environ["HOME"]
    else:
      os.environ["HOME"] = env_home
  if path is None or not str(path).startswith(str(tmp_path)):
    pytest.skip(f"OpenVINO keeps its consent file outside HOME here ({path})")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("1")
  assert _run(tmp_path)["consent"] is True
