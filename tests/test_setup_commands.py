"""README's set-up commands and CI cannot drift: .ci/run holds the README block's lines."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
  text = (ROOT / "README.md").read_text()
  block = re.search(r"<!-- setup-commands -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
  assert block, "README.md lost its <!-- setup-commands --> block"
  return [l.strip() for l in block.group(1).splitlines()
          if l.strip() and not l.lstrip().startswith("#")]


def test_readme_has_exactly_install_and_test_commands():
  install, test = _readme_commands()
  assert "pip install" in install and ".[test]" in install
  assert "pytest" in test


def test_ci_runs_exactly_the_readme_commands():
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  commands = [l.strip() for l in ci if l.startswith("python -m ")]
  assert commands == _readme_commands()
  # ... and runs them in order after the shell set-up, failing on the first error.
  assert "set -euo pipefail" in ci
  assert ci[-2:] == commands


def test_setup_pins_what_the_readme_promises():
  setup = (ROOT / "setup.py").read_text()
  for pin in ("jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "torch==2.13.0"):
    assert f'"{pin}"' in setup, pin
  assert "tensorflow\"" not in setup and "tensorflow==" not in setup
