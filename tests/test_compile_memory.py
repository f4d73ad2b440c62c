"""``benchmarks/compile_memory.py``'s results file: steps compiled once and kept, a batch
that is out of HBM stops its own steps and every larger batch, and the table it prints.

The compiles themselves (7-30 minutes each at full size) are replaced by a recorder; the
real compile path is ``compile_check.compile_steps``, tested in test_compile_check.py.
"""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30


@pytest.fixture
def bench(monkeypatch):
  spec = importlib.util.spec_from_file_location("compile_memory",
                                                ROOT / "benchmarks" / "compile_memory.py")
  cm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cm)
  hbm = 100 * GiB
  target = SimpleNamespace(devices=[0] * 4, hbm_bytes=hbm)
  calls = []

  def compile_here(config, target, step):
    calls.append((config["batch"], step))
    stage, name = step.split("/")
    # "adm/big" needs 64 GiB for 8 rows per chip, "adp/small" 10: batch 64 is out of HBM.
    per_row = {"adm/big": 8, "adp/small": 1.25}[step] * GiB
    total = int(per_row * config["batch"] / 4)
    row = {"stage": stage, "step": name, "every": 1, "state_bytes": GiB, "frozen_bytes": GiB,
           "temp": total - 2 * GiB, "flops": 1e12 * config["batch"]}
    if total > hbm:
      return [{**row, "error": "RESOURCE_EXHAUSTED: Ran out of memory on HBM", "fits": False}]
    return [{**row, "total_bytes": total, "fits": True}]

  monkeypatch.setattr(cm.compile_check, "resolve_target", lambda name, kind: target)
  monkeypatch.setattr(cm.compile_check, "step_names", lambda config, t: ["adp/small", "adm/big"])
  monkeypatch.setattr(cm, "config_for", lambda method, target, batch, *a: {"batch": batch})
  monkeypatch.setattr(cm, "_compile_here", compile_here)
  return cm, calls


def _args(cm, results, batches="32,64,128"):
  return cm.argparse.Namespace(methods="dmdx", targets="v5p-8", batches=batches, remat="full",
                               scan=1, teacher_param_dtype="float32", pixel_microbatches=0,
                               isolate=0, results=results, stack_mb=1024)


def test_grid_stops_at_the_first_batch_out_of_hbm_and_resumes_from_the_file(bench, tmp_path):
  cm, calls = bench
  results = tmp_path / "r.json"
  entries = []
  cm.measure(_args(cm, results), entries)
  # Batch 32: both steps. Batch 64: the step that was largest at 32 first; it is out of
  # HBM, so the other is not compiled, and batch 128 is not compiled at all.
  assert calls == [(32, "adp/small"), (32, "adm/big"), (64, "adm/big")]
  saved = cm.load(results)
  assert saved == json.loads(json.dumps(entries))
  assert [cm.status(e) for e in saved] == [
      "complete", "out of HBM", "not compiled: batch 64 is already out of HBM"]
  # One image per chip per pass in the pixel branch unless told otherwise.
  assert [e["pixel_microbatches"] for e in saved] == [8, 16, 32]
  text = cm.table(saved)
  assert "| 32 | 64.0 GiB | 64 % | yes | 64.0 | full | complete |" in text
  assert "largest batch measured under 80 % of HBM: 32" in text
  # A second run compiles nothing: every step it needs is in the file.
  calls.clear()
  cm.measure(_args(cm, results), cm.load(results))
  assert calls == []


def test_an_interrupted_batch_is_finished_and_reported_partial_until_then(bench, tmp_path):
  cm, calls = bench
  results = tmp_path / "r.json"
  entries = []
  cm.measure(_args(cm, results, "32"), entries)
  entries[0]["steps"] = entries[0]["steps"][:1]     # as if killed during the second compile
  cm.save(results, entries)
  assert cm.status(cm.load(results)[0]) == "1 of 2 steps"
  assert "| 32 | ≥ 10.0 GiB | ≥ 10 % | ? |" in cm.table(cm.load(results))
  calls.clear()
  cm.measure(_args(cm, results, "32"), cm.load(results))
  assert calls == [(32, "adm/big")]


def test_a_foreign_results_file_is_refused(bench, tmp_path):
  cm, _ = bench
  bad = tmp_path / "r.json"
  bad.write_text(json.dumps([{"method": "dmdx"}]))
  with pytest.raises(ValueError, match="not a compile_memory results file"):
    cm.load(bad)


def test_a_compiler_crash_is_recorded_the_next_batch_goes_on_and_a_rerun_retries(
    bench, tmp_path, monkeypatch):
  cm, calls = bench
  recorder = cm._compile_here

  def crash_at_32(config, target, step):
    if (config["batch"], step) == (32, "adm/big"):
      calls.append((32, step))
      raise cm.CompilerCrash("compiling adm/big failed (exit -6)")
    return recorder(config, target, step)

  monkeypatch.setattr(cm, "_compile_here", crash_at_32)
  results = tmp_path / "r.json"
  cm.measure(_args(cm, results, "32,64"), [])
  saved = cm.load(results)
  # The crash is not "out of HBM": batch 64 is still compiled (and is out of HBM there).
  assert calls == [(32, "adp/small"), (32, "adm/big"), (64, "adp/small"), (64, "adm/big")]
  assert [cm.status(e) for e in saved] == ["compile failed on adm/big", "out of HBM"]
  assert saved[0]["crashes"][0]["why"] == "compiling adm/big failed (exit -6)"
  assert "| 32 | ≥ 10.0 GiB | ≥ 10 % | ? |" in cm.table(saved)
  # A re-run (say with larger stacks) tries the crashed step again, and only that one.
  monkeypatch.setattr(cm, "_compile_here", recorder)
  calls.clear()
  cm.measure(_args(cm, results, "32,64"), cm.load(results))
  assert calls == [(32, "adm/big")]
  assert cm.status(cm.load(results)[0]) == "complete"


def test_an_isolated_child_that_dies_raises_compiler_crash_with_its_stack_limit(
    bench, tmp_path, monkeypatch):
  cm, _ = bench
  seen = tmp_path / "rlimit"
  child = tmp_path / "child.py"
  child.write_text(f"""import os, resource, signal
open({str(seen)!r}, "w").write(str(resource.getrlimit(resource.RLIMIT_STACK)[0]))
os.kill(os.getpid(), signal.SIGABRT)
""")
  monkeypatch.setattr(cm, "__file__", str(child))
  with pytest.raises(cm.CompilerCrash, match=r"exit -6.*thread stacks 64 MiB"):
    cm._isolated({"method": "dmdx"}, "adm/big", stack_mb=64)
  assert int(seen.read_text()) == 64 * 2 ** 20
