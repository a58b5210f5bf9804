r"""Copy detection, offline: which original does a transformed copy come from?

  python -m bench.copydetect [--photos=DIR] [--weights=random,DIR] [--output=results/copydetect.json]
  python -m bench.copydetect --small          # tiny model, few images: a check in seconds

Takes real photos (--photos; default the shared test photos when present, else a generated
collection from engine/sample.py), makes transformed copies of each (engine.sample.TRANSFORMS plus a
few defined here: crops, rotations, flips, rescaling, JPEG quality, colour shifts, overlays),
indexes the originals together with distractors (generated scenes, plus the photos of
--distractor_dir), queries the index with every copy and reports mAP and recall@1/10 per
transformation, per descriptor (fc2, pool5, mac, spoc, gem, rmac), per storage dtype and per
weights (random and each converted folder given, reported separately). A pixel baseline (16x16 RGB
thumbnails, L2-normalised; and the same with each thumbnail's mean removed) shows what a descriptor
adds over comparing colours.

`--dedup` measures duplicate grouping instead: the originals, all their copies and the
distractors form one collection, grouped by `engine.app.grouping` (complete linkage, through an
engine Index) at a grid of thresholds; a pair put in one group is right when both are the same
photo (precision: the fraction of grouped pairs that are right; recall: the fraction of copies
grouped with their original). It prints both per descriptor, with and without collection
statistics (here: the mean descriptor of the originals and distractors subtracted before L2
normalisation, in numpy, until the index applies it at search time), and with `--write_calibration` stores each curve with
its weights (`engine.app.calibration`), which `engine.dedup --precision/--tier` reads. For the
curve to apply to an index, use the index's settings (e.g. `--image_size=320`, the engine's
default).

Each query has exactly one relevant image (its original), so recall@k is the fraction of copies
whose original is in the top k, and AP (trapezoidal rule, the Oxford/Holidays code) is 1 at rank 1
and 1 / (2r) at rank r > 1 (`--ap=noninterpolated` gives 1 / r: the mean reciprocal rank).

Every image goes through the network once per input policy, not once per descriptor: fc2 and pool5
come from one 224x224 squash pass, mac/spoc/gem/rmac from one aspect-preserving pass with the
longer side at --image_size (the engine's own extraction code; the test checks equality with
`Extractor.extract_arrays`). Prints the tables last and writes JSON with --output.
"""

from __future__ import annotations

import collections
import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from bench import metrics
from engine.app import sample
from engine.common.fileio import atomic_write, atomic_write_json
from engine.features.model import PRESETS

SHARED = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  "shared",
  "data",
  "imagededup-tests",
)
DESCRIPTORS = ("fc2", "pool5", "mac", "spoc", "gem", "rmac")
FIXED = ("fc1", "fc2", "pool5")
PIXEL_BASELINES = ("pix16", "pix16zm")
MAX_SOURCE_SIDE = 1024  # originals are shrunk to this first, so transforms stay cheap


# ------------------------------------------------------------------------------ transformations


def _crop_corner(img: Image.Image, frac: float) -> Image.Image:
  w, h = img.size
  return img.crop((0, 0, int(w * frac), int(h * frac)))


def _hue_roll(img: Image.Image) -> Image.Image:
  r, g, b = img.split()
  return Image.merge("RGB", (g, b, r))


def _logo(img: Image.Image) -> Image.Image:
  """Pastes a foreign picture (a generated scene) over a quarter of the image, bottom right."""
  out = img.copy()
  w, h = out.size
  patch = sample.scene(np.random.default_rng(12345), max(8, w // 2), max(8, h // 2))
  out.paste(patch, (w - patch.width, h - patch.height))
  return out


def _caption(img: Image.Image) -> Image.Image:
  out = img.copy()
  draw = ImageDraw.Draw(out)
  w, h = out.size
  for i in range(3):
    y = int(h * (0.1 + 0.3 * i))
    draw.text((int(w * 0.05), y), "SAMPLE  COPY  " * 4, fill=(255, 255, 0))
  return out


# The engine's transformations first, then harder ones defined here.
TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
  **sample.TRANSFORMS,
  "vflip": ImageOps.flip,
  "crop50corner": lambda im: _crop_corner(im, 0.5),
  "rot45": lambda im: im.rotate(45, resample=Image.BILINEAR, expand=True),
  "quarter": lambda im: im.resize((max(1, im.width // 4), max(1, im.height // 4)), Image.BILINEAR),
  "jpeg5": lambda im: sample.jpeg_roundtrip(im, 5),
  "huerot": _hue_roll,
  "blur": lambda im: im.filter(ImageFilter.GaussianBlur(4)),
  "logo": _logo,
  "caption": _caption,
}


# ------------------------------------------------------------------------------ the data set


@functools.cache
def default_photos() -> str | None:
  path = os.path.join(SHARED, "base_images")
  return path if os.path.isdir(path) else None


def list_images(folder: str) -> list[str]:
  from engine.app import walk

  return sorted(walk.split_images(os.path.abspath(folder))[0])


def open_rgb(path: str) -> Image.Image:
  with Image.open(path) as im:
    im = ImageOps.exif_transpose(im)
    im.draft("RGB", (MAX_SOURCE_SIDE, MAX_SOURCE_SIDE))
    im = im.convert("RGB")
  if max(im.size) > MAX_SOURCE_SIDE:
    im.thumbnail((MAX_SOURCE_SIDE, MAX_SOURCE_SIDE), Image.BILINEAR)
  return im


def generated_photos(n: int, seed: int) -> list[tuple[str, Image.Image]]:
  rng = np.random.default_rng(seed)
  return [(f"scene_{i:03d}", sample.scene(rng)) for i in range(n)]


class Prepared:
  """Each image once, in every form an extractor or baseline needs.

  Attributes:
    policies: name -> engine Preprocessing.
    pixels: name -> list of `[h, w, 3]` uint8 arrays (one per image, shape per policy).
    thumbs: `[N, 16 * 16 * 3]` float32 raw thumbnails.
  """

  def __init__(self, policies: dict):
    self.policies = policies
    self.pixels: dict[str, list[np.ndarray]] = {p: [] for p in policies}
    self.thumbs: list[np.ndarray] = []

  def add(self, img: Image.Image) -> None:
    from engine.features import images

    for name, pre in self.policies.items():
      self.pixels[name].append(images.prepare(img, pre))
    self.thumbs.append(np.asarray(img.resize((16, 16), Image.BOX), np.float32).reshape(-1))

  def __len__(self) -> int:
    return len(self.thumbs)


def pixel_baseline(thumbs: Sequence[np.ndarray], name: str) -> np.ndarray:
  """`[N, 768]` thumbnails -> L2-normalised baseline vectors (`zm`: mean removed first)."""
  x = np.stack(thumbs).astype(np.float32)
  if name.endswith("zm"):
    x = x - x.mean(axis=1, keepdims=True)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def build_dataset(
  photos: Sequence[tuple[str, Image.Image]],
  distractors: Sequence[tuple[str, Image.Image]],
  transforms: Sequence[str],
  policies: dict,
) -> tuple[Prepared, list[str], Prepared, dict]:
  """Prepares the database (originals + distractors) and the queries (copies) with ground truth.

  Returns:
    (database, its keys, queries, truth) where truth is the metrics ground truth with query ids
    `{original}/{transform}` and one relevant key `orig/{original}` each, plus "transform" and
    "original" per query.
  """
  db, keys = Prepared(policies), []
  queries, truth = Prepared(policies), {"protocol": "plain", "queries": {}}
  for name, img in photos:
    db.add(img)
    keys.append(f"orig/{name}")
    for t in transforms:
      queries.add(TRANSFORMS[t](img))
      truth["queries"][f"{name}/{t}"] = {
        "relevant": [f"orig/{name}"],
        "transform": t,
        "original": name,
      }
  for name, img in distractors:
    db.add(img)
    keys.append(f"distractor/{name}")
  return db, keys, queries, truth


# ------------------------------------------------------------------------------ features


def extract_many(extractor, names: Sequence[str], pixels: Sequence[np.ndarray]) -> dict:
  """Several descriptors from one forward pass per image.

  Args:
    extractor: an engine Extractor whose weights, convention and batch size are used.
    names: descriptor names sharing the extractor's input policy.
    pixels: `[h, w, 3]` uint8 arrays already of the policy's shapes.

  Returns:
    name -> `[N, D]` float32, in input order (the same numbers as `extract_arrays` per name).
  """
  import jax

  from engine.features.descriptors import Descriptor
  from engine.features.forward import forward

  graphdef, state = extractor.graph()
  descs = tuple(Descriptor(n) for n in names)
  groups = collections.defaultdict(list)
  for i, px in enumerate(pixels):
    groups[px.shape].append(i)
  out = {n: [None] * len(pixels) for n in names}
  bs = extractor.batch_size
  for shape, idx in groups.items():
    for a in range(0, len(idx), bs):
      part = idx[a : a + bs]
      batch = np.zeros((bs, *shape), np.uint8)
      for j, i in enumerate(part):
        batch[j] = pixels[i]
      res = jax.device_get(
        forward(
          graphdef,
          state,
          batch,
          convention=extractor.preprocessing.convention,
          descriptor=descs,
        )
      )
      for n, feats in zip(names, res, strict=True):
        for j, i in enumerate(part):
          out[n][i] = np.asarray(feats[j], np.float32)
  return {n: np.stack(v) for n, v in out.items()}


# ------------------------------------------------------------------------------ scoring


def score(
  db_nd: np.ndarray,
  db_keys: Sequence[str],
  q_qd: np.ndarray,
  truth: dict,
  dtype: str,
  workdir: str,
  rule: str = "trapezoid",
) -> dict:
  """Indexes the database in an engine Index of `dtype`, ranks it for every query, scores.

  Returns:
    {"all": metrics of every query, "by_transform": {transform: metrics}} (per-query APs dropped).
  """
  from engine.store import Index

  path = tempfile.mkdtemp(dir=workdir)
  with Index.create(path, dim=db_nd.shape[1], dtype=dtype) as idx:
    idx.add(db_nd, list(db_keys))
    _, keys = idx.search(q_qd, k=len(db_keys))
  rankings = {q: list(row) for q, row in zip(truth["queries"], keys, strict=True)}
  res = metrics.evaluate(rankings, truth, rule=rule)
  by_t = collections.defaultdict(dict)
  for q, entry in truth["queries"].items():
    by_t[entry["transform"]][q] = entry
  out = {"all": _summary(res), "by_transform": {}}
  for t, qs in by_t.items():
    sub = metrics.evaluate(rankings, {"protocol": "plain", "queries": qs}, rule=rule)
    out["by_transform"][t] = _summary(sub)
  return out


THRESHOLDS = np.unique(
  np.round(
    np.concatenate(
      [np.arange(0.3, 0.9, 0.02), np.arange(0.9, 0.99, 0.005), np.arange(0.99, 1.0, 0.0005), [1.0]]
    ),
    4,
  )
)
STATISTICS = ("none", "centered")


def centre(x_nd: np.ndarray, mean_d: np.ndarray) -> np.ndarray:
  """Rows minus the collection mean, L2-normalised again."""
  y = x_nd - mean_d
  return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def dedup_curve(
  db_nd: np.ndarray,
  db_keys: Sequence[str],
  q_qd: np.ndarray,
  truth: dict,
  dtype: str,
  workdir: str,
  statistics: str = "none",
  thresholds: Sequence[float] = THRESHOLDS,
  linkage: str = "complete",
  k: int = 32,
) -> list[dict]:
  """Grouping originals + copies + distractors at each threshold: precision of the grouped pairs,
  recall of the copies (grouped with their original).

  Returns:
    [{"threshold", "precision", "recall", "pairs"}] by increasing threshold; precision is 1.0 where
    no pair is grouped.
  """
  from engine.app import grouping
  from engine.store import Index

  x = np.concatenate([db_nd, q_qd]).astype(np.float32)
  if statistics == "centered":
    # The mean of the originals and distractors: in this benchmark each original has many copies,
    # which would pull the mean towards the originals; in a real collection copies are few.
    x = centre(x, db_nd.mean(axis=0))
  elif statistics != "none":
    raise ValueError(f"unknown statistics {statistics!r}")
  keys = list(db_keys) + [f"copy/{q}" for q in truth["queries"]]
  label = {key: key[len("orig/") :] for key in db_keys if key.startswith("orig/")}
  for q, entry in truth["queries"].items():
    label[f"copy/{q}"] = entry["original"]
  copies = [(f"copy/{q}", f"orig/{e['original']}") for q, e in truth["queries"].items()]
  path = tempfile.mkdtemp(dir=workdir)
  with Index.create(path, dim=x.shape[1], dtype=dtype) as idx:
    idx.add(x, keys)
    full = grouping.neighbour_graph(idx, float(min(thresholds)), k=k)
  edges = full.sorted_edges()
  out = []
  for t in sorted(thresholds):
    g = grouping.Graph()
    for s, a, b in edges:
      if s < t:
        break
      g.add(a, b, s)
    groups = grouping.group_graph(g, linkage)
    total, right = grouping.pair_counts(groups, label)
    where = {key: i for i, gr in enumerate(groups) for key in gr.keys}
    found = sum(where.get(c, -1) == where.get(o, -2) for c, o in copies)
    out.append(
      {
        "threshold": float(t),
        "precision": right / total if total else 1.0,
        "recall": found / len(copies) if copies else 0.0,
        "pairs": int(total),
      }
    )
  return out


def best_at(points: Sequence[dict], precision: float) -> dict | None:
  """The calibration point `engine.dedup --precision` would pick (see engine.app.calibration)."""
  from engine.app import calibration

  try:
    return calibration.threshold_for({"points": points}, precision)
  except calibration.CalibrationError:
    return None


def _summary(res: dict) -> dict:
  return {k: res[k] for k in ("map", "recall@1", "recall@10", "queries")}


# ------------------------------------------------------------------------------ the binary


def _weights_label(spec: str) -> str:
  return spec if spec.startswith("random") else os.path.basename(os.path.normpath(spec))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from engine.features import quantize
  from engine.features.extractor import Extractor
  from engine.features.model import ModelConfig
  from engine.features.preprocess import Preprocessing

  small = _SMALL.value
  config = "tiny" if small else _CONFIG.value
  transforms = _TRANSFORMS.value or list(TRANSFORMS)
  unknown = [t for t in transforms if t not in TRANSFORMS]
  if unknown:
    raise app.UsageError(f"unknown transforms {unknown}; known: {list(TRANSFORMS)}")
  names = [d for d in _DESCRIPTORS.value if d not in PIXEL_BASELINES]
  fixed = [d for d in names if d in FIXED]
  pooled = [d for d in names if d not in FIXED]
  max_photos = 4 if small else _MAX_PHOTOS.value
  n_distractors = 12 if small else _DISTRACTORS.value

  t0 = time.perf_counter()
  photo_dir = _PHOTOS.value or default_photos()
  if photo_dir:
    paths = list_images(photo_dir)[:max_photos]
    photos = [(metrics.key_of(p), open_rgb(p)) for p in paths]
    source = photo_dir
  else:
    photos = generated_photos(max_photos, _SEED.value + 1)
    source = "generated scenes (engine.sample; no photo folder found)"
  if not photos:
    raise app.UsageError(f"no images in {photo_dir}")
  distractors = generated_photos(n_distractors, _SEED.value)
  ddir = _DISTRACTOR_DIR.value
  if ddir is None:
    ddir = os.path.join(SHARED, "formats_images") if photo_dir == default_photos() else ""
  if ddir and os.path.isdir(ddir):
    stems = [name for name, _ in photos]
    for p in list_images(ddir):
      if not any(metrics.key_of(p).startswith(s) for s in stems):
        distractors.append((f"file_{os.path.basename(p)}", open_rgb(p)))

  # Input policies. The weights' pixel convention is applied on the device, so the prepared
  # pixels serve every weights folder; the convention recorded here is unused.
  policies = {}
  if fixed:
    policies["fixed"] = Preprocessing("torch", "squash", ModelConfig.by_name(config).image_size)
  if pooled:
    policies["pooled"] = Preprocessing("torch", "keep_aspect", 64 if small else _IMAGE_SIZE.value)
  db, db_keys, queries, truth = build_dataset(photos, distractors, transforms, policies)
  prep_s = time.perf_counter() - t0
  print(
    f"{len(photos)} originals from {source}, {len(distractors)} distractors, "
    f"{len(queries)} copies ({len(transforms)} transforms); prepared in {prep_s:.1f} s",
    flush=True,
  )

  rows = []
  workdir = tempfile.mkdtemp(prefix="copydetect-")
  try:
    features = {}  # (weights label, descriptor) -> (db, queries)
    for name in PIXEL_BASELINES:
      features[("pixels", name)] = (
        pixel_baseline(db.thumbs, name),
        pixel_baseline(queries.thumbs, name),
      )
    timings = {}
    fingerprints = {}  # (weights label, descriptor) -> (weights spec, Extractor fingerprint)
    for spec in _WEIGHTS.value:
      label = _weights_label(spec)
      for policy, group in (("fixed", fixed), ("pooled", pooled)):
        if not group:
          continue
        kwargs = {"image_size": policies[policy].size} if policy == "pooled" else {}
        ex = Extractor(
          spec,
          group[0],
          batch_size=_BATCH.value,
          precision=_PRECISION.value,
          config=config,
          backend=_BACKEND.value,
          **kwargs,
        )
        t = time.perf_counter()
        cache = _FEATURES_CACHE.value and f"{_FEATURES_CACHE.value}.{label}.{policy}.npz"
        if cache and os.path.exists(cache):
          with np.load(cache, allow_pickle=False) as z:
            fd = {n: z[f"db_{n}"] for n in group}
            fq = {n: z[f"q_{n}"] for n in group}
        elif ex.backend == "openvino":
          fd, fq = {}, {}
          for n in group:  # one exported (and for int8 quantised) model per descriptor
            ex = Extractor(
              spec,
              n,
              batch_size=_BATCH.value,
              precision=_PRECISION.value,
              config=config,
              backend="openvino",
              **kwargs,
            )
            if ex.precision == "int8":  # calibrated on the collection, as engine.index does
              ex.use_quantized(
                quantize.calibrate_arrays(ex, db.pixels[policy], db_keys, _CALIBRATION.value)
              )
            fd[n] = ex.extract_arrays(db.pixels[policy])
            fq[n] = ex.extract_arrays(queries.pixels[policy])
        else:
          fd = extract_many(ex, group, db.pixels[policy])
          fq = extract_many(ex, group, queries.pixels[policy])
          if cache:
            arrays = {f"db_{n}": fd[n] for n in group} | {f"q_{n}": fq[n] for n in group}
            atomic_write(cache, lambda f, a=arrays: np.savez(f, **a))
        secs = time.perf_counter() - t
        n_img = len(db) + len(queries)
        timings[f"{label}/{policy}"] = {"seconds": secs, "images": n_img}
        print(
          f"{label}: {'+'.join(group)} for {n_img} images in {secs:.1f} s "
          f"({n_img / secs:.1f} images/s incl. compilation)",
          flush=True,
        )
        for n in group:
          features[(label, n)] = (fd[n], fq[n])
          fingerprints[(label, n)] = (spec, _fingerprint(ex, n))
    if _DEDUP.value:
      for (label, name), (fd, fq) in features.items():
        for stats in STATISTICS:
          curve = dedup_curve(fd, db_keys, fq, truth, _DTYPES.value[0], workdir, stats)
          rows.append(
            {
              "weights": label,
              "descriptor": name,
              "dim": int(fd.shape[1]),
              "dtype": _DTYPES.value[0],
              "statistics": stats,
              "curve": curve,
            }
          )
          if _WRITE_CALIBRATION.value and (label, name) in fingerprints:
            _write_calibration(*fingerprints[(label, name)], stats, curve, len(db_keys) + len(fq))
      features = {}
    for (label, name), (fd, fq) in features.items():
      for dtype in _DTYPES.value:
        res = score(fd, db_keys, fq, truth, dtype, workdir, _AP.value)
        rows.append(
          {"weights": label, "descriptor": name, "dim": int(fd.shape[1]), "dtype": dtype, **res}
        )
  finally:
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)

  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "photos": source,
    "originals": len(photos),
    "distractors": len(distractors),
    "database": len(db_keys),
    "queries": len(queries),
    "transforms": transforms,
    "config": config,
    "precision": _PRECISION.value,
    "backend": _BACKEND.value,
    "pooled_image_size": policies["pooled"].size if pooled else None,
    "ap_rule": _AP.value,
    "extraction": timings,
    "seconds": time.perf_counter() - t0,
  }
  if _OUTPUT.value:
    atomic_write_json(_OUTPUT.value, {"meta": meta, "rows": rows})
  if _DEDUP.value:
    print_dedup(meta, rows)
  else:
    print_tables(meta, rows, transforms)


def _fingerprint(ex, name: str) -> dict:
  """The fingerprint an index of descriptor `name` built by `ex`'s settings records."""
  from engine.features.descriptors import Descriptor

  fp = ex.fingerprint()
  desc = Descriptor(name)
  fp["descriptor"], fp["dim"] = desc.to_dict(), desc.dim(ex.config)
  return fp


def _write_calibration(spec: str, fp: dict, stats: str, curve: list, images: int) -> None:
  from engine.app import calibration

  path = calibration.path_for(spec, fp["weights"])
  if path is None:
    print(f"no place to store the calibration of {spec}", flush=True)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  bench = {
    "tool": "python -m bench.copydetect --dedup",
    "date": time.strftime("%Y-%m-%d"),
    "photos": _PHOTOS.value or default_photos() or "generated",
    "images": images,
    "transforms": _TRANSFORMS.value or list(TRANSFORMS),
    "index_dtype": _DTYPES.value[0],
  }
  calibration.save_curve(
    path,
    {
      "extractor": fp,
      "statistics": stats,
      "linkage": "complete",
      "benchmark": bench,
      "points": curve,
    },
  )
  print(f"wrote the {stats} curve of {fp['descriptor']['name']} to {path}", flush=True)


def print_dedup(meta: dict, rows: list[dict]) -> None:
  print(
    f"\nduplicate groups (complete linkage): {meta['originals']} originals x "
    f"{len(meta['transforms'])} copies + {meta['distractors']} distractors; model "
    f"{meta['config']}, {meta['precision']}, {rows[0]['dtype'] if rows else ''} index; {meta['date']}"
  )
  print(
    f"{'weights':10s} {'descriptor':10s} {'statistics':10s} "
    f"{'t@P.95':>7s} {'R@P.95':>7s} {'t@P.99':>7s} {'R@P.99':>7s} {'P@R.8':>7s} {'t@R.8':>7s}"
  )
  for r in rows:
    c = r["curve"]
    p95, p99 = best_at(c, 0.95), best_at(c, 0.99)
    at_r8 = [p for p in c if p["recall"] >= 0.8]
    best = max(at_r8, key=lambda p: p["precision"]) if at_r8 else None

    def f(p, key):
      return f"{p[key]:7.4f}" if p else f"{'-':>7s}"

    print(
      f"{r['weights']:10s} {r['descriptor']:10s} {r['statistics']:10s} "
      f"{f(p95, 'threshold')} {f(p95, 'recall')} {f(p99, 'threshold')} {f(p99, 'recall')} "
      f"{f(best, 'precision')} {f(best, 'threshold')}"
    )


def print_tables(meta: dict, rows: list[dict], transforms: Sequence[str]) -> None:
  print(
    f"\ncopy detection: {meta['queries']} copies of {meta['originals']} originals in a database "
    f"of {meta['database']} ({meta['distractors']} distractors); model {meta['config']}, "
    f"{meta['precision']}, AP {meta['ap_rule']}; {meta['date']}"
  )
  print(
    f"{'weights':10s} {'descriptor':12s} {'dim':>6s} {'dtype':8s} {'mAP':>6s} {'R@1':>6s} {'R@10':>6s}"
  )
  for r in rows:
    a = r["all"]
    print(
      f"{r['weights']:10s} {r['descriptor']:12s} {r['dim']:6d} {r['dtype']:8s} "
      f"{a['map']:6.3f} {a['recall@1']:6.3f} {a['recall@10']:6.3f}"
    )
  dtype = rows[0]["dtype"] if rows else "float32"
  cols = [r for r in rows if r["dtype"] == dtype]
  labels = {r["weights"] for r in cols if r["weights"] != "pixels"}
  heads = [
    r["descriptor"]
    if len(labels) <= 1 or r["weights"] == "pixels"
    else f"{r['weights'][:8]}:{r['descriptor']}"
    for r in cols
  ]
  width = max([6, *map(len, heads)])
  print(f"\nmAP per transformation ({dtype} index)")
  print(f"{'transform':13s} " + " ".join(f"{h:>{width}s}" for h in heads))
  for t in transforms:
    print(f"{t:13s} " + " ".join(f"{r['by_transform'][t]['map']:>{width}.3f}" for r in cols))
  print(f"\nrecall@1 per transformation ({dtype} index)")
  print(f"{'transform':13s} " + " ".join(f"{h:>{width}s}" for h in heads))
  for t in transforms:
    print(f"{t:13s} " + " ".join(f"{r['by_transform'][t]['recall@1']:>{width}.3f}" for r in cols))


if __name__ == "__main__":
  # Flags exist only when run as a program, so the module stays importable next to others.
  _PHOTOS = flags.DEFINE_string(
    "photos", None, "Folder of original photos (default: the shared test photos, else generated)."
  )
  _MAX_PHOTOS = flags.DEFINE_integer("max_photos", 50, "Use at most this many originals.")
  _DISTRACTORS = flags.DEFINE_integer("distractors", 100, "Generated scenes added as distractors.")
  _DISTRACTOR_DIR = flags.DEFINE_string(
    "distractor_dir",
    None,
    "Folder of more distractor photos (default: the shared formats_images when present; '' none). "
    "Files whose name starts with an original's name are skipped (they are copies of it).",
  )
  _TRANSFORMS = flags.DEFINE_list("transforms", None, "Transformations to use (default: all).")
  _DESCRIPTORS = flags.DEFINE_list("descriptors", list(DESCRIPTORS), "Descriptors to compare.")
  _DTYPES = flags.DEFINE_list("dtypes", ["float32", "int8"], "Index storage dtypes.")
  _WEIGHTS = flags.DEFINE_list(
    "weights", ["random"], "Weights to compare: random[:SEED] and/or converted weights folders."
  )
  _CONFIG = flags.DEFINE_enum("config", "vgg16", list(PRESETS), "Model preset (random weights).")
  _SMALL = flags.DEFINE_bool("small", False, "Quick check: tiny model, 4 photos, 12 distractors.")
  _IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 224, "Longer side for the pooled descriptors (mac, spoc, gem, rmac)."
  )
  _BATCH = flags.DEFINE_integer("batch_size", 8, "Images per device call.")
  _PRECISION = flags.DEFINE_enum(
    "precision",
    "fp32",
    ["fp32", "bf16", "int8"],
    "Compute precision; int8 needs --backend=openvino and is calibrated on --calibration_images "
    "of the database (originals and distractors), never on the queries.",
  )
  _BACKEND = flags.DEFINE_enum(
    "backend",
    "xla",
    ["xla", "openvino"],
    "Extraction backend: xla (one pass for every descriptor of a policy) or openvino (the "
    "engine's CPU fast path: one exported model per descriptor).",
  )
  _CALIBRATION = flags.DEFINE_integer(
    "calibration_images", 32, "With --precision=int8: images of the database to calibrate on."
  )
  _AP = flags.DEFINE_enum("ap", "trapezoid", list(metrics.AP_RULES), "AP rule.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated images and random transforms.")
  _OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
  _FEATURES_CACHE = flags.DEFINE_string(
    "features_cache",
    None,
    "Path prefix of .npz files keeping the extracted features between runs (same flags only).",
  )
  _DEDUP = flags.DEFINE_bool(
    "dedup", False, "Measure duplicate grouping (precision/recall of grouped pairs) instead."
  )
  _WRITE_CALIBRATION = flags.DEFINE_bool(
    "write_calibration",
    False,
    "With --dedup: store each curve with its weights (engine.app.calibration) for engine.dedup.",
  )
  app.run(main)
