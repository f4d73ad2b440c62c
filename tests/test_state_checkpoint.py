"""Tests for adm_jax.state and the training checkpoints of adm_jax.checkpoint.

Runs on the 8 fake CPU devices of conftest.py.
"""
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adm_jax import checkpoint
from adm_jax import config_lib
from adm_jax import optim
from adm_jax import sharding
from adm_jax import state as state_lib

FSDP = ((".*", "fsdp"),)
REPLICATE = ((".*", "replicate"),)
REPO = Path(__file__).resolve().parents[1]


class TinyNet(nnx.Module):
  """A conv and a linear layer: kernels of rank 4 and 2, and biases."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
    self.proj = nnx.Linear(8, 16, rngs=rngs)

  def __call__(self, x):
    return self.proj(self.conv(x).mean(axis=(1, 2)))


def _params(seed, make=TinyNet):
  """``nnx.split`` parameters of ``make`` filled from numpy: the structure of real
  NNX parameters without compiling NNX's random initialisers (slow on 8 CPU devices)."""
  rng = np.random.default_rng(seed)
  abstract = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))[1]
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), abstract)


def _txs():
  cfg = config_lib.adamw(1e-3, warmup_steps=2)
  return {n: optim.make_optimizer(cfg) for n in state_lib.NETWORKS}


TXS = _txs()


def _mesh(data, fsdp, devices=None):
  return sharding.make_mesh([("data", data), ("fsdp", fsdp)], devices)


@functools.cache
def _init_fn(full: bool):
  """Every network and the EMA (``full``), or the generator alone; cached so that
  jit sees the same function and compiles it once."""
  disc = _params(2, lambda rngs: nnx.Linear(16, 8, rngs=rngs))
  nets = (_params(0), _params(1), disc)
  if not full:
    nets = (nets[0], None, None)
  return functools.partial(state_lib.init_state, *nets, TXS, ema=full, seed=7)


def _rules(rules):
  return {n: rules for n in state_lib.NETWORKS}


def _train_step(txs):
  """A fake update of every network (random gradients from step_rng) and the EMA."""
  def step(s):
    nets = {}
    for name in state_lib.NETWORKS:
      net = getattr(s, name)
      if net is None:
        nets[name] = None
        continue
      # One draw per network keeps the compile small; the gradients still change
      # with the step, the network and the parameters.
      u = jax.random.uniform(state_lib.step_rng(s, name), minval=0.5, maxval=2.0)
      grads = jax.tree.map(lambda x: jnp.sin(u * x + u), net.params)
      nets[name] = state_lib.apply_gradients(net, grads, txs[name])
    s = state_lib.update_ema(s.replace(**nets), 0.9)
    return s.replace(step=s.step + 1)
  return step


STEP = _train_step(TXS)


def _sharded_state(mesh, rules=FSDP, full=True, steps=2):
  """A DistillState built sharded on ``mesh`` and updated ``steps`` times under jit."""
  init_fn = _init_fn(full)
  abstract = state_lib.abstract_state(init_fn)
  shardings = state_lib.state_shardings(abstract, _rules(rules), mesh)
  s = sharding.init_sharded(init_fn, shardings)
  step = jax.jit(STEP, out_shardings=shardings)   # same jit as the tests use: one compile
  for _ in range(steps):
    s = step(s)
  return s, abstract, shardings


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _specs(tree):
  return [tuple(x.sharding.spec) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def fsdp_state():
  """(mesh, state, abstract state, shardings): every network, FSDP on (data=2, fsdp=4)."""
  mesh = _mesh(2, 4)
  return (mesh, *_sharded_state(mesh))


@pytest.fixture(scope="module")
def gen_only_state():
  """(state, abstract state, shardings): the generator alone, no EMA."""
  return _sharded_state(_mesh(2, 4), full=False, steps=1)


# --- state -------------------------------------------------------------------------------


def test_init_state_layout_and_f32_master_weights():
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(0))
  s = state_lib.abstract_state(functools.partial(state_lib.init_state, bf16, None, None,
                                                 TXS, ema=False, seed=0))
  assert s.fake_score is None and s.discriminator is None and s.generator_ema is None
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s.generator.params))
  assert s.step.dtype == jnp.int32 and s.generator.step.dtype == jnp.int32
  assert s.rng.dtype == jnp.uint32
  with pytest.raises(KeyError, match="fake_score"):
    state_lib.init_state(_params(0), _params(1), None, {"generator": _txs()["generator"]},
                         ema=False, seed=0)


def test_step_rng_depends_on_seed_step_and_name_only():
  s = jax.jit(_init_fn(False))()
  draw = lambda st, name: np.asarray(jax.random.key_data(state_lib.step_rng(st, name)))
  assert not np.array_equal(draw(s, "noise"), draw(s, "timesteps"))
  assert not np.array_equal(draw(s, "noise"), draw(s.replace(step=s.step + 1), "noise"))
  again = jax.jit(functools.partial(state_lib.init_state, _params(0), None, None, TXS,
                                    ema=False, seed=7))()
  np.testing.assert_array_equal(draw(s, "noise"), draw(again, "noise"))
  # The name hash is crc32, fixed across processes (Python's hash() is salted).
  assert state_lib._name_hash("noise") == 2108266025


def test_state_shardings_mirror_params_in_optimizer_state(fsdp_state):
  mesh, s, abstract, shardings = fsdp_state
  gen = shardings.generator
  kernel = gen.params["proj"]["kernel"].get_value()
  assert tuple(kernel.spec) == (None, "fsdp")
  adam = gen.opt_state[1][0]          # chain(clip, adamw): adamw's ScaleByAdamState
  assert adam.mu["proj"]["kernel"].get_value() == kernel
  assert adam.nu["conv"]["kernel"].get_value() == gen.params["conv"]["kernel"].get_value()
  assert tuple(adam.count.spec) == ()
  assert tuple(gen.step.spec) == () and tuple(shardings.rng.spec) == ()
  assert _specs(s.generator_ema) == _specs(s.generator.params)
  # The jitted steps really produced arrays in those layouts.
  assert tuple(s.generator.opt_state[1][0].mu["proj"]["kernel"].sharding.spec) == (None, "fsdp")
  assert int(s.step) == 2 and int(s.generator.step) == 2


# --- checkpoints ---------------------------------------------------------------------------


def test_keeps_latest_two_and_restores_exactly(fsdp_state, tmp_path):
  mesh, s, abstract, shardings = fsdp_state
  step = jax.jit(STEP, out_shardings=shardings)
  meta = {"stage": "dmd", "data": {"epoch": 1, "index": np.int64(640)},
          "config": config_lib.ConfigDict({"lr": 5e-7, "mesh": (("data", 2), ("fsdp", 4))})}
  saved = {}
  with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2) as ckpt:
    for i in (1, 2, 3):
      s = step(s)
      saved[i] = jax.device_get(s)
      assert ckpt.save(i, s, meta)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    assert not ckpt.save(3, s, meta)              # already saved: skipped, no error
    target = sharding.abstract_with_shardings(abstract, shardings)
    restored, got_meta = ckpt.restore(None, target)
    _assert_trees_equal(restored, saved[3])
    assert got_meta == {"stage": "dmd", "data": {"epoch": 1, "index": 640},
                        "config": {"lr": 5e-7, "mesh": [["data", 2], ["fsdp", 4]]},
                        "step": 3}
    assert _specs(restored) == _specs(target)
    older, _ = ckpt.restore(2, target)
    _assert_trees_equal(older, saved[2])
    with pytest.raises(checkpoint.CheckpointError, match=r"step 1 .*\[2, 3\]"):
      ckpt.restore(1, target)
    # The restored state draws the same keys and continues identically.
    np.testing.assert_array_equal(
        jax.random.key_data(state_lib.step_rng(restored, "noise")),
        jax.random.key_data(state_lib.step_rng(saved[3], "noise")))
    _assert_trees_equal(jax.device_get(step(restored)), jax.device_get(step(s)))


@pytest.mark.parametrize("target", ["replicated_8", "two_devices"])
def test_restore_onto_a_different_mesh(fsdp_state, tmp_path, target):
  _, s, abstract, _ = fsdp_state
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(5, s, {"stage": "dmd"})
  if target == "replicated_8":
    mesh, rules = _mesh(8, 1), REPLICATE
  else:
    mesh, rules = _mesh(1, 2, jax.devices()[:2]), FSDP
  shardings = state_lib.state_shardings(abstract, _rules(rules), mesh)
  with checkpoint.TrainCheckpointer(tmp_path, read_only=True) as ckpt:
    restored, meta = ckpt.restore(5, sharding.abstract_with_shardings(abstract, shardings))
  _assert_trees_equal(restored, jax.device_get(s))
  assert meta["step"] == 5
  for x, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding.mesh == mesh and x.sharding.spec == want.spec
  kernel = restored.generator.params["proj"]["kernel"].get_value()
  assert len(kernel.sharding.device_set) == (8 if target == "replicated_8" else 2)


def test_absent_networks_round_trip(tmp_path, gen_only_state):
  s, abstract, shardings = gen_only_state
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, s)
    restored, meta = ckpt.restore(1, sharding.abstract_with_shardings(abstract, shardings))
  assert restored.fake_score is None and restored.discriminator is None
  assert restored.generator_ema is None
  _assert_trees_equal(restored, jax.device_get(s))
  assert meta == {"step": 1}


def test_save_copies_before_the_state_is_donated(tmp_path, gen_only_state):
  s, abstract, shardings = gen_only_state
  s = jax.jit(STEP, out_shardings=shardings)(s)   # fresh buffers, the fixture's stay
  expect = jax.device_get(s)
  step = jax.jit(STEP, out_shardings=shardings, donate_argnums=0)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(0, s)
    s = step(s)                  # donates the buffers the save was given
    s = step(s)
    restored, _ = ckpt.restore(0, sharding.abstract_with_shardings(abstract, shardings))
  _assert_trees_equal(restored, expect)


def test_meta_must_be_json(tmp_path, fsdp_state):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="object"):
      ckpt.save(1, fsdp_state[1], {"bad": object()})
    assert ckpt.all_steps() == []


def test_restore_into_a_mismatched_structure_is_a_checkpoint_error(tmp_path,
                                                                   gen_only_state):
  s = gen_only_state[0]
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, s)
    other = state_lib.abstract_state(_init_fn(True))
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore"):
      ckpt.restore(1, other)


# --- atomicity -------------------------------------------------------------------------------


def test_incomplete_step_folders_are_ignored_and_set_aside(tmp_path, gen_only_state):
  s, abstract, shardings = gen_only_state
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, s)
  # A step folder without the commit marker (a copy cut short, or a writer on a
  # file system without atomic renames killed mid-save), and Orbax's temporary folder.
  (tmp_path / "2" / "state").mkdir(parents=True)
  (tmp_path / "2" / "state" / "manifest.ocdbt").write_bytes(b"partial")
  (tmp_path / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  assert checkpoint.complete_steps(tmp_path) == [1]
  assert checkpoint.resolve_resume(tmp_path.parent, None, False).step == 0  # not a workdir
  with checkpoint.TrainCheckpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == 1               # read-only: ignored, left in place
  assert (tmp_path / "2").exists()
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    names = sorted(os.listdir(tmp_path))
    assert "2" not in names and any(n.startswith("2.incomplete-") for n in names)
    assert not any("orbax-checkpoint-tmp" in n for n in names)
    assert ckpt.save(2, s)                       # the step number is free again
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    ckpt.restore(2, sharding.abstract_with_shardings(abstract, shardings))


_KILLED_SAVE = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from adm_jax import checkpoint

    state = {"w": jnp.arange(1 << 16, dtype=jnp.float32), "step": jnp.int32(0)}
    with checkpoint.TrainCheckpointer(sys.argv[1]) as ckpt:
      ckpt.save(1, state, {"stage": "a"})
      ckpt.wait()

      # The process dies after every array is written but before the commit: the
      # latest moment a kill can hit, when the folder looks most complete.
      async def die(self, *args, **kwargs):
        os._exit(17)
      for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        cls.finalize = die
      ckpt.save(2, {"w": state["w"] + 1, "step": jnp.int32(2)}, {"stage": "b"})
      ckpt.wait()
    os._exit(0)
""")


def test_a_save_killed_before_its_commit_is_never_restored(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 17, proc.stderr[-3000:]
  assert any("orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path))  # step 2 left half done
  assert checkpoint.complete_steps(tmp_path) == [1]
  assert checkpoint.resolve_resume(tmp_path.parent, None, False).source == "scratch"
  target = {"w": jax.ShapeDtypeStruct((1 << 16,), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore(None, target)
  np.testing.assert_array_equal(restored["w"], np.arange(1 << 16, dtype=np.float32))
  assert meta == {"stage": "a", "step": 1}
  assert os.listdir(tmp_path) == ["1"]            # the temporary folder was removed


# --- resume precedence ---------------------------------------------------------------------


def _fake_steps(directory: Path, *steps, complete=True):
  for s in steps:
    (directory / str(s)).mkdir(parents=True)
    if complete:
      (directory / str(s) / checkpoint.COMMIT_MARKER).write_text("ok")
  return directory


def test_resume_precedence(tmp_path):
  workdir, other = tmp_path / "run", tmp_path / "other"
  other_ckpts = _fake_steps(other / "checkpoints", 100, 200)
  resolve = checkpoint.resolve_resume

  # 4. / 3.: nothing to resume.
  assert resolve(workdir, None, False) == checkpoint.ResumeFrom("scratch", None, 0)
  assert resolve(workdir, "", True) == checkpoint.ResumeFrom("teacher", None, 0)
  # 2.: an explicit resume path: a step folder, a checkpoints folder or a workdir.
  got = resolve(workdir, other_ckpts / "100", True)
  assert (got.source, Path(got.directory), got.step) == ("resume", other_ckpts, 100)
  for path in (other_ckpts, other):
    got = resolve(workdir, path, True)
    assert (got.source, Path(got.directory), got.step) == ("resume", other_ckpts, 200)
  # Incomplete checkpoints of this run do not count.
  _fake_steps(workdir / "checkpoints", 5, complete=False)
  assert resolve(workdir, other, True).source == "resume"
  # 1.: this run's own checkpoints win over everything.
  _fake_steps(workdir / "checkpoints", 3, 4)
  got = resolve(workdir, other, True)
  assert (got.source, Path(got.directory), got.step) == (
      "workdir", workdir / "checkpoints", 4)


def test_resume_path_without_checkpoint_is_an_error(tmp_path):
  _fake_steps(tmp_path / "half", 7, complete=False)
  for path in (tmp_path / "missing", tmp_path / "half", tmp_path / "half" / "7"):
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
      checkpoint.resolve_resume(tmp_path / "run", path, True)
