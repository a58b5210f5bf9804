"""Mutation testing: plant one known bug at a time and check that the tests notice.

Each mutant replaces one exact string of a core module by another (the string must occur exactly
once, so a stale mutant is reported instead of silently doing nothing). The runner copies the
repository once into a temporary folder (tracked and untracked files, no `.git`, no caches), then for
each mutant edits the copy, runs the mutant's own test files there with pytest (stopping at the first
failure), and restores the file. A mutant is killed when pytest fails or times out; it survives when
the tests still pass. The unmutated copy is run first: a failing baseline makes every kill
meaningless, so the run stops there.

  python -m bench.mutants                   # every mutant
  python -m bench.mutants --only=rmac,fsync # names containing any of these
  python -m bench.mutants --list

Known survivors (equivalent mutants and the reason each is accepted) are listed in BUILD.md,
section "Mutation testing".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_ONLY = flags.DEFINE_list("only", [], "Run mutants whose name contains any of these.")
_LIST = flags.DEFINE_bool("list", False, "List the mutants and exit.")
_TIMEOUT = flags.DEFINE_integer("timeout", 300, "Seconds per mutant before it counts as killed.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the temporary copy (its path is printed).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str  # relative to the repository root
  old: str
  new: str
  tests: tuple[str, ...]  # pytest arguments: files or node ids


_DESC = "engine/features/descriptors.py"
_TOPK = "engine/kernels/topk.py"
_STREAMING = "engine/kernels/streaming.py"
_SEG = "engine/store/segments.py"
_FILEIO = "engine/common/fileio.py"
_REPORT = "engine/app/report.py"
_PRE = "engine/features/preprocess.py"
_CAT = "engine/store/catalog.py"
_SEARCH = "engine/store/search.py"

_T_DESC = ("tests/test_descriptors.py",)
_STATS = "engine/store/statistics.py"
_SEARCH = "engine/store/search.py"
_T_STATS = ("tests/test_stats.py",)
_T_QUANT = ("tests/test_quantize.py",)
_T_TOPK = ("tests/test_topk_paths.py",)
_T_IO = ("tests/test_fileio.py",)
_T_HTML = ("tests/test_report_escaping.py",)
_T_CONV = ("tests/test_conventions.py",)
_T_STORE = (
  "tests/test_store_rescore.py",
  "tests/test_store.py",
  "-k",
  "round_trip or compressed or int8 or exact",
)
_T_RECOVER = (
  "tests/test_catalog_recover.py",
  "tests/test_store.py::test_crash_before_manifest_commit_keeps_last_state",
  "tests/test_faults.py::test_manifest_one_commit_older_rolls_back_two_older_is_refused",
)

MUTANTS = [
  # quantisers
  Mutant(
    "quantize-rows-floor",
    _SEG,
    "np.rint(x / scale[:, None])",
    "np.floor(x / scale[:, None])",
    _T_QUANT,
  ),
  Mutant(
    "quantize-rows-trunc",
    _SEG,
    "np.clip(np.rint(x / scale[:, None]), -127, 127)",
    "np.clip(x / scale[:, None], -127, 127)",
    _T_QUANT,
  ),
  Mutant("quantize-rows-clip128", _SEG, "-127, 127)", "-128, 127)", _T_QUANT),
  Mutant("quantize-rows-scale", _SEG, "amax / 127.0, 1.0", "amax / 128.0, 1.0", _T_QUANT),
  Mutant(
    "quantize-queries-trunc",
    _TOPK,
    "jnp.round(q / qscale).astype(jnp.int8)",
    "(q / qscale).astype(jnp.int8)",
    _T_QUANT,
  ),
  # descriptors
  Mutant(
    "rmac-steps-one-too-few",
    _DESC,
    "overlap))) + 1",
    "overlap)))",
    _T_DESC,
  ),
  Mutant("rmac-overlap", _DESC, "overlap = 0.4", "overlap = 0.3", _T_DESC),
  Mutant(
    "rmac-region-side",
    _DESC,
    "wl = math.floor(2 * side / (level + 1))",
    "wl = math.floor(2 * side / (level + 2))",
    _T_DESC,
  ),
  Mutant(
    "rmac-grid-position",
    _DESC,
    "left = int(math.floor(j * step_w))",
    "left = int(math.ceil(j * step_w))",
    _T_DESC,
  ),
  Mutant("rmac-no-dedup", _DESC, "return list(dict.fromkeys(regions))", "return regions", _T_DESC),
  Mutant(
    "rmac-region-unnormalised",
    _DESC,
    "total = total + l2_normalize(fmap[:, top : top + rh, left : left + rw, :].max(axis=(1, 2)))",
    "total = total + fmap[:, top : top + rh, left : left + rw, :].max(axis=(1, 2))",
    _T_DESC,
  ),
  Mutant(
    "gem-root-fixed-p",
    _DESC,
    ".mean(axis=(1, 2)), 1.0 / p)",
    ".mean(axis=(1, 2)), 1.0 / 3.0)",
    _T_DESC,
  ),
  Mutant(
    "gem-power-fixed-p",
    _DESC,
    "jnp.power(jnp.maximum(fmap, EPS), p)",
    "jnp.power(jnp.maximum(fmap, EPS), 3.0)",
    _T_DESC,
  ),
  Mutant(
    "gem-no-clamp", _DESC, "jnp.power(jnp.maximum(fmap, EPS), p)", "jnp.power(fmap, p)", _T_DESC
  ),
  Mutant(
    "spoc-is-sum", _DESC, "return fmap.mean(axis=(1, 2))", "return fmap.sum(axis=(1, 2))", _T_DESC
  ),
  Mutant(
    "l2-normalize-l1",
    _DESC,
    "jnp.linalg.norm(x, axis=axis, keepdims=True)",
    "jnp.linalg.norm(x, ord=1, axis=axis, keepdims=True)",
    _T_DESC,
  ),
  Mutant(
    "describe-skips-normalize",
    _DESC,
    "return l2_normalize(out) if desc.normalize else out",
    "return out",
    _T_DESC,
  ),
  Mutant(
    "whitening-ascending-order",
    _DESC,
    "order = np.argsort(eig)[::-1][:dim]",
    "order = np.argsort(eig)[:dim]",
    _T_DESC,
  ),
  Mutant(
    "whitening-no-scale",
    _DESC,
    "scale = 1.0 / np.sqrt(",
    "scale = 1.0 + 0 * np.sqrt(",
    _T_DESC,
  ),
  # collection statistics
  Mutant(
    "statistics-bias-sign",
    _SEARCH,
    "weight[a:b] = -r",
    "weight[a:b] = r",
    _T_STATS,
  ),
  Mutant(
    "statistics-rescore-unnormalised-rows",
    _STATS,
    "return np.where(xn > _EPS, dots / np.maximum(xn, _EPS), 0.0)",
    "return dots",
    _T_STATS,
  ),
  Mutant(
    "statistics-whitening-unscaled",
    _STATS,
    "scale = 1.0 / np.sqrt(np.maximum(eig[order], 0)",
    "scale = 1.0 + 0 * np.sqrt(np.maximum(eig[order], 0)",
    _T_STATS,
  ),
  # top-k
  Mutant(
    "two-stage-k-minus-1-blocks",
    _TOPK,
    "lax.top_k(jnp.max(blocks, axis=-1), k)",
    "lax.top_k(jnp.max(blocks, axis=-1), k - 1)",
    _T_TOPK,
  ),
  Mutant(
    "two-stage-wrong-offset",
    _TOPK,
    "* _BLOCK + j % _BLOCK",
    "* _BLOCK + j % (_BLOCK - 1)",
    _T_TOPK,
  ),
  Mutant(
    "two-stage-block-mean",
    _TOPK,
    "lax.top_k(jnp.max(blocks, axis=-1), k)",
    "lax.top_k(jnp.mean(blocks, axis=-1), k)",
    _T_TOPK,
  ),
  Mutant(
    "merge-swapped-ids",
    _TOPK,
    "i = jnp.concatenate([jnp.asarray(ids_a), jnp.asarray(ids_b)], axis=1)",
    "i = jnp.concatenate([jnp.asarray(ids_b), jnp.asarray(ids_a)], axis=1)",
    _T_TOPK,
  ),
  Mutant(
    "scan-chunk-no-offset",
    _STREAMING,
    "i = jnp.where(i >= 0, i + offset, -1)",
    "i = jnp.where(i >= 0, i, -1)",
    _T_TOPK,
  ),
  Mutant(
    "tombstone-finite-bias",
    _TOPK,
    "bias = None if valid is None else jnp.where(valid, 0.0, -jnp.inf)",
    "bias = None if valid is None else jnp.where(valid, 0.0, -1e3)",
    _T_TOPK,
  ),
  Mutant(
    "cosine-query-not-normalised",
    _TOPK,
    "queries = queries / jnp.where(norm > 0, norm, 1.0)",
    "queries = queries",
    _T_TOPK,
  ),
  Mutant("int8-row-scales-dropped", _TOPK, "s = s * scales[None, :]", "s = s", _T_TOPK),
  Mutant(
    "l2-missing-factor-2",
    _TOPK,
    "s = 2.0 * s - (sq if bias is None",
    "s = s - (sq if bias is None",
    _T_TOPK,
  ),
  Mutant(
    "pad-ids-zero",
    _TOPK,
    "jnp.full((q, short), -1, ids.dtype)",
    "jnp.full((q, short), 0, ids.dtype)",
    _T_TOPK,
  ),
  Mutant(
    "bf16x2-low-part-dropped",
    _TOPK,
    "s = s2[: queries.shape[0]] + s2[queries.shape[0] :]",
    "s = s2[: queries.shape[0]]",
    _T_TOPK,
  ),
  Mutant(
    "float16-subnormal-scale",
    _TOPK,
    "jnp.float32(2.0**-24)",
    "jnp.float32(2.0**-23)",
    ("tests/test_search.py::test_half_storage_scores_the_stored_values",),
  ),
  Mutant("chunk-skip-partial", _STREAMING, "if not va.any():", "if not va.all():", _T_TOPK),
  # store re-scoring
  Mutant(
    "rescore-l2-sign",
    _SEARCH,
    '2.0 * dots - np.einsum("qkd,qkd->qk", x64, x64)',
    '2.0 * dots + np.einsum("qkd,qkd->qk", x64, x64)',
    _T_STORE,
  ),
  Mutant(
    "rescore-not-unit-length",
    _SEARCH,
    "s = dots / np.where(n > 0, n, 1.0)",
    "s = dots",
    _T_STORE,
  ),
  Mutant(
    "rescore-ascending",
    _SEARCH,
    'order = np.argsort(-s, axis=1, kind="stable")[:, :m]',
    'order = np.argsort(s, axis=1, kind="stable")[:, :m]',
    _T_STORE,
  ),
  # crash-safe writes
  Mutant("fsync-data-removed", _FILEIO, "      os.fsync(f.fileno())\n", "", _T_IO),
  Mutant("fsync-folder-removed", _FILEIO, "    raise\n  fsync_dir(folder)\n", "    raise\n", _T_IO),
  Mutant("fsync-dir-noop", _FILEIO, "  try:\n    os.fsync(fd)\n", "  try:\n    pass\n", _T_IO),
  Mutant(
    "rename-before-fsync",
    _FILEIO,
    "      os.fsync(f.fileno())\n    os.replace(tmp, path)\n",
    "      os.replace(tmp, path)\n      os.fsync(f.fileno())\n",
    _T_IO,
  ),
  # HTML report
  Mutant(
    "html-path-quotes-unescaped",
    _REPORT,
    "full = html.escape(path)",
    "full = html.escape(path, quote=False)",
    _T_HTML,
  ),
  Mutant(
    "html-name-quotes-unescaped",
    _REPORT,
    "name = html.escape(os.path.basename(path) or path)",
    "name = html.escape(os.path.basename(path) or path, quote=False)",
    _T_HTML,
  ),
  Mutant(
    "html-row-title-raw",
    _REPORT,
    'parts.append(f"<h2>{html.escape(row.title)}</h2>")',
    'parts.append(f"<h2>{row.title}</h2>")',
    _T_HTML,
  ),
  Mutant(
    "html-note-raw",
    _REPORT,
    "{html.escape(note)}</p>",
    "{note}</p>",
    _T_HTML,
  ),
  # pixel conventions
  Mutant(
    "caffe-no-bgr-swap",
    _PRE,
    "return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR",
    "return x - jnp.asarray(CAFFE_MEAN_BGR",
    _T_CONV,
  ),
  Mutant(
    "caffe-mean-rgb-order",
    _PRE,
    "CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)",
    "CAFFE_MEAN_BGR = (123.68, 116.779, 103.939)",
    _T_CONV,
  ),
  Mutant(
    "torch-no-std", _PRE, "return (x / 255.0 - mean) / std", "return x / 255.0 - mean", _T_CONV
  ),
  Mutant(
    "torch-bgr",
    _PRE,
    "x = images.astype(jnp.float32)",
    "x = images.astype(jnp.float32)[..., ::-1]",
    _T_CONV,
  ),
  Mutant(
    "store-normalize-no-sqrt",
    _SEG,
    'n = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))',
    'n = np.einsum("ij,ij->i", b, b, dtype=np.float64)',
    ("tests/test_store.py::test_float32_round_trip_matches_brute_force",),
  ),
  # catalog recovery
  Mutant(
    "recover-keeps-uncommitted-rows",
    _CAT,
    '      db.execute("DELETE FROM rows WHERE added_gen > ?", (generation,))\n',
    "",
    _T_RECOVER,
  ),
  Mutant(
    "recover-keeps-uncommitted-tombstones",
    _CAT,
    '      db.execute("UPDATE rows SET deleted_gen = NULL WHERE deleted_gen > ?", (generation,))\n',
    "",
    _T_RECOVER,
  ),
  Mutant(
    "recover-keeps-unlisted-segments",
    _CAT,
    '      db.execute("DELETE FROM rows WHERE segment NOT IN (SELECT name FROM live_segments)")\n',
    "",
    _T_RECOVER,
  ),
]


def _copy_repo(dst: str) -> None:
  """Tracked and untracked (not ignored) files of the repository, as `git ls-files` lists them."""
  out = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=ROOT,
    check=True,
    capture_output=True,
  ).stdout
  for rel in filter(None, out.decode().split("\0")):
    src = os.path.join(ROOT, rel)
    if not os.path.isfile(src):
      continue
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    shutil.copy2(src, os.path.join(dst, rel))


def _pytest(copy: str, tests: tuple[str, ...], timeout: int) -> tuple[str, float, str]:
  """('passed' | 'failed' | 'timeout', seconds, last output lines)."""
  env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
  t0 = time.perf_counter()
  try:
    r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - t0, ""
  tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-3:])
  return ("passed" if r.returncode == 0 else "failed"), time.perf_counter() - t0, tail


def run(mutants: list[Mutant], timeout: int, keep: bool = False) -> list[dict]:
  copy = tempfile.mkdtemp(prefix="mutants-")
  try:
    _copy_repo(copy)
    for tests in dict.fromkeys(m.tests for m in mutants):  # each distinct selection once
      status, secs, tail = _pytest(copy, tests, timeout)
      print(f"baseline {' '.join(tests)[:70]}: {status} in {secs:.0f}s", flush=True)
      if status != "passed":
        raise SystemExit(f"the unmutated tests do not pass:\n{tail}")
    results = []
    for m in mutants:
      path = os.path.join(copy, m.path)
      with open(path, encoding="utf-8") as f:
        source = f.read()
      count = source.count(m.old)
      if count != 1:
        results.append(dict(name=m.name, status="stale", seconds=0.0, detail=f"{count} matches"))
        print(f"{m.name:40s} STALE ({count} matches of the old string)", flush=True)
        continue
      with open(path, "w", encoding="utf-8") as f:
        f.write(source.replace(m.old, m.new))
      try:
        status, secs, tail = _pytest(copy, m.tests, timeout)
      finally:
        with open(path, "w", encoding="utf-8") as f:
          f.write(source)
      verdict = "survived" if status == "passed" else "killed"
      detail = status if status == "timeout" else tail.splitlines()[-1] if tail else ""
      results.append(dict(name=m.name, status=verdict, seconds=round(secs, 1), detail=detail))
      print(f"{m.name:40s} {verdict.upper():8s} {secs:5.0f}s  {detail[:80]}", flush=True)
    return results
  finally:
    if keep:
      print(f"copy kept at {copy}")
    else:
      shutil.rmtree(copy, ignore_errors=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mutants = [m for m in MUTANTS if not _ONLY.value or any(s in m.name for s in _ONLY.value)]
  if _LIST.value:
    for m in mutants:
      print(f"{m.name:40s} {m.path}  ->  {' '.join(m.tests)}")
    return
  results = run(mutants, _TIMEOUT.value, _KEEP.value)
  scored = [r for r in results if r["status"] != "stale"]
  killed = sum(r["status"] == "killed" for r in scored)
  print(f"\nmutation score: {killed}/{len(scored)} killed", end="")
  print(f" ({100 * killed / max(1, len(scored)):.0f}%)")
  for r in results:
    if r["status"] != "killed":
      print(f"  {r['status']}: {r['name']}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"killed": killed, "total": len(scored), "mutants": results}, f, indent=2)
  if any(r["status"] == "stale" for r in results):
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
