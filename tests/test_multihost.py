"""Multi-controller runs on one machine (loopback only) and preemption.

* 2 processes x 2 CPU devices train the tiny toy config with the batch split by
  process, checkpoint, stop, restore and finish: both processes see the same losses,
  equal to one process with 4 devices.
* SIGTERM mid-run: exit 0 with a checkpoint at the step reached; the same command
  resumes to the state of an uninterrupted run.
* SIGKILL at several points (some during an asynchronous save): every restart resumes
  from the last complete checkpoint; a partial one is never taken.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import conftest
from adm_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("ADM_JAX_TEST_CACHE", "/tmp/adm_jax_test_xla_cache")


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=conftest.xla_flags(devices),
             PYTHONPATH=str(ROOT))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _workers(workdir, n: int, devices: int, stop_at=None, timeout=240) -> list[dict]:
  port = _free_port()
  cmd = [sys.executable, str(ROOT / "tests" / "train_worker.py"), f"--workdir={workdir}"]
  if stop_at is not None:
    cmd.append(f"--stop_at={stop_at}")
  procs = []
  for i in range(n):
    extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
              f"--process_id={i}"] if n > 1 else [])
    procs.append(subprocess.Popen(cmd + extra, env=_env(devices), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  tag = stop_at if stop_at is not None else "end"
  return [json.loads((Path(workdir) / f"worker_{i}_{tag}.json").read_text())
          for i in range(n)]


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  (single,) = _workers(tmp_path / "single", 1, 4)                # steps 1..6 straight
  first = _workers(tmp_path / "multi", 2, 2, stop_at=3)          # saves step 3, stops
  assert checkpoint.complete_steps(tmp_path / "multi" / "checkpoints")[-1] == 3
  second = _workers(tmp_path / "multi", 2, 2)                    # restores 3, runs to 6
  for w in [single] + first + second:
    assert w["devices"] == 4
  assert [w["processes"] for w in first + second] == [2, 2, 2, 2]
  # Both processes saw identical losses and parameters (one SPMD program)...
  assert first[0]["losses"] == first[1]["losses"]
  assert second[0]["losses"] == second[1]["losses"]
  assert second[0]["norms"] == second[1]["norms"]
  # ... equal to one process driving 4 devices without a stop.
  multi = first[0]["losses"] + second[0]["losses"]
  assert [r["step"] for r in multi] == [r["step"] for r in single["losses"]] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(single["losses"], multi):
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=f"step {a['step']} {k}")
  for k, v in single["norms"].items():
    np.testing.assert_allclose(second[0]["norms"][k], v, rtol=1e-5, err_msg=k)


# ------------------------------------------------------------------------ preemption

TOTAL = 60
MAIN = [sys.executable, "-m", "adm_jax.main", "--config=configs/toy.py:method=dmd2,variant=tiny",
        f"--config.total_steps={TOTAL}", "--config.log_every=1", "--config.checkpoint_every=25",
        f"--config.compilation_cache_dir={CACHE}"]


class Run:
  """``python -m adm_jax.main`` in the background, its output read line by line."""

  def __init__(self, workdir):
    self.proc = subprocess.Popen(MAIN + [f"--workdir={workdir}"], env=_env(1), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines = []

  def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout
    for line in self.proc.stdout:
      self.lines.append(line)
      m = re.search(pattern, line)
      if m:
        return m
      assert time.monotonic() < deadline, f"no {pattern!r} in time:\n{''.join(self.lines)}"
    raise AssertionError(f"exited without {pattern!r}:\n{''.join(self.lines)}")

  def finish(self, timeout: float = 180) -> tuple[int, str]:
    out = self.proc.communicate(timeout=timeout)[0]
    self.lines.append(out)
    return self.proc.returncode, "".join(self.lines)


def _final_state(workdir, step=TOTAL) -> dict:
  tree = ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  work = tmp_path_factory.mktemp("uninterrupted")
  rc, out = Run(work).finish()
  assert rc == 0, out[-3000:]
  return _final_state(work)


def test_sigterm_saves_the_step_reached_exits_0_and_resumes(tmp_path, uninterrupted):
  run = Run(tmp_path)
  run.wait_for(r"\] step 12/")
  run.proc.send_signal(signal.SIGTERM)
  rc, out = run.finish()
  assert rc == 0, out[-3000:]
  m = re.search(r"preempted \(SIGTERM\): checkpoint (\d+) saved", out)
  assert m, out[-3000:]
  stopped = int(m.group(1))
  assert 12 <= stopped < TOTAL
  assert checkpoint.complete_steps(tmp_path / "checkpoints")[-1] == stopped
  assert "[eval]" not in out and "sample grid" not in out      # stopped, not finished

  rc, out = Run(tmp_path).finish()
  assert rc == 0, out[-3000:]
  assert f"step {stopped} (stage dmd2)" in out
  _assert_same(uninterrupted, _final_state(tmp_path))


def test_sigkill_at_any_point_resumes_from_the_last_complete_checkpoint(tmp_path,
                                                                       uninterrupted):
  ckpts = tmp_path / "checkpoints"
  # Killed on step 8 (no checkpoint yet), on 25 and 50 (their asynchronous saves in
  # flight or just finished) and on 37.
  for kill_on in (8, 25, 37, 50):
    before = checkpoint.complete_steps(ckpts) if ckpts.exists() else []
    run = Run(tmp_path)
    if before:
      m = run.wait_for(r"resumed from .* step (\d+)")
      assert int(m.group(1)) == before[-1]
    run.wait_for(rf"\] step {kill_on}/")
    run.proc.kill()
    run.finish()
    steps = checkpoint.complete_steps(ckpts) if ckpts.exists() else []
    assert all(s <= kill_on for s in steps) and steps[-len(before):] if before else True
  last = checkpoint.complete_steps(ckpts)[-1]
  run = Run(tmp_path)
  m = run.wait_for(r"resumed from .* step (\d+)")
  assert int(m.group(1)) == last
  rc, out = run.finish()
  assert rc == 0, out[-3000:]
  _assert_same(uninterrupted, _final_state(tmp_path))
