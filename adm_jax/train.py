"""The one trainer: mesh -> problem (teacher, students, data) -> state -> jitted steps ->
loop with the TTUR ratio -> metrics -> checkpoints.

Every family and method goes through :func:`train_and_evaluate`. A family contributes a
:class:`Problem` (its teacher, student / discriminator initialisation and batches) through
:data:`PROBLEMS`; a method is a list of step builders with update ratios
(:func:`method_plan`). Resume precedence (:func:`adm_jax.checkpoint.resolve_resume`):
1. the latest complete checkpoint in ``workdir/checkpoints``; 2. ``config.resume``;
3. initialisation from the teacher.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from adm_jax import checkpoint, config_lib, metrics as metrics_lib, optim, sharding
from adm_jax import state as state_lib
from adm_jax import steps
from adm_jax import teacher as teacher_lib

Array = jax.Array


@dataclasses.dataclass
class Problem:
  """What a family gives the trainer.

  Attributes:
    param: the teacher's parameterisation.
    teacher: ``apply(params, x_t, model_time, cond, *, return_features=False)``.
    teacher_params: frozen teacher parameters (never checkpointed).
    student: apply function of the generator and fake score.
    student_params: their initial parameters (a copy of the teacher's, or a student
      fitted to an exact teacher).
    disc_backbone: ``"student"`` (DMD2: fake-score features) or ``"teacher"`` (ADM).
    make_disc: ``feature_specs -> (disc_apply, disc_params)``.
    latent_shape: one sample's latent shape.
    batch: ``step -> host batch dict`` (deterministic in the step: exact resume).
  """
  param: Any
  teacher: Callable
  teacher_params: Any
  student: Callable
  student_params: Any
  make_disc: Callable
  latent_shape: tuple[int, ...]
  batch: Callable[[int], dict]


def _toy_problem(config, mesh) -> Problem:
  """The exact-score 2-D mixture (``family="toy"``)."""
  from adm_jax.models import disc_heads, toy
  del mesh
  mixture = toy.ToyMixture.ring(**config.toy.mixture)
  param = teacher_lib.make_parameterization(config.teacher)
  student = toy.init_denoiser(toy.ToyConfig(**config.toy.student), config.seed)
  graphdef, params = nnx.split(student)
  # "Initialised from the teacher": the exact teacher has no weights, so the students
  # start as an MLP regressed onto it.
  params = toy.fit_to_teacher(student, mixture, param, steps=config.toy.fit_steps,
                              rng=jax.random.key(config.seed))
  teacher = mixture.teacher_apply(param)

  def make_disc(specs):
    disc = disc_heads.MultiHeadDiscriminator(specs, head=config.disc.head,
                                             rngs=nnx.Rngs(config.seed + 1),
                                             **config.disc.head_kw)
    dgraph, dparams = nnx.split(disc)
    return (lambda p, feats: nnx.merge(dgraph, p)(feats)), dparams

  sampler = jax.jit(functools.partial(_toy_pairs, teacher, param, config))

  def batch(step: int) -> dict:
    key = jax.random.fold_in(jax.random.key(config.seed + 7), step)
    r = jax.random.split(key, 4)
    b = config.batch_size
    labels = jax.random.randint(r[0], (b,), 0, mixture.num_modes)
    cond = {"label": labels}
    out = dict(cond=cond, uncond=toy.uncond_like(cond), real_cond=cond,
               real=mixture.sample(r[1], b, label=labels))
    if config.method == "regression":
      noise = jax.random.normal(r[2], (b, mixture.dim))
      out.update(pair_noise=noise, pair_latent=sampler(noise, cond, out["uncond"]))
    return out

  return Problem(param=param, teacher=teacher, teacher_params={},
                 student=toy.denoiser_apply(graphdef), student_params=params,
                 make_disc=make_disc, latent_shape=(mixture.dim,), batch=batch)


def _toy_pairs(teacher, param, config, noise, cond, uncond):
  from adm_jax import sampling
  f = sampling.make_ode_sampler(teacher, param, config.pairs.num_steps,
                                cfg_scale=config.teacher.guidance_scale)
  return f({}, noise, cond, uncond)


PROBLEMS: dict[str, Callable[..., Problem]] = {"toy": _toy_problem}


# ------------------------------------------------------------------------------ plan


def method_plan(config, nets: steps.Nets) -> list[tuple[str, Callable, int]]:
  """``[(name, step_fn, every)]``: step ``s`` runs each entry with ``s % every == 0``.

  DMD2: the guidance model (fake score + GAN head) updates every iteration, the
  generator every ``ttur`` iterations (DMD2 App. C). ADM: fake score, discriminator and
  generator alternate (ADM Algorithm 1; TTUR 1 by default).
  """
  m, ttur = config.method, config.ttur
  if m == "dmd2":
    gan = config.dmd2.gan
    return [("fake_score", steps.make_fake_score_step(nets, gan=gan), 1),
            ("generator", steps.make_dmd2_generator_step(nets, gan=gan), ttur)]
  if m == "adm":
    return [("fake_score", steps.make_fake_score_step(nets, gan=False), 1),
            ("discriminator", steps.make_adm_discriminator_step(nets), 1),
            ("generator", steps.make_adm_generator_step(nets), ttur)]
  if m == "regression":
    return [("generator", steps.make_regression_step(nets), 1)]
  raise config_lib.ConfigError(f"method {m!r} cannot be trained yet; valid: dmd2, adm, "
                               f"regression")


def _networks(config) -> tuple[str, ...]:
  """The networks ``config.method`` trains."""
  if config.method == "regression":
    return ("generator",)
  if config.method == "dmd2" and not config.dmd2.gan:
    return ("generator", "fake_score")
  return state_lib.NETWORKS


# ------------------------------------------------------------------------------ setup


def _feature_specs(problem: Problem, backbone: str, names, example_cond) -> dict:
  """``{name: (channels, resolution)}`` of the backbone's features, by shape inference."""
  apply, params = ((problem.student, problem.student_params) if backbone == "student"
                   else (problem.teacher, problem.teacher_params))
  x = jax.ShapeDtypeStruct((1, *problem.latent_shape), jnp.float32)
  cond = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype),
                      example_cond)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  _, feats = jax.eval_shape(lambda p, x, t, c: apply(p, x, t, c, return_features=True),
                            params, x, t, cond)
  missing = [n for n in names if n not in feats]
  if missing:
    raise config_lib.ConfigError(f"config.disc.features: {missing} not produced by the "
                                 f"{backbone}; valid: {', '.join(sorted(feats))}")
  return {n: (feats[n].shape[-1], feats[n].shape[1]) for n in names}


def build(config, mesh):
  """Problem, an example batch, Nets, the state initialiser and its arguments, the
  abstract state, its shardings and the step plan."""
  if config.family not in PROBLEMS:
    raise config_lib.ConfigError(
        f"training is not available for family {config.family!r} yet; valid: "
        f"{', '.join(PROBLEMS)}")
  problem = PROBLEMS[config.family](config, mesh)
  example = problem.batch(0)
  nets_used = _networks(config)
  disc_apply = disc_params = None
  if "discriminator" in nets_used:
    backbone = "student" if config.method == "dmd2" else "teacher"
    disc_apply, disc_params = problem.make_disc(_feature_specs(
        problem, backbone, config.disc.features, example["cond"]))
  txs = {n: optim.make_optimizer(config.optim[n]) for n in nets_used}
  nets = steps.Nets(param=problem.param, teacher=problem.teacher, student=problem.student,
                    disc=disc_apply, txs=txs, latent_shape=problem.latent_shape,
                    gen_times=tuple(float(t) for t in config.student.times),
                    cfg_scale=config.teacher.guidance_scale,
                    hp=steps.default_hparams(**config.hparams))
  # Parameters are arguments of the (jitted) initialiser, not closed-over constants: a
  # closure would embed every weight in the compiled program.
  init = functools.partial(state_lib.init_state, txs=txs, ema=config.ema_decay > 0,
                           seed=config.seed)
  init_args = (problem.student_params,
               problem.student_params if "fake_score" in nets_used else None, disc_params)
  abstract = jax.eval_shape(init, *init_args)
  rules = {n: config.sharding_rules for n in state_lib.NETWORKS}
  shardings = state_lib.state_shardings(abstract, rules, mesh)
  return dict(problem=problem, example=example, nets=nets, init=init, init_args=init_args,
              abstract=abstract, shardings=shardings, plan=method_plan(config, nets))


def _jit_plan(plan, problem, example, shardings, mesh):
  batch_sh = jax.tree.map(lambda a: sharding.batch_sharding(mesh, a.ndim), example)
  teacher_sh = jax.tree.map(lambda _: sharding.replicated(mesh), problem.teacher_params)
  jitted = [(name, jax.jit(fn, in_shardings=(shardings, teacher_sh, batch_sh, None),
                           out_shardings=(shardings, None), donate_argnums=0), every)
            for name, fn, every in plan]
  return jitted, batch_sh, teacher_sh


# ------------------------------------------------------------------------------- loop


def train_and_evaluate(config, workdir: str) -> state_lib.DistillState:
  """Runs ``config.total_steps`` iterations (resuming if possible); returns the state."""
  mesh = sharding.make_mesh(config.mesh)
  b = build(config, mesh)
  problem, shardings = b["problem"], b["shardings"]
  jitted, batch_sh, teacher_sh = _jit_plan(b["plan"], problem, b["example"], shardings, mesh)
  teacher_params = jax.device_put(problem.teacher_params, teacher_sh)
  ckptr = checkpoint.TrainCheckpointer(checkpoint.checkpoint_dir(workdir),
                                       max_to_keep=config.keep_checkpoints)
  state, start = _initial_state(config, workdir, ckptr, b, shardings)
  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(start, config.total_steps)
  incr = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0,
                 out_shardings=shardings)
  ema = jax.jit(lambda s: state_lib.update_ema(s, config.ema_decay), donate_argnums=0,
                out_shardings=shardings)
  history, last_log = [], start
  try:
    for step in range(start, config.total_steps):
      batch = jax.device_put(problem.batch(step), batch_sh)
      key = jax.random.fold_in(jax.random.key(config.seed), step)
      for i, (name, fn, every) in enumerate(jitted):
        if step % every == 0:
          state, m = fn(state, teacher_params, batch, jax.random.fold_in(key, i))
          history.append(m)
          if name == "generator" and config.ema_decay > 0:
            state = ema(state)
      state = incr(state)
      done = step + 1
      if metrics_lib.itstime(done, config.log_every, config.total_steps):
        scalars = metrics_lib.mean_metrics(history)
        metrics_lib.check_finite(scalars, last_log + 1, done)
        line, perf = progress.line(done, config.batch_size)
        writer.write(done, {**scalars, **perf})
        if jax.process_index() == 0:
          print(line + "  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())
                                        if k.endswith("loss")), flush=True)
        history, last_log = [], done
      if metrics_lib.itstime(done, config.checkpoint_every, config.total_steps):
        ckptr.save(done, state, {"stage": config.method, "data_step": done})
  finally:
    ckptr.wait()
    ckptr.close()
    writer.close()
  return state


def _initial_state(config, workdir, ckptr, b, shardings):
  resume = checkpoint.resolve_resume(workdir, config.get("resume") or None,
                                     init_from_teacher=True)
  if resume.source in ("workdir", "resume"):
    src = ckptr if resume.source == "workdir" else checkpoint.TrainCheckpointer(
        resume.directory, read_only=True)
    state, meta = src.restore(resume.step, sharding.abstract_with_shardings(
        b["abstract"], shardings))
    if jax.process_index() == 0:
      print(f"resumed from {resume.directory} step {resume.step} "
            f"(stage {meta.get('stage')})", flush=True)
    return state, int(resume.step)
  return jax.jit(b["init"], out_shardings=shardings)(*b["init_args"]), 0
