"""Finding near-duplicates users can act on: a threshold chosen by score, precision or tier, groups
under a stated linkage rule, a suggested keeper per group, and the outputs (text, csv, json, html).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json

from engine import store
from engine.app import calibration, grouping, moves, report
from engine.common import textio
from engine.common.errors import UserError

# Used when no calibration exists for the index's weights and no threshold is given.
UNCALIBRATED_THRESHOLD = 0.9
DEFAULT_TIER = "exact"
FORMATS = ("text", "csv", "json", "html")


def index_statistics(idx: store.Index) -> str:
  """The collection statistics the index applies to scores at search time, as calibration curves
  name them: "none" (raw cosine), "centered", or "whiten:DIM" (`engine.store.statistics`)."""
  stats = idx.statistics
  if stats is None:
    return "none"
  if stats.kind == "center":
    return "centered"
  return f"whiten:{idx.statistics_info['dim']}"


@dataclasses.dataclass(frozen=True)
class Selection:
  """The threshold in use, how it was chosen, and what the calibration expects of it.

  Attributes:
    threshold: the score two images need.
    chosen_by: "--threshold", "--precision=P", "--tier=NAME (precision P)" or "default ...".
    expected: the calibration point (precision, recall on the benchmark) or None.
    note: why there is no expectation (no calibration, ...) or "".
  """

  threshold: float
  chosen_by: str
  expected: dict | None
  note: str = ""

  def describe(self) -> str:
    if self.expected:
      e = self.expected
      return (
        f"expected precision {e['precision']:.3f} (recall {e['recall']:.3f}) of the pairs shown, "
        f"measured on the copy-detection benchmark at threshold {e['threshold']:.4f}"
      )
    return f"expected precision unknown: {self.note}"


def select_threshold(
  idx: store.Index,
  *,
  threshold: float | None = None,
  precision: float | None = None,
  tier: str | None = None,
  linkage: str = "complete",
) -> Selection:
  """Resolves at most one of threshold / precision / tier (none: the default tier when the weights
  are calibrated, else `UNCALIBRATED_THRESHOLD`) through the calibration of the index's weights.

  Raises:
    UserError: more than one given, a value out of range, or a precision target without a
      calibration that reaches it.
  """
  pairs = (("threshold", threshold), ("precision", precision), ("tier", tier))
  given = [n for n, v in pairs if v is not None]
  if len(given) > 1:
    raise UserError(f"give one of --threshold, --precision, --tier (got {', '.join(given)})")
  if threshold is not None and not -1.0 <= threshold <= 1.0:
    raise UserError(f"--threshold must be in [-1, 1], got {threshold}")
  if precision is not None and not 0.0 < precision <= 1.0:
    raise UserError(f"--precision must be in (0, 1], got {precision}")
  if tier is not None and tier not in calibration.TIERS:
    raise UserError(f"--tier must be one of {sorted(calibration.TIERS)}, got {tier!r}")
  curve, why = calibration.find_curve(idx.metadata, index_statistics(idx), linkage)
  if threshold is not None:
    expected = calibration.expected_at(curve, threshold) if curve else None
    if curve and expected is None:
      why = "the threshold is below every calibrated one"
    return Selection(threshold, "--threshold", expected, why)
  if precision is None and tier is None:
    if curve is None:
      return Selection(
        UNCALIBRATED_THRESHOLD,
        f"default threshold {UNCALIBRATED_THRESHOLD} (uncalibrated)",
        None,
        why,
      )
    tier = DEFAULT_TIER
    label = f"default --tier={tier} (precision {calibration.TIERS[tier]})"
  elif tier is not None:
    label = f"--tier={tier} (precision {calibration.TIERS[tier]})"
  else:
    label = f"--precision={precision}"
  if curve is None:
    raise calibration.CalibrationError(f"{label} needs a calibration: {why}; or give --threshold")
  try:
    point = calibration.threshold_for(curve, precision or calibration.TIERS[tier])
  except calibration.CalibrationError:
    if not label.startswith("default"):
      raise
    # The default must run: the most precise threshold measured, said as such.
    point = max(curve["points"], key=lambda p: (p["pairs"] > 0, p["precision"], p["threshold"]))
    label = f"default: the most precise calibrated threshold (tier {tier} not reached)"
  return Selection(point["threshold"], label, point)


@dataclasses.dataclass
class Result:
  """Groups found, their keepers, and how they were found."""

  selection: Selection
  linkage: str
  groups: list[grouping.Group]
  decisions: list[moves.Decision]

  @property
  def rule(self) -> str:
    return grouping.rule(self.linkage, self.selection.threshold)


def find(
  idx: store.Index, selection: Selection, *, linkage: str = "complete", k: int = 32, scan=None
) -> Result:
  """Groups of the index under `linkage` at the selected threshold, each with a suggested keeper."""
  groups = grouping.find_groups(idx, selection.threshold, linkage=linkage, k=k, scan=scan)
  decisions = [moves.choose_keeper([moves.file_info(key) for key in g.keys]) for g in groups]
  return Result(selection, linkage, groups, decisions)


def _member_rows(res: Result):
  """(group number, role, FileInfo, score, reason) for every member, keeper first."""
  for i, (g, d) in enumerate(zip(res.groups, res.decisions, strict=True), 1):
    score = dict(zip(g.keys, g.scores, strict=True))
    yield i, "keep", d.keeper, score[d.keeper.path], d.reason
    for f in d.others:
      yield i, "duplicate", f, score[f.path], ""


def summary(res: Result) -> str:
  n = sum(len(g) for g in res.groups)
  return (
    f"{len(res.groups)} groups ({n} images) at threshold {res.selection.threshold:.4f} "
    f"[{res.selection.chosen_by}]; rule ({res.linkage} linkage): {res.rule}; "
    f"{res.selection.describe()}"
  )


def to_text(res: Result) -> str:
  out = io.StringIO()
  for i, g in enumerate(res.groups, 1):
    out.write(f"group {i} ({len(g)} images, lowest pair score {g.min_pair:.4f})\n")
    for _, role, f, s, reason in (r for r in _member_rows(res) if r[0] == i):
      tail = f"  <- keep: {reason}" if role == "keep" else ""
      out.write(f"  {role:9s} {s:.4f}  {textio.escape(f.path)}{tail}\n")
  out.write(summary(res) + "\n")
  return out.getvalue()


def to_csv(res: Result) -> str:
  out = io.StringIO()
  w = csv.writer(out, lineterminator="\n")
  w.writerow(["group", "role", "path", "score", "width", "height", "size", "mtime_ns", "reason"])
  for i, role, f, s, reason in _member_rows(res):
    w.writerow([i, role, f.path, f"{s:.6f}", f.width, f.height, f.size, f.mtime_ns, reason])
  return out.getvalue()


def to_json(res: Result) -> str:
  groups = []
  for i, g in enumerate(res.groups, 1):
    members = [
      {
        "key": f.path,
        "score": s,
        "role": role,
        "width": f.width,
        "height": f.height,
        "size": f.size,
        "mtime_ns": f.mtime_ns,
        **({"error": f.error} if f.error else {}),
      }
      for _, role, f, s, _ in (r for r in _member_rows(res) if r[0] == i)
    ]
    d = res.decisions[i - 1]
    groups.append(
      {"keeper": d.keeper.path, "reason": d.reason, "min_pair": g.min_pair, "members": members}
    )
  sel = res.selection
  doc = {
    "threshold": sel.threshold,
    "chosen_by": sel.chosen_by,
    "linkage": res.linkage,
    "rule": res.rule,
    "expected": sel.expected,
    "expected_note": sel.describe(),
    "groups": groups,
  }
  return json.dumps(doc, indent=2) + "\n"


def html_rows(res: Result) -> list[report.Row]:
  rows = []
  for i, (g, d) in enumerate(zip(res.groups, res.decisions, strict=True), 1):
    score = dict(zip(g.keys, g.scores, strict=True))
    title = f"group {i} ({len(g)} images): keep {d.keeper.path} ({d.reason})"
    matches = [(f.path, score[f.path]) for f in (d.keeper, *d.others)]
    rows.append(report.Row(title, None, matches))
  return rows


def to_html(res: Result) -> str:
  title = f"Near-duplicates at {res.selection.threshold:.4f} ({res.linkage} linkage)"
  return report.render(title, html_rows(res), note=summary(res))


def render(res: Result, fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  return {"text": to_text, "csv": to_csv, "json": to_json, "html": to_html}[fmt](res)
