"""The ODE-pair job (``--mode=pairs``) and its Grain reader on a tiny SDXL teacher:
records equal the teacher's sampler on their own noise, a re-run writes nothing, a
killed writer's partial shard is never read and its chunk comes back byte-identical,
per-process reading is a disjoint cover, and the data position resumes by step."""
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_sdxl  # noqa: E402
from adm_jax import conditioning, config_lib, pairs, sampling  # noqa: E402
from adm_jax import teacher as teacher_lib  # noqa: E402
from adm_jax.convert.__main__ import convert_pipeline  # noqa: E402

PROMPTS = ["a photo of a cat", "a red dog sitting on the mat", "a cat on the mat"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  tiny_sdxl.build_pipeline(root / "src")
  convert_pipeline("sdxl", root / "src", root / "sdxl", log=lambda *_: None)
  (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                              for p in PROMPTS))
  c = config_lib.load_config_file("configs/sdxl_onestep.py:tiny,method=adp")
  c.teacher.weights_dir = str(root / "sdxl")
  c.mesh = config_lib.mesh(data=4, fsdp=2, tensor=1)
  c.pairs.update(prompts_file=str(root / "prompts.jsonl"), num_pairs=24, shard_size=8,
                 batch_size=8, num_steps=2)
  c = config_lib.validate(c)
  logs = []
  out = pairs.generate(c, root / "work", log=logs.append)
  return c, root, out, logs


def _records(directory):
  from array_record.python import array_record_module as ar
  out = {}
  for path in sorted((directory / "shards").glob("*.array_record")):
    reader = ar.ArrayRecordReader(str(path))
    out[path.name] = [pairs.decode_record(r) for r in reader.read_all()]
    reader.close()
  return out


def test_records_are_the_teachers_ode_solutions(job):
  c, root, out, logs = job
  index = pairs.read_index(out)
  assert index["complete"] and index["num_records"] == 24 and len(index["shards"]) == 3
  recs = [r for rs in _records(out).values() for r in rs]
  assert sorted(int(r["index"]) for r in recs) == list(range(24))
  assert all(int(r["prompt_id"]) == int(r["index"]) % 3 for r in recs)
  assert json.loads((out / "prompts.json").read_text()) == PROMPTS
  # Recompute four pairs on one device with the plain sampler and the record's noise.
  teacher = teacher_lib.load_teacher(c.teacher)
  sample = sampling.make_ode_sampler(teacher.apply, pairs.ode_parameterization(c), 2,
                                     spacing=c.pairs.spacing, sampler=c.pairs.sampler,
                                     cfg_scale=c.teacher.guidance_scale)
  some = recs[:4]
  noise = np.stack([r["noise"] for r in some])
  cond = teacher.encode_prompts([PROMPTS[int(r["prompt_id"])] for r in some])
  want = sample(teacher.denoiser.params, noise, cond, conditioning.uncond_like(cond))
  # (latents reach |x| ~ 30 here; the sharded and the one-device solve differ in the
  # last float32 bits)
  np.testing.assert_allclose(np.stack([r["latent"] for r in some]), want,
                             rtol=1e-4, atol=5e-4)
  # Noise of pair i is a function of i alone, and a standard normal.
  key = jax.random.key(c.pairs.seed)
  np.testing.assert_array_equal(
      some[0]["noise"], jax.random.normal(jax.random.fold_in(key, int(some[0]["index"])),
                                          teacher.latent_shape))
  assert any("pairs/s" in line for line in logs)
  # The conditioning cache holds the encoded prompts.
  cached = pairs.Conditioner(PROMPTS, None, out / "conditioning")(np.array([2, 0]))
  direct = teacher.encode_prompts([PROMPTS[2], PROMPTS[0]])
  for k in direct:
    np.testing.assert_allclose(cached[k], direct[k], rtol=1e-5, atol=1e-6)


def test_rerun_is_idempotent_and_a_killed_chunk_comes_back_identical(job):
  c, root, out, _ = job
  before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.array_record")}
  mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.array_record")}
  logs = []
  pairs.generate(c, root / "work", log=logs.append)
  assert "3/3 chunks already" in logs[0] and not any("wrote" in line for line in logs)
  assert {p.name: p.stat().st_mtime_ns
          for p in (out / "shards").glob("*.array_record")} == mtimes
  # A writer killed mid-chunk: its final shard is absent, a partial .tmp is left.
  victim = out / "shards" / pairs.shard_name(1, 0)
  victim.unlink()
  (victim.parent / (victim.name + ".tmp")).write_bytes(b"partial garbage")
  with pytest.raises(ValueError, match="incomplete"):
    pairs._update_index(out, 3, 1)
    pairs.PairReader(out, 4)
  logs = []
  pairs.generate(c, root / "work", log=logs.append)
  assert "2/3 chunks already" in logs[0]
  assert not list((out / "shards").glob("*.tmp"))
  after = {p.name: p.read_bytes() for p in (out / "shards").glob("*.array_record")}
  assert after == before
  assert pairs.read_index(out)["complete"]


def test_another_spec_is_refused(job):
  c, root, _, _ = job
  other = config_lib.override(c.copy_and_resolve_references(), {"pairs.num_steps": 3})
  with pytest.raises(config_lib.ConfigError, match="num_steps"):
    pairs.generate(other, root / "work")


def test_reader_splits_processes_and_resumes_by_step(job):
  _, _, out, _ = job
  whole = pairs.PairReader(out, 4, seed=3, process_index=0, process_count=1)
  a = pairs.PairReader(out, 2, seed=3, process_index=0, process_count=2)
  b = pairs.PairReader(out, 2, seed=3, process_index=1, process_count=2)
  assert whole.num_local == 24 and a.num_local == b.num_local == 12
  # One epoch of each process: disjoint, together every pair once.
  ia = np.concatenate([a[s]["index"] for s in range(6)])
  ib = np.concatenate([b[s]["index"] for s in range(6)])
  assert not set(ia) & set(ib) and sorted(set(ia) | set(ib)) == list(range(24))
  assert sorted(ia) == sorted(set(ia))
  # The next epoch is reshuffled but complete again.
  ia2 = np.concatenate([a[s]["index"] for s in range(6, 12)])
  assert sorted(ia2) == sorted(ia) and list(ia2) != list(ia)
  # A new reader (a resumed run) at step s gives the same batch.
  again = pairs.PairReader(out, 2, seed=3, process_index=0, process_count=2)
  for s in (0, 5, 17):
    for k in ("index", "noise", "latent"):
      np.testing.assert_array_equal(again[s][k], a[s][k])
  batch = a[0]
  assert batch["noise"].shape == (2, 16, 16, 4) and batch["latent"].dtype == np.float32


def test_prompt_files_and_missing_pairs(tmp_path):
  (tmp_path / "p.txt").write_text("one\n\n two \n")
  assert pairs.read_prompts(tmp_path / "p.txt") == ["one", "two"]
  (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    pairs.read_prompts(tmp_path / "bad.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    pairs.read_prompts(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="--mode=pairs"):
    pairs.PairReader(tmp_path / "none", 2)
  rec = pairs.decode_record(pairs.encode_record(5, 1, np.ones((2, 2, 4), np.float16),
                                                np.zeros((2, 2, 4), np.float32)))
  assert int(rec["index"]) == 5 and rec["noise"].dtype == np.float32
