"""The main job on the embedded digits teacher, end to end through ``python -m
adm_jax.main``: the committed diffusers teacher is converted into the workdir, its ODE
pairs are written, ADP then ADM train, the student is evaluated by the shipped
classifier, and the results table and the grid path are printed. Then a re-run resumes
and writes nothing new."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest

from adm_jax import checkpoint, config_lib, evaluation, train
from adm_jax import teacher as teacher_lib
from adm_jax.convert.__main__ import convert_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _main(*args, timeout=1200):
  return subprocess.run([sys.executable, "-m", "adm_jax.main", *args],
                        env={**os.environ, "XLA_FLAGS": conftest.xla_flags()}, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _load_benchmark(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_digits_dmdx_main_job(tmp_path):
  r = _main("--config=configs/digits_dmdx.py:tiny", f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "converted the teacher" in out and "pairs: wrote 16 pairs" in out
  assert "[adp]" in out and "[adm]" in out
  rows = evaluation.read_results(tmp_path)
  assert [row["stage"] for row in rows] == ["adp", "adm"]
  for row in rows:
    assert row["samples"] == 20 and 0.0 <= row["alignment"] <= 1.0 and row["fid"] > 0
  grid = Path(rows[-1]["grid"])
  assert grid.is_file() and f"sample grid: {grid}" in out
  assert "| step | stage | samples | fid |" in out
  assert (tmp_path / "teacher" / "unet").is_dir()
  assert json.loads((tmp_path / "pairs" / "index.json").read_text())["complete"]
  # Finished: a second start converts nothing, writes no pairs and trains no step.
  again = _main("--config=configs/digits_dmdx.py:tiny", f"--workdir={tmp_path}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "converted the teacher" not in again.stdout and "pairs:" not in again.stdout
  assert "[adm] step" not in again.stdout
  # --mode=eval scores the last checkpoint again: the trainer's own final row, exactly.
  ev = _main("--config=configs/digits_dmdx.py:tiny", f"--workdir={tmp_path}", "--mode=eval")
  assert ev.returncode == 0, ev.stderr[-3000:]
  rows = evaluation.read_results(tmp_path)
  assert len(rows) == 3 and rows[-1] == rows[-2] | {"grid": rows[-1]["grid"]}
  assert "| step | stage | samples | fid |" in ev.stdout and "[adm] step" not in ev.stdout
  # benchmarks/digits_adm_sweep.py reruns ADM alone from the ADP checkpoint: with the
  # config's own settings it reproduces the main job's ADM row; overrides reach the steps
  # (a generator update every iteration at a large lr moves the student).
  sweep = _load_benchmark("digits_adm_sweep").main([
      "--from", str(tmp_path), "--pairs", str(tmp_path / "pairs"), "--variant", "tiny",
      "--out", str(tmp_path / "sweep"), "--runs", "same:",
      "moved:dmdx.adm_ttur=1,dmdx.adm_optim.generator.lr=0.001"])
  main_adm = {k: v for k, v in rows[-2].items() if k != "grid"}
  # (The test process's XLA device flags differ from the subprocess's: float rounding.)
  again = {k: v for k, v in sweep[0]["adm"].items() if k != "grid"}
  assert again.keys() == main_adm.keys()
  for k, v in main_adm.items():
    assert again[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k
  assert sweep[0]["adp"] == rows[0]
  assert len(sweep[0]["hinge"]) >= 1 and all(0 <= h <= 4 for h in sweep[0]["hinge"])
  assert sweep[1]["adm"]["fid"] != main_adm["fid"]


def test_eval_mode_needs_a_checkpoint(tmp_path):
  c = config_lib.load_config_file("configs/digits_dmdx.py:tiny")
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*train first"):
    train.evaluate_checkpoint(c, str(tmp_path))
  assert not (tmp_path / "eval").exists()


def test_prepare_converts_once_and_names_a_missing_teacher(tmp_path):
  c = config_lib.load_config_file("configs/digits_dmdx.py:tiny")
  teacher_lib.prepare(c, tmp_path)
  assert c.teacher.weights_dir == str(tmp_path / "teacher")
  unet = tmp_path / "teacher" / "unet"
  stamp = unet.stat().st_mtime_ns
  c2 = config_lib.load_config_file("configs/digits_dmdx.py:tiny")
  teacher_lib.prepare(c2, tmp_path)
  assert unet.stat().st_mtime_ns == stamp
  teacher = teacher_lib.load_teacher(c.teacher)
  assert teacher.latent_shape[:2] == (8, 8)
  c3 = config_lib.load_config_file("configs/digits_dmdx.py:tiny")
  c3.teacher.diffusers_dir = str(tmp_path / "no_such_teacher")
  with pytest.raises(FileNotFoundError, match="no_such_teacher"):
    teacher_lib.prepare(c3, tmp_path / "other")
  assert not (tmp_path / "other" / "teacher").exists()


def _lock_waiters(path: Path) -> int:
  """How many processes wait on a ``flock`` of ``path`` (Linux ``/proc/locks``)."""
  ino = os.stat(path).st_ino
  return sum(1 for line in Path("/proc/locks").read_text().splitlines()
             if "->" in line and line.split()[-3].endswith(f":{ino}"))


def test_prepare_is_safe_for_jobs_sharing_a_workdir(tmp_path):
  """A second job on the same work directory waits while another converts, then uses
  the finished teacher instead of converting again (before the lock it crashed on the
  first job's temporary folder). Deterministic: this test plays the first job."""
  c = config_lib.load_config_file("configs/digits_dmdx.py:tiny")
  code = ("import sys; from adm_jax import config_lib, teacher; "
          "c = config_lib.load_config_file('configs/digits_dmdx.py:tiny'); "
          "teacher.prepare(c, sys.argv[1]); "
          "print('loaded', teacher.load_teacher(c.teacher).latent_shape)")
  lock_path = tmp_path / "teacher.lock"
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while _lock_waiters(lock_path) == 0:
      assert child.poll() is None, child.communicate()[0]
      assert time.monotonic() < deadline, "the second job never waited on the lock"
      time.sleep(0.2)
    (tmp_path / "teacher.converting").mkdir()  # what a killed first job leaves behind
    convert_pipeline(c.teacher.family, ROOT / c.teacher.diffusers_dir,
                     tmp_path / "teacher", log=lambda *_: None)
  out = child.communicate(timeout=300)[0]
  assert child.returncode == 0, out
  assert "converted the teacher" not in out, out
  assert "loaded (8, 8" in out, out
  # A job that starts after a crash finds no teacher: it clears the stale folder.
  shutil.rmtree(tmp_path / "teacher")
  again = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0, again.stdout + again.stderr
  assert "converted the teacher" in again.stdout
  assert not (tmp_path / "teacher.converting").exists()


def test_eval_config_is_checked(tmp_path):
  from adm_jax import problems, sharding
  c = config_lib.load_config_file("configs/digits_dmdx.py:tiny")
  c.eval.labels = (0, 1)
  teacher_lib.prepare(c, tmp_path)
  with pytest.raises(config_lib.ConfigError, match="must pair up"):
    problems._evaluation(c, teacher_lib.load_teacher(c.teacher))
