"""Metric writing (JSONL + TensorBoard), cadence and the non-finite check.

Only process 0 writes; every process runs the same code otherwise (no collective is
ever skipped by one process).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping

import jax
import numpy as np


def itstime(step: int, every: int, total: int | None = None) -> bool:
  """True on every ``every``-th step (1-based count) and on the last step."""
  return (every > 0 and step % every == 0) or (total is not None and step == total)


class MetricWriter:
  """Appends ``{"step": s, name: value, ...}`` lines to ``metrics.jsonl`` and scalars to
  TensorBoard event files under ``workdir/tb``."""

  def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.active:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(Path(workdir) / "tb"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def check_finite(scalars: Mapping[str, float], first_step: int, last_step: int) -> None:
  """Raises ``FloatingPointError`` naming the network(s) and the step range."""
  bad = sorted(k for k, v in scalars.items() if not math.isfinite(float(v)))
  if bad:
    nets = sorted({k.split("/")[0] for k in bad})
    raise FloatingPointError(
        f"non-finite {', '.join(bad)} (network(s): {', '.join(nets)}) between steps "
        f"{first_step} and {last_step}")


def mean_metrics(history: list[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Fetches the metrics of the steps since the last log (one host transfer) and
  averages each name over the steps it was produced in."""
  host = jax.device_get(history)
  out: dict[str, list[float]] = {}
  for m in host:
    for k, v in m.items():
      out.setdefault(k, []).append(float(np.mean(v)))
  return {k: float(np.mean(v)) for k, v in out.items()}


class Progress:
  """Step rate and ETA for the log line."""

  def __init__(self, start_step: int, total: int):
    self.t0, self.s0, self.total = time.perf_counter(), start_step, total

  def line(self, step: int, batch_size: int) -> tuple[str, dict[str, float]]:
    dt = time.perf_counter() - self.t0
    rate = (step - self.s0) / dt if dt > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    stats = {"perf/steps_per_s": rate, "perf/samples_per_s": rate * batch_size}
    return f"step {step}/{self.total}  {rate:.2f} it/s  eta {eta:.0f} s", stats
