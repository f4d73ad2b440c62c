"""Our on-disk formats.

Converted model components (teacher UNet, VAE, text encoders) are written by
``python -m adm_jax.convert`` as one folder each::

    <dir>/adm_jax_model.json   {"format": 1, "family": ..., "component": ..., "config": {...}}
    <dir>/params/              Orbax checkpoint of the parameter tree

Folders are written under a temporary name and renamed into place, so an interrupted
conversion never leaves a folder that :func:`load_params` accepts.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
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
