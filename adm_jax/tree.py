"""Pytree helpers: dotted-path flattening of NNX states, norms, counts."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _leaf(v):
  return v.get_value() if isinstance(v, nnx.Variable) else v


def flatten(state) -> dict[str, Any]:
  """``nnx.State`` (or nested dict) -> ``{"a.0.b.kernel": array}``."""
  if isinstance(state, nnx.State):
    return {".".join(map(str, p)): _leaf(v) for p, v in nnx.to_flat_state(state)}
  out = {}

  def rec(d, prefix):
    for k, v in d.items():
      key = f"{prefix}{k}"
      if isinstance(v, Mapping):
        rec(v, key + ".")
      else:
        out[key] = v
  rec(state, "")
  return out


def shapes(state) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in flatten(state).items()}


def unflatten_like(template: nnx.State, flat: Mapping[str, Any]) -> nnx.State:
  """Fills ``template`` (a state of the same model, possibly abstract) from ``flat``."""
  want = set(flatten(template))
  if want != set(flat):
    missing, extra = sorted(want - set(flat)), sorted(set(flat) - want)
    raise KeyError(f"parameters do not match the model: missing {missing[:10]}, "
                   f"unexpected {extra[:10]}")
  pure = nnx.to_pure_dict(template)

  def rec(d, prefix):
    for k in list(d):
      key = f"{prefix}{k}"
      d[k] = rec(d[k], key + ".") if isinstance(d[k], dict) else flat[key]
    return d
  rec(pure, "")
  state = jax.tree.map(lambda x: x, template)   # a copy; the template is left as it was
  nnx.replace_by_pure_dict(state, pure)
  return state


def to_nested_str(flat: Mapping[str, Any]) -> dict:
  """``{"a.0.b": x}`` -> ``{"a": {"0": {"b": x}}}`` (string keys, for Orbax)."""
  out: dict = {}
  for k, v in flat.items():
    d = out
    parts = k.split(".")
    for p in parts[:-1]:
      d = d.setdefault(p, {})
    d[parts[-1]] = v
  return out


def l2_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def count(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
