"""The training state shared by every distillation method.

One pytree, :class:`DistillState`, holds everything a run checkpoints: for each
trained network its f32 master parameters, optimiser state and update count, the
generator EMA, the global iteration counter and the base RNG key. Networks that a
method does not train (DMD2 without GAN has no discriminator; regression has only
a generator) are ``None``, which JAX treats as an empty subtree, so jit, sharding
and Orbax all see only the networks that exist. The frozen teacher is not part of
the state: it is never updated and never checkpointed.

Module definitions (``nnx.GraphDef``) and optax transformations stay outside the
state, in the closures that build the step functions, so the state is only arrays.

Typical set-up on a mesh::

  init_fn = functools.partial(state.init_state, gen_params, fake_params, None, txs,
                              ema=True, seed=config.seed)
  abstract = state.abstract_state(init_fn)
  shardings = state.state_shardings(abstract, {"generator": rules, ...}, mesh)
  train_state = sharding.init_sharded(init_fn, shardings)
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from adm_jax import optim
from adm_jax import sharding as sharding_lib

NETWORKS = ("generator", "fake_score", "discriminator")


@flax.struct.dataclass
class NetState:
  """One trainable network.

  Attributes:
    params: f32 master weights (``nnx.State`` from ``nnx.split`` or any pytree).
    opt_state: the optax state of ``params``.
    step: int32 scalar, the number of updates applied to this network (differs
      from the global step under two-timescale updates).
  """
  params: Any
  opt_state: Any
  step: jax.Array


@flax.struct.dataclass
class DistillState:
  """Everything a distillation run checkpoints.

  Attributes:
    generator: the student.
    fake_score: the critic that tracks the generator's distribution (DMD2's
      "fake score" network), or ``None``.
    discriminator: GAN heads, or ``None``.
    generator_ema: EMA of the generator parameters, or ``None``.
    step: int32 scalar, global iterations (drives the update ratio of TTUR).
    rng: uint32 raw key data (``jax.random.key_data``): Orbax saves plain arrays,
      not typed keys. Use :func:`step_rng` to draw keys.
  """
  generator: NetState
  fake_score: NetState | None
  discriminator: NetState | None
  generator_ema: Any | None
  step: jax.Array
  rng: jax.Array


def _to_f32(x):
  """Floating leaves become f32 (master weights); integer leaves stay as they are."""
  return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def make_net_state(params, tx: optax.GradientTransformation) -> NetState:
  """Casts ``params`` to f32 master weights and initialises ``tx`` on them.

  A student initialised from a bf16 teacher must still accumulate its small
  updates (lr ~ 5e-7) in f32, hence the cast.
  """
  params = jax.tree.map(_to_f32, params)
  return NetState(params=params, opt_state=tx.init(params),
                  step=jnp.zeros((), jnp.int32))


def init_state(generator, fake_score, discriminator,
               txs: Mapping[str, optax.GradientTransformation], *, ema: bool,
               seed: int | jax.Array) -> DistillState:
  """Builds the state from initial parameters; traceable (``jax.eval_shape``, jit).

  Args:
    generator: the student's parameters.
    fake_score: the fake-score network's parameters, or ``None``.
    discriminator: the discriminator's parameters, or ``None``.
    txs: ``{network name: optax transformation}`` for every network given.
    ema: whether to keep an EMA of the generator (it starts as a copy).
    seed: integer seed of the base RNG key.

  Returns:
    A :class:`DistillState` at step 0.

  Raises:
    KeyError: a network is given without a transformation in ``txs``.
  """
  given = dict(zip(NETWORKS, (generator, fake_score, discriminator)))
  missing = [n for n, p in given.items() if p is not None and n not in txs]
  if missing:
    raise KeyError(f"no optimizer for {missing}; txs has {sorted(txs)}")
  nets = {n: None if p is None else make_net_state(p, txs[n]) for n, p in given.items()}
  # A separate copy: one buffer in two fields could not be donated to a jitted step.
  ema_params = jax.tree.map(jnp.copy, nets["generator"].params) if ema else None
  return DistillState(**nets, generator_ema=ema_params, step=jnp.zeros((), jnp.int32),
                      rng=jax.random.key_data(jax.random.key(seed)))


def apply_gradients(net: NetState, grads, tx: optax.GradientTransformation) -> NetState:
  """One optimiser update of ``net`` with ``grads`` (same structure as its params)."""
  updates, opt_state = tx.update(grads, net.opt_state, net.params)
  return net.replace(params=optax.apply_updates(net.params, updates),
                     opt_state=opt_state, step=net.step + 1)


def update_ema(state: DistillState, decay: float | jax.Array) -> DistillState:
  """Moves ``generator_ema`` towards the generator (no-op when there is no EMA)."""
  if state.generator_ema is None:
    return state
  return state.replace(generator_ema=optim.ema_update(
      state.generator_ema, state.generator.params, decay))


def _name_hash(name: str) -> int:
  # crc32, not hash(): Python salts str hashes per process, so keys would differ
  # between runs and hosts. Masked to 31 bits to fit fold_in's data argument.
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def step_rng(state: DistillState, name: str) -> jax.Array:
  """The key for purpose ``name`` ("noise", "timesteps", ...) at ``state.step``.

  The key depends only on the seed, the global step and the name, so a resumed run
  draws exactly the keys of an uninterrupted one and the RNG needs no state of its
  own beyond the seed (big_vision folds the step in the same way).

  Returns:
    A typed key (``jax.random.key``-style).
  """
  key = jax.random.wrap_key_data(state.rng)
  key = jax.random.fold_in(key, state.step)
  return jax.random.fold_in(key, _name_hash(name))


def abstract_state(init_fn: Callable[[], DistillState]) -> DistillState:
  """``jax.eval_shape(init_fn)``: the state as ``ShapeDtypeStruct``s, no memory used.

  ``init_fn`` takes no arguments (bind them with ``functools.partial``): the optax
  transformations passed to :func:`init_state` are functions, not arrays, and must
  not become traced arguments.
  """
  return jax.eval_shape(init_fn)


def state_shardings(abstract: DistillState, rules_per_net: Mapping[str, Any],
                    mesh: jax.sharding.Mesh, logical_axis_rules=()) -> DistillState:
  """Shardings for every array of ``abstract`` (from :func:`abstract_state`).

  Parameters follow ``rules_per_net[name]`` (:func:`adm_jax.sharding.infer_param_shardings`
  rules). Optimiser states of optax mirror the parameter tree (Adam's ``mu`` and
  ``nu``), so every subtree of ``opt_state`` with the parameters' structure and
  shapes gets the parameters' shardings; every other leaf (counts, step counters,
  the RNG, factored statistics) is replicated. The EMA is sharded like the
  generator.

  Args:
    abstract: the state, abstract or concrete.
    rules_per_net: ``{network name: [(regex, rule), ...]}`` for every network present.
    mesh: the device mesh.
    logical_axis_rules: passed on to :func:`adm_jax.sharding.infer_param_shardings`.

  Returns:
    A :class:`DistillState` of ``NamedSharding``s (``None`` where the state has
    ``None``), usable as jit ``out_shardings`` or with
    :func:`adm_jax.sharding.abstract_with_shardings` for a sharded restore.

  Raises:
    KeyError: a network present in the state has no rules.
  """
  replicated = sharding_lib.replicated(mesh)
  nets = {}
  for name in NETWORKS:
    net = getattr(abstract, name)
    if net is None:
      nets[name] = None
      continue
    if name not in rules_per_net:
      raise KeyError(f"no sharding rules for {name!r}; rules_per_net has "
                     f"{sorted(rules_per_net)}")
    params = sharding_lib.infer_param_shardings(net.params, rules_per_net[name], mesh,
                                                logical_axis_rules)
    nets[name] = NetState(params=params,
                          opt_state=_mirror_params(net.opt_state, net.params, params,
                                                   replicated),
                          step=replicated)
  ema = abstract.generator_ema
  if ema is not None:
    ema = _mirror_params(ema, abstract.generator.params, nets["generator"].params,
                         replicated)
  return DistillState(**nets, generator_ema=ema, step=replicated, rng=replicated)


def _mirror_params(tree, params, param_shardings, default):
  """``param_shardings`` for each subtree of ``tree`` shaped like ``params``, else ``default``."""
  treedef = jax.tree.structure(params)
  shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]

  def like_params(x) -> bool:
    # Structure alone is not enough: with a single-array "tree" every leaf would match.
    return (jax.tree.structure(x) == treedef
            and [tuple(getattr(l, "shape", ())) for l in jax.tree.leaves(x)] == shapes)

  return jax.tree.map(lambda x: param_shardings if like_params(x) else default,
                      tree, is_leaf=like_params)
