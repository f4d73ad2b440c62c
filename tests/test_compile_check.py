"""``--mode=compile``: abstract build, compile for a target, memory and FLOPs per device.

The embedded digits teacher's architecture (read from its ``config.json``, no weights)
keeps the compiles small. The TPU cases use libtpu's compiler for real topologies (the
test extra installs ``jax[tpu]``); nothing runs on a TPU.
"""
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from adm_jax import compile_check, config_lib
from adm_jax.models import layers

ROOT = Path(__file__).resolve().parents[1]


def _config(target, **overrides):
  c = config_lib.load_config_file("configs/digits_dmdx.py:method=regression")
  config_lib.override(c, {"compile.target": target, "compile.batch_size": 64,
                          "teacher.weights_dir": "/nonexistent", **overrides})
  return config_lib.validate(c)


def test_targets_map_to_topologies():
  assert compile_check._torus(4, 3) == "2x2x1" and compile_check._torus(32, 3) == "2x4x4"
  assert compile_check._torus(16, 2) == "4x4"
  with pytest.raises(config_lib.ConfigError, match="valid chip counts"):
    compile_check._torus(6, 3)
  with pytest.raises(config_lib.ConfigError, match="unknown accelerator 'v9x'"):
    compile_check.resolve_target("v9x-8")
  with pytest.raises(config_lib.ConfigError, match="expected e.g. v5p-8"):
    compile_check.resolve_target("v5p")
  with pytest.raises(config_lib.ConfigError, match="needs 64 CPU devices"):
    compile_check.resolve_target("cpu-64")
  # Without the TPU compiler a slice falls back to as many CPU devices as it has chips.
  t = compile_check.resolve_target("v5p-8", "cpu")
  assert len(t.devices) == 4 and t.hbm_bytes == 95 * 2**30 and "stand in for v5:2x2x1" in t.note


def test_remat_policy_names_match_the_config_choices():
  for net in ("generator", "fake_score", "teacher", "decoder", "pixel"):
    assert config_lib.CHOICES[f"remat.{net}"] == layers.REMAT_POLICIES


def _check_arguments(rows, padded=False):
  for r in rows:
    # Arguments are this device's shards of state + frozen nets + batch (+ the key);
    # exactly on CPU, rounded up to the TPU's tiled layouts there.
    want = r["state_bytes"] + r["frozen_bytes"] + r["batch_bytes"]
    assert want <= r["argument"] <= (4 * want if padded else want + 16), r
    assert r["total_bytes"] >= r["argument"] and r["flops"] > 0


def test_cpu_target_replicated_state(capsys):
  rows, summary = compile_check.run(_config("cpu-4"))
  assert [r["step"] for r in rows] == ["generator"]
  assert rows[0]["state_bytes"] == rows[0]["state_bytes_unsharded"]     # replicated
  _check_arguments(rows)
  out = capsys.readouterr().out
  assert "architecture from weights/digits-sdxl/unet/config.json" in out
  assert "| regression/generator | 1 |" in out and "fits: unknown (CPU)" in out
  assert summary["fits"] is None and summary["iteration_flops"] == rows[0]["flops"]


def test_step_filter_names_every_step_and_rejects_unknown_ones():
  target = compile_check.resolve_target("cpu-4")
  dmdx = config_lib.load_config_file("configs/digits_dmdx.py")
  config_lib.override(dmdx, {"teacher.weights_dir": "/nonexistent"})
  names = compile_check.step_names(config_lib.validate(dmdx), target)
  assert names[0].startswith("adp/") and "adm/generator" in names and len(names) == len(
      set(names)) >= 4
  with pytest.raises(config_lib.ConfigError, match="no step regression/critic; this config "
                                                   "has regression/generator"):
    compile_check.compile_steps(_config("cpu-4", **{"compile.steps": "regression/critic"}),
                                target, log=lambda *_: None)


def test_tpu_target_fsdp_shards_state():
  pytest.importorskip("libtpu", reason="the test extra installs jax[tpu]")
  common = {"mesh": (("data", 1), ("fsdp", 4), ("tensor", 1)),
            "sharding_rules": ((".*", "fsdp"),)}
  target = compile_check.resolve_target("v5e-4", "tpu")
  assert target.note.startswith("TPU compiler") and target.devices[0].platform == "tpu"
  plain = compile_check.compile_steps(_config("v5e-4", **common), target, log=lambda *_: None)
  _check_arguments(plain, padded=True)
  # FSDP over 4 chips: a quarter of the whole state per device (small leaves that do
  # not split evenly stay whole, hence the slack).
  assert plain[0]["state_bytes"] < 0.3 * plain[0]["state_bytes_unsharded"]
  assert plain[0]["fits"] and compile_check.summary(plain, target)["fits"]


def test_remat_recomputes_the_forward():
  """Full remat recomputes every block's forward in the backward pass: more FLOPs for the
  same step and the same state (what it saves, activations, only shows at real sizes: see
  benchmarks/compile_memory.py). CPU devices keep this compile cheap."""
  target = compile_check.resolve_target("cpu-4")
  plain = compile_check.compile_steps(_config("cpu-4"), target, log=lambda *_: None)
  remat = compile_check.compile_steps(_config("cpu-4", **{"remat.generator": "full"}), target,
                                      log=lambda *_: None)
  _check_arguments(plain + remat)
  assert remat[0]["flops"] > 1.1 * plain[0]["flops"]
  assert remat[0]["state_bytes"] == plain[0]["state_bytes"]


def test_main_compile_mode_on_a_bad_target_is_a_clear_error(tmp_path):
  r = subprocess.run([sys.executable, "-m", "adm_jax.main",
                      "--config=configs/digits_dmdx.py:method=regression",
                      f"--workdir={tmp_path}", "--mode=compile",
                      "--config.compile.target=v5q-8"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0 and "unknown accelerator 'v5q'" in r.stderr


def test_memory_levers_keep_the_numbers():
  """Remat and scanned transformer stacks change what is stored / compiled, not the
  loss or its gradient."""
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from adm_jax.models import unet
  cfg = unet.UNetConfig(
      block_out_channels=(16, 32), layers_per_block=(1, 1),
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), down_transformer_layers=((1,), (3,)),
      up_transformer_layers=((3, 3), (1, 1)), mid_transformer_layers=2,
      num_attention_heads=(2, 4), cross_attention_dim=16, norm_num_groups=8,
      projection_class_embeddings_input_dim=16 + 6 * 8, addition_time_embed_dim=8)
  graphdef, params = nnx.split(unet.UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  cond = dict(context=jax.random.normal(jax.random.key(1), (2, 5, 16)),
              pooled=jnp.ones((2, 16)), time_ids=jnp.ones((2, 6)))

  def loss(p, scan, remat):
    def apply(x):
      model = nnx.merge(graphdef, p)
      model.set_scan(scan)
      model.set_remat(remat)
      return model(x, jnp.array([10.0, 700.0]), cond)
    # Inside a loop as well (DMD2's backward simulation runs the UNet in a fori_loop).
    x1 = jax.lax.stop_gradient(jax.lax.fori_loop(0, 1, lambda i, z: apply(z), x))
    return jnp.mean(apply(x) ** 2) + jnp.mean(apply(x1) ** 2)

  ref_v, ref_g = jax.jit(jax.value_and_grad(lambda p: loss(p, False, "none")))(params)
  for scan, remat in ((True, "none"), (False, "full"), (True, "dots_saveable")):
    v, g = jax.jit(jax.value_and_grad(lambda p: loss(p, scan, remat)))(params)
    np.testing.assert_allclose(v, ref_v, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
      np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)
  with pytest.raises(ValueError, match="unknown remat policy 'most'"):
    loss(params, False, "most")
