"""The one trainer: mesh -> problem (teacher, students, data) -> state -> jitted steps ->
loop with the TTUR ratio -> metrics -> checkpoints -> sample grids.

Every family and method goes through :func:`train_and_evaluate`. A family contributes a
:class:`~adm_jax.problems.Problem`; a method is a list of step builders with update
ratios (:func:`method_plan`). A run is a sequence of stages (:func:`stages`): one for
DMD2 / ADM / ADP / regression, two for DMDX (ADP, then ADM from the ADP generator). The
hand-over to a new stage is saved as a checkpoint at the boundary step, tagged with the
stage, so a resumed run rebuilds the right state.

Resume precedence (:func:`adm_jax.checkpoint.resolve_resume`): 1. the latest complete
checkpoint in ``workdir/checkpoints``; 2. ``config.resume``; 3. initialisation from the
teacher.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adm_jax import checkpoint, config_lib, metrics as metrics_lib, multihost, optim, problems
from adm_jax import sharding
from adm_jax import pairs as pairs_lib
from adm_jax import state as state_lib
from adm_jax import steps

Array = jax.Array
PROBLEMS = problems.PROBLEMS


@dataclasses.dataclass(frozen=True)
class Stage:
  method: str          # dmd2 | adm | adp | regression
  start: int           # first global step of the stage
  end: int             # one past its last step


def stages(config) -> list[Stage]:
  """The run's stages. DMDX: ADP for ``config.dmdx.adp_steps`` steps, then ADM."""
  total = config.total_steps
  if config.method != "dmdx":
    return [Stage(config.method, 0, total)]
  split = config.dmdx.adp_steps
  if not 0 < split < total:
    raise config_lib.ConfigError(f"config.dmdx.adp_steps={split} must lie in (0, "
                                 f"total_steps={total})")
  return [Stage("adp", 0, split), Stage("adm", split, total)]


def stage_at(all_stages: list[Stage], step: int) -> int:
  """Index of the stage that runs ``step`` (the last stage once the run is done)."""
  return next((i for i, s in enumerate(all_stages) if step < s.end), len(all_stages) - 1)


# ------------------------------------------------------------------------------ plan


def method_plan(method: str, config, nets: steps.Nets) -> list[tuple[str, Callable, int]]:
  """``[(name, step_fn, every)]``: step ``s`` runs each entry with ``s % every == 0``.

  DMD2: the guidance model (fake score + GAN head) updates every iteration, the
  generator every ``ttur`` iterations (DMD2 App. C). ADM: fake score, discriminator and
  generator alternate (ADM Algorithm 1; TTUR 1 by default). ADP: discriminators, then
  generator. In DMDX, ``config.dmdx.adp_ttur`` / ``adm_ttur`` set a stage's own ratio.
  """
  ttur = config.ttur
  if config.method == "dmdx":            # a DMDX stage's own ratio (0: config.ttur)
    ttur = int(config.dmdx.get(f"{method}_ttur", 0)) or ttur
  if method == "dmd2":
    gan = config.dmd2.gan
    return [("fake_score", steps.make_fake_score_step(nets, gan=gan), 1),
            ("generator", steps.make_dmd2_generator_step(nets, gan=gan), ttur)]
  if method == "adm":
    return [("fake_score", steps.make_fake_score_step(nets, gan=False), 1),
            ("discriminator", steps.make_adm_discriminator_step(nets), 1),
            ("generator", steps.make_adm_generator_step(nets), ttur)]
  if method == "adp":
    return [("discriminator", steps.make_adp_discriminator_step(nets), 1),
            ("generator", steps.make_adp_generator_step(nets), ttur)]
  if method == "regression":
    return [("generator", steps.make_regression_step(nets), 1)]
  raise config_lib.ConfigError(f"method {method!r} cannot be trained; valid: dmd2, adm, "
                               f"adp, dmdx, regression")


def _networks(method: str, config) -> tuple[str, ...]:
  """The networks ``method`` trains."""
  if method == "regression":
    return ("generator",)
  if method == "adp":
    return ("generator", "discriminator")
  if method == "dmd2" and not config.dmd2.gan:
    return ("generator", "fake_score")
  return state_lib.NETWORKS


def _needs(method: str, config) -> frozenset:
  if method in ("adp", "regression"):
    return frozenset({"pairs"})
  if method == "dmd2" and config.dmd2.gan:
    return frozenset({"real"})
  return frozenset()


# ------------------------------------------------------------------------------ setup


def _abstract_cond(example_cond):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype),
                      example_cond)


def _feature_specs(apply, params, latent_shape, names, example_cond, what) -> dict:
  """``{name: (channels, resolution)}`` of a backbone's features, by shape inference."""
  x = jax.ShapeDtypeStruct((1, *latent_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  _, feats = jax.eval_shape(lambda p, x, t, c: apply(p, x, t, c, return_features=True),
                            params, x, t, _abstract_cond(example_cond))
  return _pick(feats, names, what)


def _pick(feats, names, what) -> dict:
  missing = [n for n in names if n not in feats]
  if missing:
    raise config_lib.ConfigError(f"{what}: {missing} not produced; valid: "
                                 f"{', '.join(sorted(feats))}")
  return {n: (feats[n].shape[-1], tuple(feats[n].shape[1:3])) for n in names}


def _heads(specs, dcfg, seed):
  """Discriminator heads on ``specs``: ``(apply(params, feats) -> [B], params)``."""
  from adm_jax.models import disc_heads
  disc = disc_heads.MultiHeadDiscriminator(specs, head=dcfg.head, rngs=nnx.Rngs(seed),
                                           **dcfg.head_kw)
  graphdef, params = nnx.split(disc)
  return (lambda p, feats: nnx.merge(graphdef, p)(feats)), params


def _discriminator(method, config, problem: problems.Problem, hp, example):
  """``(disc, pixel_disc, params)`` for the method (``None``s where it has none)."""
  cond = example["cond"]
  if method == "dmd2":      # DMD2: a head on the fake score's (student's) features
    specs = _feature_specs(problem.student, problem.student_params, problem.latent_shape,
                           config.disc.features, cond, "config.disc.features")
    disc, params = _heads(specs, config.disc, config.seed + 1)
    return disc, None, params
  specs = _feature_specs(problem.teacher, problem.frozen["teacher"], problem.latent_shape,
                         config.disc.features, cond, "config.disc.features")
  disc, latent = _heads(specs, config.disc, config.seed + 1)
  if method == "adm":
    return disc, None, latent
  params, pixel_disc = {}, None
  if "latent" in hp["adp_weights"]:
    params["latent"] = latent
  if "pixel" in hp["adp_weights"]:
    if problem.pixel is None:
      raise config_lib.ConfigError(
          f"hparams.adp_weights has 'pixel' but family {config.family!r} has no pixel "
          "encoder configured (config.disc.pixel)")
    x = jax.ShapeDtypeStruct((1, *problem.latent_shape), jnp.float32)
    feats = jax.eval_shape(lambda f, x: problem.pixel(f["pixel"], problem.decode(
        f["decoder"], x)), problem.frozen, x)
    pixel_disc, params["pixel"] = _heads(
        _pick(feats, list(feats), "pixel encoder"), config.disc.pixel, config.seed + 2)
  return disc, pixel_disc, params


def _optim_config(config, method: str, net: str):
  """``config.optim[net]``, updated by ``config.dmdx.<stage>_optim[net]`` in a DMDX stage
  (ADP and ADM may want different learning rates)."""
  out = config_lib.ConfigDict(config.optim[net].to_dict())
  if config.method == "dmdx":
    out.update(config.dmdx.get(f"{method}_optim", {}).get(net, {}))
  return out


@dataclasses.dataclass
class Built:
  nets: steps.Nets
  init: Callable
  init_args: tuple
  abstract: state_lib.DistillState
  shardings: state_lib.DistillState
  plan: list
  needs: frozenset
  example: dict           # problem.batch(0, needs): shapes for the jitted plan


def build(config, mesh, problem: problems.Problem, method: str) -> Built:
  """Nets, the state initialiser and its arguments, the abstract state, its shardings
  and the step plan of one stage."""
  hp = steps.default_hparams(**config.hparams)
  needs = _needs(method, config)
  example = problem.batch(0, needs)
  used = _networks(method, config)
  disc = pixel_disc = disc_params = None
  if "discriminator" in used:
    disc, pixel_disc, disc_params = _discriminator(method, config, problem, hp, example)
  txs = {n: optim.make_optimizer(_optim_config(config, method, n)) for n in used}
  nets = steps.Nets(param=problem.param, teacher=problem.teacher, student=problem.student,
                    disc=disc, txs=txs, latent_shape=problem.latent_shape,
                    gen_times=tuple(float(t) for t in config.student.times),
                    cfg_scale=float(config.get("real_guidance_scale", 0.0)
                                    or config.teacher.guidance_scale), hp=hp,
                    decode=problem.decode, pixel=problem.pixel, pixel_disc=pixel_disc,
                    fake=problem.fake,
                    pixel_microbatches=int(config.get("pixel_microbatches", 1)))
  # Parameters are arguments of the (jitted) initialiser, not closed-over constants: a
  # closure would embed every weight in the compiled program.
  init = functools.partial(state_lib.init_state, txs=txs, ema=config.ema_decay > 0,
                           seed=config.seed)
  init_args = (problem.student_params,
               problem.student_params if "fake_score" in used else None, disc_params)
  abstract = jax.eval_shape(init, *init_args)
  rules = {n: config_lib.rules_for(config, n) for n in state_lib.NETWORKS}
  shardings = state_lib.state_shardings(abstract, rules, mesh)
  return Built(nets, init, init_args, abstract, shardings, method_plan(method, config, nets),
               needs, example)


def jit_plan(b: Built, problem, mesh, *, keep_unused: bool = False):
  """A stage's step functions jitted as the trainer runs them: ``([(name, jitted,
  every)], batch shardings, frozen shardings)``. The state keeps ``b.shardings`` and is
  donated; the batch is split over data x fsdp; each frozen network stays where the
  problem placed it (concrete arrays or, for the compile check, abstract ones), or is
  replicated if it lives on other devices. ``keep_unused``: every frozen network is an
  argument of every step, used or not (the compile check counts them all resident)."""
  batch_sh = jax.tree.map(lambda a: sharding.batch_sharding(mesh, a.ndim), b.example)

  def placed(a):
    sh = getattr(a, "sharding", None)
    return sh if sh is not None and len(sh.device_set) == mesh.size else sharding.replicated(mesh)
  frozen_sh = jax.tree.map(placed, problem.frozen)
  jitted = [(name, jax.jit(fn, in_shardings=(b.shardings, frozen_sh, batch_sh, None),
                           out_shardings=(b.shardings, None), donate_argnums=0,
                           keep_unused=keep_unused), every)
            for name, fn, every in b.plan]
  return jitted, batch_sh, frozen_sh


def _hand_over(config, b: Built, previous: state_lib.DistillState):
  """The next stage's first state: its own fresh networks and optimisers, with the
  generator (and its EMA) taken from the previous stage (DMDX: ADM from ADP), and with
  ``config.dmdx.adm_disc_init="adp_latent"`` ADM's discriminator heads from ADP's
  latent-branch heads (same heads on the same teacher features; fresh optimiser)."""
  fake, disc = b.init_args[1:]
  if config.method == "dmdx" and config.dmdx.adm_disc_init == "adp_latent":
    prev_disc = previous.discriminator.params
    if not isinstance(prev_disc, dict) or "latent" not in prev_disc or (
        jax.tree.structure(prev_disc["latent"]) != jax.tree.structure(disc)):
      raise config_lib.ConfigError(
          "config.dmdx.adm_disc_init='adp_latent' needs ADP's latent heads to match "
          "ADM's discriminator (same config.disc head and features)")
    disc = prev_disc["latent"]

  def init(prev, fake, disc):
    s = b.init(prev.generator.params, fake, disc)
    return s.replace(generator_ema=prev.generator_ema if s.generator_ema is not None
                     else None, step=prev.step, rng=prev.rng)
  return jax.jit(init, out_shardings=b.shardings)(previous, fake, disc)


# ------------------------------------------------------------------------------- loop


def train_and_evaluate(config, workdir: str, *, stop_at: int | None = None
                       ) -> state_lib.DistillState:
  """Runs ``config.total_steps`` iterations (resuming if possible); returns the state.

  ``stop_at``: end early after that global step with a checkpoint, as an interrupted
  run would (the schedule, stages and data order stay those of the full run).
  """
  stop_at = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % shards:
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} does not split over the mesh's "
        f"{shards} batch shards (data x fsdp = {mesh.shape['data']} x "
        f"{mesh.shape['fsdp']}); change the batch size or config.mesh")
  all_stages = stages(config)
  problems.check_family(config)
  if config.pairs.source == "files" and any(_needs(st.method, config) for st in all_stages):
    _ensure_pairs(config, workdir)
  problem = problems.make(config, mesh, workdir)
  ckptr = checkpoint.TrainCheckpointer(checkpoint.checkpoint_dir(workdir),
                                       max_to_keep=config.keep_checkpoints)
  writer = metrics_lib.MetricWriter(workdir)
  state, start, current, resumed = _initial_state(config, workdir, ckptr, problem, mesh,
                                                  all_stages)
  guard = multihost.PreemptionGuard()
  try:
    guard.__enter__()
    for i in range(stage_at(all_stages, start), len(all_stages)):
      stage = all_stages[i]
      # The resumed stage's build is reused (building draws its example batch, which on
      # online-teacher problems is a teacher sampling).
      b = resumed if resumed is not None and i == current else build(config, mesh, problem,
                                                                   stage.method)
      resumed = None
      if state is not None and current != i:            # entering this stage now
        state, current = _hand_over(config, b, state), i
        ckptr.save(stage.start, state, _meta(stage, stage.start), force=True)
      state = _run_stage(config, workdir, problem, mesh, b, stage, state,
                         max(start, stage.start), ckptr, writer,
                         last=i == len(all_stages) - 1, stop_at=stop_at, guard=guard)
      current = i
      if stop_at <= stage.end or guard.step is not None:
        break
  finally:
    guard.__exit__()
    ckptr.wait()
    ckptr.close()
    writer.close()
  if guard.step is not None:
    if jax.process_index() == 0:
      print(f"preempted (SIGTERM): checkpoint {guard.step} saved in "
            f"{checkpoint.checkpoint_dir(workdir)}; the same command resumes from it",
            flush=True)
    return state
  if problem.evaluator is not None and jax.process_index() == 0:
    print_results(workdir)
  return state


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """``--mode=eval``: scores the generator of the run's latest checkpoint (``workdir``,
  else ``config.resume``) with ``config.eval`` (e.g. more samples than during training:
  ``--config.eval.num_per_prompt=500``), appends the row to ``eval/results.jsonl`` and
  prints the table. Same config as the training run; nothing is trained or saved."""
  if not config.eval.evaluator:
    raise config_lib.ConfigError("--mode=eval: config.eval.evaluator is empty (nothing to "
                                 "score the samples with)")
  if checkpoint.resolve_resume(workdir, config.get("resume") or None,
                               init_from_teacher=True).source not in ("workdir", "resume"):
    raise checkpoint.CheckpointError(
        f"--mode=eval: no checkpoint in {checkpoint.checkpoint_dir(workdir)} (nor "
        "config.resume); train first")
  mesh = sharding.make_mesh(config.mesh)
  problem = problems.make(config, mesh, workdir)
  all_stages = stages(config)
  ckptr = checkpoint.TrainCheckpointer(checkpoint.checkpoint_dir(workdir), read_only=True)
  try:
    state, step, index, b = _initial_state(config, workdir, ckptr, problem, mesh, all_stages)
  finally:
    ckptr.close()
  scores = evaluate(config, workdir, problem, make_sampler(b.nets), state, step,
                    stage=all_stages[index].method)
  if jax.process_index() == 0:
    print_results(workdir)
  return scores


def print_results(workdir) -> str:
  """The evaluation rows of ``workdir/eval/results.jsonl`` as a table (printed)."""
  from adm_jax import evaluation
  rows = evaluation.read_results(workdir)
  if not rows:
    return ""
  cols = ["step", "stage", "samples"] + [k for k in rows[-1] if k not in (
      "step", "stage", "samples", "grid")]
  table = evaluation.format_table(rows, cols)
  print(f"\n{table}\nsample grid: {rows[-1]['grid']}", flush=True)
  return table


def _ensure_pairs(config, workdir) -> None:
  """The pair job's shards, made first when missing or unfinished (``pairs.generate``
  skips the chunks that are already written)."""
  try:
    if pairs_lib.read_index(pairs_lib.pairs_dir(config, workdir)).get("complete"):
      return
  except FileNotFoundError:
    pass
  pairs_lib.generate(config, workdir)


def _meta(stage: Stage, step: int) -> dict:
  return {"stage": stage.method, "data_step": step}


def global_batch(problem, step: int, needs, mesh, batch_size: int) -> dict:
  """Batch ``step`` as global arrays split over the mesh's batch axes. Each process
  contributes its own rows: the problem's per-process batch (pair files), or its slice
  of a batch every process computes alike (online batches)."""
  local = problem.batch(step, needs)
  n = jax.process_count()
  if n > 1 and not problem.batch_per_process:
    rows, p = batch_size // n, jax.process_index()
    local = jax.tree.map(lambda a: a[p * rows:(p + 1) * rows]
                         if np.ndim(a) and np.shape(a)[0] == batch_size else a, local)
  return sharding.make_global_batch(local, mesh)


def _run_stage(config, workdir, problem, mesh, b: Built, stage: Stage, state, start,
               ckptr, writer, *, last: bool, stop_at: int,
               guard: multihost.PreemptionGuard | None = None):
  """Steps ``start .. stage.end - 1`` of one stage (or up to ``stop_at``). A stage that
  hands over to another does not checkpoint its last step: the hand-over checkpoint at
  that step does, unless the run stops there. When ``guard`` reports a preemption, the
  step reached is checkpointed and the stage returns early (``guard.step`` is set)."""
  end = min(stage.end, stop_at)
  jitted, batch_sh, frozen_sh = jit_plan(b, problem, mesh)
  frozen = jax.device_put(problem.frozen, frozen_sh)
  if state is None:
    state = jax.jit(b.init, out_shardings=b.shardings)(*b.init_args)
  progress = metrics_lib.Progress(start, end)
  incr = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0,
                 out_shardings=b.shardings)
  ema = jax.jit(lambda s: state_lib.update_ema(s, config.ema_decay), donate_argnums=0,
                out_shardings=b.shardings)
  sampler = make_sampler(b.nets)
  history, last_log = [], start
  for step in range(start, end):
    batch = global_batch(problem, step, b.needs, mesh, config.batch_size)
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    for i, (name, fn, every) in enumerate(jitted):
      if step % every == 0:
        state, m = fn(state, frozen, batch, jax.random.fold_in(key, i))
        history.append(m)
        if name == "generator" and config.ema_decay > 0:
          state = ema(state)
    state = incr(state)
    done = step + 1
    if metrics_lib.itstime(done, config.log_every, end):
      scalars = metrics_lib.mean_metrics(history)
      metrics_lib.check_finite(scalars, last_log + 1, done)
      line, perf = progress.line(done, config.batch_size)
      writer.write(done, {**scalars, **perf})
      if jax.process_index() == 0:
        print(f"[{stage.method}] {line}  " + "  ".join(
            f"{k}={v:.4g}" for k, v in sorted(scalars.items()) if k.endswith("loss")),
            flush=True)
      history, last_log = [], done
    if (config.sample_every and metrics_lib.itstime(done, config.sample_every, stage.end)
        or last and done == stage.end):
      write_samples(config, workdir, problem, sampler, state, done)
    if problem.evaluator is not None and (
        metrics_lib.itstime(done, config.eval.every, stage.end) if config.eval.every
        else done == stage.end):
      evaluate(config, workdir, problem, sampler, state, done, writer, stage=stage.method)
    preempted = guard is not None and guard.reached(done)
    if (metrics_lib.itstime(done, config.checkpoint_every, stage.end)
        and (last or done < stage.end)) or done == stop_at or preempted:
      ckptr.save(done, state, _meta(stage, done))
    if preempted:
      break
  return state


def evaluate(config, workdir, problem, sampler, state, step: int, writer=None, *,
             stage: str = "") -> dict[str, float]:
  """Scores ``config.eval``'s samples of the generator (the EMA when there is one) with
  ``problem.evaluator``: fixed noise, all student steps, decoded to images. Writes the
  scores (``eval/...``) to the metric writer, ``workdir/eval/step_N.png`` (a grid
  labelled by prompt) and ``workdir/eval/results.jsonl``; returns the scores."""
  import json
  from adm_jax import evaluation
  ec = config.eval
  cond, labels, prompts = problem.eval_set
  params = state.generator_ema if state.generator_ema is not None else state.generator.params
  decode = _jitted(problem.decode)
  key = jax.random.key(ec.seed + 23)
  images = []
  for s in range(0, len(labels), ec.batch_size):
    c = {k: v[s:s + ec.batch_size] for k, v in cond.items()}
    noise = jax.random.normal(jax.random.fold_in(key, s), (ec.batch_size, *problem.latent_shape))
    images.append(np.asarray(decode(problem.frozen["decoder"], sampler(params, noise, c))))
  images = np.concatenate(images)                                     # [N, H, W, 3]
  scores = problem.evaluator.evaluate(images, labels)
  out = (Path(workdir) / evaluation.RESULTS).parent
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    per = min(ec.num_per_prompt, 10)
    keep = np.concatenate([np.flatnonzero(labels == l)[:per] for l in np.unique(labels)])
    grid = evaluation.labelled_grid(images[keep], labels[keep], out / f"step_{step:07d}.png",
                                    prompts=prompts)
    with open(Path(workdir) / evaluation.RESULTS, "a") as f:
      f.write(json.dumps({"step": step, "stage": stage, "samples": len(labels),
                          "grid": str(grid), **scores}) + "\n")
    print(f"[eval] step {step} ({len(labels)} samples): " + "  ".join(
        f"{k}={v:.4g}" for k, v in scores.items()) + f"  grid: {grid}", flush=True)
  if writer is not None:
    writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
  return scores


@functools.lru_cache(maxsize=4)
def _jitted(fn: Callable) -> Callable:
  """One ``jax.jit`` wrapper per function (a problem's decoder, jitted once per run, not
  at every evaluation)."""
  return jax.jit(fn)


def make_sampler(nets: steps.Nets, seed: int = 0):
  """Jitted ``(params, noise, cond) -> samples``: all ``len(nets.gen_times)`` student
  steps from ``noise``."""
  k = len(nets.gen_times) - 1
  return jax.jit(lambda p, z, c: steps.generate(nets, p, z, c, k, jax.random.key(seed)))


def sample_generator(nets: steps.Nets, params, noise, cond, seed: int = 0) -> Array:
  """One-off :func:`make_sampler` call."""
  return make_sampler(nets, seed)(params, noise, cond)


def write_samples(config, workdir, problem, sampler, state, step: int) -> Path:
  """A grid of generator samples (the EMA when there is one) from fixed noise and
  conditioning: ``workdir/samples/step_<step>.png``."""
  from PIL import Image
  batch = problem.batch(0, frozenset())
  n = min(config.num_samples, jax.tree.leaves(batch["cond"])[0].shape[0])
  cond = jax.tree.map(lambda a: a[:n], batch["cond"])
  noise = jax.random.normal(jax.random.key(config.seed + 11), (n, *problem.latent_shape))
  params = state.generator_ema if state.generator_ema is not None else state.generator.params
  latents = sampler(params, noise, cond)
  out = Path(workdir) / "samples"
  path = out / f"step_{step:07d}.png"
  if jax.process_index() == 0 and problem.render is not None:
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(problem.render(np.asarray(jax.device_get(latents)))).save(path)
  return path


def _initial_state(config, workdir, ckptr, problem, mesh, all_stages):
  """``(state or None, start step, stage index of the state, that stage's Built or
  None)``; ``None``: initialise the first stage."""
  resume = checkpoint.resolve_resume(workdir, config.get("resume") or None,
                                     init_from_teacher=True)
  if resume.source not in ("workdir", "resume"):
    return None, 0, None, None
  step = int(resume.step)
  src = ckptr if resume.source == "workdir" else checkpoint.TrainCheckpointer(
      resume.directory, read_only=True)
  written_by = src.read_meta(step).get("stage")
  # The stage that wrote it: the one running ``step``, or the one ending there (a run
  # stopped at a hand-over).
  index = next((i for i, s in enumerate(all_stages)
                if s.method == written_by and s.start <= step <= s.end), None)
  if index is None:
    raise checkpoint.CheckpointError(
        f"checkpoint {resume.directory}/{step} was written by stage {written_by!r}, which "
        f"this config does not run at step {step} (stages: "
        f"{[(s.method, s.start, s.end) for s in all_stages]})")
  stage = all_stages[index]
  b = build(config, mesh, problem, stage.method)
  state, _ = src.restore(step, sharding.abstract_with_shardings(b.abstract, b.shardings))
  if jax.process_index() == 0:
    print(f"resumed from {resume.directory} step {step} (stage {stage.method})", flush=True)
  return state, step, index, b
