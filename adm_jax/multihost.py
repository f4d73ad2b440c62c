"""Multi-controller runs: start-up, barriers, agreement and preemption.

Every process of a run executes the same program: the same jitted steps on global
arrays, the same collectives in the same order. Only host-side side effects (logs,
sample grids, result files) are limited to process 0, and never around a collective.

Start-up (:func:`initialize`) follows the environment:

* Cloud TPU VMs of a multi-host slice: ``jax.distributed.initialize()`` with no
  arguments (the TPU runtime tells JAX the coordinator and the process ids);
* GPU clusters and local tests: ``coordinator_address`` / ``num_processes`` /
  ``process_id`` from the command line (``--coordinator_address=host:port ...``) or the
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables;
  SLURM is detected by JAX itself;
* anything else: one process, nothing to initialise.

Preemption (:class:`PreemptionGuard`): TPU maintenance and spot reclaims send SIGTERM.
With several processes, JAX's preemption service (started by
``jax.distributed.initialize``) hears it, and every process agrees on one step
(``multihost_utils.reached_preemption_sync_point``); with one process a SIGTERM handler
sets a flag. Either way the trainer saves at that step and returns, and the process
exits 0; the next start resumes from that checkpoint.
"""
from __future__ import annotations

import os
import signal
from typing import Sequence

import jax
import numpy as np


def _tpu_pod() -> bool:
  """A multi-host Cloud TPU slice (more than one worker listed by the TPU runtime)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> bool:
  """Starts JAX's distributed runtime when the run has several processes.

  Explicit arguments win over ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``; a multi-host TPU slice or a SLURM job needs none of them. Must run
  before the first JAX computation. Returns whether the runtime was started.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("a multi-process run needs all of coordinator_address, "
                       f"num_processes and process_id; got {explicit}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} is not in [0, {num_processes})")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
    return True
  if _tpu_pod() or int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True
  return False


def barrier(name: str) -> None:
  """Every process waits here for the others (nothing to do with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def all_agree(mask: Sequence[bool] | np.ndarray) -> np.ndarray:
  """Element-wise AND of a boolean vector over the processes (the same length on each):
  what every process sees as true, e.g. files a lagging shared file system shows late."""
  mask = np.asarray(mask, bool)
  if jax.process_count() == 1:
    return mask
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(mask.astype(np.int32)).min(axis=0).astype(bool)


class PreemptionGuard:
  """Answers, once per training step, "save now and stop?", the same on every process.

  Use as a context manager around the training loop: on one process it installs a
  SIGTERM handler for its duration (restoring the previous one on exit); with several
  processes JAX's preemption service already listens for SIGTERM and agrees on the
  step. :meth:`reached` must be called at every step, with increasing steps, by every
  process.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._flag = False
    self._previous = None
    self.step: int | None = None      # the step the run stopped at, if it was preempted

  def __enter__(self) -> "PreemptionGuard":
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._flag = True

  def reached(self, step: int) -> bool:
    """Whether every process should checkpoint ``step`` and stop now."""
    if self._multi:
      from jax.experimental import multihost_utils
      hit = multihost_utils.reached_preemption_sync_point(int(step))
    else:
      hit = self._flag
    if hit:
      self.step = int(step)
    return hit
