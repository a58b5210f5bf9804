"""Several processes on one index through JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same binary with the same flags; `initialize` joins the run, `agree`
refuses to go on unless every process was given the same index, queries and settings, and
`engine.store.sharded.ProcessScan` splits the index's segments between the processes and merges
their top-k lists, so every process holds the merged answer and process 0 prints it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from engine.common.errors import UserError


class DistributedError(UserError):
  """The processes of a run cannot meet, or were started differently."""


class LostProcessError(DistributedError):
  """Another process of the run stopped in the middle of it. JAX's own shutdown then waits for its
  heartbeat timeout and aborts, so binaries end at once (`engine.cli.user_errors`)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """This process's place in the run: process `process_id` of `num_processes`."""

  process_id: int = 0
  num_processes: int = 1

  @property
  def distributed(self) -> bool:
    return self.num_processes > 1


def _wait_for(address: str, timeout_s: float) -> None:
  """Returns once `address` (host:port) accepts a TCP connection; else a DistributedError.

  JAX's own client aborts the whole process (a fatal log, no exception) when the coordinator
  never answers, so a process that is not the coordinator checks first.
  """
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address must be host:port, got {address!r}")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
          f"cannot reach the jax.distributed coordinator at {address} within {timeout_s:g} s "
          f"({e.strerror or e}): is process 0 running there, and is the port open?"
        ) from None
      time.sleep(0.2)


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout_s: int = 60,
) -> Cluster:
  """Joins a `jax.distributed` run, or stays one process when no argument is given.

  Arguments left None take JAX's own defaults (a cluster environment: SLURM, Open MPI, Kubernetes,
  TPU pods). A process other than the coordinator first waits up to `timeout_s` for the
  coordinator's port and fails naming the address.
  """
  if coordinator_address is None and num_processes is None and process_id is None:
    return Cluster()
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f"--num_processes must be at least 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id={process_id} is not in [0, {num_processes})")
  if coordinator_address and process_id:
    _wait_for(coordinator_address, timeout_s)
  try:
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, initialization_timeout=int(timeout_s)
    )
  except (RuntimeError, ValueError) as e:
    where = coordinator_address or "the address the cluster environment gives"
    raise DistributedError(f"cannot join the jax.distributed run at {where}: {e}") from None
  return Cluster(jax.process_index(), jax.process_count())


def _allgather(x: np.ndarray) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x))


@contextlib.contextmanager
def _stdout_to_stderr():
  """Sends file descriptor 1 to stderr: Gloo's C++ prints a line on stdout when the processes'
  first collective connects them, where a binary's answer goes."""
  sys.stdout.flush()
  saved = os.dup(1)
  try:
    os.dup2(2, 1)
    yield
  finally:
    os.dup2(saved, 1)
    os.close(saved)


def gather_json(cluster: Cluster, value) -> list:
  """Every process's JSON-able `value`, in process order, on every process (a barrier too)."""
  if not cluster.distributed:
    return [value]
  blob = json.dumps(value, sort_keys=True).encode()
  try:
    with _stdout_to_stderr():  # the first collective may be this one
      length = int(_allgather(np.array([len(blob)], np.int32)).max())
    buf = np.zeros(max(length, 1), np.uint8)
    buf[: len(blob)] = np.frombuffer(blob, np.uint8)
    rows = _allgather(buf).reshape(cluster.num_processes, -1)
  except (RuntimeError, ValueError) as e:  # Gloo: "Connection closed by peer" when one died
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise LostProcessError(
      f"lost another process of the run ({first}): it stopped or crashed; start every process again"
    ) from None
  return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def agree(cluster: Cluster, values: Mapping[str, str]) -> None:
  """Refuses (on every process) to go on unless every process was given the same `values`.

  Raises:
    DistributedError: naming each differing value and the processes that hold it.
  """
  if not cluster.distributed:
    return
  seen = gather_json(cluster, dict(values))
  diffs = []
  for name in sorted(set().union(*seen)):
    vals = [s.get(name) for s in seen]
    if any(v != vals[0] for v in vals):
      odd = next(p for p, v in enumerate(vals) if v != vals[0])
      diffs.append(f"{name} is {vals[0]!r} on process 0 but {vals[odd]!r} on process {odd}")
  if diffs:
    raise DistributedError("the processes were started differently: " + "; ".join(diffs))
