"""Runs the absl binaries (`engine.index`, `engine.query`, ...) for tests: in this process or as a
subprocess, with one result type for both.

In-process (the default) runs the module as `__main__` with `runpy`, exactly as `python -m` does:
its docstring is the usage text, its flags are registered under its file name (what `--help`
lists), `app.run` parses the arguments, and stdout and stderr are captured as bytes through text
streams encoded the way a subprocess's pipes are (UTF-8, stderr with `backslashreplace`). The exit
code comes from `SystemExit`; any other exception is printed as a traceback on the captured stderr
with exit code 1, as the interpreter would. Afterwards the flags the run defined are deleted and
the rest reset, so the next binary defines its own. It saves the 8-10 s of interpreter start,
imports, model build and compilation of every subprocess: the jitted functions stay compiled.

Use `subprocess=True` for what only a real process shows: one smoke test per binary, crash points
that SIGKILL the process (`fault=`), output written to file descriptors below Python, environment
read once per process (e.g. `VGG_RETRIEVAL_NATIVE`), and concurrent runs (in-process runs take a
lock and go one at a time).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import logging as std_logging
import os
import runpy
import shutil
import subprocess as subprocess_lib
import sys
import tempfile
import threading
import traceback

from absl import flags
from absl import logging as absl_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Exported graphs and other caches of the runs land here (both kinds of run).
CACHE = tempfile.mkdtemp(prefix="vgg-retrieval-test-cache-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
# The arguments of a tiny model that every binary test uses: random weights, 64 px, XLA.
TINY = ["--weights=random:5", "--config=tiny", "--image_size=64", "--batch_size=4", "--backend=xla"]

# Runs a binary's __main__ with a crash point armed: argv = [point, n, module, *args].
_ARMED_MAIN = (
  "import runpy, sys; from engine.store import faults; "
  "point, n, module = sys.argv[1:4]; del sys.argv[1:4]; faults.kill_at(point, int(n)); "
  "sys.argv[0] = module; runpy.run_module(module, run_name='__main__', alter_sys=True)"
)

_LOCK = threading.RLock()


@dataclasses.dataclass
class Result:
  """What a run left: exit code (negative: killed by that signal), raw output and its text."""

  args: list[str]
  returncode: int
  stdout: bytes
  stderr: bytes

  @property
  def out(self) -> str:
    return self.stdout.decode("utf-8", "surrogateescape")

  @property
  def err(self) -> str:
    return self.stderr.decode("utf-8", "surrogateescape")


def run(
  module: str,
  *args: str,
  ok: bool | None = True,
  env: dict[str, str] | None = None,
  timeout: float = 300,
  fault: str | None = None,
  subprocess: bool = False,
) -> Result:
  """Runs `python -m module *args` (in this process unless `subprocess` or `fault`).

  A `module` ending in `.py` is a script file, run as `python FILE *args`.

  ok: True: must exit 0; False: must fail as a user error does (exit code above 0, no traceback,
    exactly one line starting with "error" on stderr); None: no check.
  env: variables added to the environment for the run.
  fault: "POINT:N" SIGKILLs the binary the N-th time it reaches the store's crash point POINT
    (always a subprocess).
  """
  env = {"VGG_RETRIEVAL_CACHE": CACHE, **(env or {})}
  if subprocess or fault:
    result = _run_subprocess(module, list(args), env, timeout, fault)
  else:
    result = run_in_process(module, list(args), env)
  check(result, ok)
  return result


def check(result: Result, ok: bool | None) -> None:
  name = " ".join(result.args)
  if ok is True:
    assert result.returncode == 0, f"{name} failed:\n{result.out}\n{result.err}"
  elif ok is False:
    assert result.returncode != 0, f"{name} should fail:\n{result.out}"
    assert result.returncode > 0, f"{name} died from a signal:\n{result.err}"
    assert "Traceback" not in result.err, result.err
    errors = [ln for ln in result.err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, result.err


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a child Python: this one (compilation cache included), the repository
  importable, plus `env`."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return {**os.environ, "PYTHONPATH": path, **(env or {})}


def _run_subprocess(module, args, env, timeout, fault) -> Result:
  if fault:
    point, _, n = fault.partition(":")
    argv = [sys.executable, "-c", _ARMED_MAIN, point, n or "1", module, *args]
  elif module.endswith(".py"):
    argv = [sys.executable, module, *args]
  else:
    argv = [sys.executable, "-m", module, *args]
  proc = subprocess_lib.run(
    argv, cwd=ROOT, capture_output=True, env=subprocess_env(env), timeout=timeout
  )
  return Result([module, *args], proc.returncode, proc.stdout, proc.stderr)


def run_in_process(module: str, args: list[str], env: dict[str, str] | None = None) -> Result:
  """`python -m module *args` inside this process (one at a time); see the module docstring."""
  out, err = io.BytesIO(), io.BytesIO()
  with _LOCK, _environ(env or {}):
    # What a pipe gives a child Python: UTF-8, strict on stdout, backslashreplace on stderr.
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    with _redirect(stdout, stderr):
      code = _main(module, args)
    stdout.flush()
    stderr.flush()
    result = Result([module, *args], code, out.getvalue(), err.getvalue())
    stdout.detach()
    stderr.detach()
  return result


def _main(module: str, args: list[str]) -> int:
  fv = flags.FLAGS
  before = set(fv)
  argv = sys.argv
  sys.argv = [module, *args]  # runpy puts the module's file name in argv[0], as `python -m` does
  # A child logs at INFO (app.run sets --verbosity=0 on its first run in a process, only then).
  fv.verbosity = 0
  try:
    if module.endswith(".py"):
      runpy.run_path(module, run_name="__main__")
    else:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
  except SystemExit as e:
    code = _exit_code(e.code)
  except KeyboardInterrupt:
    raise
  except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
    traceback.print_exc()
    code = 1
  finally:
    sys.argv = argv
    _forget_flags(fv, before)
  return code


def _exit_code(code) -> int:
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)  # sys.exit("message"): printed, exit code 1
  return 1


def _forget_flags(fv: flags.FlagValues, before: set[str]) -> None:
  """Deletes the flags the run defined (absl's own stay: they are defined once per process) and
  resets the others to their defaults, unparsed."""
  for name in set(fv) - before:
    if not (fv.find_module_defining_flag(name) or "").startswith("absl."):
      delattr(fv, name)
  fv.unparse_flags()


@contextlib.contextmanager
def _redirect(stdout, stderr):
  """sys.stdout/err replaced; absl's log handler (created with the stderr of its time) follows."""
  absl_handler = absl_logging.get_absl_handler()
  handler = absl_handler.python_handler
  old_stream = handler.stream
  old_level = std_logging.root.level
  attached = absl_handler in std_logging.root.handlers
  # As in a fresh process, where app.run attaches it: a library may have detached it since (the
  # OpenVINO converter does when imported).
  absl_logging.use_absl_handler()
  handler.stream = stderr
  try:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      yield
  finally:
    handler.stream = old_stream
    if not attached:
      std_logging.root.removeHandler(absl_handler)
    std_logging.root.setLevel(old_level)  # app.run sets INFO (--verbosity=0) on first use


@contextlib.contextmanager
def _environ(env: dict[str, str]):
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
