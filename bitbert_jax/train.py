"""The loop that runs one stage's steps: one jitted, sharded step per batch, eval, checkpoints.

Everything about *what* is optimised comes in as an `Objective` (`distill/objective.py`) and
the batches as `TaskBatches` or `StreamBatches` (`data/batching.py`); this module only steps,
and around the steps evaluates, checkpoints, resumes and reports through their own modules.
"""
import contextlib
import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import optax

from bitbert_jax import checkpoint as ckpt_lib
from bitbert_jax import distributed
from bitbert_jax import evaluate as evaluate_lib
from bitbert_jax import logs
from bitbert_jax import optim
from bitbert_jax import preempt
from bitbert_jax import progress as progress_lib
from bitbert_jax import sharding
from bitbert_jax import signals as signals_lib
from bitbert_jax.distill.objective import make_loss_fn
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertModel

log = logging.getLogger('bitbert_jax')


@dataclasses.dataclass
class Settings:
  """One stage's training settings (from its config section)."""
  lr: float
  epochs: float
  batch_size: int
  warmup: float = 0.1  # fraction of total steps (< 1) or number of epochs (>= 1)
  float_lr: float = 0.0  # lr of the non-quantized parameters; 0 = lr
  float_warmup: float | None = None  # their warmup, as `warmup`; None = warmup
  warmin: float = 0.0  # quantization warm-in: lambda 0 -> 1 over this fraction of the steps
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  max_steps: int = -1
  log_every: int = 50
  eval_every: int = 0  # steps; 0 = every epoch
  keep_best: bool = True
  checkpoint_every_steps: int = 0
  checkpoint_every_secs: float = 600.0
  keep_checkpoints: int = 2
  skip_nonfinite: bool = False
  grad_accum_steps: int = 1  # micro-batches per optimiser update
  report_memory: bool = True  # ahead-of-time compile and log the step's memory before training
  field: str = 'config'


def total_steps(settings, steps_per_epoch):
  """A stage's step count: max_steps when set, else its epochs of steps (at least one)."""
  return (settings.max_steps if settings.max_steps > 0
          else max(1, int(math.ceil(settings.epochs * steps_per_epoch))))


def warmin_lambda(step, warmin_steps):
  """The warm-in lambda before step `step` (0-based): linear 0 -> 1 over `warmin_steps`."""
  return jnp.minimum(1.0, step.astype(jnp.float32) / warmin_steps)


def make_train_step(loss_fn, tx, warmin_steps=0):
  """One optimiser step; a non-finite loss or gradient leaves the state unchanged.

  warmin_steps > 0: the student's quantization is warmed in over that many steps (lambda is
  computed from state.step inside the step: one compiled step for the whole ramp).
  """

  def step(state, batch, teacher_params):
    rng, step_rng = jax.random.split(state.rng)
    mix = warmin_lambda(state.step, warmin_steps) if warmin_steps > 0 else None
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, (terms, model_state)), grads = grad_fn(state.params, state.aux_params,
                                                  state.model_state, batch, teacher_params,
                                                  step_rng, mix)
    if mix is not None:
      terms = dict(terms, quant_lambda=mix)
    grad_norm = optax.tree.norm(grads)
    trainable = (state.params, state.aux_params)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params, aux_params = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        aux_params=keep(aux_params, state.aux_params), opt_state=keep(opt_state, state.opt_state),
        model_state=keep(model_state, state.model_state), rng=rng)
    metrics = dict(loss=loss, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32),
                   **terms)
    return new_state, metrics

  return step


@functools.lru_cache(maxsize=4)
def _optimizer_and_step(model_config, policy, teacher_config, objective, lr, steps, warmup_steps,
                        weight_decay, clip_norm, accum, field, float_lr=None,
                        float_warmup_steps=None, grouped=False, warmin_steps=0):
  """(tx, schedules, step function); equal arguments give the same objects, so a stage run
  again in this process (a retry, a notebook re-run, tests) reuses the compiled step."""
  tx, schedule = optim.stage_optimizer(policy, lr, steps, warmup_steps, weight_decay, clip_norm,
                                       accum, field, float_lr=float_lr,
                                       float_warmup_steps=float_warmup_steps, grouped=grouped)
  teacher_model = BertModel(teacher_config) if teacher_config is not None else None
  loss_fn = make_loss_fn(BertModel(model_config, policy), teacher_model, objective,
                         model_config.is_regression)
  return tx, schedule, make_train_step(loss_fn, tx, warmin_steps)


def train(state, *, name, objective, settings, batches, mesh, workdir, writer, task=None,
          dev_sets=None, teacher=None):
  """Runs one stage's optimisation; returns (state with the kept parameters, dev results).

  Resumes from the newest intact checkpoint under `workdir/checkpoints` when one exists; a
  resumed stage ends bitwise equal to an uninterrupted one (data order, dropout RNG, optimizer,
  best-on-dev and skip counter are all in the checkpoint). SIGTERM (see `preempt.preemptible`)
  writes a checkpoint and raises `preempt.Preempted`; a non-finite loss or gradient norm raises
  `logs.NonFiniteError` (the newest checkpoint predates it) unless `settings.skip_nonfinite`.
  """
  with preempt.preemptible():
    return _train(state, name=name, objective=objective, settings=settings, batches=batches,
                  mesh=mesh, workdir=workdir, writer=writer, task=task, dev_sets=dev_sets,
                  teacher=teacher)


def _train(state, *, name, objective, settings, batches, mesh, workdir, writer, task, dev_sets,
           teacher):
  sharding.check_batch_size(settings.batch_size, mesh, f'{settings.field}.batch_size')
  steps_per_epoch = batches.steps_per_epoch()
  if steps_per_epoch < 1:
    raise BitbertError(f'{settings.field}: the training split has fewer examples than one '
                       f'batch ({settings.batch_size}); lower batch_size')
  total = total_steps(settings, steps_per_epoch)
  to_steps = lambda w: w * total if w < 1 else w * steps_per_epoch
  warmup = to_steps(settings.warmup)
  float_warmup = None if settings.float_warmup is None else to_steps(settings.float_warmup)
  accum = settings.grad_accum_steps
  if accum < 1:
    raise BitbertError(f'{settings.field}.grad_accum_steps={accum}: must be >= 1')
  grouped = optim.needs_groups(state.policy, settings.lr, settings.warmup, settings.float_lr,
                     settings.float_warmup)
  tx, schedule, train_step = _optimizer_and_step(
      state.model_config, state.policy, teacher.config if teacher is not None else None,
      objective, settings.lr, max(total // accum, 1), int(warmup) // accum,
      settings.weight_decay, settings.clip_norm, accum, settings.field,
      float_lr=settings.float_lr or None,
      float_warmup_steps=None if float_warmup is None else int(float_warmup) // accum,
      grouped=grouped, warmin_steps=settings.warmin * total if state.policy.enabled else 0)

  state = state.replace(step=jnp.zeros((), jnp.int32))
  teacher_model = BertModel(teacher.config) if teacher is not None else None
  if objective.needs_teacher and teacher is None:
    raise BitbertError(f'{settings.field}: losses {objective.losses} need a teacher')

  # Optimizer state created already sharded, never whole on one device first.
  shardings = sharding.state_shardings(mesh, state)
  # Own buffers: the state is donated to the step, and a student built from the teacher's
  # layers must not alias the teacher's arrays.
  state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)
  opt_shapes = jax.eval_shape(tx.init, (state.params, state.aux_params))
  state = state.replace(opt_state=opt_shapes)
  shardings = sharding.state_shardings(mesh, state, tx)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)((state.params,
                                                                   state.aux_params))
  state = state.replace(opt_state=opt_state)
  teacher_params = None
  if teacher is not None:
    teacher_params = jax.device_put(teacher.params,
                                    sharding.param_shardings(mesh, teacher_model, teacher.params))

  batch_sh = {k: sharding.batch_sharding(mesh) for k in sharding.BATCH_KEYS}
  t_sh = jax.tree.map(lambda x: x.sharding, teacher_params) if teacher_params else None
  step_fn = jax.jit(train_step, in_shardings=(shardings, batch_sh, t_sh),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  if settings.report_memory:
    logs.report_step_memory(step_fn, state, batches, mesh, teacher_params, name)

  rep = sharding.replicated(mesh)
  signs = signals_lib.SignTracker(state.policy, state.params, rep)
  abstract = _checkpoint_target(state, shardings, signs, rep)
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(workdir, 'checkpoints'),
                                    settings.keep_checkpoints, settings.checkpoint_every_steps,
                                    settings.checkpoint_every_secs)
  fingerprint = ckpt_lib.fingerprint(settings, total, steps_per_epoch, objective)
  with contextlib.closing(ckpts):
    return _loop(state, name=name, settings=settings, batches=batches, mesh=mesh,
                 writer=writer, task=task, dev_sets=dev_sets, teacher_params=teacher_params,
                 step_fn=step_fn, schedule=schedule, ckpts=ckpts, total=total,
                 steps_per_epoch=steps_per_epoch, fingerprint=fingerprint, abstract=abstract,
                 signs=signs)


def _checkpoint_target(state, shardings, signs, rep):
  """meta -> the restore target; checkpoints written before the sign signals lack 'signs'."""
  tree = {'state': state, 'best_params': (state.params, state.model_state)}
  tree_sh = {'state': shardings, 'best_params': (shardings.params, shardings.model_state)}
  if signs:
    refs = signs.abstract(state.params)
    with_signs = ckpt_lib.abstract_like(dict(tree, signs=refs),
                                        dict(tree_sh, signs=jax.tree.map(lambda _: rep, refs)))
  without = ckpt_lib.abstract_like(tree, tree_sh)
  return lambda meta: with_signs if signs and meta.get('signs') else without


def _loop(state, *, name, settings, batches, mesh, writer, task, dev_sets, teacher_params,
          step_fn, schedule, ckpts, total, steps_per_epoch, fingerprint, abstract, signs):
  """Restores the newest checkpoint, then steps, logs, evaluates and checkpoints to `total`."""
  best = {'score': None, 'step': 0, 'evals': None}
  best_params, last_evals, nonfinite_skipped, start = None, None, 0, 0
  restored = ckpts.restore_latest(abstract, ckpt_lib.check_fingerprint(name, settings.field,
                                                                       fingerprint))
  if restored is not None:
    tree, meta = restored
    state, best_params = tree['state'], tree['best_params']
    if signs:
      if 'signs' in tree:
        signs.refs = tree['signs']
      else:  # an older checkpoint: flips count from the resumed step
        log.warning('[%s] checkpoint without sign references: sign flips count from step %d',
                    name, int(meta['step']))
        signs.reset(state.params)
    best = meta['best']
    best_params = best_params if best['evals'] is not None else None
    last_evals = meta.get('last_evals')
    nonfinite_skipped = int(meta.get('nonfinite_skipped', 0))
    start = int(meta['step'])
    log.info('[%s] resumed from step %d (checkpoint %s)', name, start,
             os.path.join(ckpts.directory, str(start)))

  if signs and restored is None:
    signs.reset(state.params)  # the stage's first step: the reference of signflip_stage
  writer.rewind(name, start)
  progress = progress_lib.StageProgress(name, total, start, settings.batch_size)
  eval_every = settings.eval_every or steps_per_epoch
  can_eval = task is not None and dev_sets and state.model_config.num_labels > 0
  accum = settings.grad_accum_steps

  def save(step, pending_eval=False):
    meta = {'step': step, 'best': best, 'last_evals': last_evals,
            'nonfinite_skipped': nonfinite_skipped, 'fingerprint': fingerprint,
            'signs': bool(signs), 'pending_eval': pending_eval}
    # Without a best yet, the current params fill the slot (same structure, never used).
    tree = {'state': state, 'best_params': best_params or (state.params, state.model_state)}
    writer.flush()  # a bucket's rows up to this step are kept before the checkpoint after them
    ckpts.save(step, dict(tree, signs=signs.refs) if signs else tree, meta)

  def dev_eval(step):
    nonlocal best, best_params, last_evals
    evals = evaluate_lib.evaluate(state.model, state.params, state.model_state, task, dev_sets,
                                  settings.batch_size, mesh)
    flat = evaluate_lib.flat_metrics(evals)
    writer.write(name, step, {'dev/score': evals['score'], **flat})
    log.info('[%s] step %d dev %s', name, step, flat)
    last_evals = evals
    if best['score'] is None or evals['score'] > best['score']:
      best = {'score': float(evals['score']), 'step': step, 'evals': evals}
      best_params = distributed.fetch((state.params, state.model_state))

  step, evaluating = start, False
  try:
    if restored is not None and restored[1].get('pending_eval'):
      evaluating = True  # SIGTERM came during this step's evaluation: it runs now instead
      dev_eval(step)
      evaluating = False
    while step < total:
      epoch, index = divmod(step, steps_per_epoch)
      taken = 0
      for batch in batches.epoch(epoch, index):
        taken += 1
        state, m = step_fn(state, sharding.device_batch(mesh, batch), teacher_params)
        step += 1
        if float(m['nonfinite']):
          if not settings.skip_nonfinite:
            logs.nonfinite_error(name, step, m, ckpts, writer, settings)
          nonfinite_skipped += 1
        if step % settings.log_every == 0 or step == total:
          m = {k: float(v) for k, v in m.items()}
          m.update({k: float(f((step - 1) // accum)) for k, f in schedule.items()},
                   nonfinite_skipped=nonfinite_skipped)
          if signs:
            m.update(signs.log(state.params))
          writer.write(name, step, m)
          log.info(progress.line(step, logs.console_metrics(m)))
        if can_eval and (step % eval_every == 0 or step == total):
          evaluating = True
          dev_eval(step)
          evaluating = False
        # One verdict for all processes (one allgather): a save is collective, clocks differ.
        preempted, due = distributed.any_process(preempt.local_request(), ckpts.due(step))
        if due or preempted:
          save(step)
        if preempted:
          raise preempt.Preempted(name, step)
        if step >= total:
          break
      if not taken:  # a data source that runs dry would otherwise loop here for ever
        raise BitbertError(f'stage {name!r}: epoch {epoch} gave no batch at step {step} (from '
                           f'batch {index} of {steps_per_epoch} per epoch): its data ran out; '
                           f'lower {settings.field}.steps_per_epoch or give more data')
  except preempt.Preempted as e:
    if e.stage is not None:  # raised above, after its checkpoint
      raise
    save(step, pending_eval=evaluating)  # SIGTERM in a data phase or an evaluation
    raise preempt.Preempted(name, step, e.during) from None
  save(step)

  if settings.keep_best and best_params is not None:
    params, model_state = best_params
    state = state.replace(params=params, model_state=model_state)
    return state, best['evals']
  if can_eval and last_evals is None:  # a checkpoint from before last_evals was saved
    last_evals = evaluate_lib.evaluate(state.model, state.params, state.model_state, task,
                                       dev_sets, settings.batch_size, mesh)
  return state, last_evals
