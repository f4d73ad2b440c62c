"""README's set-up commands and CI cannot drift: CI reads them from the README block."""
import re
import subprocess
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


def test_ci_runs_the_readme_block():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "<!-- setup-commands -->" in ci and "README.md" in ci
  # The extraction CI performs yields the same two commands this test reads.
  script = re.search(r"<<'PY'\n(.*?)\nPY", ci, re.S).group(1)
  out = subprocess.run(["python3", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out == _readme_commands()


def test_setup_pins_what_the_readme_promises():
  setup = (ROOT / "setup.py").read_text()
  for pin in ("jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "torch==2.13.0"):
    assert f'"{pin}"' in setup, pin
  assert "tensorflow\"" not in setup and "tensorflow==" not in setup
