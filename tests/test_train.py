"""The trainer end to end on the exact-score toy: every method runs, logs, checkpoints
and resumes to the same state as an uninterrupted run; a NaN stops it with a clear error."""
import json

import jax
import numpy as np
import pytest

from adm_jax import config_lib, train
from adm_jax.checkpoint import CheckpointError


def _config(method="dmd2", **overrides):
  c = config_lib.load_config_file(f"configs/toy.py:method={method},variant=tiny")
  config_lib.override(c, overrides)
  return config_lib.validate(c)


def _flat(state):
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def test_dmd2_logs_checkpoints_and_resumes_exactly(tmp_path):
  straight = train.train_and_evaluate(_config(), str(tmp_path / "a"))
  rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 8, 12]
  for key in ("generator/dm_loss", "generator/gan_loss", "fake_score/loss",
              "discriminator/loss", "generator/grad_norm", "fake_score/update_norm",
              "discriminator/param_norm", "perf/steps_per_s"):
    assert key in rows[-1], key
  assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()
                if p.name.isdigit()) == ["12", "6"]
  assert int(straight.step) == 12 and int(straight.generator.step) == 3   # TTUR 5

  # Interrupted at 6, then resumed to 12: the same final state.
  train.train_and_evaluate(_config(total_steps=6), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(_config(), str(tmp_path / "b"))
  a, b = _flat(straight), _flat(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("method", ["adm", "adp", "regression"])
def test_other_methods_train(method, tmp_path):
  config = _config(method, ema_decay=0.5)
  state = train.train_and_evaluate(config, str(tmp_path))
  # The EMA (decay 0.5) followed the generator away from the initial parameters but
  # lags it: closer to the generator than the start is, and not equal to it.
  init = train.PROBLEMS["toy"](config, None).student_params
  dist = lambda a, b: sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  g, e = state.generator.params, state.generator_ema
  assert 0 < dist(e, g) < dist(init, g)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert int(state.generator.step) == 12
  want = {"adm": "discriminator/loss", "adp": "generator/adp_gan_loss",
          "regression": "generator/regression_loss"}[method]
  assert np.isfinite(rows[-1][want])


def test_non_finite_loss_names_network_and_steps(tmp_path):
  with pytest.raises(FloatingPointError, match=r"generator.*between steps 1 and 4"):
    train.train_and_evaluate(_config(**{"hparams.dm_weight": float("nan")}), str(tmp_path))


def test_dmdx_hands_over_from_adp_to_adm_and_resumes_across_the_boundary(tmp_path,
                                                                        monkeypatch):
  straight = train.train_and_evaluate(_config("dmdx"), str(tmp_path / "a"))
  ckpts = tmp_path / "a" / "checkpoints"
  metas = {p.name: json.loads((p / "meta" / "metadata").read_text())
           for p in ckpts.iterdir() if p.name.isdigit()}
  # Step 6 is the hand-over: the ADM stage's first state, holding the ADP generator.
  assert {k: m["stage"] for k, m in metas.items()} == {"6": "adm", "12": "adm"}
  rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert "generator/adp_gan_loss" in rows[0] and "fake_score/loss" in rows[-1]
  assert int(straight.generator.step) == 6          # ADM's own generator updates
  assert (tmp_path / "a" / "samples" / "step_0000012.png").exists()

  # Stopped inside ADP (step 4), at the hand-over (6) and inside ADM (9), then resumed:
  # the same final state as the uninterrupted run.
  built = []
  real_build = train.build
  monkeypatch.setattr(train, "build", lambda *a: built.append(a[-1]) or real_build(*a))
  # Each resumed run builds each stage it touches once: the resumed stage's build is
  # reused (at 6 the checkpoint is ADP's last state, restored in ADP's layout).
  for stop, builds in ((4, ["adp", "adm"]), (6, ["adp", "adm"]), (9, ["adm"])):
    work = str(tmp_path / f"stop{stop}")
    train.train_and_evaluate(_config("dmdx"), work, stop_at=stop)
    built.clear()
    resumed = train.train_and_evaluate(_config("dmdx"), work)
    assert built == builds, stop
    a, b = _flat(straight), _flat(resumed)
    assert a.keys() == b.keys(), stop
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=f"{stop} {k}")


@pytest.mark.parametrize("disc_init", ["fresh", "adp_latent"])
def test_dmdx_hand_over_starts_adm_heads_fresh_or_from_adp(disc_init):
  from adm_jax import sharding
  config = _config("dmdx", **{"dmdx.adm_disc_init": disc_init})
  mesh = sharding.make_mesh(config.mesh)
  problem = train.PROBLEMS["toy"](config, mesh)
  adp, adm = (train.build(config, mesh, problem, m) for m in ("adp", "adm"))
  state = jax.jit(adp.init)(*adp.init_args)
  # Move ADP's heads away from their initial values, as training would.
  state = state.replace(discriminator=state.discriminator.replace(
      params=jax.tree.map(lambda p: p + 0.25, state.discriminator.params)))
  new = _flat(train._hand_over(config, adm, state).discriminator.params)
  want = _flat(state.discriminator.params["latent"] if disc_init == "adp_latent"
               else adm.init_args[2])
  assert new.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(new[k], want[k], err_msg=k)


def test_dmdx_stages_take_their_own_ttur():
  from adm_jax import sharding
  config = _config("dmdx", **{"dmdx.adm_ttur": 3})
  mesh = sharding.make_mesh(config.mesh)
  problem = train.PROBLEMS["toy"](config, mesh)
  every = {m: {name: e for name, _, e in train.build(config, mesh, problem, m).plan}
           for m in ("adp", "adm")}
  assert every == {"adp": {"discriminator": 1, "generator": 1},
                   "adm": {"fake_score": 1, "discriminator": 1, "generator": 3}}


@pytest.mark.parametrize("method", ["dmd2", "adm"])
def test_real_score_guidance_defaults_to_the_teachers(method):
  from adm_jax import sharding
  for scale, want in ((0.0, None), (3.5, 3.5)):
    config = _config(method, real_guidance_scale=scale)
    mesh = sharding.make_mesh(config.mesh)
    nets = train.build(config, mesh, train.PROBLEMS["toy"](config, mesh), method).nets
    assert nets.cfg_scale == (want or config.teacher.guidance_scale) != 0


def test_checkpoint_from_another_stage_layout_is_refused(tmp_path):
  train.train_and_evaluate(_config("adm"), str(tmp_path), stop_at=4)
  with pytest.raises(CheckpointError, match="stage 'adm'"):
    train.train_and_evaluate(_config("dmdx"), str(tmp_path))


def test_unknown_family_for_training(tmp_path):
  c = config_lib.load_config_file("configs/sdxl_onestep.py:tiny")
  c.family = "sd3"
  c.teacher.family = "sd3"
  c.batch_size = 8
  with pytest.raises(config_lib.ConfigError, match="valid: toy, sdxl"):
    train.train_and_evaluate(c, str(tmp_path))
