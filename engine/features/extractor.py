"""Images -> descriptors: a jit-compiled, fixed-shape, batched extractor.

Batches of uint8 RGB pixels `[B, H, W, 3]` go through `engine.features.forward` (XLA) or the same
computation exported to OpenVINO. Shapes are fixed per batch size and input bucket; a last, partial
batch is padded to the next power of two (so one image costs one image of compute) and the padding
rows dropped, so a run compiles a few shapes per bucket at most. Decoding runs in a
thread pool ahead of the device, and the device runs one batch ahead of the host reading results
back.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.common.errors import UserError
from engine.features import backends, checkpoint, images, quantize
from engine.features import model as model_lib
from engine.features.descriptors import Descriptor, Whitening
from engine.features.forward import forward
from engine.features.preprocess import Preprocessing

# Compute dtype of the network for each precision; int8 runs only on OpenVINO (a quantised model,
# engine.features.quantize), with float32 parameters for its export.
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "int8": jnp.float32}
DEFAULT_MAX_SIDE = 320


@dataclasses.dataclass
class Extracted:
  """Result of extracting a list of files.

  Attributes:
    features: `[M, D]` float32, one row per file that decoded, in input order.
    positions: `[M]` index into the input list of each row.
    errors: input index -> reason, for files that could not be decoded.
  """

  features: np.ndarray
  positions: np.ndarray
  errors: dict[int, str]


class Extractor:
  """Turns image files or pixel arrays into `[N, D]` float32 descriptors.

  Args:
    weights: a converted weights folder, `random` or `random:SEED` (random is NOT ImageNet).
    descriptor: a Descriptor or its name (`fc2`, `fc1`, `pool5`, `mac`, `spoc`, `gem`, `rmac`).
    resize: resize policy (`squash`, `center_crop`, `keep_aspect`). Default: squash for
      fc1/fc2/pool5, keep_aspect for pooled conv descriptors.
    image_size: input side, or the longer side for keep_aspect. Default: the model's input size
      for fc1/fc2/pool5, DEFAULT_MAX_SIDE for pooled conv descriptors. The pixel convention always
      comes from the weights.
    batch_size: images per device call; a last, partial batch is padded to the next power of two.
    precision: `fp32`, `bf16` (bf16 compute with float32 accumulation) or `int8` (OpenVINO only:
      the model quantised by `engine.features.quantize` on a sample of the user's images; give it
      as `quantized`, or call `calibrate` before extracting).
    config: model preset used with random weights (a name in `model.PRESETS`).
    whitening: optional PCA whitening applied after the descriptor.
    workers: decoding threads.
    scales: multi-scale pooled descriptors: each image is also described at these relative sizes
      (bilinear resize of the prepared pixels) and the L2-normalised descriptors are averaged and
      normalised again. Default (1.0,): one scale. Pooled conv descriptors only (mac, spoc, gem,
      rmac).
    backend: `xla` (jit, any device), `openvino` (the same model exported to ONNX and compiled by
      OpenVINO's CPU plugin: the fast path on x86 CPUs) or `auto` (OpenVINO where installed on an
      x86 CPU host, XLA otherwise).
    quantized: the int8 model (precision int8 only), e.g. `quantize.load` of an index's.
  """

  def __init__(
    self,
    weights: str = "random",
    descriptor: Descriptor | str = "gem",
    *,
    resize: str | None = None,
    image_size: int | None = None,
    batch_size: int = 16,
    precision: str = "fp32",
    config: str = "vgg16",
    whitening: Whitening | None = None,
    workers: int | None = None,
    backend: str = "xla",
    scales: Sequence[float] = (1.0,),
    quantized: quantize.QuantizedModel | None = None,
  ):
    if isinstance(descriptor, str):
      descriptor = Descriptor(descriptor)
    if precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = checkpoint.resolve_info(weights, config)
    cfg = model_lib.ModelConfig.by_name(info.config)
    if descriptor.model_tap not in cfg.tap_names:
      raise ValueError(f"tap {descriptor.model_tap!r} is not in the model: {cfg.tap_names}")
    fixed = descriptor.needs_fixed_size
    preprocessing = Preprocessing(
      info.convention,
      resize or ("squash" if fixed else "keep_aspect"),
      image_size or (cfg.image_size if fixed else DEFAULT_MAX_SIDE),
    )
    if fixed and (preprocessing.resize == "keep_aspect" or preprocessing.size != cfg.image_size):
      raise ValueError(
        f"descriptor {descriptor.name} needs {cfg.image_size}x{cfg.image_size} inputs: use "
        f"resize squash or center_crop with size {cfg.image_size}"
      )
    scales = tuple(dict.fromkeys(float(x) for x in scales))
    if not scales or any(not 0.25 <= x <= 4.0 for x in scales):
      raise ValueError(f"scales must be in [0.25, 4], got {scales}")
    if scales != (1.0,) and fixed:
      raise ValueError(
        f"multi-scale descriptors need a pooled descriptor (mac, spoc, gem, rmac), not "
        f"{descriptor.name}, whose input size is fixed"
      )
    if whitening is not None and whitening.in_dim != descriptor.dim(cfg):
      raise ValueError(
        f"whitening expects {whitening.in_dim}-d input, the descriptor is {descriptor.dim(cfg)}-d"
      )
    self.config = cfg
    self.weights_spec = weights
    self.weights_info = info
    self.descriptor = descriptor
    self.preprocessing = preprocessing
    self.batch_size = batch_size
    self.precision = precision
    self.whitening = whitening
    self.scales = scales
    self.workers = workers or min(8, os.cpu_count() or 2)
    self.backend = backends.resolve(backend)
    if precision == "int8":
      if self.backend != "openvino":
        why = quantize.unavailable_reason() or f"backend {backend} runs {self.backend} here"
        raise quantize.QuantizationError(
          f"precision int8 runs on the OpenVINO backend only ({why}); use --backend=openvino "
          "(or auto) on an x86 CPU with OpenVINO, or precision fp32"
        )
      why = quantize.unavailable_reason(descriptor.name)
      if why is not None:
        raise quantize.QuantizationError(f"precision int8 with descriptor {descriptor.name}: {why}")
    elif quantized is not None:
      raise ValueError(f"a quantised model needs precision int8, not {precision}")
    self.quantized: quantize.QuantizedModel | None = None
    self._openvino = backends.OpenVINOExtraction(self) if self.backend == "openvino" else None
    if quantized is not None:
      self.use_quantized(quantized)
    # The parameters are loaded when first needed: OpenVINO runs a cached export without them.
    self._network: tuple[nnx.GraphDef, nnx.State] | None = None
    self._network_lock = threading.Lock()
    if self._openvino is None:
      self._load_network()

  def _load_network(self) -> tuple[nnx.GraphDef, nnx.State]:
    with self._network_lock:
      if self._network is None:
        model, info = checkpoint.resolve(
          self.weights_spec, self.config.name, PRECISIONS[self.precision]
        )
        if info != self.weights_info:
          raise checkpoint.WeightsError(f"{self.weights_spec}: the weights changed while in use")
        self._network = nnx.split(model)
      return self._network

  def use_quantized(self, model: quantize.QuantizedModel) -> None:
    """Runs `model` (an int8 extractor's, quantised from this extractor's own export)."""
    if self.precision != "int8":
      raise ValueError(f"a quantised model needs precision int8, not {self.precision}")
    if self.quantized is not None and self.quantized.sha256 != model.sha256:
      raise ValueError("this extractor already runs another int8 model")
    export = model.record.get("export_key")
    if export is not None and export != self._export_key():
      raise quantize.QuantizationError(
        f"the int8 model {model.sha256[:16]} was quantised from another network or descriptor "
        f"({export}) than this extractor's ({self._export_key()})"
      )
    self.quantized = model

  def _export_key(self) -> dict:
    size = self.preprocessing.size
    return backends.export_key(self, size, size)

  def calibrate(
    self, paths: Sequence[str | os.PathLike], sample: int = quantize.DEFAULT_SAMPLE
  ) -> quantize.QuantizedModel:
    """Quantises this int8 extractor's model on a sample of `paths` and runs it from now on."""
    if self.precision != "int8":
      raise ValueError(f"calibration is for precision int8, not {self.precision}")
    model = quantize.calibrate(self, [os.fspath(p) for p in paths], sample)
    self.use_quantized(model)
    return model

  @property
  def dim(self) -> int:
    return self.whitening.out_dim if self.whitening else self.descriptor.dim(self.config)

  def fingerprint(self) -> dict:
    """What an index must record to refuse queries from an incompatible extractor."""
    return {
      "model": self.config.name,
      "weights": self.weights_info.fingerprint,
      "weights_source": self.weights_info.source,
      "descriptor": self.descriptor.to_dict(),
      "preprocessing": self.preprocessing.to_dict(),
      "precision": self.precision,
      "dim": self.dim,
      # Whitened descriptors only meet queries whitened the same way (absent: none, as before).
      **({"whitening": self.whitening.fingerprint()} if self.whitening is not None else {}),
      **({"scales": list(self.scales)} if self.scales != (1.0,) else {}),
      # int8 descriptors come from one quantised model: another one (other calibration images)
      # gives other numbers.
      **({"int8_model": self._int8_sha()} if self.precision == "int8" else {}),
    }

  def _int8_sha(self) -> str | None:
    return self.quantized.sha256 if self.quantized is not None else None

  def index_metadata(self) -> dict:
    """What an index records: the fingerprint (compared) and where the weights were (a hint);
    for int8, the quantised model's record (files, sha256, calibration images, versions)."""
    meta = {"extractor": self.fingerprint(), "weights_spec": self.weights_spec}
    if self.quantized is not None:
      meta["int8"] = self.quantized.record
    return meta

  @classmethod
  def from_index_metadata(
    cls, meta: dict, weights: str | None = None, *, folder: str | None = None, **kwargs
  ) -> Extractor:
    """Rebuilds the extractor an index was built with; `weights` overrides the recorded spec.

    Args:
      meta: the index's metadata (`index_metadata()` of the extractor that built it).
      weights: weights to use instead of the recorded spec.
      folder: the index folder, where an int8 index keeps its quantised model.
      **kwargs: other `Extractor` arguments (batch_size, workers, backend).

    Raises:
      QuantizationError: an int8 index whose model is missing or damaged (or no `folder`).
    """
    try:
      fp = meta["extractor"]
      desc = Descriptor(**fp["descriptor"])
      pre = fp["preprocessing"]
      spec = weights or meta["weights_spec"]
      ex = cls(
        spec,
        desc,
        resize=pre["resize"],
        image_size=pre["size"],
        precision=fp["precision"],
        config=fp["model"],
        scales=tuple(fp.get("scales", (1.0,))),
        **kwargs,
      )
      if ex.precision == "int8":
        if folder is None:
          raise quantize.QuantizationError("an int8 index's extractor needs the index folder")
        ex.use_quantized(quantize.load(folder, meta["int8"]))
    except (KeyError, TypeError) as e:
      raise ValueError(f"index metadata does not describe an extractor ({e!r})") from e
    check_compatible(meta, ex)
    return ex

  def compiled_shapes(self) -> int:
    """Number of compiled variants of the extraction function (for recompilation checks)."""
    if self._openvino is not None:
      return self._openvino.compiled_shapes()
    return forward._cache_size()

  def graph(self, dtype: jnp.dtype | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """The network as `forward` takes it: `(graphdef, state)`.

    Args:
      dtype: compute dtype of the graphdef; default the extractor's precision. The parameters are
        float32 either way, so `jnp.float32` gives the float32 network of a bf16 extractor (what
        the ONNX export traces).
    """
    graphdef, state = self._load_network()
    if dtype is None or jnp.dtype(dtype) == jnp.dtype(PRECISIONS[self.precision]):
      return graphdef, state
    graphdef, _ = nnx.split(model_lib.abstract_model(self.config, dtype))
    return graphdef, state

  def run_batch(self, batch_bhw3: np.ndarray) -> jax.Array | np.ndarray:
    """One batch of already prepared pixels through the backend, without whitening.

    Args:
      batch_bhw3: `[B, H, W, 3]` uint8 RGB, already of the preprocessing policy's shape.

    Returns:
      `[B, D]` float32: a device array from XLA (dispatched, not awaited), numpy from OpenVINO.
    """
    if self.scales != (1.0,):
      return self._multi_scale(batch_bhw3)
    return self._run_one(batch_bhw3)

  def _multi_scale(self, batch_bhw3: np.ndarray) -> np.ndarray:
    """The normalised mean of the L2-normalised descriptors of every scale, [B, D] float32."""
    total = None
    for scale in self.scales:
      px = batch_bhw3 if scale == 1.0 else images.rescale(batch_bhw3, scale)
      d = np.asarray(jax.device_get(self._run_one(px)), np.float64)
      d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
      total = d if total is None else total + d
    total /= np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
    return total.astype(np.float32)

  def _run_one(self, batch_bhw3: np.ndarray) -> jax.Array | np.ndarray:
    if self.precision == "int8" and self.quantized is None:
      raise quantize.QuantizationError(
        "this int8 extractor has no quantised model yet: calibrate it on the user's images "
        "(Extractor.calibrate) or build it from an int8 index"
      )
    if self._openvino is not None:
      return self._openvino(batch_bhw3)
    graphdef, state = self._load_network()
    return forward(
      graphdef,
      state,
      batch_bhw3,
      convention=self.preprocessing.convention,
      descriptor=self.descriptor,
    )

  def padded_batch(self, n: int) -> int:
    """The batch shape that carries n <= batch_size images: the next power of two, at most
    batch_size. A one-image query costs one image of compute, and a run compiles at most
    log2(batch_size) + 1 batch shapes per input bucket."""
    return min(self.batch_size, 1 << max(0, n - 1).bit_length())

  def _finish(self, feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, np.float32)
    return self.whitening(feats) if self.whitening is not None else feats

  def _stream(
    self, items: Iterable[tuple[int, np.ndarray | None, str | None]]
  ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """(position, pixels | None, error | None) -> (position, descriptor | None, error | None).

    Images are grouped by shape (bucket) into fixed-size batches; a bucket's batch goes to the
    device when full, and what is left is padded (`padded_batch`) and flushed at the end. Results
    come out in
    completion order, one batch behind the dispatch so host and device overlap.
    """
    buckets: dict[tuple, list[tuple[int, np.ndarray]]] = collections.defaultdict(list)
    in_flight: collections.deque = collections.deque()

    def dispatch(shape):
      group = buckets.pop(shape)
      batch = np.zeros((self.padded_batch(len(group)), *shape), np.uint8)
      for i, (_, px) in enumerate(group):
        batch[i] = px
      in_flight.append(([pos for pos, _ in group], self.run_batch(batch)))

    def drain(keep: int):
      while len(in_flight) > keep:
        positions, out = in_flight.popleft()
        feats = self._finish(jax.device_get(out)[: len(positions)])
        yield from ((pos, feats[i], None) for i, pos in enumerate(positions))

    for pos, pixels, err in items:
      if pixels is None:
        yield pos, None, err
        continue
      buckets[pixels.shape].append((pos, pixels))
      if len(buckets[pixels.shape]) == self.batch_size:
        dispatch(pixels.shape)
        yield from drain(keep=1)
    for shape in list(buckets):
      dispatch(shape)
    yield from drain(keep=0)

  def iter_paths(
    self, paths: Iterable[str | os.PathLike]
  ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Streams `(position, [D] descriptor or None, error or None)` for each path.

    Results arrive in batch-completion order, not input order; undecodable files yield their
    reason instead of a descriptor.
    """
    decoded = images.load_many(paths, self.preprocessing, workers=self.workers)
    yield from self._stream(decoded)

  def extract_paths(self, paths: Sequence[str | os.PathLike]) -> Extracted:
    """Descriptors of the files that decode, with the reasons for those that do not."""
    rows: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for pos, feat, err in self.iter_paths(paths):
      if feat is None:
        errors[pos] = err
      else:
        rows[pos] = feat
    positions = np.asarray(sorted(rows), np.int64)
    feats = np.stack([rows[p] for p in positions]) if rows else np.zeros((0, self.dim), np.float32)
    return Extracted(feats, positions, errors)

  def extract_arrays(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """`[N, H, W, 3]` uint8 RGB (or a list of arrays of any size) -> `[N, D]` float32.

    Arrays not already of the policy's shape are resized by the same policy as files.
    """
    prepared = ((i, images.from_array(px, self.preprocessing), None) for i, px in enumerate(pixels))
    rows = dict((pos, feat) for pos, feat, _ in self._stream(prepared))
    if not rows:
      return np.zeros((0, self.dim), np.float32)
    return np.stack([rows[i] for i in range(len(rows))])

  def __call__(self, inputs) -> np.ndarray:
    """Paths or pixel arrays -> `[N, D]`; raises if any path cannot be decoded."""
    if isinstance(inputs, (str, os.PathLike)):
      inputs = [inputs]
    if len(inputs) and isinstance(inputs[0], (str, os.PathLike)):
      result = self.extract_paths(inputs)
      if result.errors:
        pos, reason = next(iter(sorted(result.errors.items())))
        raise images.ImageError(f"{inputs[pos]}: {reason}")
      return result.features
    return self.extract_arrays(inputs)


class IncompatibleExtractorError(UserError, ValueError):
  """Features from this extractor cannot be compared with the index's."""


# Recorded in the index but not compared: the OpenVINO fp32 path agrees with XLA's to ~1e-6
# (tests/test_openvino.py); a change of precision is still refused.
_RECORDED_ONLY = frozenset({"backend"})


def check_compatible(meta: dict, extractor: Extractor) -> None:
  """Raises IncompatibleExtractorError naming every setting that differs from the index's."""
  want = meta.get("extractor") or {}
  have = extractor.fingerprint()
  keys = (set(want) | set(have)) - _RECORDED_ONLY
  diffs = [k for k in sorted(keys) if want.get(k) != have.get(k)]
  if diffs:
    detail = "; ".join(f"{k}: index {want.get(k)!r}, now {have.get(k)!r}" for k in diffs)
    raise IncompatibleExtractorError(
      f"the index was built with a different extractor ({detail}); use the same weights and "
      "descriptor settings, or build a new index"
    )
