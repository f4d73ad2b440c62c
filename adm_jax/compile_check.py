r"""``--mode=compile``: will this config fit the target, and how much work is a step?

Builds the whole run abstractly (teacher, students, discriminator heads, optimiser
states, batch: ``jax.ShapeDtypeStruct`` with the shardings of a real run; no weights
read), then lowers and compiles every step function of the configured method for
``config.compile.target`` and prints, per step and per device: argument, output,
temporary and generated-code bytes, the total against the chip's HBM, and FLOPs.

Targets. ``local`` (the default): the devices of this run, e.g. on every host of a TPU
slice started by ``launch/run_tpu.sh --mode compile``. A Cloud TPU slice by its accelerator type (``v5p-8``, ``v5p-64``,
``v5litepod-16`` / ``v5e-16``, ``v6e-8``, ``v4-32`` ...): with libtpu installed (``pip
install -e ".[tpu]"``) the TPU compiler runs on this host for the slice's topology
(``jax.experimental.topologies``), and an out-of-HBM program is reported at compile
time. ``cpu-N`` (or a TPU target without libtpu) compiles for N fake CPU devices:
argument and output sizes are exact, but XLA:CPU's temporaries overstate a TPU's.

  python -m adm_jax.main --config=configs/sdxl_onestep.py --workdir=DIR --mode=compile \
      --config.compile.target=v5p-8 --config.mesh="(('data', 1), ('fsdp', 4))"

FLOPs are per device, from XLA's cost analysis of the partitioned program (a loop body
counts once: DMD2's backward simulation under ``fori_loop`` is undercounted).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np

from adm_jax import config_lib, problems, sharding, train
from adm_jax.models import layers

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  topology: str            # prefix of jax topology names
  hbm_bytes: int
  peak_flops: float        # dense bf16 FLOP/s per chip
  cores_per_chip: int      # the accelerator type counts TensorCores (v4 / v5p) or chips
  dims: int                # torus dimensions


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 2, 3),
    "v5p": Chip("v5", 95 * GiB, 459e12, 2, 3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 1, 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  devices: list
  hbm_bytes: int | None      # per device; None: unknown (CPU)
  peak_flops: float | None
  note: str


# Chip count -> topology shape, as Cloud TPU names its slices (MaxText's table).
TORUS = {3: {1: "1x1x1", 2: "1x1x2", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4",
             64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16"},
         2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}}


def _torus(chips: int, dims: int) -> str:
  if chips not in TORUS[dims]:
    raise config_lib.ConfigError(f"no {dims}-D slice of {chips} chips; valid chip counts: "
                                 f"{', '.join(map(str, TORUS[dims]))}")
  return TORUS[dims][chips]


def _cpu_devices(n: int) -> list:
  if jax.device_count() < n:
    raise config_lib.ConfigError(
        f"compile target cpu-{n} needs {n} CPU devices, this process has "
        f"{jax.device_count()}: set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
        "before starting")
  return jax.devices()[:n]


def _local() -> Target:
  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  hbm = stats.get("bytes_limit")
  kind = devices[0].device_kind
  peak = next((c.peak_flops for c in CHIPS.values() if kind.lower().startswith(
      f"tpu {c.topology}")), None)
  return Target("local", devices, int(hbm) if hbm else None, peak,
                f"this run's own {len(devices)} {kind} devices")


def resolve_target(name: str, kind: str = "auto") -> Target:
  """``v5p-8`` -> the 4 devices of a v5p 2x2x1 slice (TPU compiler, or the CPU
  stand-in without libtpu); ``cpu-N`` -> N CPU devices; ``local`` -> the devices this
  run has (on a TPU slice: all of its chips, every host running the same check)."""
  if name == "local":
    return _local()
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  if not m:
    raise config_lib.ConfigError(f"config.compile.target={name!r}: expected e.g. v5p-8, "
                                 "v5p-64, v5e-16, v6e-8, cpu-8 or local")
  family, count = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
  if family == "cpu":
    return Target(name, _cpu_devices(count), None, None,
                  "XLA:CPU fake devices: temporaries overstate a TPU's")
  if family not in CHIPS:
    raise config_lib.ConfigError(f"unknown accelerator {m.group(1)!r} in {name!r}; valid: "
                                 f"{', '.join(sorted(CHIPS) + sorted(ALIASES))}, cpu")
  chip = CHIPS[family]
  chips = max(1, count // chip.cores_per_chip)
  topo = f"{chip.topology}:{_torus(chips, chip.dims)}"
  if kind != "cpu":
    try:
      devices = _tpu_devices(topo, chip)
      return Target(name, devices, chip.hbm_bytes, chip.peak_flops,
                    f"TPU compiler (libtpu), topology {topo}")
    except (ImportError, RuntimeError) as e:      # no libtpu on this host
      if kind == "tpu":
        raise config_lib.ConfigError(f"cannot compile for {name}: {e}. Install the TPU "
                                     'compiler: pip install -e ".[tpu]"') from e
      why = str(e)[:200]
  else:
    why = "target_kind=cpu"
  return Target(name, _cpu_devices(chips), chip.hbm_bytes, chip.peak_flops,
                f"no TPU compiler ({why}): {chips} XLA:CPU fake devices stand in for "
                f"{topo}; temporaries overstate a TPU's, fit is approximate")


def _tpu_devices(topo: str, chip: Chip) -> list:
  # Several processes (test workers, a second check) may load libtpu on one host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kw = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1)) if (
      chip.cores_per_chip == 2) else {}
  try:
    return list(topologies.get_topology_desc(topology_name=topo, platform="tpu",
                                             num_slices=1, **kw).devices)
  except Exception as e:                                    # noqa: BLE001
    raise RuntimeError(str(e).splitlines()[0]) from e


# ------------------------------------------------------------------------------ check


def _struct(x, sh):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)


def step_names(config, target: Target) -> list[str]:
  """``stage/step`` of every step function that :func:`compile_steps` compiles (an
  abstract build, nothing compiled): the values ``config.compile.steps`` takes."""
  mesh = sharding.make_mesh(config.mesh, devices=target.devices)
  problem = problems.make(config, mesh, abstract=True)
  names = []
  for method in dict.fromkeys(stage.method for stage in train.stages(config)):
    names += [f"{method}/{name}" for name, _, _ in
              train.build(config, mesh, problem, method).plan]
  return names


def compile_steps(config, target: Target, log=print) -> list[dict]:
  """Compiles every step of every stage for ``target``; one row per step function."""
  mesh = sharding.make_mesh(config.mesh, devices=target.devices)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = config.compile.batch_size or config.batch_size
  if batch_size % shards:
    raise config_lib.ConfigError(f"global batch {batch_size} does not split over the "
                                 f"mesh's {shards} batch shards (data x fsdp)")
  problem = problems.make(config, mesh, abstract=True)
  only = [s for s in config.compile.get("steps", "").split(",") if s]
  rows, seen, known = [], set(), []
  for stage in train.stages(config):
    if stage.method in seen:
      continue
    seen.add(stage.method)
    b = train.build(config, mesh, problem, stage.method)
    known += [f"{stage.method}/{name}" for name, _, _ in b.plan]
    if only and not any(f"{stage.method}/{name}" in only for name, _, _ in b.plan):
      continue
    jitted, batch_sh, frozen_sh = train.jit_plan(b, problem, mesh, keep_unused=True)
    state = sharding.abstract_with_shardings(b.abstract, b.shardings)
    batch = jax.tree.map(_struct, b.example, batch_sh)
    frozen = jax.tree.map(_struct, problem.frozen, frozen_sh)
    rng = _struct(jax.eval_shape(lambda: jax.random.key(0)), sharding.replicated(mesh))
    for name, fn, every in jitted:
      if only and f"{stage.method}/{name}" not in only:
        continue
      log(f"compiling {stage.method}/{name} for {target.name} ...")
      row = {"stage": stage.method, "step": name, "every": every,
             **{f"{k}_bytes": shard_bytes(v) for k, v in
                (("state", state), ("frozen", frozen), ("batch", batch))},
             "state_bytes_unsharded": shard_bytes(state, sharded=False)}
      try:
        # Convolutions lower as the target's chips want them (also on the CPU stand-ins
        # for a TPU slice), not as this host's CPU would.
        native = target.hbm_bytes is None and target.devices[0].platform == jax.default_backend()
        lowering = "auto" if native else "xla"
        with layers.conv_lowering(lowering):
          lowered = fn.lower(state, frozen, batch, rng)
        compiled = _compile(lowered, target)
      except Exception as e:                                  # noqa: BLE001
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "Ran out of memory" not in msg:
          raise
        row.update(error=msg.splitlines()[0][:300], fits=False)
        rows.append(row)
        continue
      row.update(_memory(compiled), flops=_flops(compiled))
      total = row["total_bytes"]
      row["fits"] = None if target.hbm_bytes is None else total <= target.hbm_bytes
      rows.append(row)
  unknown = sorted(set(only) - set(known))
  if unknown:
    raise config_lib.ConfigError(f"config.compile.steps: no step {', '.join(unknown)}; "
                                 f"this config has {', '.join(known)}")
  return rows


def _compile(lowered, target: Target):
  """``lowered.compile()``; a foreign target's executables stay out of the persistent
  compilation cache (this host has no client to load them back)."""
  if target.name == "local":
    return lowered.compile()
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return lowered.compile()
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


def shard_bytes(tree, sharded: bool = True) -> int:
  """Bytes of one device's shards of ``tree`` (``sharded=False``: of the whole tree)."""
  total = 0
  for a in jax.tree.leaves(tree):
    shape = (a.sharding.shard_shape(a.shape) if sharded and a.sharding is not None
             else a.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
  return total


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  # Donated state: outputs alias their arguments and take no extra room.
  out["total_bytes"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                        + out["generated_code"])
  return out


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def report(rows: list[dict], target: Target, step_time_s: float = 0.0) -> str:
  """The per-step table and the iteration's peak (the largest step: steps run one at a
  time, the state is donated between them)."""
  hbm = target.hbm_bytes
  sizes = [r["total_bytes"] for r in rows if "total_bytes" in r]
  unit, scale = ("GiB", GiB) if not sizes or max(sizes) >= GiB else ("MiB", 1024 ** 2)
  g = lambda b: f"{b / scale:.2f}"
  lines = [f"target {target.name}: {len(target.devices)} devices, "
           f"HBM {f'{hbm / GiB:.1f} GiB' if hbm else 'unknown'} per device ({target.note})",
           f"| step | every | arguments {unit} | outputs {unit} | temporaries {unit} | "
           f"code {unit} | total {unit} | of HBM | TFLOP per device |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    label = f"{r['stage']}/{r['step']}"
    if "error" in r:
      lines.append(f"| {label} | {r['every']} | – | – | – | – | out of HBM | > 100 % "
                   "| – |")
      continue
    share = f"{100 * r['total_bytes'] / hbm:.0f} %" if hbm else "–"
    lines.append(f"| {label} | {r['every']} | {g(r['argument'])} | {g(r['output'] - r['alias'])}"
                 f" | {g(r['temp'])} | {g(r['generated_code'])} | {g(r['total_bytes'])} | "
                 f"{share} | {r['flops'] / 1e12:.2f} |")
  s = summary(rows, target, step_time_s)
  peak = (f"{g(s['peak_bytes'])} {unit}" if s["peak_bytes"] is not None else "out of HBM")
  lines.append(f"peak per device {peak}; fits: "
               f"{'unknown (CPU)' if s['fits'] is None else ('yes' if s['fits'] else 'NO')}; "
               f"iteration (every step once) {s['iteration_flops'] / 1e12:.2f} TFLOP per device")
  if s.get("mfu") is not None:
    lines.append(f"at {step_time_s:g} s per iteration: MFU {100 * s['mfu']:.1f} %")
  return "\n".join(lines)


def summary(rows: list[dict], target: Target, step_time_s: float = 0.0) -> dict:
  """``peak_bytes`` (None if a step ran out of HBM), ``fits``, ``iteration_flops`` per
  device (every step function once) and the implied ``mfu`` at ``step_time_s``."""
  failed = any("error" in r for r in rows)
  peak = None if failed else max(r["total_bytes"] for r in rows)
  fits = False if failed else (None if target.hbm_bytes is None else peak <= target.hbm_bytes)
  flops = sum(r.get("flops", 0.0) for r in rows)
  mfu = (flops / (step_time_s * target.peak_flops) if step_time_s > 0 and target.peak_flops
         and not failed else None)
  return {"peak_bytes": peak, "fits": fits, "iteration_flops": flops, "mfu": mfu}


def _cpu_count_needed(name: str) -> int:
  """CPU devices the target may need (``cpu-N``; a TPU slice's chips without libtpu)."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  if not m:
    return 1
  family, count = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
  return count if family not in CHIPS else max(1, count // CHIPS[family].cores_per_chip)


def run(config, log=print) -> tuple[list[dict], dict]:
  """``--mode=compile``: compile for ``config.compile.target`` and print the table."""
  try:          # before the CPU backend starts (a no-op if it already has)
    jax.config.update("jax_num_cpu_devices", max(_cpu_count_needed(config.compile.target),
                                                 jax.config.jax_num_cpu_devices))
  except RuntimeError:
    pass
  target = resolve_target(config.compile.target, config.compile.get("target_kind", "auto"))
  rows = compile_steps(config, target, log=log)
  log(report(rows, target, config.compile.get("step_time_s", 0.0)))
  return rows, summary(rows, target, config.compile.get("step_time_s", 0.0))
