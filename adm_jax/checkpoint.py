"""Our on-disk formats.

Converted model components (teacher UNet, VAE, text encoders) are written by
``python -m adm_jax.convert`` as one folder each::

    <dir>/adm_jax_model.json   {"format": 1, "family": ..., "component": ..., "config": {...}}
    <dir>/params/              Orbax checkpoint of the parameter tree

Folders are written under a temporary name and renamed into place, so an interrupted
conversion never leaves a folder that :func:`load_params` accepts.

Training checkpoints (:class:`TrainCheckpointer`) hold a whole
:class:`adm_jax.state.DistillState` and JSON metadata per step under
``<workdir>/checkpoints/<step>/``; :func:`resolve_resume` decides where a run starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from adm_jax import tree

META = "adm_jax_model.json"
FORMAT = 1


class CheckpointError(ValueError):
  """A checkpoint folder is missing, incomplete or does not match the model."""


def save_params(path: str | Path, params, meta: Mapping[str, Any], *,
                overwrite: bool = False) -> Path:
  """Writes ``params`` (``nnx.State`` or ``{dotted path: array}``) and ``meta`` atomically."""
  path = Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
  flat = {k: np.asarray(v) for k, v in tree.flatten(params).items()}
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.parent.mkdir(parents=True, exist_ok=True)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / "params", tree.to_nested_str(flat))
      ckptr.wait_until_finished()
    with open(tmp / META, "w") as f:
      json.dump({"format": FORMAT, **meta}, f, indent=2)
    if path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return path


def read_meta(path: str | Path) -> dict:
  path = Path(path)
  if not (path / META).exists():
    what = "does not exist" if not path.exists() else f"has no {META} (not an adm_jax model)"
    raise CheckpointError(f"model folder {path} {what}")
  with open(path / META) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: unsupported format {meta.get('format')!r} (want {FORMAT})")
  return meta


def load_params(path: str | Path, abstract=None) -> tuple[dict, Any]:
  """Reads a folder written by :func:`save_params`.

  Args:
    path: the folder.
    abstract: optional ``nnx.State`` of ``jax.ShapeDtypeStruct`` (with shardings, to
      restore straight onto a mesh) whose parameter paths and shapes must match.

  Returns:
    ``(meta, params)``: ``params`` is an ``nnx.State`` shaped like ``abstract`` when given,
    else a ``{dotted path: array}`` dict.
  """
  path = Path(path).absolute()
  meta = read_meta(path)
  if not (path / "params").exists():
    raise CheckpointError(f"{path}: params/ is missing (incomplete checkpoint)")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract is None:
      return meta, tree.flatten(ckptr.restore(path / "params"))
    want = tree.flatten(abstract)
    stored = ckptr.metadata(path / "params")
    stored = {k: tuple(v.shape) for k, v in tree.flatten(_tree_metadata(stored)).items()}
    _check_match(path, stored, {k: tuple(v.shape) for k, v in want.items()})
    target = tree.to_nested_str({k: _as_struct(v) for k, v in want.items()})
    restored = tree.flatten(ckptr.restore(path / "params", target))
  return meta, tree.unflatten_like(abstract, restored)


def _tree_metadata(meta):
  return getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta


def _as_struct(v):
  return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))


def _check_match(path, stored, want):
  missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
  bad = [f"{k}: stored {stored[k]} vs model {want[k]}" for k in sorted(set(want) & set(stored))
         if stored[k] != want[k]]
  if missing or extra or bad:
    raise CheckpointError(
        f"{path}: parameters do not match the model: missing {missing[:10]}, "
        f"unexpected {extra[:10]}, shape mismatches {bad[:10]}")


# ------------------------------------------------------------------------------------
# Training checkpoints: DistillState + JSON metadata, resumable.
# ------------------------------------------------------------------------------------
#
#   <workdir>/checkpoints/<step>/state/              Orbax StandardSave of the DistillState
#   <workdir>/checkpoints/<step>/meta/metadata       JSON: step, stage, data position, config
#   <workdir>/checkpoints/<step>/commit_success.txt  written last, when the step is complete
#
# Orbax writes a step under "<step>.orbax-checkpoint-tmp*" and renames it into place
# (on GCS, where renames are not atomic, it writes in place and the marker alone says
# the step is complete). Its step listing on a local disk trusts any directory named
# by an integer, though, so a step folder that lacks the marker (a copy cut short, a
# crash on a file system without atomic renames) would be picked as the latest step.
# Here a step counts only with its commit marker, and the writer moves incomplete step
# folders aside when it opens, so they are neither restored nor block a new save.

CHECKPOINTS_SUBDIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_INCOMPLETE = ".incomplete-"


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """Where a run keeps its training checkpoints: ``<workdir>/checkpoints``."""
  return epath.Path(workdir) / CHECKPOINTS_SUBDIR


def _is_step_dir(path: epath.Path) -> bool:
  return path.name.isdigit() and path.is_dir()


def is_complete_step(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a step folder that Orbax finished writing (has the marker)."""
  path = epath.Path(path)
  return _is_step_dir(path) and (path / COMMIT_MARKER).exists()


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Sorted steps of the complete checkpoints in ``directory`` ([] if it does not exist)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if is_complete_step(p))


def _tidy(directory: epath.Path) -> None:
  """Deletes Orbax's unfinished temporary folders; sets incomplete step folders aside.

  Orbax can delete its ``*.orbax-checkpoint-tmp*`` folders itself, but does so in a
  background thread that may still be running when the first listing is made; this
  runs before the manager opens. A step folder without its commit marker is renamed
  to ``<step>.incomplete-<ns>`` rather than deleted, so nothing is lost if the marker
  was missing for another reason; Orbax does not list such names as steps.
  """
  for p in directory.iterdir():
    if TMP_SUFFIX in p.name:
      logging.warning("deleting the unfinished checkpoint %s", p)
      p.rmtree()
    elif _is_step_dir(p) and not (p / COMMIT_MARKER).exists():
      target = p.parent / f"{p.name}{_INCOMPLETE}{time.time_ns()}"
      logging.warning("checkpoint %s is incomplete (no %s); moved to %s", p,
                      COMMIT_MARKER, target.name)
      p.rename(target)


def _json_default(x):
  """Numpy values, paths and ConfigDicts as JSON; anything else is an error."""
  if hasattr(x, "to_dict"):            # ml_collections.ConfigDict: the config snapshot
    return x.to_dict()
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  raise TypeError(f"{type(x).__name__} is not JSON serialisable: {x!r}")


class TrainCheckpointer:
  """Saves and restores a :class:`adm_jax.state.DistillState` with its metadata.

  A thin layer over ``ocp.CheckpointManager`` with two Composite items: ``state``
  (``StandardSave``) and ``meta`` (``JsonSave``: ``step``, ``stage``, the data
  position, a config snapshot, whatever the caller adds). Saves are asynchronous:
  :meth:`save` returns once the arrays are copied off the devices, so the state may
  be donated to the next step straight away, and the files are written in the
  background. Use it as a context manager, or call :meth:`close`, so that the last
  save finishes before the process exits.

  Example::

    with TrainCheckpointer(checkpoint_dir(workdir), max_to_keep=3) as ckpt:
      ckpt.save(step, train_state, {"stage": "dmd", "data": loader_position})
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    """Opens (and, unless ``read_only``, creates and tidies) ``directory``.

    Args:
      directory: the checkpoints folder, usually :func:`checkpoint_dir`.
      max_to_keep: how many of the latest checkpoints to keep (``None``: all).
      async_save: write files in a background thread.
      read_only: only restore; nothing in ``directory`` is created, moved or
        deleted (use this to restore from another run's folder).
    """
    self.directory = epath.Path(directory)
    if not read_only:
      self.directory.mkdir(parents=True, exist_ok=True)
      if jax.process_index() == 0:
        _tidy(self.directory)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("adm_jax.TrainCheckpointer.init")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=1,
        enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints, oldest first (includes a finished async save)."""
    return complete_steps(self.directory)

  def latest_step(self) -> int | None:
    """The newest complete step, or ``None``; a save still in flight does not count."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, meta: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Starts saving ``state`` and ``meta`` as checkpoint ``step``.

    Args:
      step: the global step; also stored as ``meta["step"]``.
      state: the ``DistillState`` (sharded arrays are fine; each process writes
        its shards).
      meta: JSON-serialisable dict (numpy scalars are converted).
      force: save even if Orbax's policy would skip this step (it skips steps that
        are not newer than the latest saved one).

    Returns:
      Whether a save was started: ``False`` when Orbax's policy skips it, or when
      ``step`` is already saved (e.g. the final save of a run that just saved its
      last step; Orbax would raise ``StepAlreadyExistsError`` under ``force``).

    Raises:
      TypeError: ``meta`` holds values JSON cannot store (raised here rather than
        in the background writer).
    """
    step = int(step)
    if step in self._manager.all_steps():
      logging.info("checkpoint %d exists in %s; not saved again", step, self.directory)
      return False
    meta = json.loads(json.dumps({**(meta or {}), "step": step}, default=_json_default))
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
    """Reads checkpoint ``step`` (``None``: the latest) into ``abstract_state``'s layout.

    Args:
      step: the step, or ``None`` for :meth:`latest_step`.
      abstract_state: the state's structure with ``jax.ShapeDtypeStruct`` leaves whose
        ``sharding`` says where each array goes; it may be a different mesh (or a
        different sharding) than the one saved, Orbax reshards while reading. Built
        with :func:`adm_jax.state.abstract_state`, :func:`adm_jax.state.state_shardings`
        and :func:`adm_jax.sharding.abstract_with_shardings`. Concrete arrays are
        accepted too (their shape, dtype and sharding are used).

    Returns:
      ``(state, meta)``.

    Raises:
      CheckpointError: no such complete step, or the stored tree does not match.
    """
    self._manager.wait_until_finished()   # a save of this process may still be in flight
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise CheckpointError(f"no complete checkpoint for step {step} in "
                            f"{self.directory}; complete steps: {steps}")
    target = jax.tree.map(_as_struct, abstract_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{self.directory / str(step)}: cannot restore into the "
                            f"given state structure: {e}") from e
    return restored.state, dict(restored.meta)

  def read_meta(self, step: int) -> dict:
    """The metadata of complete checkpoint ``step`` alone (no arrays are read): which
    stage wrote it decides the state structure to restore into."""
    self._manager.wait_until_finished()
    if step not in self.all_steps():
      raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(restored.meta)

  def wait(self) -> None:
    """Blocks until a save in flight is on disk (and old checkpoints are removed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in flight, then releases Orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@dataclasses.dataclass(frozen=True)
class ResumeFrom:
  """Where a run starts from; see :func:`resolve_resume`.

  Attributes:
    source: ``"workdir"``, ``"resume"``, ``"teacher"`` or ``"scratch"``.
    directory: the checkpoints folder to restore from (``None`` unless the source is
      ``"workdir"`` or ``"resume"``).
    step: the checkpoint step to restore, 0 when starting fresh.
  """
  source: str
  directory: epath.Path | None
  step: int


def resolve_resume(workdir: str | os.PathLike, resume_path: str | os.PathLike | None,
                   init_from_teacher: bool) -> ResumeFrom:
  """Decides where training starts, in this order of precedence (as big_vision):

  1. The latest complete checkpoint in ``<workdir>/checkpoints``: the run itself was
     interrupted (preemption, crash) and continues where it stopped, even when a
     ``resume`` path is configured, because that path was already used at the
     first start and the run has moved on since.
  2. ``resume_path``: another run's checkpoint, given as a step folder
     (``.../checkpoints/1200``), a checkpoints folder (its latest step) or a workdir
     (its ``checkpoints/`` latest step). Restore it with
     ``TrainCheckpointer(directory, read_only=True)``. A path without a complete
     checkpoint is an error, never a silent fresh start.
  3. ``init_from_teacher``: a new run whose student starts from the teacher's weights.
  4. Otherwise from scratch (random initialisation).

  Only complete checkpoints (with Orbax's commit marker) are considered.

  Returns:
    A :class:`ResumeFrom`.

  Raises:
    CheckpointError: ``resume_path`` holds no complete checkpoint.
  """
  own = checkpoint_dir(workdir)
  steps = complete_steps(own)
  if steps:
    return ResumeFrom("workdir", own, steps[-1])
  if resume_path:
    path = epath.Path(resume_path)
    if is_complete_step(path):
      return ResumeFrom("resume", path.parent, int(path.name))
    for directory in (path, path / CHECKPOINTS_SUBDIR):
      steps = complete_steps(directory)
      if steps:
        return ResumeFrom("resume", directory, steps[-1])
    raise CheckpointError(f"resume path {resume_path} holds no complete checkpoint "
                          f"(a step folder with {COMMIT_MARKER}, a checkpoints folder "
                          f"or a workdir with checkpoints/)")
  if init_from_teacher:
    return ResumeFrom("teacher", None, 0)
  return ResumeFrom("scratch", None, 0)
