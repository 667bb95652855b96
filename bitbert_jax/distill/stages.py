"""Stages: each is a train-state transform `stage(state, ctx) -> state`.

A stage reads its settings from `ctx.stage` (its config section) and the shared pieces (teacher,
task data, mesh, workdir) from the context; it never reaches into the pipeline around it.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bitbert_jax import sharding
from bitbert_jax import train as train_lib
from bitbert_jax.data import batching
from bitbert_jax.distill import layer_map as layer_map_lib
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertModel
from bitbert_jax.quant.policy import QuantPolicy, policy_from_name
from bitbert_jax.train_state import adapt_params, init_variables, new_state, with_policy

LOSS_SETS = {'stage1': ('attn', 'hidden'), 'stage2': ('pred',), 'all': ('pred', 'attn', 'hidden'),
             'label': ('label',)}


@dataclasses.dataclass
class StageContext:
  """What a stage may use. `data` is a TaskData (train/dev splits, tokenizer) or None."""
  name: str
  stage: Any  # this stage's ConfigDict
  config: Any  # the whole run's ConfigDict
  workdir: str
  mesh: Any
  writer: Any
  task: Any = None
  data: Any = None
  teacher: objective_lib.Teacher | None = None
  pretrained: objective_lib.Teacher | None = None
  corpus: Callable | None = None  # corpus(batch_size, epoch, repeat) -> iterator of batches
  student_layers: tuple[int, ...] | None = None  # teacher layers the student was built from
  results: dict = dataclasses.field(default_factory=dict)  # a stage's dev metrics go here


def settings(ctx):
  """Training settings: the stage's own fields over the run's optim/train sections."""
  s, c = ctx.stage, ctx.config
  get = lambda k, default: s.get(k, default) if s.get(k, None) is not None else default
  batch_size = get('batch_size', c.train.batch_size)
  eval_every = get('eval_every', c.train.eval_every)
  task_train = getattr(getattr(ctx, 'data', None), 'train', None)
  if not eval_every and s.get('data', 'task') == 'augmented' and task_train is not None:
    # an augmented epoch is N + 1 task epochs: evaluate (and keep the best) once per task epoch
    eval_every = max(1, batching.num_batches(task_train, batch_size, drop_remainder=True))
  return train_lib.Settings(
      lr=get('lr', c.optim.lr), epochs=get('epochs', 1.0),
      batch_size=batch_size, warmup=get('warmup', c.optim.warmup),
      float_lr=get('float_lr', c.optim.get('float_lr', 0.0)),
      float_warmup=get('float_warmup', c.optim.get('float_warmup')),
      warmin=get('warmin', c.quant.get('warmin', 0.0)),
      weight_decay=c.optim.weight_decay, clip_norm=c.optim.clip_norm,
      max_steps=get('max_steps', -1), log_every=c.train.log_every,
      eval_every=eval_every, keep_best=get('keep_best', True),
      checkpoint_every_steps=c.train.checkpoint_every_steps,
      checkpoint_every_secs=c.train.checkpoint_every_secs,
      keep_checkpoints=c.train.keep_checkpoints, skip_nonfinite=c.train.skip_nonfinite,
      grad_accum_steps=c.train.grad_accum_steps, report_memory=c.train.report_memory,
      field=f'config.stages.{ctx.name}')


def _task_batches(ctx, batch_size):
  train = ctx.data.augmented if ctx.stage.get('data', 'task') == 'augmented' else ctx.data.train
  if train is None:
    raise BitbertError(f'config.stages.{ctx.name}.data=augmented but no augment stage ran before')
  return batching.TaskBatches(train, batch_size, ctx.config.seed)


def _run(state, ctx, objective, batches, teacher):
  state, evals = train_lib.train(
      state, name=ctx.name, objective=objective, settings=settings(ctx), batches=batches,
      mesh=ctx.mesh, workdir=ctx.workdir, writer=ctx.writer, task=ctx.task,
      dev_sets=ctx.data.dev if ctx.data else None, teacher=teacher)
  if evals is not None:
    ctx.results.update(evals)
  return state


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
  """Stage 0: the teacher, fine-tuned on gold labels from a pre-trained checkpoint."""
  state = attach_head(state, ctx.task, ctx.config.seed)
  return _run(state, ctx, objective_lib.Objective(('label',)), _task_batches(ctx, settings(ctx).batch_size),
              None)


def _student_config(ctx, base):
  s = ctx.stage
  hidden = s.get('hidden_size') or base.hidden_size
  # Default: half the teacher's depth at its width, so that the uniform layer map applies.
  depth = s.get('num_layers') or max(1, base.num_hidden_layers // 2)
  kw = dict(num_hidden_layers=depth, hidden_size=hidden,
            intermediate_size=s.get('intermediate_size') or 4 * hidden, num_labels=0,
            label_names=(), dtype=ctx.config.model.dtype, remat=ctx.config.model.remat)
  return base.replace(**kw)


def _copied_student(ctx, source, num_layers, keep_head):
  """A student copying the stage's `layers` of `source` (a Teacher; empty = the XTC default for
  `num_layers`), with its embeddings and pooler, and its head if `keep_head`."""
  n = source.config.num_hidden_layers
  layers = list(ctx.stage.get('layers') or []) or layer_map_lib.xtc_default_layers(n, num_layers)
  layer_map_lib.check_layer_list(layers, n, f'config.stages.{ctx.name}.layers')
  ctx.student_layers = tuple(layers)
  params = {k: v for k, v in jax.tree.map(np.asarray, dict(source.params)).items()
            if keep_head or k != 'classifier'}
  params['encoder'] = {f'layer_{i}': source.params['encoder'][f'layer_{l}']
                       for i, l in enumerate(layers)}
  cfg = source.config.replace(num_hidden_layers=len(layers), dtype=ctx.config.model.dtype,
                              remat=ctx.config.model.remat)
  if not keep_head:
    cfg = cfg.replace(num_labels=0, label_names=())
  return new_state(cfg, params, rng=jax.random.PRNGKey(ctx.config.seed))


def init_student(state, ctx):
  """General KD's starting point: a random student created already sharded (TinyBERT), or with
  `init: pretrained` a copy of some of config.pretrained's layers at its width, headless like the
  random one (a short general KD then starts from a working model instead of noise)."""
  del state
  base = ctx.pretrained.config
  cfg = _student_config(ctx, base)
  if cfg.num_attention_heads != base.num_attention_heads:
    raise BitbertError(f'config.stages.{ctx.name}: the student needs the teacher\'s '
                       f'{base.num_attention_heads} attention heads for the attention loss')
  if ctx.stage.get('init', 'random') == 'pretrained':
    return _copied_student(ctx, ctx.pretrained, cfg.num_hidden_layers, keep_head=False)
  model = BertModel(cfg)
  rng = jax.random.PRNGKey(ctx.config.seed)
  abstract = jax.eval_shape(lambda r: init_variables(model, r)['params'], rng)
  shardings = sharding.param_shardings(ctx.mesh, model, abstract)
  params = jax.jit(lambda r: init_variables(model, r)['params'], out_shardings=shardings)(rng)
  return new_state(cfg, params, rng=rng)


def reduce_layers(state, ctx):
  """XTC initialisation: the student copies a list of the task teacher's layers, its embeddings,
  pooler and head; `layers` empty = the XTC default for `num_layers`."""
  del state
  n = ctx.teacher.config.num_hidden_layers
  return _copied_student(ctx, ctx.teacher, ctx.stage.get('num_layers') or n, keep_head=True)


def _layer_map(ctx, student_cfg, teacher_cfg):
  layers = ctx.stage.get('layers') or ctx.student_layers
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
  objective = objective_lib.Objective(LOSS_SETS['stage1'],
                                  _layer_map(ctx, state.model_config, teacher.config))
  state = _with_projection(state, teacher.config, ctx.config.seed)
  sets = settings(ctx)
  batches = batching.StreamBatches(
      lambda epoch, repeat: ctx.corpus(sets.batch_size, epoch, repeat),
      ctx.stage.get('steps_per_epoch') or 1000, sets.batch_size,
      name=getattr(ctx.corpus, 'name', 'corpus'), field=sets.field,
      wrap=ctx.stage.get('wrap_corpus', True))
  if not sets.epochs and sets.max_steps <= 0:
    raise BitbertError(f'config.stages.{ctx.name}: give epochs or max_steps')
  state = _run(state, ctx, objective, batches, teacher)
  return state.replace(aux_params={})  # the projection is discarded after distillation


def task_kd(state, ctx):
  """Task distillation from the fine-tuned teacher: losses 'stage1', 'stage2' or 'all'."""
  which = ctx.stage.get('losses', 'all')
  if which not in LOSS_SETS or which == 'label':
    raise BitbertError(f'config.stages.{ctx.name}.losses={which!r}; valid: stage1, stage2, all')
  state = attach_head(state, ctx.task, ctx.config.seed)
  st = ctx.stage
  weights = tuple((k, float(st.get(f'{k}_weight', 1.0))) for k in ('pred', 'attn', 'hidden'))
  objective = objective_lib.Objective(LOSS_SETS[which],
                                  _layer_map(ctx, state.model_config, ctx.teacher.config),
                                  st.get('temperature', 1.0), weights, st.get('attn_loss', 'mse'))
  if 'hidden' in objective.losses:
    state = _with_projection(state, ctx.teacher.config, ctx.config.seed)
  if which == 'stage1' and ctx.stage.get('keep_best') is None:
    ctx.stage.keep_best = False  # intermediate losses say nothing about dev accuracy
  state = _run(state, ctx, objective, _task_batches(ctx, settings(ctx).batch_size), ctx.teacher)
  return state.replace(aux_params={})


def quantize(state, ctx):
  """Switches the quantization policy (e.g. FP32 -> 2-bit -> 1-bit); latent weights carry over."""
  q = ctx.config.quant
  policy = policy_from_name(ctx.stage.bits, weight_groups=q.weight_groups,
                            ffn_output_bits=q.ffn_output_bits or None,
                            act_mode=q.act_mode or None,
                            binary_mode=q.get('binary_mode', 'bwn'))
  return with_policy(state, policy, ctx.data.sample_batch() if ctx.data else None)


def split(state, ctx):
  """Ternary -> binary weight splitting: the binary model computes the same function."""
  del ctx
  from bitbert_jax import split as split_lib  # pylint: disable=g-import-not-at-top
  params, policy = split_lib.split_params(jax.device_get(state.params), state.policy)
  return state.replace(params=params, policy=policy)


def augment(state, ctx):
  """Builds the augmented task set (cached in the workdir); the state passes through."""
  from bitbert_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  ctx.data.augmented = augment_lib.augmented_split(ctx)
  return state


STAGES = {'finetune': finetune, 'init_student': init_student, 'reduce_layers': reduce_layers,
          'general_kd': general_kd, 'task_kd': task_kd, 'quantize': quantize, 'split': split,
          'augment': augment}
TRAINING_STAGES = ('finetune', 'general_kd', 'task_kd')
