"""Test set-up: 8 fake CPU devices (before JAX starts) and small shared fixtures."""
import os

# XLA:CPU aborts a process whose fake devices do not all reach a collective within 40 s;
# with two xdist workers sharing two cores a busy neighbour can delay one that long.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=1200")


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process or a subprocess: ``devices`` fake CPU devices (one,
  the default, when None) and the raised collective timeouts."""
  fake = f"--xla_force_host_platform_device_count={devices} " if devices else ""
  return fake + COLLECTIVE_TIMEOUTS


# Must happen before the first JAX operation anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# libtpu (the test extra installs it for the TPU compile checks) must not try to drive
# a TPU here: its compiler is reached through jax.experimental.topologies alone.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests build the same step functions many times (every trainer run re-jits them); a
# persistent compilation cache shared by the xdist workers turns repeats into lookups.
# Subprocesses (the main-job tests) inherit it through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ.get("ADM_JAX_TEST_CACHE", "/tmp/adm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_configure(config):
  try:
    import torch
    torch.set_num_threads(1)   # pytest -n 2 already fills both cores
    torch.manual_seed(0)
  except ImportError:
    pass
