"""Mode coverage on the exact-score toy (unconditional 8-mode ring), measured by
``benchmarks/toy_modes.py`` itself: one-step ADM and DMDX students cover every mode
(fixed seed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow      # about 4 minutes on 2 CPU cores
def test_adm_and_dmdx_cover_all_eight_modes(tmp_path):
  out = tmp_path / "modes.json"
  # One CPU device (the trainer's default mesh would otherwise span the 8 fake test
  # devices, multiplying the per-step dispatch cost of these small steps).
  r = subprocess.run([sys.executable, "benchmarks/toy_modes.py", "--steps", "2000",
                      "--seeds", "0", "--methods", "ADM,DMDX", "--samples", "2000",
                      "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                     timeout=900,
                     env={**os.environ, "XLA_FLAGS": conftest.xla_flags()})
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {row["method"]: row for row in json.loads(out.read_text())}
  assert rows["teacher, 25-step DDIM"]["modes"] == 8
  for name in ("ADM", "DMDX"):
    # All 8 modes hold >= 10 % of their share of the samples, and many samples sit
    # inside a mode (the exact data: 0.99; the initial generator, which outputs the
    # mixture mean for every noise, 0).
    assert rows[name]["modes"] == 8, rows[name]
    assert rows[name]["in_mode"] > 0.2, rows[name]
  assert rows["ADM"]["generator_updates"] == 2000
  assert rows["DMDX"]["generator_updates"] == 1000      # the ADM stage's own updates
