"""Stages: each is a train-state transform `stage(state, ctx) -> (state, record)`.

A stage reads its section (`ctx.stage`, every field of its kind) and the shared pieces (the
trainer, teacher, task data, mesh, its workdir) from `ctx`, a read-only StageContext. What it
measured or made for later stages (dev scores, the teacher layers a student copies, augmented
data, the fine-tuned teacher) it returns in a StageRecord; the runner folds the record into the
next stage's context (`fold`). A stage's config side (fields, defaults, checks) is
`stage_config.KINDS[kind]`; its run side is `STAGES[kind]`.
"""
import dataclasses
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bitbert_jax import fs
from bitbert_jax import sharding
from bitbert_jax import train as train_lib
from bitbert_jax.data import batching
from bitbert_jax.distill import layer_map as layer_map_lib
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.distill import stage_config
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertModel
from bitbert_jax.train_state import adapt_params, init_variables, new_state, with_policy


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
  augmented: Any = None  # EncodedSplit of the augment stage before, if any


@dataclasses.dataclass(frozen=True)
class StageRecord:
  """What a stage measured or made: `dev` (its kept parameters' dev metrics) is reported; the
  CARRIED fields, when set, replace the context's for the stages after it."""
  dev: dict | None = None
  student_layers: tuple[int, ...] | None = None
  augmented: Any = None
  teacher: objective_lib.Teacher | None = None


CARRIED = ('student_layers', 'augmented', 'teacher')


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
  teacher = objective_lib.Teacher(state.model_config, jax.device_get(state.params))
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
  params = {k: v for k, v in jax.tree.map(np.asarray, dict(state.params)).items()
            if keep_head or k != 'classifier'}
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
  cfg = stage_config.student_config(ctx.stage, f'config.stages.{ctx.name}', state.model_config,
                                    ctx.config.model)
  if ctx.stage.init == 'pretrained':
    return _copied_student(state, ctx, cfg.num_hidden_layers, False, 'config.pretrained')
  model = BertModel(cfg)
  rng = jax.random.PRNGKey(ctx.config.seed)
  abstract = jax.eval_shape(lambda r: init_variables(model, r)['params'], rng)
  shardings = sharding.param_shardings(ctx.mesh, model, abstract)
  params = jax.jit(lambda r: init_variables(model, r)['params'], out_shardings=shardings)(rng)
  return new_state(cfg, params, rng=rng), StageRecord()


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
  if state.model_config.num_attention_heads != teacher.config.num_attention_heads:
    raise BitbertError(f'config.stages.{ctx.name}: student and teacher need equal head counts')
  objective = objective_lib.Objective(stage_config.LOSS_SETS['stage1'],
                                      _layer_map(ctx, state.model_config, teacher.config))
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
  objective = objective_lib.Objective(stage_config.LOSS_SETS[st.losses],
                                      _layer_map(ctx, state.model_config, teacher.config),
                                      st.temperature, weights, st.attn_loss)
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
  params, policy = split_lib.split_params(jax.device_get(state.params), state.policy)
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
  layers = info.get('student_layers')
  return StageRecord(dev=info.get('dev'), student_layers=tuple(layers) if layers else None)


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
