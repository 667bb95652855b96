"""The loop that runs one stage's steps: one jitted, sharded step per batch, eval, checkpoints.

Everything about *what* is optimised comes in as an `Objective`; this module only knows how to
step, evaluate, checkpoint, resume and report.
"""
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from bitbert_jax import checkpoint as ckpt_lib
from bitbert_jax import logs
from bitbert_jax import preempt
from bitbert_jax import sharding
from bitbert_jax import signals as signals_lib
from bitbert_jax.data import batching
from bitbert_jax.data import metrics as metrics_lib
from bitbert_jax.distill import losses
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertModel
from bitbert_jax.optim import make_optimizer
from bitbert_jax.preempt import Preempted, preempt_requested, preemptible  # re-exported

log = logging.getLogger('bitbert_jax')
BATCH_KEYS = ('input_ids', 'attention_mask', 'token_type_ids', 'labels', 'weights')


class NonFiniteError(BitbertError):
  """A NaN or infinite loss or gradient norm."""


@dataclasses.dataclass(frozen=True)
class Teacher:
  config: Any
  params: Any


@dataclasses.dataclass(frozen=True)
class Objective:
  """Which losses a stage sums: 'label' (gold labels, fine-tuning only), 'pred' (teacher
  logits), 'attn' (attention scores), 'hidden' (hidden states); each times its entry of
  `weights` ((name, weight) pairs; 1 if absent). attn_loss: 'mse' of the pre-softmax scores or
  'kl' of the probabilities (`losses.ATTENTION_LOSSES`)."""
  losses: tuple[str, ...]
  layer_map: Any = None
  temperature: float = 1.0
  weights: tuple[tuple[str, float], ...] = ()
  attn_loss: str = 'mse'

  def weight(self, term):
    return dict(self.weights).get(term, 1.0)

  @property
  def needs_teacher(self):
    return bool(set(self.losses) & {'pred', 'attn', 'hidden'})


@dataclasses.dataclass
class TaskBatches:
  """Epochs over a tokenized split, resumable at (epoch, batch)."""
  encoded: Any
  batch_size: int
  seed: int

  def steps_per_epoch(self):
    return batching.num_batches(self.encoded, self.batch_size, drop_remainder=True)

  def epoch(self, epoch, start=0):
    return batching.epoch_batches(self.encoded, self.batch_size, seed=self.seed, epoch=epoch,
                                  drop_remainder=True, start=start,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())


@dataclasses.dataclass
class StreamBatches:
  """An unlabelled stream (general-KD corpus) cut into epochs of `batches_per_epoch` batches.

  `make(epoch, repeat)` restarts pass `repeat` of the stream for an epoch deterministically
  (its StopIteration value, if any, counts the stream's sequences). A stream shorter than an
  epoch starts its next pass when `wrap`, else stops with an error naming `name`; so an epoch
  is a pure function of its number and resumes at any batch.
  """
  make: Callable[[int, int], Iterator[dict]]
  batches_per_epoch: int
  batch_size: int = 0
  name: str = 'corpus'
  field: str = 'config'
  wrap: bool = True

  def steps_per_epoch(self):
    return self.batches_per_epoch

  def epoch(self, epoch, start=0):
    # resume: skipping `start` batches replays the same pure function of (seed, epoch, pass)
    return itertools.islice(self._passes(epoch), start, self.batches_per_epoch)

  def _passes(self, epoch):
    for repeat in itertools.count():
      it, yielded = self.make(epoch, repeat), 0
      while True:
        try:
          batch = next(it)
        except StopIteration as stop:
          sequences = stop.value
          break
        yielded += 1
        yield batch
      if not yielded or not self.wrap:
        raise BitbertError(self._short(sequences, yielded))

  def _short(self, sequences, yielded):
    held = f'{sequences} sequences' if isinstance(sequences, int) else f'{yielded} batches'
    wanted = f'{self.batches_per_epoch} batches of {self.batch_size}'
    if not yielded:
      return (f'{self.field}: corpus {self.name} holds {held}, fewer than one batch of '
              f'{self.batch_size}; give more text or lower {self.field}.batch_size')
    return (f'{self.field}: corpus {self.name} holds {held}; the stage asks for {wanted} '
            f'(= {self.batches_per_epoch * self.batch_size} sequences) per epoch; set '
            f'{self.field}.wrap_corpus=True to start its next pass, or lower '
            f'{self.field}.steps_per_epoch')


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


def make_loss_fn(student, teacher_model, objective, is_regression):
  """loss_fn(params, aux, model_state, batch, teacher_params, rng, quant_mix=None) ->
  (loss, (terms, state)); quant_mix: the student's warm-in lambda (None: fully quantized)."""

  def loss_fn(params, aux_params, model_state, batch, teacher_params, rng, quant_mix=None):
    mutable = list(model_state) if model_state else False
    out = student.apply({'params': params, **model_state}, batch['input_ids'],
                        batch['attention_mask'], batch['token_type_ids'], deterministic=False,
                        rngs={'dropout': rng}, mutable=mutable, quant_mix=quant_mix)
    out, new_model_state = out if mutable else (out, model_state)
    w, mask = batch['weights'], batch['attention_mask']
    terms = {}
    if 'label' in objective.losses:
      terms['label'] = losses.label_loss(out.logits, batch['labels'], w, is_regression)
    if objective.needs_teacher:
      t = teacher_model.apply({'params': teacher_params}, batch['input_ids'], mask,
                              batch['token_type_ids'], deterministic=True)
      t = jax.lax.stop_gradient(t)
      lmap = objective.layer_map
      if 'pred' in objective.losses:
        terms['pred'] = losses.prediction_loss(out.logits, t.logits, w, is_regression,
                                               objective.temperature)
      if 'attn' in objective.losses:
        attention_loss = losses.ATTENTION_LOSSES[objective.attn_loss]
        terms.update(_per_layer('attn', [
            attention_loss(s, t.attention_scores[j], mask, w)
            for s, j in zip(out.attention_scores, lmap.attention)]))
      if 'hidden' in objective.losses:
        proj = aux_params.get('hidden_proj') if aux_params else None
        terms.update(_per_layer('hidden', [losses.hidden_mse(s, t.hidden_states[j], w, proj)
                                           for s, j in zip(out.hidden_states, lmap.hidden)]))
    # Terms are logged unweighted; the loss weighs them (per-layer parts are not summed twice).
    loss = sum(objective.weight(k) * v for k, v in terms.items() if '/' not in k)
    return loss, (terms, new_model_state)

  return loss_fn


def _per_layer(name, values):
  """{name: sum, name/i: values[i]}: the summed term and each student layer's part."""
  return {name: sum(values), **{f'{name}/{i}': v for i, v in enumerate(values)}}


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


def param_shardings(mesh, model, params):
  """Shardings for `params` of `model` from its logical axis names (via jax.eval_shape)."""
  abstract = jax.eval_shape(lambda r: model.init(r, **_tiny_input())['params'],
                            jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(mesh, abstract)
  return _match(params, shardings, sharding.replicated(mesh))


def _tiny_input():
  ids = jnp.zeros((1, 8), jnp.int32)
  return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=ids)


def _match(tree, shardings, default):
  """`shardings` laid onto `tree`'s structure; leaves it lacks (e.g. learned scales) replicate."""
  flat = {jax.tree_util.keystr(k): s for k, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  return jax.tree_util.tree_map_with_path(lambda k, _: flat.get(jax.tree_util.keystr(k), default),
                                          tree)


def state_shardings(mesh, state, tx=None):
  rep = sharding.replicated(mesh)
  p_sh = param_shardings(mesh, state.model, state.params)
  aux_sh = jax.tree.map(lambda _: rep, state.aux_params)
  opt_sh = jax.tree.map(lambda _: rep, state.opt_state)
  if tx is not None and state.opt_state != ():
    # A multi_transform group's state holds MaskedNode where the other group's params are.
    masked = lambda v: isinstance(v, optax.MaskedNode)
    opt_sh = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, state.opt_state,
                                   (p_sh, aux_sh), transform_non_params=lambda _: rep,
                                   is_leaf=masked)
  return state.replace(step=rep, params=p_sh, aux_params=aux_sh, opt_state=opt_sh,
                       model_state=jax.tree.map(lambda _: rep, state.model_state), rng=rep)


def device_batch(mesh, batch):
  """A host-local numpy batch -> global arrays sharded over the data-parallel axes."""
  bs = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(bs, np.asarray(batch[k]))
          for k in BATCH_KEYS if k in batch}


@functools.lru_cache(maxsize=16)
def _eval_step(config, policy, mesh, param_sh, state_sh):
  """The jitted eval step for one model and mesh, compiled once per batch shape, not per call."""
  model = BertModel(config, policy)

  def logits_fn(params, model_state, batch):
    return model.apply({'params': params, **model_state}, batch['input_ids'],
                       batch['attention_mask'], batch['token_type_ids']).logits

  batch_sh = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
  unflatten = lambda sh: jax.tree_util.tree_unflatten(sh[0], sh[1])
  return jax.jit(logits_fn, in_shardings=(unflatten(param_sh), unflatten(state_sh), batch_sh),
                 out_shardings=sharding.replicated(mesh))


def _hashable(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple(leaves)


def predict(model, params, model_state, encoded, batch_size, mesh):
  """Logits (or regression scores) [N, C] for every example of a split, in split order."""
  p_sh = param_shardings(mesh, model, params)
  ms_sh = jax.tree.map(lambda _: sharding.replicated(mesh), model_state)
  params, model_state = jax.device_put((params, model_state), (p_sh, ms_sh))
  step = _eval_step(model.config, model.policy, mesh, _hashable(p_sh), _hashable(ms_sh))
  out = np.zeros((len(encoded), model.config.num_labels), np.float32)
  for batch in batching.eval_batches(encoded, batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    preempt.check('evaluation')
    batch_in = device_batch(mesh, batch)
    batch_in.setdefault('labels', batch_in['weights'])  # eval batches need no labels
    logits = np.asarray(step(params, model_state, batch_in))  # replicated: every host has all
    index = multihost_utils.process_allgather(batch['index'], tiled=True) \
        if jax.process_count() > 1 else batch['index']
    real = index >= 0
    out[index[real]] = logits[real]
  return out


def evaluate(model, params, model_state, task, dev_sets, batch_size, mesh):
  """{split: metrics} plus 'score' = the task's main score on the first dev split."""
  results = {}
  for split, encoded in dev_sets.items():
    logits = predict(model, params, model_state, encoded, batch_size, mesh)
    results[split] = metrics_lib.compute_metrics(task, logits, encoded.labels)
  first = next(iter(results.values()))
  results['score'] = task.score(first)
  return results


def _flat_metrics(evals):
  return {f'{split}/{k}': v for split, m in evals.items() if isinstance(m, dict)
          for k, v in m.items()}


def param_labels(policy):
  """labels(trainable) for `optim.make_optimizer`: 'quant' where `policy` quantizes the leaf of
  the student's params (a (params, aux_params) tuple or a params dict), else 'float'."""

  def label(path, _):
    if isinstance(path[0], jax.tree_util.SequenceKey):
      if path[0].idx != 0:
        return 'float'  # aux_params: distillation-only, never quantized
      path = path[1:]
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    return 'quant' if policy.weight_quant(name) is not None else 'float'

  return lambda tree: jax.tree_util.tree_map_with_path(label, tree)


def _grouped(policy, lr, warmup, float_lr, float_warmup):
  """Whether the stage needs two optimizer groups: a float setting differs and the policy
  quantizes something (in an FP32 stage everything trains at lr)."""
  differs = (float_lr and float_lr != lr) or (float_warmup is not None and float_warmup != warmup)
  return bool(differs) and any(q.bits < 32 for _, q in policy.rules)


@functools.lru_cache(maxsize=4)
def _optimizer_and_step(model_config, policy, teacher_config, objective, lr, steps, warmup_steps,
                        weight_decay, clip_norm, accum, field, float_lr=None,
                        float_warmup_steps=None, grouped=False, warmin_steps=0):
  """(tx, schedules, step function); equal arguments give the same objects, so a stage run
  again in this process (a retry, a notebook re-run, tests) reuses the compiled step."""
  tx, schedule = make_optimizer(lr, steps, warmup_steps, weight_decay, clip_norm, field=field,
                                float_lr=float_lr, float_warmup_steps=float_warmup_steps,
                                labels=param_labels(policy) if grouped else None)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  teacher_model = BertModel(teacher_config) if teacher_config is not None else None
  loss_fn = make_loss_fn(BertModel(model_config, policy), teacher_model, objective,
                         model_config.is_regression)
  return tx, schedule, make_train_step(loss_fn, tx, warmin_steps)


def _fingerprint(settings, total, steps_per_epoch, objective):
  """Settings that fix the step sequence; a resumed stage should match its checkpoint's."""
  return dict(total_steps=total, steps_per_epoch=steps_per_epoch,
              batch_size=settings.batch_size, lr=settings.lr, warmup=settings.warmup,
              float_lr=settings.float_lr, float_warmup=settings.float_warmup,
              warmin=settings.warmin,
              grad_accum_steps=settings.grad_accum_steps, losses=list(objective.losses),
              loss_weights=[list(w) for w in objective.weights], attn_loss=objective.attn_loss,
              temperature=objective.temperature)


def _check_fingerprint(name, field, fingerprint):
  def check(meta, where):
    old = meta.get('fingerprint') or {}
    changed = [f'{k}: {old[k]!r} -> {v!r}' for k, v in fingerprint.items()
               if k in old and old[k] != v]
    if changed:  # allowed (e.g. a lower lr after a NaN), but no longer an exact resume
      log.warning('[%s] resuming from %s written with other settings (%s; see %s): the run '
                  'will differ from an uninterrupted one', name, where, '; '.join(changed), field)
  return check


def train(state, *, name, objective, settings, batches, mesh, workdir, writer, task=None,
          dev_sets=None, teacher=None):
  """Runs one stage's optimisation; returns (state with the kept parameters, dev results).

  Resumes from the newest intact checkpoint under `workdir/checkpoints` when one exists; a
  resumed stage ends bitwise equal to an uninterrupted one (data order, dropout RNG, optimizer,
  best-on-dev and skip counter are all in the checkpoint). SIGTERM (see `preemptible`) writes a
  checkpoint and raises Preempted; a non-finite loss or gradient norm raises NonFiniteError
  (the newest checkpoint predates it) unless `settings.skip_nonfinite`.
  """
  with preemptible():
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
  total = (settings.max_steps if settings.max_steps > 0
           else max(1, int(math.ceil(settings.epochs * steps_per_epoch))))
  to_steps = lambda w: w * total if w < 1 else w * steps_per_epoch
  warmup = to_steps(settings.warmup)
  float_warmup = None if settings.float_warmup is None else to_steps(settings.float_warmup)
  accum = settings.grad_accum_steps
  if accum < 1:
    raise BitbertError(f'{settings.field}.grad_accum_steps={accum}: must be >= 1')
  grouped = _grouped(state.policy, settings.lr, settings.warmup, settings.float_lr,
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
  shardings = state_shardings(mesh, state)
  # Own buffers: the state is donated to the step, and a student built from the teacher's
  # layers must not alias the teacher's arrays.
  state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)
  opt_shapes = jax.eval_shape(tx.init, (state.params, state.aux_params))
  state = state.replace(opt_state=opt_shapes)
  shardings = state_shardings(mesh, state, tx)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)((state.params,
                                                                   state.aux_params))
  state = state.replace(opt_state=opt_state)
  teacher_params = None
  if teacher is not None:
    teacher_params = jax.device_put(teacher.params,
                                    param_shardings(mesh, teacher_model, teacher.params))

  batch_sh = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
  t_sh = jax.tree.map(lambda x: x.sharding, teacher_params) if teacher_params else None
  step_fn = jax.jit(train_step, in_shardings=(shardings, batch_sh, t_sh),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  if settings.report_memory:
    report_step_memory(step_fn, state, batches, mesh, teacher_params, name)

  rep = sharding.replicated(mesh)
  signs = signals_lib.SignTracker(state.policy, state.params, rep)
  abstract = _checkpoint_target(state, shardings, signs, rep)
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(workdir, 'checkpoints'),
                                    settings.keep_checkpoints, settings.checkpoint_every_steps,
                                    settings.checkpoint_every_secs)
  fingerprint = _fingerprint(settings, total, steps_per_epoch, objective)
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
  restored = ckpts.restore_latest(abstract, _check_fingerprint(name, settings.field,
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
  progress = logs.Progress(name, total, start, settings.batch_size)
  eval_every = settings.eval_every or steps_per_epoch
  can_eval = task is not None and dev_sets and state.model_config.num_labels > 0
  accum = settings.grad_accum_steps

  def save(step, pending_eval=False):
    meta = {'step': step, 'best': best, 'last_evals': last_evals,
            'nonfinite_skipped': nonfinite_skipped, 'fingerprint': fingerprint,
            'signs': bool(signs), 'pending_eval': pending_eval}
    # Without a best yet, the current params fill the slot (same structure, never used).
    tree = {'state': state, 'best_params': best_params or (state.params, state.model_state)}
    ckpts.save(step, dict(tree, signs=signs.refs) if signs else tree, meta)

  def dev_eval(step):
    nonlocal best, best_params, last_evals
    evals = evaluate(state.model, state.params, state.model_state, task, dev_sets,
                     settings.batch_size, mesh)
    writer.write(name, step, {'dev/score': evals['score'], **_flat_metrics(evals)})
    log.info('[%s] step %d dev %s', name, step, _flat_metrics(evals))
    last_evals = evals
    if best['score'] is None or evals['score'] > best['score']:
      best = {'score': float(evals['score']), 'step': step, 'evals': evals}
      best_params = jax.device_get((state.params, state.model_state))

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
        state, m = step_fn(state, device_batch(mesh, batch), teacher_params)
        step += 1
        if float(m['nonfinite']):
          if not settings.skip_nonfinite:
            _nonfinite_error(name, step, m, ckpts, writer, settings)
          nonfinite_skipped += 1
        if step % settings.log_every == 0 or step == total:
          m = {k: float(v) for k, v in m.items()}
          m.update({k: float(f((step - 1) // accum)) for k, f in schedule.items()},
                   nonfinite_skipped=nonfinite_skipped)
          if signs:
            m.update(signs.log(state.params))
          writer.write(name, step, m)
          log.info(progress.line(step, _console(m)))
        if can_eval and (step % eval_every == 0 or step == total):
          evaluating = True
          dev_eval(step)
          evaluating = False
        preempted = preempt_requested()
        if ckpts.due(step) or preempted:
          save(step)
        if preempted:
          raise Preempted(name, step)
        if step >= total:
          break
      if not taken:  # a data source that runs dry would otherwise loop here for ever
        raise BitbertError(f'stage {name!r}: epoch {epoch} gave no batch at step {step} (from '
                           f'batch {index} of {steps_per_epoch} per epoch): its data ran out; '
                           f'lower {settings.field}.steps_per_epoch or give more data')
  except Preempted as e:
    if e.stage is not None:  # raised above, after its checkpoint
      raise
    save(step, pending_eval=evaluating)  # SIGTERM in a data phase or an evaluation
    raise Preempted(name, step, e.during) from None
  save(step)

  if settings.keep_best and best_params is not None:
    params, model_state = best_params
    state = state.replace(params=params, model_state=model_state)
    return state, best['evals']
  if can_eval and last_evals is None:  # a checkpoint from before last_evals was saved
    last_evals = evaluate(state.model, state.params, state.model_state, task, dev_sets,
                          settings.batch_size, mesh)
  return state, last_evals


def _console(m):
  """The progress line's metrics: summed terms (no per-layer ones) and the recent flip rate."""
  shown = {k: v for k, v in m.items() if '/' not in k and k != 'nonfinite'}
  if 'signflip_recent/all' in m:
    shown['flips'] = m['signflip_recent/all']  # near 0: the binary weights have stopped moving
  return shown


def _nonfinite_error(name, step, m, ckpts, writer, settings):
  """Stops the stage: the faulty step is logged; the newest checkpoint predates it."""
  loss, grad_norm = float(m['loss']), float(m['grad_norm'])
  writer.write(name, step, {'loss': loss, 'grad_norm': grad_norm, 'nonfinite': 1.0})
  good = [s for s in ckpts.all_steps() if s < step]
  kept = (f'the newest checkpoint, step {max(good)}, is kept under {ckpts.directory}' if good
          else 'no checkpoint was written before it')
  raise NonFiniteError(
      f'stage {name!r}: non-finite loss or gradient norm at step {step} (loss={loss}, '
      f'grad_norm={grad_norm}); {kept}. Lower {settings.field}.lr, or set '
      f'config.train.skip_nonfinite=True to skip such batches')


def report_step_memory(step_fn, state, batches, mesh, teacher_params, name):
  """Compiles the step ahead of time for the longest bucket and logs its memory needs."""
  first = next(iter(batches.epoch(0)))
  s_max = first['input_ids'].shape[1]
  if hasattr(batches, 'encoded'):
    s_max = max(batching.default_bucket_lengths(batches.encoded.max_length))
  pad = lambda a: np.zeros(a.shape[:1] + (s_max,) + a.shape[2:], a.dtype) if a.ndim == 2 else a
  shapes = device_batch(mesh, {k: pad(np.asarray(v)) for k, v in first.items()})
  try:
    stats = step_fn.lower(state, shapes, teacher_params).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    log.info('[%s] memory analysis unavailable: %s', name, e)
    return None
  if stats is None:
    return None
  mib = lambda b: b / 2**20
  report = dict(arguments_mib=mib(stats.argument_size_in_bytes),
                outputs_mib=mib(stats.output_size_in_bytes),
                temporaries_mib=mib(stats.temp_size_in_bytes),
                generated_code_mib=mib(stats.generated_code_size_in_bytes))
  log.info('[%s] step memory at sequence %d (per device): %s', name, s_max,
           ', '.join(f'{k} {v:.1f}' for k, v in report.items()))
  return report

