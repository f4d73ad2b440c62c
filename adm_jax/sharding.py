"""Device mesh, parameter sharding rules and global batches.

Mesh. ``config.mesh`` lists ``(axis, size)`` pairs over the axes ``data``, ``fsdp`` and
``tensor``; one size may be ``-1`` to take the remaining devices, and axes left out get
size 1, so every mesh has all three axes::

  config.mesh = [("data", -1), ("fsdp", 8), ("tensor", 1)]

Parameters (big_vision style). An ordered list of ``(regex, rule)`` pairs; the first
regex that *fully* matches a parameter's dotted path (:func:`adm_jax.tree.flatten`
naming, e.g. ``down_blocks.0.resnets.1.conv1.kernel``) decides its sharding, and a
parameter that no regex matches is an error, so a list should end with a catch-all.
A rule is one of:

* a string of ops joined by ``|``, applied left to right to a spec that starts fully
  replicated: ``"replicate"``, ``"fsdp"``, ``'fsdp(axis="data", min_size_mb=1)'``,
  ``'shard_dim(-1, "tensor")'``, ``"logical"``, ``'spec(None, "tensor")'``, or e.g.
  ``'logical|fsdp'`` (annotated parameters follow their annotation, the rest FSDP);
* an explicit PartitionSpec: a tuple whose entries are all ``None``, mesh axis names
  or tuples of mesh axis names, e.g. ``(None, None, None, "tensor")`` (or a
  ``jax.sharding.PartitionSpec``); shorter than the array means trailing ``None``;
* any other tuple is ``(op, *args)``, e.g. ``("shard_dim", -1, "tensor")`` or
  ``("fsdp", "fsdp", 1)``. Note ``("fsdp", None)`` reads as a PartitionSpec.

``"logical"`` maps the names of ``nnx.with_partitioning`` annotations to mesh axes
with ``logical_axis_rules``, pairs ``(logical_name, mesh_axes)`` where ``mesh_axes``
is ``None``, an axis or a tuple of axes. Everything here is lists of tuples and
strings, so it fits in an ``ml_collections.ConfigDict``::

  config.sharding = dict(
      logical_axis_rules=[("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor")],
      rules=[
          (r".*norm.*", "replicate"),
          (r".*attn.*\\.to_out\\.0\\.kernel", ("shard_dim", 0, "tensor")),
          (r".*", "logical|fsdp(min_size_mb=1)"),
      ],
  )

Typical use: ``jax.eval_shape``/``nnx.eval_shape`` gives shapes,
:func:`infer_param_shardings` turns them into shardings, then :func:`init_sharded`
(``jax.jit`` with ``out_shardings``) or :func:`shard_params` (``jax.device_put`` of
host arrays) materialises the parameters already sharded.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import mesh_utils
import numpy as np
from flax import nnx

Mesh = jax.sharding.Mesh
NamedSharding = jax.sharding.NamedSharding
P = jax.sharding.PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# ---------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------


def make_mesh(axes: Sequence[tuple[str, int]] | Mapping[str, int],
              devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a ``(data, fsdp, tensor)`` mesh with Auto axis types.

  Args:
    axes: ``[(name, size), ...]`` in mesh order, or a mapping ``{name: size}`` (then
      the order is data, fsdp, tensor). Names are from ``MESH_AXES``; at most one
      size is ``-1`` and takes the remaining devices; missing axes get size 1 and
      are appended.
    devices: the devices to use; all of ``jax.devices()`` by default.

  Returns:
    A ``jax.sharding.Mesh`` whose axes are all ``AxisType.Auto`` (GSPMD style, as
    the sharding rules here assume; ``jax.make_mesh`` would default to Explicit).

  Raises:
    ValueError: unknown or repeated axis names, bad sizes, two ``-1``, or sizes
      whose product does not fit the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  pairs = _axis_pairs(axes)
  sizes = _fill_sizes(pairs, len(devices))
  names = tuple(name for name, _ in pairs)
  return Mesh(_device_array(sizes, devices), names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _axis_pairs(axes) -> list[tuple[str, int]]:
  """Config axes -> ``[(name, size)]`` with every axis of ``MESH_AXES`` present."""
  if hasattr(axes, "items"):
    given = dict(axes.items())
    pairs = [(n, given.pop(n)) for n in MESH_AXES if n in given]
    pairs += list(given.items())          # unknown names, rejected below
  else:
    pairs = [tuple(a) for a in axes]
    if any(len(p) != 2 for p in pairs):
      raise ValueError(f"mesh axes are (name, size) pairs, got {list(axes)}")
  names = [p[0] for p in pairs]
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the axes are {MESH_AXES}")
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axes repeat: {names}")
  for name, size in pairs:
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis {name!r} has size {size!r}; use a positive int or -1")
  return [(n, int(s)) for n, s in pairs] + [(n, 1) for n in MESH_AXES if n not in names]


def _fill_sizes(pairs: list[tuple[str, int]], n_devices: int) -> list[int]:
  """Replaces the single ``-1`` so that the sizes multiply to ``n_devices``."""
  sizes = [s for _, s in pairs]
  desc = ", ".join(f"{n}={s}" for n, s in pairs)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh ({desc}): only one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise ValueError(f"mesh ({desc}): the fixed sizes multiply to {fixed}, which "
                       f"does not divide the {n_devices} devices")
    return [n_devices // fixed if s == -1 else s for s in sizes]
  if fixed != n_devices:
    raise ValueError(f"mesh ({desc}): the sizes multiply to {fixed}, but there are "
                     f"{n_devices} devices")
  return sizes


def _device_array(sizes: Sequence[int], devices: list) -> np.ndarray:
  """Topology-aware device order when JAX knows one, else a plain reshape."""
  try:
    return mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    logging.warning("create_device_mesh(%s) failed (%s); using devices in order.",
                    sizes, e)
    return np.asarray(devices, dtype=object).reshape(sizes)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that puts a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int,
                   axes: str | Sequence[str] = BATCH_AXES) -> NamedSharding:
  """Sharding of a ``[B, ...]`` array of rank ``ndim`` with B split over ``axes``."""
  axes = _axis_tuple(axes)
  _check_axes_in_mesh(axes, mesh, "batch_sharding")
  if ndim < 1:
    raise ValueError(f"batch_sharding needs ndim >= 1, got {ndim}")
  return NamedSharding(mesh, P(_spec_entry(axes), *(None,) * (ndim - 1)))


def make_global_batch(local_batch, mesh: Mesh,
                      axes: str | Sequence[str] = BATCH_AXES):
  """Assembles this process's part of a batch into global arrays split over ``axes``.

  Every leaf ``[b, ...]`` is this process's slice of the batch; the result has the
  global batch (``b`` times the number of processes when ``axes`` span them all) on
  the leading axis. Scalars are replicated. With one process this is a sharded put.

  Args:
    local_batch: a pytree of host arrays (numpy or anything ``np.asarray`` takes).
    mesh: the device mesh.
    axes: the mesh axes that split the batch axis.

  Returns:
    The same pytree of global ``jax.Array``s.
  """
  single = jax.process_count() == 1

  def put(x):
    x = x if hasattr(x, "shape") else np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim, axes) if x.ndim else replicated(mesh)
    if single:            # device arrays stay on the devices (no host round trip)
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree.map(put, local_batch)


# ---------------------------------------------------------------------------------
# Parameter sharding rules
# ---------------------------------------------------------------------------------

Spec = tuple   # one entry per array dimension: None, an axis name, or a tuple of names


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """What a rule may look at: the path, the shape, the size and the annotation."""
  path: str
  shape: tuple[int, ...]
  nbytes: int
  logical: tuple | None     # names from ``nnx.with_partitioning``, if any


@dataclasses.dataclass(frozen=True)
class _Env:
  mesh: Mesh
  logical_axis_rules: dict


Op = Callable[[Spec, _Leaf, _Env], Spec]
_OPS: dict[str, Callable[..., Op]] = {}


def _register(fn):
  _OPS[fn.__name__] = fn
  return fn


@_register
def replicate() -> Op:
  """Full replication (the default; useful to say so in a config)."""
  def update(spec, leaf, env):
    del env
    if any(a is not None for a in spec):
      raise ValueError(f"{leaf.path}: 'replicate' after an op that sharded it "
                       f"({P(*spec)})")
    return spec
  return update


@_register
def fsdp(axis: str | Sequence[str] = "fsdp", min_size_mb: float = 0.0) -> Op:
  """Shards the largest free dimension divisible by the size of ``axis``.

  Args:
    axis: a mesh axis, or several (their sizes multiply).
    min_size_mb: arrays smaller than this stay replicated.

  Returns:
    An op; it leaves the spec as it is when ``axis`` has size 1 or is already used,
    the array is small, or no free dimension divides.
  """
  axes = _axis_tuple(axis)

  def update(spec, leaf, env):
    size = _axes_size(env.mesh, axes, leaf.path)
    if size == 1 or leaf.nbytes < min_size_mb * 2**20 or _used_axes(spec) & set(axes):
      return spec
    order = sorted(range(len(leaf.shape)), key=lambda i: (-leaf.shape[i], -i))
    for i in order:
      if spec[i] is None and leaf.shape[i] % size == 0:
        return spec[:i] + (_spec_entry(axes),) + spec[i + 1:]
    logging.info("fsdp: %s %s has no free dimension divisible by %s=%d; replicated.",
                 leaf.path, leaf.shape, axes, size)
    return spec
  return update


@_register
def shard_dim(dim: int, axis: str | Sequence[str] = "tensor") -> Op:
  """Shards dimension ``dim`` (may be negative) over ``axis``."""
  axes = _axis_tuple(axis)

  def update(spec, leaf, env):
    del env
    ndim = len(leaf.shape)
    if not -ndim <= dim < ndim:
      raise ValueError(f"{leaf.path}: shard_dim({dim}) on an array of shape {leaf.shape}")
    i = dim % ndim
    if spec[i] is not None:
      raise ValueError(f"{leaf.path}: shard_dim({dim}) but dim {i} is already sharded "
                       f"({P(*spec)})")
    return spec[:i] + (_spec_entry(axes),) + spec[i + 1:]
  return update


@_register
def logical() -> Op:
  """Maps ``nnx.with_partitioning`` names through ``logical_axis_rules``.

  Parameters without an annotation are left as they are. A logical name missing from
  the rules is an error unless it is itself a mesh axis name.
  """
  def update(spec, leaf, env):
    if leaf.logical is None:
      return spec
    mapped = tuple(_logical_to_mesh(name, leaf, env) for name in leaf.logical)
    return _merge(spec, _pad(mapped, leaf), leaf)
  return update


@_register
def spec(*entries) -> Op:
  """An explicit PartitionSpec; missing trailing entries are ``None``."""
  want = _normalize_spec(entries)

  def update(cur, leaf, env):
    del env
    return _merge(cur, _pad(want, leaf), leaf)
  return update


def _logical_to_mesh(name, leaf: _Leaf, env: _Env):
  if name is None:
    return None
  if name in env.logical_axis_rules:
    entry = env.logical_axis_rules[name]
    return None if entry is None else _spec_entry(_axis_tuple(entry))
  if name in env.mesh.axis_names:
    return name
  raise ValueError(f"{leaf.path}: logical axis {name!r} (annotation {leaf.logical}) "
                   f"is not in logical_axis_rules {sorted(env.logical_axis_rules)}")


def _merge(cur: Spec, new: Spec, leaf: _Leaf) -> Spec:
  """Combines two specs that must not both shard one dimension."""
  out = []
  for a, b in zip(cur, new):
    if a is not None and b is not None and a != b:
      raise ValueError(f"{leaf.path}: conflicting sharding {P(*cur)} vs {P(*new)}")
    out.append(a if a is not None else b)
  return tuple(out)


def _pad(spec: Spec, leaf: _Leaf) -> Spec:
  ndim = len(leaf.shape)
  if len(spec) > ndim:
    raise ValueError(f"{leaf.path}: spec {P(*spec)} has more entries than the shape "
                     f"{leaf.shape}")
  return tuple(spec) + (None,) * (ndim - len(spec))


# --- parsing the config form ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rule:
  pattern: re.Pattern
  ops: tuple[Op, ...]
  text: str               # the rule as written, for error messages


def compile_rules(rules: Sequence[tuple[str, Any]]) -> list[_Rule]:
  """Parses ``[(regex, rule), ...]`` (see the module docstring) once, eagerly.

  Raises:
    ValueError: a malformed entry, regex or rule, or an unknown op.
  """
  out = []
  for entry in rules:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"a sharding rule is (regex, rule), got {entry!r}")
    pattern, rule = entry
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"bad regex {pattern!r} in sharding rules: {e}") from e
    out.append(_Rule(regex, tuple(_parse_rule(rule)), f"({pattern!r}, {rule!r})"))
  return out


def _parse_rule(rule) -> list[Op]:
  if isinstance(rule, P):
    return [spec(*rule)]
  if isinstance(rule, str):
    return [_parse_op(text) for text in rule.split("|")]
  if isinstance(rule, (tuple, list)):
    if _is_spec(rule):
      return [spec(*rule)]
    return [_make_op(rule[0], rule[1:], {}, repr(rule))]
  raise ValueError(f"a sharding rule is a string, a tuple or a PartitionSpec, "
                   f"got {rule!r}")


def _parse_op(text: str) -> Op:
  """``'fsdp'`` or ``'fsdp(axis="data", min_size_mb=1)'`` -> an op."""
  name, args, kwargs = _parse_call(text)
  return _make_op(name, args, kwargs, text)


def _parse_call(text: str) -> tuple[str, list, dict]:
  """``'name(1, axis="x")'`` -> ``("name", [1], {"axis": "x"})``; literals only."""
  try:
    node = ast.parse(text.strip(), mode="eval").body
    if isinstance(node, ast.Name):
      return node.id, [], {}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and all(k.arg for k in node.keywords)):
      return (node.func.id, [ast.literal_eval(a) for a in node.args],
              {k.arg: ast.literal_eval(k.value) for k in node.keywords})
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"cannot parse sharding op {text!r}: {e}") from e
  raise ValueError(f"cannot parse sharding op {text!r}; write name or name(args)")


def _make_op(name, args, kwargs, text: str) -> Op:
  if name not in _OPS:
    raise ValueError(f"unknown sharding op {name!r} in {text!r}; ops: {sorted(_OPS)}")
  try:
    return _OPS[name](*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for sharding op {text!r}: {e}") from e


def _is_spec(rule) -> bool:
  def entry_ok(e):
    if e is None or e in MESH_AXES:
      return True
    return isinstance(e, (tuple, list)) and bool(e) and all(a in MESH_AXES for a in e)
  return all(entry_ok(e) for e in rule)


def _normalize_spec(entries) -> Spec:
  return tuple(e if e is None or isinstance(e, str) else tuple(e) for e in entries)


# --- resolving -----------------------------------------------------------------------


def infer_param_shardings(state, rules: Sequence[tuple[str, Any]], mesh: Mesh,
                          logical_axis_rules=()):
  """Shardings for every array of ``state`` from ordered ``(regex, rule)`` pairs.

  Args:
    state: an ``nnx.State`` (of arrays, or of ``ShapeDtypeStruct`` from
      ``nnx.eval_shape``) or any pytree of array-likes; paths are dotted as in
      :func:`adm_jax.tree.flatten`.
    rules: ``[(regex, rule), ...]``, first full match wins (module docstring).
    mesh: the device mesh.
    logical_axis_rules: ``[(logical_name, mesh_axes), ...]`` or a mapping, used by
      the ``logical`` op.

  Returns:
    A pytree like ``state`` (Variables keep their metadata) with a ``NamedSharding``
    in place of every array; it can be given to ``jax.jit`` as in/out shardings.

  Raises:
    ValueError: parameters that no rule matches (all their paths are listed), or a
      rule that cannot apply to a parameter (named in the message).
  """
  compiled = compile_rules(rules)
  env = _Env(mesh, _as_dict(logical_axis_rules))
  flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)
  leaves = [_leaf_info(path, x) for path, x in flat]
  specs = [_resolve(leaf, compiled, env) for leaf in leaves]
  unmatched = [f"{l.path} {l.shape}" for l, s in zip(leaves, specs) if s is None]
  if unmatched:
    raise ValueError(f"no sharding rule matches {len(unmatched)} parameter(s): "
                     f"{unmatched[:20]}; end the rules with a catch-all such as "
                     f"('.*', 'replicate')")
  out = [_with_value(x, NamedSharding(mesh, P(*s))) for (_, x), s in zip(flat, specs)]
  return treedef.unflatten(out)


def _resolve(leaf: _Leaf, compiled: list[_Rule], env: _Env) -> Spec | None:
  for rule in compiled:
    if rule.pattern.fullmatch(leaf.path):
      spec_ = (None,) * len(leaf.shape)
      try:
        for op in rule.ops:
          spec_ = op(spec_, leaf, env)
        _check_spec(spec_, leaf, env.mesh)
      except ValueError as e:
        raise ValueError(f"{e} [rule {rule.text}]") from e
      return spec_
  return None


def _check_spec(spec_: Spec, leaf: _Leaf, mesh: Mesh) -> None:
  """Axes exist, none repeats, and every sharded dimension divides evenly."""
  used = [a for e in spec_ if e is not None for a in _axis_tuple(e)]
  if len(set(used)) != len(used):
    raise ValueError(f"{leaf.path}: spec {P(*spec_)} uses a mesh axis twice")
  for dim, entry in zip(leaf.shape, spec_):
    if entry is None:
      continue
    size = _axes_size(mesh, _axis_tuple(entry), leaf.path)
    if dim % size:
      raise ValueError(f"{leaf.path}: shape {leaf.shape} cannot be split by "
                       f"{P(*spec_)} ({entry}={size} does not divide {dim})")


def _leaf_info(path, x) -> _Leaf:
  logical_names = None
  if isinstance(x, nnx.Variable):
    logical_names = _annotation(x)
    x = x.get_value()
  shape = _shape(x)
  itemsize = getattr(getattr(x, "dtype", None), "itemsize", None) or 4
  return _Leaf(_path_str(path), shape, math.prod(shape) * itemsize, logical_names)


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _annotation(v: nnx.Variable) -> tuple | None:
  names = v.get_metadata().get("out_sharding")
  if not names:
    return None
  if isinstance(names, NamedSharding):
    names = names.spec
  return tuple(names)


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _with_value(x, value):
  return x.replace(value) if isinstance(x, nnx.Variable) else value


def _as_dict(pairs) -> dict:
  items = pairs.items() if hasattr(pairs, "items") else pairs
  return {name: (tuple(v) if isinstance(v, list) else v) for name, v in items}


def _axis_tuple(axis) -> tuple[str, ...]:
  return (axis,) if isinstance(axis, str) else tuple(axis)


def _spec_entry(axes: tuple[str, ...]):
  return axes[0] if len(axes) == 1 else axes


def _used_axes(spec_: Spec) -> set[str]:
  return {a for e in spec_ if e is not None for a in _axis_tuple(e)}


def _axes_size(mesh: Mesh, axes: tuple[str, ...], where: str) -> int:
  _check_axes_in_mesh(axes, mesh, where)
  return math.prod(mesh.shape[a] for a in axes)


def _check_axes_in_mesh(axes: tuple[str, ...], mesh: Mesh, where: str) -> None:
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"{where}: mesh axes {missing} not in the mesh {mesh.axis_names}")


# ---------------------------------------------------------------------------------
# Materialising sharded parameters
# ---------------------------------------------------------------------------------


def abstract_with_shardings(state, shardings):
  """``ShapeDtypeStruct(shape, dtype, sharding=...)`` per array, same structure.

  For ``jax.jit(...).lower(...)`` ahead of time and for Orbax restores straight into
  the target layout.
  """
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=s),
      state, shardings)


def infer_abstract_params(state, rules, mesh: Mesh, logical_axis_rules=()):
  """:func:`infer_param_shardings` then :func:`abstract_with_shardings`."""
  shardings = infer_param_shardings(state, rules, mesh, logical_axis_rules)
  return abstract_with_shardings(state, shardings)


def shard_params(state, shardings, *, donate: bool = False):
  """Places every array of ``state`` with its sharding.

  Host (numpy) arrays go to each device as that device's shard only, so no device
  ever holds a full unsharded copy. Arrays already on devices are resharded; pass
  ``donate=True`` to free their old buffers (``state`` is then unusable). Parameters
  created from scratch are better built sharded with :func:`init_sharded`.

  Args:
    state: a pytree (e.g. ``nnx.State``) of arrays.
    shardings: the matching pytree from :func:`infer_param_shardings`.
    donate: whether the input device buffers may be reused.

  Returns:
    The state with sharded ``jax.Array`` leaves.
  """
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
    raise ValueError("shard_params got abstract arrays; materialise them with "
                     "init_sharded(init_fn, shardings) instead")
  return jax.device_put(state, shardings, donate=donate)


def init_sharded(init_fn: Callable[..., Any], shardings, *args):
  """Runs ``init_fn(*args)`` under ``jax.jit`` with ``out_shardings=shardings``.

  Each device computes only its shards, so parameters larger than one device's
  memory can be created. ``shardings`` usually comes from
  :func:`infer_param_shardings` on ``jax.eval_shape(init_fn, *args)``.
  """
  return jax.jit(init_fn, out_shardings=shardings)(*args)
