"""Configs load and validate; bad keys / values / missing weights give one clear error."""
import subprocess
import sys
from pathlib import Path

import pytest

from adm_jax import config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_config_loads_and_validates(path, arg):
  spec = str(path) + (f":{arg}" if arg else "")
  config = config_lib.validate(config_lib.load_config_file(spec))
  assert config.family in config_lib.CHOICES["family"]
  assert "python -m adm_jax.main" in path.read_text()   # docstring carries the command


def test_unknown_variant_is_an_error():
  with pytest.raises(config_lib.ConfigError, match="valid: full, tiny"):
    config_lib.load_config_file(str(ROOT / "configs/sdxl_onestep.py:huge"))


def test_parse_arg():
  a = config_lib.parse_arg("tiny", variant="full", batch=8)
  assert a.variant == "tiny" and a.batch == 8
  a = config_lib.parse_arg("variant=tiny,batch=2", variant="full", batch=8)
  assert a.batch == 2
  with pytest.raises(config_lib.ConfigError, match="'size' is unknown"):
    config_lib.parse_arg("size=3", variant="full")


def test_invalid_choice_names_key_and_choices():
  config = config_lib.load_config_file(str(ROOT / "configs/sdxl_onestep.py"))
  config.sample.sampler = "rk45"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert "'sample.sampler'" in str(e.value) and "'ddim', 'euler'" in str(e.value)


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "adm_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_pixel_microbatches_must_split_the_batch():
  c = config_lib.load_config_file("configs/sdxl_onestep.py")
  c.pixel_microbatches = 4
  config_lib.validate(c)
  c.batch_size = 6
  with pytest.raises(config_lib.ConfigError, match="batch_size=6 does not split into "
                                                   "config.pixel_microbatches=4"):
    config_lib.validate(c)
  c.pixel_microbatches = 0
  with pytest.raises(config_lib.ConfigError, match="a positive integer"):
    config_lib.validate(c)


def test_ttur_ratios_are_checked():
  c = config_lib.load_config_file("configs/digits_dmdx.py")
  c.dmdx.adm_ttur = 4
  config_lib.validate(c)
  for key, value, msg in (("ttur", 0, "config.ttur=0: an integer >= 1"),
                          ("dmdx.adm_ttur", -1, "config.dmdx.adm_ttur=-1: an integer >= 0"),
                          ("dmdx.adp_ttur", -2, "config.dmdx.adp_ttur=-2")):
    bad = config_lib.load_config_file("configs/digits_dmdx.py")
    config_lib.override(bad, {key: value})
    with pytest.raises(config_lib.ConfigError, match=msg):
      config_lib.validate(bad)


def test_cli_unknown_key_lists_valid_keys(tmp_path):
  r = _main("--config=configs/sdxl_onestep.py", f"--workdir={tmp_path}",
            "--config.teacher.dtyp=float32")
  assert r.returncode != 0
  assert "unknown config key 'teacher.dtyp'" in r.stderr
  assert "dtype" in r.stderr and "weights_dir" in r.stderr


def test_cli_invalid_value_lists_choices(tmp_path):
  r = _main("--config=configs/sdxl_onestep.py", f"--workdir={tmp_path}",
            "--config.teacher.dtype=float16")
  assert r.returncode != 0
  assert "'teacher.dtype'" in r.stderr and "'bfloat16'" in r.stderr


def test_cli_missing_weights_names_path_and_convert_command(tmp_path):
  r = _main("--config=configs/sdxl_onestep.py", f"--workdir={tmp_path}", "--mode=sample",
            f"--config.teacher.weights_dir={tmp_path}/sdxl")
  assert r.returncode != 0
  assert f"{tmp_path}/sdxl/unet" in r.stderr
  assert "python -m adm_jax.convert --family=sdxl" in r.stderr
