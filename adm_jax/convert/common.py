"""Reading foreign checkpoints and applying explicit key tables.

A *key table* maps every tensor name of a diffusers / transformers checkpoint to one
parameter path of ours (dotted, e.g. ``down_blocks.0.resnets.1.conv1.kernel``) and a
layout rule. :func:`apply_table` refuses any checkpoint key the table does not name
(unused), any table entry the checkpoint lacks (missing), any parameter of our model the
table does not fill (unmapped) and any shape mismatch, so a conversion either maps every
tensor exactly once or fails with the list of offending names. :func:`export_table` runs
the same table backwards.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import jax
import ml_dtypes
import numpy as np

from adm_jax import tree

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class ConversionError(ValueError):
  """A checkpoint does not match the key table or layout of the model it is read into."""


class Layout(NamedTuple):
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


def _conv1x1_to_linear(w):
  if w.shape[2:] != (1, 1):
    raise ConversionError(f"expected a 1x1 conv weight, got shape {w.shape}")
  return w[:, :, 0, 0].T


LAYOUTS: dict[str, Layout] = {
    # Same array either side: biases, norm scales, embeddings.
    "copy": Layout(lambda w: w, lambda w: w),
    # torch.nn.Linear weight [out, in] <-> kernel [in, out].
    "linear": Layout(lambda w: w.T, lambda w: w.T),
    # torch Conv2d weight [O, I, kh, kw] <-> kernel [kh, kw, I, O] (channels-last).
    "conv2d": Layout(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    # A 1x1 Conv2d used as a projection <-> a Linear kernel [I, O].
    "conv1x1_linear": Layout(_conv1x1_to_linear, lambda w: w.T[:, :, None, None]),
}

# torch key -> (our dotted parameter path, layout name)
KeyTable = dict[str, tuple[str, str]]


# Table rows for the three layer types every converter uses. ``ours`` defaults to the
# torch module name: our modules carry the torch names, only the leaves differ.

def linear(t: KeyTable, torch_name: str, ours: str | None = None, *, bias: bool = True):
  """``torch.nn.Linear``: ``weight`` [out, in] -> ``kernel`` [in, out], ``bias``."""
  ours = ours or torch_name
  t[f"{torch_name}.weight"] = (f"{ours}.kernel", "linear")
  if bias:
    t[f"{torch_name}.bias"] = (f"{ours}.bias", "copy")


def conv(t: KeyTable, torch_name: str, ours: str | None = None):
  """``torch.nn.Conv2d``: ``weight`` OIHW -> ``kernel`` HWIO, ``bias``."""
  ours = ours or torch_name
  t[f"{torch_name}.weight"] = (f"{ours}.kernel", "conv2d")
  t[f"{torch_name}.bias"] = (f"{ours}.bias", "copy")


def norm(t: KeyTable, torch_name: str, ours: str | None = None):
  """GroupNorm / LayerNorm: ``weight`` -> ``scale``, ``bias``."""
  ours = ours or torch_name
  t[f"{torch_name}.weight"] = (f"{ours}.scale", "copy")
  t[f"{torch_name}.bias"] = (f"{ours}.bias", "copy")


def _listing(names, limit=20):
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def apply_table(tensors: Mapping[str, np.ndarray], table: KeyTable,
                expected: Mapping[str, tuple[int, ...]] | None = None, *,
                what: str = "checkpoint") -> dict[str, np.ndarray]:
  """Renames and re-lays ``tensors`` by ``table``; returns ``{our path: array}``.

  ``expected`` maps every parameter path of the target model to its shape; when given,
  the result must cover it exactly, shape for shape.
  """
  unused = set(tensors) - set(table)
  missing = set(table) - set(tensors)
  errors = []
  if unused:
    errors.append(f"{len(unused)} unused key(s) in the {what} (no entry in the key table): "
                  + _listing(unused))
  if missing:
    errors.append(f"{len(missing)} key(s) missing from the {what}: " + _listing(missing))
  if errors:
    raise ConversionError("; ".join(errors))
  out = {}
  for src, (dst, layout) in table.items():
    if dst in out:
      raise ConversionError(f"key table maps two tensors onto {dst!r}")
    try:
      out[dst] = LAYOUTS[layout].to_ours(np.asarray(tensors[src]))
    except (ValueError, IndexError) as e:
      raise ConversionError(f"{what}: cannot apply layout {layout!r} to {src!r} "
                            f"of shape {np.shape(tensors[src])}: {e}") from e
  if expected is not None:
    _check_against(out, expected, what)
  return out


def _check_against(out, expected, what):
  unmapped = set(expected) - set(out)
  extra = set(out) - set(expected)
  if unmapped or extra:
    raise ConversionError(
        f"{what}: key table does not match the model: "
        + (f"{len(unmapped)} model parameter(s) unmapped: {_listing(unmapped)}. "
           if unmapped else "")
        + (f"{len(extra)} table target(s) not in the model: {_listing(extra)}."
           if extra else ""))
  bad = [f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(expected[k])}"
         for k in sorted(out) if tuple(out[k].shape) != tuple(expected[k])]
  if bad:
    raise ConversionError(f"{what}: {len(bad)} shape mismatch(es): " + "; ".join(bad[:20]))


def export_table(params: Mapping[str, np.ndarray], table: KeyTable, *,
                 what: str = "model") -> dict[str, np.ndarray]:
  """Inverse of :func:`apply_table`: ``{our path: array}`` -> ``{torch key: array}``."""
  inverse = {dst: (src, layout) for src, (dst, layout) in table.items()}
  unmapped = set(params) - set(inverse)
  missing = set(inverse) - set(params)
  if unmapped or missing:
    raise ConversionError(
        f"{what}: cannot export: " + (f"unmapped: {_listing(unmapped)}. " if unmapped else "")
        + (f"missing: {_listing(missing)}." if missing else ""))
  return {src: np.ascontiguousarray(LAYOUTS[layout].to_torch(np.asarray(params[dst])))
          for dst, (src, layout) in inverse.items()}


# ------------------------------------------------------------------------------------
# Reading tensors from disk.
# ------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors_file(path: str | Path) -> dict[str, np.ndarray]:
  """Memory-maps one ``.safetensors`` file into numpy arrays (bf16 included).

  Any truncation or header damage raises :class:`ConversionError` naming the file.
  """
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 * 2**20:
      raise ConversionError(f"{path}: corrupt safetensors header (length {n}, file {size} B)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: corrupt safetensors header: {e}") from e
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if data_size else None
  out = {}
  for name, info in header.items():
    try:
      dtype = np.dtype(_ST_DTYPES[info["dtype"]])
      begin, end = info["data_offsets"]
      shape = tuple(info["shape"])
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(f"{path}: corrupt header entry for {name!r}: {info!r}") from e
    count = int(np.prod(shape, dtype=np.int64))
    if end > data_size or end - begin != count * dtype.itemsize:
      raise ConversionError(f"{path}: tensor {name!r} lies outside the file "
                            f"(truncated or corrupt)")
    out[name] = mm[begin:end].view(dtype).reshape(shape) if count else np.zeros(shape, dtype)
  return out


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
  import torch  # Only with the explicit opt-in; torch is an optional dependency.
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  return {k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy())
          for k, v in obj.items()}


def read_tensors(path: str | Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint file or folder (sharded ``*.safetensors`` included).

  Pickle formats (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) can run code when loaded and are
  refused unless ``allow_pickle`` is set.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.is_dir():
    files = sorted(path.glob("*.safetensors"))
    if not files:
      pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
      if not pickles:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
      files = pickles
  else:
    files = [path]
  tensors = {}
  for f in files:
    if f.suffix in PICKLE_SUFFIXES:
      if not allow_pickle:
        raise ConversionError(
            f"{f} is a pickle file, which can execute code when loaded; convert it to "
            f"safetensors, or pass --allow_pickle (allow_pickle=True) if you trust it")
      part = _read_pickle(f)
    elif f.suffix == ".safetensors":
      part = read_safetensors_file(f)
    else:
      raise ConversionError(f"{f}: unknown checkpoint format (want .safetensors)")
    dup = set(part) & set(tensors)
    if dup:
      raise ConversionError(f"{f}: tensors also present in another shard: {_listing(dup)}")
    tensors.update(part)
  return tensors


def read_json(path: str | Path) -> dict:
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"config not found: {path}")
  with open(path) as f:
    return json.load(f)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes float32/16/bf16 numpy arrays to ``path`` (what torch's loaders read)."""
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
            metadata=dict(metadata or {}))


def fill_params(tensors: Mapping[str, np.ndarray], table: KeyTable, abstract, *,
                param_dtype, what: str):
  """Applies ``table`` against the abstract state of the target model (every parameter
  mapped, shape for shape) and returns that state filled with ``param_dtype`` arrays on
  the host CPU device: nothing lands on an accelerator before it is sharded."""
  flat = apply_table(tensors, table, tree.shapes(abstract), what=what)
  cpu = jax.devices("cpu")[0]
  flat = {k: jax.device_put(np.asarray(np.asarray(v, np.float32), np.dtype(param_dtype)),
                            cpu) for k, v in flat.items()}
  return tree.unflatten_like(abstract, flat)


def write_folder(out_dir: str | Path, params, table: KeyTable, *, weights_name: str,
                 config: Mapping, what: str) -> Path:
  """Exports ``params`` (``nnx.State`` or flat dict) through ``table`` as a
  diffusers / transformers folder: float32 ``weights_name`` (safetensors) +
  ``config.json``."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v, np.float32) for k, v in tree.flatten(params).items()}
  write_safetensors(out_dir / weights_name, export_table(flat, table, what=what),
                    metadata={"format": "pt"})
  with open(out_dir / "config.json", "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  return out_dir
