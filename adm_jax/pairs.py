r"""ODE pairs: the teacher's (noise, sample) pairs as a resumable job and a Grain reader.

``python -m adm_jax.main --config=... --workdir=DIR --mode=pairs`` solves the teacher's
PF-ODE from fresh noise with classifier-free guidance (``config.pairs``: sampler, step
count, spacing; the guidance scale is the teacher's) and writes every pair once:

  DIR/pairs/                        (or ``config.pairs.dir``)
    spec.json                       what the pairs are (teacher, sampler, seed, shapes ...)
    prompts.json                    prompt id -> text
    index.json                      the finished shards and their record counts
    conditioning/{key}.npy          optional cache of the encoded prompts [P, ...]
    shards/pairs-c{chunk}-p{process}.array_record

Pair ``i`` (a global index) has noise ``N(0, I)`` from ``fold_in(key(seed), i)`` and
prompt ``i mod P``: whatever the mesh, the process count or the number of restarts, pair
``i`` is the same. Chunk ``c`` holds pairs ``[c·S, (c+1)·S)`` (``S = shard_size``);
each process writes the rows of each global batch that live on its devices to its own
shard of the chunk, to ``*.tmp`` first and then renamed, so a killed job never leaves a
shard under its final name that a reader would take. A re-run skips finished chunks.

Records are msgpack maps ``{index, prompt_id, noise, latent}`` (arrays channels-last
``[h, w, c]``). :class:`PairReader` reads them with Grain: per-process slices, a
reshuffle each epoch, and random access by step, so the data position of a resumed run
is its step.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from adm_jax import config_lib, conditioning, multihost, sampling, sharding
from adm_jax import teacher as teacher_lib

FORMAT_VERSION = 1
SPEC, PROMPTS, INDEX = "spec.json", "prompts.json", "index.json"
DTYPES = {"float32": np.float32, "float16": np.float16}
# Keys of spec.json that may change between runs on one directory: more pairs extend it.
_GROWABLE = ("num_pairs",)


# ------------------------------------------------------------------------ prompts


def read_prompts(path: str | Path) -> list[str]:
  """Prompts from a text file (one per line, blank lines skipped) or JSONL
  (``{"prompt": ...}`` per line)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompts file {path} does not exist")
  lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
  if path.suffix == ".jsonl":
    out = []
    for n, ln in enumerate(lines, 1):
      rec = json.loads(ln)
      if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        raise ValueError(f"{path}:{n}: expected {{\"prompt\": \"...\"}}, got {ln[:80]!r}")
      out.append(rec["prompt"])
    lines = out
  if not lines:
    raise ValueError(f"prompts file {path} has no prompts")
  return lines


def config_prompts(config) -> list[str]:
  """``config.pairs.prompts_file`` if set, else ``config.data.prompts``."""
  if config.pairs.get("prompts_file"):
    return read_prompts(config.pairs.prompts_file)
  prompts = list(config.data.prompts)
  if not prompts:
    raise config_lib.ConfigError("no prompts: set config.pairs.prompts_file or "
                                 "config.data.prompts")
  return prompts


class Conditioner:
  """Prompt ids ``[b]`` -> the teacher's conditioning ``{key: [b, ...]}`` (host arrays).

  Reads ``conditioning/{key}.npy`` (memory-mapped) when the cache exists, else encodes
  the prompts with the teacher's text encoders on the fly.
  """

  def __init__(self, prompts: Sequence[str], encode: Callable | None = None,
               cache_dir: str | Path | None = None):
    self.prompts = list(prompts)
    self.encode = encode
    self.cache = None
    if cache_dir is not None and Path(cache_dir).is_dir():
      self.cache = {p.stem: np.load(p, mmap_mode="r")
                    for p in sorted(Path(cache_dir).glob("*.npy"))}
      for k, v in self.cache.items():
        if v.shape[0] != len(self.prompts):
          raise ValueError(f"conditioning cache {cache_dir}/{k}.npy has {v.shape[0]} rows "
                           f"for {len(self.prompts)} prompts; delete it to re-encode")
    if self.cache is None and encode is None:
      raise ValueError("Conditioner needs a text encoder or a conditioning cache")

  def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids)
    if self.cache is not None:
      return {k: np.asarray(v[ids]) for k, v in self.cache.items()}
    return jax.device_get(self.encode([self.prompts[i] for i in ids]))


def write_conditioning_cache(encode: Callable, prompts: Sequence[str], out_dir: Path,
                             batch: int = 64) -> Path:
  """Encodes every prompt once into ``out_dir/{key}.npy`` (written under a temporary
  name, then renamed)."""
  tmp = out_dir.with_name(out_dir.name + ".tmp")
  tmp.mkdir(parents=True, exist_ok=True)
  arrays = None
  for s in range(0, len(prompts), batch):
    cond = jax.device_get(encode(list(prompts[s:s + batch])))
    if arrays is None:
      arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", np.float32,
                                             (len(prompts), *v.shape[1:]))
                for k, v in cond.items()}
    for k, v in cond.items():
      arrays[k][s:s + len(v)] = v
  for a in arrays.values():
    a.flush()
  os.replace(tmp, out_dir)
  return out_dir


# ------------------------------------------------------------------------ records


def encode_record(index: int, prompt_id: int, noise: np.ndarray, latent: np.ndarray) -> bytes:
  return serialization.msgpack_serialize({
      "index": np.int64(index), "prompt_id": np.int32(prompt_id),
      "noise": np.asarray(noise), "latent": np.asarray(latent)})


def decode_record(data: bytes) -> dict[str, np.ndarray]:
  rec = serialization.msgpack_restore(data)
  return {"index": np.int64(rec["index"]), "prompt_id": np.int32(rec["prompt_id"]),
          "noise": np.asarray(rec["noise"], np.float32),
          "latent": np.asarray(rec["latent"], np.float32)}


def shard_name(chunk: int, process: int) -> str:
  return f"pairs-c{chunk:06d}-p{process:03d}.array_record"


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


def read_index(directory: str | Path) -> dict:
  """``index.json`` of a pair directory: ``{"shards": {name: records}, ...}``."""
  path = Path(directory) / INDEX
  if not path.is_file():
    raise FileNotFoundError(f"no ODE pairs at {directory} ({INDEX} missing): run "
                            f"`python -m adm_jax.main --mode=pairs` with this config first")
  return json.loads(path.read_text())


def pairs_dir(config, workdir: str | Path) -> Path:
  return Path(config.pairs.dir) if config.pairs.get("dir") else Path(workdir) / "pairs"


# ---------------------------------------------------------------------------- job


def make_spec(config, latent_shape, num_prompts: int) -> dict:
  """What the pairs are; a directory made with another spec is refused, not mixed."""
  pc, tc = config.pairs, config.teacher
  return {"format": FORMAT_VERSION, "family": config.family,
          "teacher": str(Path(tc.weights_dir).resolve()), "dtype": tc.dtype,
          "guidance_scale": float(tc.guidance_scale), "sampler": pc.sampler,
          "num_steps": int(pc.num_steps), "spacing": pc.spacing, "seed": int(pc.seed),
          "num_pairs": int(pc.num_pairs), "shard_size": int(pc.shard_size),
          "num_prompts": int(num_prompts), "latent_shape": list(latent_shape),
          "record_dtype": pc.record_dtype}


def _check_spec(directory: Path, spec: dict) -> None:
  path = directory / SPEC
  if not path.is_file():
    return
  old = json.loads(path.read_text())
  diff = {k: (old.get(k), v) for k, v in spec.items()
          if old.get(k) != v and k not in _GROWABLE}
  if diff:
    raise config_lib.ConfigError(
        f"{directory} holds pairs made with another spec ({path}); differences "
        + ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
        + ". Use another config.pairs.dir or delete it.")


def _finished(directory: Path, chunks: int, nproc: int) -> set[int]:
  """Chunks whose every process shard exists under its final name."""
  names = {p.name for p in (directory / "shards").glob("*.array_record")}
  return {c for c in range(chunks)
          if all(shard_name(c, p) in names for p in range(nproc))}


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order."""
  shards = sorted({s.index[0].start or 0: s for s in x.addressable_shards}.items())
  return np.concatenate([np.asarray(s.data) for _, s in shards])


def generate(config, workdir: str | Path, *, log=print) -> Path:
  """``--mode=pairs``: writes the missing chunks of ``config.pairs`` (idempotent)."""
  from tqdm import tqdm
  from array_record.python import array_record_module as ar
  pc = config.pairs
  directory = pairs_dir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  nproc, proc = jax.process_count(), jax.process_index()
  gb = pc.batch_size
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if gb % n_batch or gb % nproc or pc.shard_size % gb or pc.num_pairs % pc.shard_size:
    raise config_lib.ConfigError(
        f"pairs: batch_size {gb} must split over data x fsdp ({n_batch}) and the "
        f"{nproc} processes; shard_size {pc.shard_size} must be a multiple of it and "
        f"num_pairs {pc.num_pairs} a multiple of shard_size")
  teacher = teacher_lib.load_teacher(config.teacher, shard=lambda abstract: (
      sharding.infer_abstract_params(abstract, config_lib.rules_for(config, "teacher"),
                                     mesh)))
  param = ode_parameterization(config)
  prompts = config_prompts(config)
  spec = make_spec(config, teacher.latent_shape, len(prompts))
  _check_spec(directory, spec)
  (directory / "shards").mkdir(parents=True, exist_ok=True)
  if proc == 0:
    _write_json(directory / SPEC, spec)
    _write_json(directory / PROMPTS, prompts)
    if pc.cache_conditioning and not (directory / "conditioning").is_dir():
      write_conditioning_cache(teacher.encode_prompts, prompts, directory / "conditioning")
  multihost.barrier("pairs-setup")
  for tmp in (directory / "shards").glob(f"*-p{proc:03d}.array_record.tmp"):
    tmp.unlink()                                    # a killed writer's partial shard
  cond_of = Conditioner(prompts, teacher.encode_prompts, directory / "conditioning")

  sample = make_pair_sampler(teacher.apply, param, config, teacher.latent_shape, mesh)
  chunks = pc.num_pairs // pc.shard_size
  # Chunks every process sees as finished (a shared file system may lag).
  finished = _finished(directory, chunks, nproc)
  agreed = multihost.all_agree([c in finished for c in range(chunks)])
  done = {int(c) for c in np.flatnonzero(agreed)}
  todo = [c for c in range(chunks) if c not in done]
  log(f"pairs: {len(done)}/{chunks} chunks already in {directory}; {len(todo)} to write "
      f"({pc.num_steps} {pc.sampler} steps, CFG {config.teacher.guidance_scale}, "
      f"batch {gb}, {nproc} process(es))")
  lb = gb // nproc
  bar = tqdm(total=len(todo) * pc.shard_size, unit="pair", disable=proc != 0,
             dynamic_ncols=True)
  t0, made, t_first, first = time.perf_counter(), 0, None, 0
  dtype = DTYPES[pc.record_dtype]
  for c in todo:
    final = directory / "shards" / shard_name(c, proc)
    tmp = final.with_name(final.name + ".tmp")
    writer = ar.ArrayRecordWriter(str(tmp), "group_size:1")
    for start in range(c * pc.shard_size, (c + 1) * pc.shard_size, gb):
      idx = np.arange(start + proc * lb, start + (proc + 1) * lb)          # [b] local
      cond = cond_of(idx % len(prompts))
      g_idx, g_cond = sharding.make_global_batch((idx, cond), mesh)
      noise, latent = sample(teacher.denoiser.params, g_idx, g_cond)
      for i, n, l in zip(idx, _local_rows(noise), _local_rows(latent)):
        writer.write(encode_record(i, i % len(prompts), n.astype(dtype), l.astype(dtype)))
      made += gb
      bar.update(gb)
      if t_first is None:                         # the first batch includes compilation
        t_first, first = time.perf_counter(), made
      elif made > first:
        bar.set_postfix(pairs_s=f"{(made - first) / (time.perf_counter() - t_first):.2f}")
    writer.close()
    os.replace(tmp, final)
    multihost.barrier(f"pairs-chunk-{c}")
    if proc == 0:
      _update_index(directory, chunks, nproc)
  bar.close()
  if proc == 0:
    _update_index(directory, chunks, nproc)
  wall = time.perf_counter() - t0
  if made:
    rate = (f"{(made - first) / (time.perf_counter() - t_first):.2f} pairs/s after the "
            f"first batch" if made > first else "one batch")
    log(f"pairs: wrote {made} pairs in {wall:.1f} s ({rate}; first batch with "
        f"compilation {t_first - t0:.1f} s) to {directory}")
  return directory


def ode_parameterization(config):
  """The teacher's parameterisation as its pair sampler uses it (as ``--mode=sample``:
  Euler lands on alpha = 1 at the last step, DDIM keeps the schedule's final alpha)."""
  return teacher_lib.make_parameterization(
      config.teacher, set_alpha_to_one=config.pairs.sampler == "euler")


def teacher_eval_samples(config, teacher, sampler: str, num_steps: int,
                         key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """The teacher's own samples of ``config.eval``'s prompts (``num_per_prompt`` each, in
  batches of ``eval.batch_size``; ``sampler`` with ``num_steps`` trailing steps at the
  teacher's CFG), decoded by its VAE: images ``[N, H, W, 3]`` in [-1, 1] and labels [N]."""
  ec = config.eval
  rows = np.repeat(np.arange(len(ec.prompts)), ec.num_per_prompt)
  cond = jax.device_get(teacher.encode_prompts(list(ec.prompts)))
  cfg = config.copy_and_resolve_references()
  cfg.pairs.sampler = sampler
  sample = jax.jit(sampling.make_ode_sampler(
      teacher.apply, ode_parameterization(cfg), num_steps, spacing="trailing",
      sampler=sampler, cfg_scale=config.teacher.guidance_scale))
  vae = teacher.parts["vae"]
  decode = jax.jit(lambda z: vae.module().decode(z))
  images = []
  for s in range(0, len(rows), ec.batch_size):
    c = {k: v[rows[s:s + ec.batch_size]] for k, v in cond.items()}
    noise = jax.random.normal(jax.random.fold_in(key, s),
                              (len(rows[s:s + ec.batch_size]), *teacher.latent_shape))
    images.append(np.asarray(decode(sample(teacher.denoiser.params, noise, c,
                                           conditioning.uncond_like(c)))))
  return np.concatenate(images), np.asarray(ec.labels)[rows]


def make_pair_sampler(apply, param, config, latent_shape, mesh) -> Callable:
  """Jitted ``(teacher_params, index [B], cond) -> (noise, latent)``: the noise of pair
  ``i`` drawn from ``fold_in(key(seed), i)`` on device, then the teacher's PF-ODE."""
  pc = config.pairs
  ode = sampling.make_ode_sampler(apply, param, pc.num_steps, spacing=pc.spacing,
                                  cfg_scale=config.teacher.guidance_scale,
                                  sampler=pc.sampler)
  key = jax.random.key(pc.seed)

  def run(params, index, cond):
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                                 latent_shape))(index)   # [B, h, w, c]
    return noise, ode(params, noise, cond, conditioning.uncond_like(cond))
  out = sharding.batch_sharding(mesh, 1 + len(latent_shape))
  return jax.jit(run, out_shardings=(out, out))


def _update_index(directory: Path, chunks: int, nproc: int) -> None:
  done = sorted(_finished(directory, chunks, nproc))
  shards = {}
  from array_record.python import array_record_module as ar
  old = {}
  if (directory / INDEX).is_file():
    old = json.loads((directory / INDEX).read_text()).get("shards", {})
  for c in done:
    for p in range(nproc):
      name = shard_name(c, p)
      if name not in old:
        reader = ar.ArrayRecordReader(str(directory / "shards" / name))
        old[name] = reader.num_records()
        reader.close()
      shards[name] = old[name]
  _write_json(directory / INDEX, {"format": FORMAT_VERSION, "chunks": chunks,
                                  "complete": len(done) == chunks,
                                  "num_records": sum(shards.values()), "shards": shards})


# ------------------------------------------------------------------------- reader


class PairReader:
  """Batches of ODE pairs for one process: ``reader[step]`` -> ``{"index",
  "prompt_id", "noise", "latent"}`` with ``[local_batch, ...]`` arrays.

  Process ``p`` of ``n`` reads records ``p, p + n, ...`` of the index's shards, reshuffled
  every epoch from ``seed``; ``reader[step]`` depends only on ``step``, so a resumed run
  continues on exactly the batches it would have seen.
  """

  def __init__(self, directory: str | Path, local_batch: int, *, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None):
    import grain
    self.directory = Path(directory)
    index = read_index(self.directory)
    if not index.get("complete"):
      raise ValueError(f"ODE pairs at {directory} are incomplete ({len(index['shards'])} "
                       "shards of the job's chunks): finish the pairs job first")
    self.spec = json.loads((self.directory / SPEC).read_text())
    self.prompts = json.loads((self.directory / PROMPTS).read_text())
    paths = [str(self.directory / "shards" / n) for n in sorted(index["shards"])]
    for p in paths:
      if not Path(p).is_file():
        raise FileNotFoundError(f"{p} is listed in {INDEX} but missing")
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))[p::n]
    self.num_local = len(ds)
    if self.num_local < local_batch:
      raise ValueError(f"{self.num_local} pairs for this process < batch {local_batch}")
    self._ds = ds.map(decode_record).shuffle(seed=seed).repeat(None).batch(
        local_batch, drop_remainder=True)

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    return self._ds[int(step)]
