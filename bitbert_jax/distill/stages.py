"""Stages: each is a train-state transform `stage(state, ctx) -> (state, record)`.

A stage reads its section (`ctx.stage`, every field of its kind) and the shared pieces (the
trainer, teacher, task data, mesh, its workdir) from `ctx`, a read-only StageContext. What it
measured or made for later stages (dev scores, the teacher layers a student copies, augmented
data, the fine-tuned teacher) it returns in a StageRecord; the runner folds the record into the
next stage's context (`fold`). A stage's config side (fields, defaults, checks) is
`stage_config.KINDS[kind]`; its run side is `STAGES[kind]`.
"""
import dataclasses
import itertools
import logging
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bitbert_jax import distributed
from bitbert_jax import fs
from bitbert_jax import sharding
from bitbert_jax import train as train_lib
from bitbert_jax.data import batching
from bitbert_jax.distill import layer_map as layer_map_lib
from bitbert_jax.distill import losses
from bitbert_jax.distill import narrow as narrow_lib
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.distill import stage_config
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertModel
from bitbert_jax.train_state import adapt_params, init_variables, new_state, with_policy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What a stage may use, read-only. `train` is the trainer (`train.train`'s signature);
  `data` a TaskData (train/dev splits, tokenizer) or None."""
  config: Any  # the whole run's config (a FrozenConfigDict)
  mesh: Any
  writer: Any
  train: Callable
  name: str = ''
  stage: Any = None  # this stage's section (a FrozenConfigDict: every field of its kind)
  workdir: str = ''  # this stage's directory
  task: Any = None
  data: Any = None
  teacher: objective_lib.Teacher | None = None
  pretrained: objective_lib.Teacher | None = None
  corpus: Callable | None = None  # corpus(batch_size, epoch, repeat) -> iterator of batches
  tokenizer_dir: str | None = None  # the run's tokenizer files (the teacher's HF export)
  student_layers: tuple[int, ...] | None = None  # teacher layers the student was built from
  # per student layer, the teacher heads its heads were kept from (a student narrower than its
  # teacher; None: the teacher's heads)
  student_heads: tuple[tuple[int, ...], ...] | None = None
  augmented: Any = None  # EncodedSplit of the augment stage before, if any


@dataclasses.dataclass(frozen=True)
class StageRecord:
  """What a stage measured or made: `dev` (its kept parameters' dev metrics) is reported; the
  CARRIED fields, when set, replace the context's for the stages after it."""
  dev: dict | None = None
  student_layers: tuple[int, ...] | None = None
  student_heads: tuple[tuple[int, ...], ...] | None = None
  augmented: Any = None
  teacher: objective_lib.Teacher | None = None


CARRIED = ('student_layers', 'student_heads', 'augmented', 'teacher')


def fold(ctx, record):
  """The context for the stages after one that returned `record`."""
  given = {k: getattr(record, k) for k in CARRIED if getattr(record, k) is not None}
  return dataclasses.replace(ctx, **given)


def settings(ctx):
  """Training settings: the stage's own fields over the run's (`stage_config.resolve`)."""
  c = ctx.config
  task_train = getattr(ctx.data, 'train', None)
  per_epoch = None if task_train is None else (
      lambda b: batching.num_batches(task_train, b, drop_remainder=True))
  v = {k: r.value for k, r in stage_config.resolve(c, ctx.name, per_epoch).items()}
  return train_lib.Settings(
      lr=v['lr'], epochs=v['epochs'], batch_size=v['batch_size'], warmup=v['warmup'],
      float_lr=v['float_lr'], float_warmup=v['float_warmup'], warmin=v['warmin'],
      weight_decay=c.optim.weight_decay, clip_norm=c.optim.clip_norm,
      max_steps=v['max_steps'], log_every=c.train.log_every, eval_every=v['eval_every'],
      keep_best=v['keep_best'], checkpoint_every_steps=c.train.checkpoint_every_steps,
      checkpoint_every_secs=c.train.checkpoint_every_secs,
      keep_checkpoints=c.train.keep_checkpoints, skip_nonfinite=c.train.skip_nonfinite,
      grad_accum_steps=c.train.grad_accum_steps, report_memory=c.train.report_memory,
      field=f'config.stages.{ctx.name}')


def _task_batches(ctx):
  train = ctx.augmented if ctx.stage.data == 'augmented' else ctx.data.train
  if train is None:
    raise BitbertError(f'config.stages.{ctx.name}.data=augmented but no augment stage ran before')
  return batching.TaskBatches(train, settings(ctx).batch_size, ctx.config.seed)


def _train(state, ctx, objective, batches, teacher):
  """(state, dev metrics or None) from the context's trainer."""
  return ctx.train(state, name=ctx.name, objective=objective, settings=settings(ctx),
                   batches=batches, mesh=ctx.mesh, workdir=ctx.workdir, writer=ctx.writer,
                   task=ctx.task, dev_sets=ctx.data.dev if ctx.data else None, teacher=teacher)


def _teacher(ctx):
  if ctx.teacher is None:
    raise BitbertError(f'stage {ctx.name!r} needs a fine-tuned teacher: set config.teacher to a '
                       'checkpoint dir, or put a finetune stage before it')
  return ctx.teacher


def attach_head(state, task, rng_seed=0):
  """Adds a fresh classifier (or regression) head when the student has none for this task."""
  cfg = state.model_config
  if cfg.num_labels == task.num_labels:
    return state
  cfg = cfg.replace(num_labels=task.num_labels, label_names=tuple(task.label_names or ()),
                    problem_type='regression' if task.is_regression else
                    'single_label_classification')
  fresh = init_variables(BertModel(cfg, state.policy), jax.random.PRNGKey(rng_seed))['params']
  params = adapt_params({k: v for k, v in state.params.items() if k != 'classifier'}, fresh)
  return state.replace(model_config=cfg, params=params)


def finetune(state, ctx):
  """Stage 0: the teacher, fine-tuned on gold labels from the pre-trained model's state; it is
  also written as a Hugging Face checkpoint under the stage's `hf/`."""
  state = attach_head(state, ctx.task, ctx.config.seed)
  state, dev = _train(state, ctx, objective_lib.Objective(('label',)), _task_batches(ctx), None)
  return state, _teacher_record(state, ctx, dev)


def _teacher_record(state, ctx, dev):
  teacher = objective_lib.Teacher(state.model_config, distributed.fetch(state.params))
  if jax.process_index() == 0:
    _export_hf(fs.join(ctx.workdir, 'hf'), teacher, ctx.tokenizer_dir)
  return StageRecord(dev=dev, teacher=teacher)


def _export_hf(out_dir, teacher, tokenizer_dir):
  """The teacher for transformers (once: an existing export is kept)."""
  from bitbert_jax import hf  # pylint: disable=g-import-not-at-top
  if fs.is_published(out_dir, hf.SAFETENSORS):  # a bucket's copy: its weights come last
    return
  with fs.published(out_dir, hf.SAFETENSORS) as local:
    parent, stale = os.path.dirname(local), f'.{os.path.basename(local)}.tmp-'
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):  # an export killed midway (hf writes to a temp dir first)
      if name.startswith(stale):
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    hf.save_hf_checkpoint(teacher.config.replace(dtype='float32'), teacher.params, local,
                          tokenizer_dir=tokenizer_dir)


def _copied_student(state, ctx, num_layers, keep_head, source_field):
  """A student copying the stage's `layers` of the model in `state` (empty = the XTC default
  for `num_layers`, 0: all), with its embeddings and pooler, and its head if `keep_head`."""
  n = state.model_config.num_hidden_layers
  layers = stage_config.copied_layers(ctx.stage, f'config.stages.{ctx.name}', num_layers, n,
                                      source_field)
  host = jax.tree.map(np.asarray, distributed.fetch(dict(state.params)))
  params = {k: v for k, v in host.items() if keep_head or k != 'classifier'}
  params['encoder'] = {f'layer_{i}': state.params['encoder'][f'layer_{l}']
                       for i, l in enumerate(layers)}
  cfg = state.model_config.replace(num_hidden_layers=len(layers), dtype=ctx.config.model.dtype,
                                   remat=ctx.config.model.remat)
  if not keep_head:
    cfg = cfg.replace(num_labels=0, label_names=())
  student = new_state(cfg, params, rng=jax.random.PRNGKey(ctx.config.seed))
  return student, StageRecord(student_layers=tuple(layers))


def init_student(state, ctx):
  """General KD's starting point, derived from the pre-trained model's state: a random student
  of `stage_config.student_config` created already sharded (TinyBERT), or with `init:
  pretrained` a copy of some of its layers at its width, headless like the random one (a short
  general KD then starts from a working model instead of noise)."""
  field = f'config.stages.{ctx.name}'
  cfg = stage_config.student_config(ctx.stage, field, state.model_config, ctx.config.model)
  if ctx.stage.init == 'pretrained':
    student, record = _copied_student(state, ctx, cfg.num_hidden_layers, False,
                                      'config.pretrained')
    return _narrowed(student, record, ctx, field)
  model = BertModel(cfg)
  rng = jax.random.PRNGKey(ctx.config.seed)
  abstract = jax.eval_shape(lambda r: init_variables(model, r)['params'], rng)
  shardings = sharding.param_shardings(ctx.mesh, model, abstract)
  params = jax.jit(lambda r: init_variables(model, r)['params'], out_shardings=shardings)(rng)
  heads = None
  if cfg.num_attention_heads < state.model_config.num_attention_heads:
    # A random head has no origin: head h learns from the teacher's head h.
    heads = (tuple(range(cfg.num_attention_heads)),) * cfg.num_hidden_layers
    log.info('[%s] narrow random student: %d of %d heads, %d FFN neurons; the attention loss '
             'compares head h with the teacher\'s head h', ctx.name, cfg.num_attention_heads,
             state.model_config.num_attention_heads, cfg.intermediate_size)
  return new_state(cfg, params, rng=rng), StageRecord(student_heads=heads)


def _narrowed(student, record, ctx, field):
  """The copied student at the stage's width (`stage_config.narrow_width`): the heads and FFN
  neurons of highest importance (`narrow`), and the head map of what it kept."""
  full = student.model_config
  heads, neurons = stage_config.narrow_width(ctx.stage, field, full)
  if (heads, neurons) == (full.num_attention_heads, full.intermediate_size):
    return student, record
  params = distributed.fetch(student.params)
  if ctx.stage.importance == 'taylor':
    scores = _taylor_scores(full, params, record.student_layers, ctx, field)
  else:
    scores = narrow_lib.magnitude_importance(full, params)
  kept = narrow_lib.most_important(*scores, heads, neurons)
  cfg, params = narrow_lib.narrow(full, params, kept)
  log.info('[%s] narrow student: per layer the %d of %d heads and %d of %d FFN neurons of '
           'highest %s importance; the attention loss compares each head with the teacher head '
           'it was kept from (heads kept: %s)', ctx.name, heads, full.num_attention_heads,
           neurons, full.intermediate_size, ctx.stage.importance, [list(h) for h in kept.heads])
  return (new_state(cfg, params, rng=jax.random.PRNGKey(ctx.config.seed)),
          dataclasses.replace(record, student_heads=kept.heads))


def reduce_layers(state, ctx):
  """XTC initialisation, derived from the task teacher's state: the student copies a list of
  its layers, its embeddings, pooler and head; `layers` empty = the XTC default for
  `num_layers` (0: all)."""
  return _copied_student(state, ctx, ctx.stage.num_layers, True, 'the fine-tuned teacher')


def _layer_map(ctx, student_cfg, teacher_cfg):
  layers = ctx.stage.layers or ctx.student_layers
  if layers:
    return layer_map_lib.from_layers(list(layers), teacher_cfg.num_hidden_layers)
  return layer_map_lib.uniform(teacher_cfg.num_hidden_layers, student_cfg.num_hidden_layers)


def _taylor_scores(cfg, params, layers, ctx, field):
  """Taylor importance of the copied student's heads and neurons for its first task-KD
  objective: the Stage-I losses (attention-score and hidden-state MSE) against the fine-tuned
  teacher, dropout off, over `importance_batches` task batches (every host the same ones)."""
  teacher = ctx.teacher
  stage_config.check_taylor_teacher(None if ctx.data is None or teacher is None
                                    else teacher.config, cfg, field)
  t = teacher.config
  lmap = layer_map_lib.from_layers(list(layers), t.num_hidden_layers)
  exact = dict(dtype='float32', remat=False, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
  teacher_model = BertModel(t.replace(**exact))

  def loss_fn(forward, batch, params, teacher_params):
    out = forward(params, batch)
    ref = jax.lax.stop_gradient(teacher_model.apply(
        {'params': teacher_params}, batch['input_ids'], batch['attention_mask'],
        batch['token_type_ids']))
    w, mask = batch['weights'], batch['attention_mask']
    attn = sum(losses.attention_mse(s, ref.attention_scores[j], mask, w)
               for s, j in zip(out.attention_scores, lmap.attention))
    return attn + sum(losses.hidden_mse(s, ref.hidden_states[j], w)
                      for s, j in zip(out.hidden_states, lmap.hidden))

  batch_size = min(ctx.config.train.batch_size, len(ctx.data.train))
  batches = itertools.islice(batching.epoch_batches(
      ctx.data.train, batch_size, seed=ctx.config.seed, drop_remainder=True),
      ctx.stage.importance_batches)
  return narrow_lib.taylor_importance(BertModel(cfg.replace(**exact)), loss_fn, batches, params,
                                      distributed.fetch(teacher.params))


def _head_map(ctx, student_cfg, teacher_cfg):
  """Which teacher head each student head's attention is compared with: None (head h with head
  h) at equal head counts, else the heads a narrow student was kept from (`student_heads`)."""
  if student_cfg.num_attention_heads == teacher_cfg.num_attention_heads:
    return None
  heads = ctx.student_heads
  if heads is None or len(heads) != student_cfg.num_hidden_layers:
    raise BitbertError(f'config.stages.{ctx.name}: the student has '
                       f'{student_cfg.num_attention_heads} attention heads, its teacher '
                       f'{teacher_cfg.num_attention_heads}, and no record of which teacher heads '
                       'it was kept from (an init_student stage with width < 1 makes one)')
  log.info('[%s] attention loss: each of the %d student heads against one teacher head, as '
           'init_student recorded them (per layer: %s)', ctx.name,
           student_cfg.num_attention_heads, [list(h) for h in heads])
  return heads


def _with_projection(state, teacher_cfg, seed):
  """A learned student->teacher width map for the hidden loss, when the student is narrower."""
  s, t = state.model_config.hidden_size, teacher_cfg.hidden_size
  if s == t:
    return state.replace(aux_params={})
  if s > t:
    raise BitbertError(f'student hidden_size {s} is wider than the teacher\'s {t}: not supported')
  kernel = jax.random.normal(jax.random.PRNGKey(seed), (s, t), jnp.float32) * 0.02
  return state.replace(aux_params={'hidden_proj': {'kernel': kernel,
                                                   'bias': jnp.zeros((t,), jnp.float32)}})


def general_kd(state, ctx):
  """Task-agnostic distillation from the pre-trained teacher over a text corpus (Stage-I losses)."""
  teacher = ctx.pretrained
  objective = objective_lib.Objective(stage_config.LOSS_SETS['stage1'],
                                      _layer_map(ctx, state.model_config, teacher.config),
                                      head_map=_head_map(ctx, state.model_config, teacher.config))
  state = _with_projection(state, teacher.config, ctx.config.seed)
  sets = settings(ctx)
  batches = batching.StreamBatches(
      lambda epoch, repeat: ctx.corpus(sets.batch_size, epoch, repeat),
      ctx.stage.steps_per_epoch, sets.batch_size, name=getattr(ctx.corpus, 'name', 'corpus'),
      field=sets.field, wrap=ctx.stage.wrap_corpus)
  if not sets.epochs and sets.max_steps <= 0:
    raise BitbertError(f'config.stages.{ctx.name}: give epochs or max_steps')
  state, dev = _train(state, ctx, objective, batches, teacher)
  return state.replace(aux_params={}), StageRecord(dev=dev)  # the projection is discarded


def task_kd(state, ctx):
  """Task distillation from the fine-tuned teacher: losses 'stage1', 'stage2' or 'all'."""
  teacher = _teacher(ctx)
  state = attach_head(state, ctx.task, ctx.config.seed)
  st = ctx.stage
  weights = tuple((k, float(st[f'{k}_weight'])) for k in ('pred', 'attn', 'hidden'))
  head_map = (_head_map(ctx, state.model_config, teacher.config)
              if 'attn' in stage_config.LOSS_SETS[st.losses] else None)
  objective = objective_lib.Objective(stage_config.LOSS_SETS[st.losses],
                                      _layer_map(ctx, state.model_config, teacher.config),
                                      st.temperature, weights, st.attn_loss, head_map)
  if 'hidden' in objective.losses:
    state = _with_projection(state, teacher.config, ctx.config.seed)
  state, dev = _train(state, ctx, objective, _task_batches(ctx), teacher)
  return state.replace(aux_params={}), StageRecord(dev=dev)


def quantize(state, ctx):
  """Switches the quantization policy (e.g. FP32 -> 2-bit -> 1-bit); latent weights carry over."""
  policy = stage_config.policy(ctx.stage.bits, ctx.config.quant)
  state = with_policy(state, policy, ctx.data.sample_batch() if ctx.data else None)
  return state, StageRecord()


def split(state, ctx):
  """Ternary -> binary weight splitting: the binary model computes the same function."""
  del ctx
  from bitbert_jax import split as split_lib  # pylint: disable=g-import-not-at-top
  params, policy = split_lib.split_params(distributed.fetch(state.params), state.policy)
  return state.replace(params=params, policy=policy), StageRecord()


def augment(state, ctx):
  """Builds the augmented task set (cached in the stage's workdir); the state passes through."""
  from bitbert_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  return state, StageRecord(augmented=augment_lib.augmented_split(ctx))


# How the runner drives each kind.


def _from_pretrained(state, ctx):
  """The pre-trained model's state: what finetune and init_student start from."""
  del state
  if ctx.pretrained is None:
    raise BitbertError(f'stage {ctx.name!r} starts from config.pretrained, which is not loaded')
  return new_state(ctx.pretrained.config, ctx.pretrained.params)


def _from_teacher(state, ctx):
  """The fine-tuned teacher's state: what reduce_layers starts from."""
  del state
  teacher = _teacher(ctx)
  return new_state(teacher.config, teacher.params)


def _resume(state, ctx, info):
  """The record of a completed stage, from its stage.json."""
  del state, ctx
  layers, heads = info.get('student_layers'), info.get('student_heads')
  return StageRecord(dev=info.get('dev'), student_layers=tuple(layers) if layers else None,
                     student_heads=tuple(map(tuple, heads)) if heads else None)


@dataclasses.dataclass(frozen=True)
class Stage:
  """A kind's run side. run(state, ctx) -> (state, record); start(state, ctx): the state run
  receives (default: the previous stage's); resume(state, ctx, info) -> the record of a stage
  completed earlier (loaded state and stage.json); skip(ctx): why it is skipped, or None."""
  run: Callable
  start: Callable = lambda state, ctx: state
  resume: Callable = _resume
  skip: Callable = lambda ctx: None


STAGES = {
    'finetune': Stage(finetune, start=_from_pretrained,
                      resume=lambda state, ctx, info: _teacher_record(state, ctx,
                                                                      info.get('dev')),
                      skip=lambda ctx: 'config.teacher is set' if ctx.config.teacher else None),
    'init_student': Stage(init_student, start=_from_pretrained),
    'reduce_layers': Stage(reduce_layers, start=_from_teacher),
    'general_kd': Stage(general_kd),
    'task_kd': Stage(task_kd),
    'quantize': Stage(quantize),
    'split': Stage(split),
    # Its product is data, not parameters: a completed augment stage runs again (a cache hit).
    'augment': Stage(augment, resume=lambda state, ctx, info: augment(state, ctx)[1]),
}
