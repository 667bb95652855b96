"""A run's inputs, checked before anything is written: config fields, paths, then model fit.

`validate_config` needs the config alone (plus the device count and a look at the files it
names); `check_models` runs once the checkpoints and the tokenizer are loaded and checks that
they fit the pipeline (layer lists, widths, heads, vocabulary, the teacher's head). A stage's
own section is checked by its kind (`stage_config.KINDS`); this module checks the run-wide
sections and asks each stage in turn. Every failure is a BitbertError that names the config
field, file or tensor and the valid choices.
"""
import math
import os

from bitbert_jax import paths
from bitbert_jax.checks import check_bool, check_choice, check_int, check_number, is_int
from bitbert_jax.distill import stage_config
from bitbert_jax.errors import BitbertError

_SNIFF_BYTES = 1 << 16


def stage_names(config):
  """The pipeline's stage names, each defined in config.stages with a known kind."""
  names = [n.strip() for n in str(config.pipeline).split(',') if n.strip()]
  if not names:
    raise BitbertError('config.pipeline is empty; list stage names, comma-separated (defined: '
                       f'{", ".join(config.stages) or "none"})')
  for n in names:
    if n not in config.stages:
      raise BitbertError(f'config.pipeline names stage {n!r}, which is not in config.stages '
                         f'(defined: {", ".join(config.stages)})')
    kind = config.stages[n].get('kind')
    if kind not in stage_config.KINDS:
      raise BitbertError(f'config.stages.{n}.kind={kind!r} is not a stage; valid: '
                         f'{", ".join(stage_config.KINDS)}')
  return names


def validate_config(config, num_devices=None):
  """Checks every field of a run's config; returns the pipeline's stage names."""
  names = stage_names(config)
  check_int(config.seed, 'config.seed', 0)
  _check_task(config.task)
  check_choice(config.model.dtype, 'config.model.dtype', _dtypes())
  check_bool(config.model.remat, 'config.model.remat')
  _check_optim(config.optim)
  _check_train(config.train)
  data_parallel = _check_mesh(config.mesh, num_devices)
  for i, name in enumerate(names):  # each stage's kind checks its own section
    before = [config.stages[b].kind for b in names[:i]]
    stage_config.KINDS[config.stages[name].kind].check(config, name, before, data_parallel)
  _check_export(config.export)
  _check_paths(config, names)
  return names


def _dtypes():
  from bitbert_jax.model.config import TRAIN_DTYPES  # pylint: disable=g-import-not-at-top
  return TRAIN_DTYPES


def _check_task(t):
  from bitbert_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  check_int(t.max_length, 'config.task.max_length', 3, ' ([CLS], [SEP] and a token)')
  check_int(t.max_train_examples, 'config.task.max_train_examples', -1, ' (-1 or 0: all)')
  check_int(t.max_dev_examples, 'config.task.max_dev_examples', -1, ' (-1 or 0: all)')
  if t.train_file:
    _check_custom_task(t)
    return
  if t.problem != 'auto':  # GLUE tasks come with their own label kind
    raise BitbertError(f'config.task.problem={t.problem!r} is for custom tasks '
                       '(config.task.train_file); a GLUE task keeps its own labels: leave it auto')
  try:
    task = data_lib.get_task(t.name)
  except BitbertError as e:
    raise BitbertError(f'config.task.name: {e}; or set config.task.train_file for your own '
                       'data') from None
  check_int(t.max_length, 'config.task.max_length', 2 * len(task.text_fields) + 1,
             f' ([CLS], [SEP] and a token per text of {task.name})')
  if t.glue_dir and not os.path.isdir(t.glue_dir):
    raise BitbertError(f'config.task.glue_dir={t.glue_dir!r}: no such directory; valid: the '
                       'GLUE root holding MRPC/, SST-2/, ... (or env GLUE_DIR), or \'\' for the '
                       'Hugging Face hub')


def _check_custom_task(t):
  from bitbert_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  for field in ('train_file', 'dev_file'):
    path = t[field]
    if not path:
      raise BitbertError(f'config.task.{field} is empty; a custom task needs both train_file '
                         'and dev_file (.tsv, .csv or .jsonl)')
    ext = os.path.splitext(path)[1].lower()
    if ext not in ('.tsv', '.csv', '.jsonl'):
      raise BitbertError(f'config.task.{field}={path!r}: unsupported extension {ext!r}; '
                         'valid: .tsv, .csv, .jsonl')
    if not os.path.isfile(path):
      parent = os.path.dirname(os.path.abspath(path))
      listing = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
      where = f'files in {parent}: {listing}' if listing is not None else \
          f'folder {parent} does not exist'
      raise BitbertError(f'config.task.{field}={path!r}: no such file; {where}')
  named = file_columns(t)
  if named is not None:
    if len(set(named)) != len(named):
      raise BitbertError(f'config.task.columns={t.columns!r}: column names must be distinct')
    if t.train_file.lower().endswith('.jsonl') or t.dev_file.lower().endswith('.jsonl'):
      raise BitbertError(f'config.task.columns={t.columns!r}: names the columns of headerless '
                         '.tsv/.csv files; a .jsonl line names its own fields')
    if t.label_column not in named:
      raise BitbertError(f'config.task.label_column={t.label_column!r} is not among '
                         f'config.task.columns={t.columns!r}')
  columns = text_columns(t)
  if named is not None and not set(columns) <= set(named):
    raise BitbertError(f'config.task.text_columns={t.text_columns!r}: not among '
                       f'config.task.columns={t.columns!r}')
  if len(columns) not in (1, 2):
    raise BitbertError(f'config.task.text_columns={t.text_columns!r}: name one or two text '
                       'columns, comma-separated (e.g. "sentence1,sentence2")')
  labels = tuple(str(t.label_names).split(',')) if t.label_names else None
  data_lib.tasks.check_problem(t.problem, t.label_names)
  try:
    data_lib.custom_task(t.name, columns, labels)
  except BitbertError as e:
    raise BitbertError(f'config.task: {e}') from None


def file_columns(t):
  """config.task.columns as a tuple (a headerless file's column names), or None (a header)."""
  names = tuple(c.strip() for c in str(t.get('columns') or '').split(','))
  return names if any(names) else None


def text_columns(t):
  """config.task.text_columns; with config.task.columns and none given, all but the label."""
  named = file_columns(t)
  given = tuple(c.strip() for c in str(t.text_columns).split(',') if c.strip())
  if not given and named is not None:
    return tuple(c for c in named if c != t.label_column)
  return given


def _check_optim(o):
  check_number(o.lr, 'config.optim.lr', positive=True, what=' (the learning rate)')
  check_number(o.weight_decay, 'config.optim.weight_decay', lo=0)
  check_number(o.warmup, 'config.optim.warmup', lo=0,
                what=' (a fraction of the steps if < 1, else epochs)')
  check_number(o.clip_norm, 'config.optim.clip_norm', lo=0, what=' (0: no clipping)')
  check_number(o.get('float_lr', 0.0), 'config.optim.float_lr', lo=0, what=' (0: lr)')
  if o.get('float_warmup') is not None:
    check_number(o.float_warmup, 'config.optim.float_warmup', lo=0)


def _check_train(t):
  check_int(t.batch_size, 'config.train.batch_size', 1)
  check_int(t.log_every, 'config.train.log_every', 1)
  check_int(t.eval_every, 'config.train.eval_every', 0, ' (0: every epoch)')
  check_int(t.checkpoint_every_steps, 'config.train.checkpoint_every_steps', 0, ' (0: off)')
  check_number(t.checkpoint_every_secs, 'config.train.checkpoint_every_secs', lo=0,
                what=' (0: off)')
  check_int(t.keep_checkpoints, 'config.train.keep_checkpoints', 1)
  check_bool(t.skip_nonfinite, 'config.train.skip_nonfinite')
  check_int(t.get('grad_accum_steps', 1), 'config.train.grad_accum_steps', 1)
  check_bool(t.get('report_memory', False), 'config.train.report_memory')


def _check_mesh(mesh, num_devices):
  """The data-parallel size (data x fsdp) of the mesh on `num_devices` (None: not checked)."""
  from bitbert_jax import sharding  # pylint: disable=g-import-not-at-top
  for axis in sharding.MESH_AXES:
    v = mesh.get(axis, 1)
    if not is_int(v) or v == 0 or v < -1:
      raise BitbertError(f'config.mesh.{axis}={v!r}: need a positive integer or -1 (the rest '
                         'of the devices)')
  if num_devices is None:
    return 1
  shape = sharding.mesh_shape(mesh, num_devices)
  return math.prod(s for a, s in zip(sharding.MESH_AXES, shape) if a in sharding.BATCH_AXES)


def _check_export(e):
  check_bool(e.packed, 'config.export.packed')
  try:
    from bitbert_jax.export import FLOAT_DTYPES  # pylint: disable=g-import-not-at-top
  except ImportError:
    FLOAT_DTYPES = ('float16', 'float32')  # pylint: disable=invalid-name
  check_choice(e.float_dtype, 'config.export.float_dtype', FLOAT_DTYPES)


def _using(config, names, model):
  """The stages of `names` whose kind reads `model` ('pretrained' or 'teacher')."""
  return [n for n in names if model in stage_config.KINDS[config.stages[n].kind].uses]


def _makes_teacher(config, names):
  return [n for n in names if stage_config.KINDS[config.stages[n].kind].makes_teacher]


def needs_pretrained(config, names):
  """Whether a stage reads config.pretrained (the teacher's maker is skipped when
  config.teacher is set)."""
  skipped = _makes_teacher(config, names) if config.teacher else []
  return any(n not in skipped for n in _using(config, names, 'pretrained'))


def _check_paths(config, names):
  """Checkpoint dirs that are local paths hold a config.json; corpus files are text."""
  if needs_pretrained(config, names):
    _check_checkpoint_dir(config.pretrained, 'config.pretrained')
  if config.teacher:
    _check_checkpoint_dir(config.teacher, 'config.teacher')
  elif _using(config, names, 'teacher') and not _makes_teacher(config, names):
    users = ', '.join(_using(config, names, 'teacher'))
    raise BitbertError('config.teacher is empty and config.pipeline has no finetune stage, but '
                       f'{users} need a fine-tuned teacher; valid: set config.teacher to a '
                       'checkpoint dir, or add a finetune stage')
  if config.tokenizer and not os.path.isdir(config.tokenizer):
    raise BitbertError(f'config.tokenizer={config.tokenizer!r}: no such directory; valid: a '
                       'folder with tokenizer.json or vocab.txt, or \'\' for the checkpoint\'s')
  if any(stage_config.KINDS[config.stages[n].kind].uses_corpus for n in names):
    check_corpus(config.corpus)


def _check_checkpoint_dir(path, field):
  if not path:
    raise BitbertError(f'{field} is empty; valid: a Hugging Face BERT dir (config.json + '
                       'model.safetensors), a hub id, or \'minilm\'')
  if path == 'minilm' or not paths.looks_local(path):
    return  # the packaged MiniLM, or a hub id: checked when loaded
  if not os.path.isdir(path):
    raise BitbertError(f'{field}={path!r}: no such checkpoint directory; valid: a Hugging Face '
                       'BERT dir (config.json + model.safetensors), a hub id, or \'minilm\'')
  if not os.path.isfile(os.path.join(path, 'config.json')):
    listing = ', '.join(sorted(os.listdir(path))) or '(empty)'
    raise BitbertError(f'{field}={path!r}: no config.json (files there: {listing}); valid: a '
                       'Hugging Face BERT dir (config.json + model.safetensors)')


def check_corpus(corpus):
  """The general-KD corpus ('' the shipped excerpt): present, and (its first 64 KiB) UTF-8 text."""
  specs = [s for s in str(corpus).split(',') if s]
  for spec in specs:
    if spec.startswith('hub:'):
      continue
    if os.path.isdir(spec):
      files = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                     if not f.startswith('.') and os.path.isfile(os.path.join(spec, f)))
      if not files:
        raise BitbertError(f'config.corpus: folder {spec} holds no files; valid: UTF-8 text '
                           'files')
    elif os.path.isfile(spec):
      files = [spec]
    else:
      raise BitbertError(f'config.corpus: {spec} does not exist; valid: text files/folders or '
                         'hub:DATASET/CONFIG:SPLIT:COLUMN')
    for f in files:
      _check_text_file(f)


def _check_text_file(path):
  with open(path, 'rb') as fh:
    head = fh.read(_SNIFF_BYTES)
  if b'\x00' in head:
    raise BitbertError(f'config.corpus: {path} is not text (a NUL byte at offset '
                       f'{head.index(0)}); valid: plain UTF-8 text files, one passage per line')
  try:
    head.decode('utf-8')
  except UnicodeDecodeError as e:
    if e.start < len(head) - 3 or len(head) < _SNIFF_BYTES:  # not a character cut at the end
      raise BitbertError(f'config.corpus: {path} is not UTF-8 text (byte offset {e.start}: '
                         f'{e.reason}); valid: plain UTF-8 text files') from None


def check_models(config, names, task, tokenizer, pretrained=None, teacher=None):
  """Checks that the loaded checkpoints and tokenizer fit the pipeline, stage by stage.

  pretrained / teacher: BertConfigs of config.pretrained / config.teacher (None: not loaded).
  """
  for cfg, field in ((pretrained, 'config.pretrained'), (teacher, 'config.teacher')):
    if cfg is not None:
      _check_fits_data(config, cfg, field, tokenizer)
  if teacher is not None and _using(config, names, 'teacher'):
    _check_teacher_head(config, teacher, task)
  task_teacher = (teacher, 'config.teacher') if teacher is not None else (
      pretrained, 'config.pretrained (fine-tuned by the finetune stage)')
  models = stage_config.Models(pretrained, *task_teacher, student=pretrained)
  for n in names:  # each stage's kind follows the student and checks its own fit
    s = stage_config.section(config.stages[n])
    models = stage_config.KINDS[s.kind].fit(s, f'config.stages.{n}', models)


def _check_fits_data(config, cfg, field, tokenizer):
  if config.task.max_length > cfg.max_position_embeddings:
    raise BitbertError(f'config.task.max_length={config.task.max_length}: {field} has only '
                       f'{cfg.max_position_embeddings} positions; valid: <= '
                       f'{cfg.max_position_embeddings}')
  vocab = len(tokenizer)
  if vocab > cfg.vocab_size:
    raise BitbertError(f'{field}: vocab_size {cfg.vocab_size} but the tokenizer has {vocab} '
                       'tokens (ids past the embedding table); valid: the checkpoint\'s own '
                       'tokenizer (config.tokenizer=\'\') or a checkpoint of this vocabulary')


def _check_teacher_head(config, teacher, task):
  want = task.num_labels
  kind = 'regression' if task.is_regression else 'classification'
  has = 'no classifier head' if not teacher.num_labels else \
      f'a head of {teacher.num_labels} outputs ({teacher.problem_type})'
  if teacher.num_labels != want or teacher.is_regression != task.is_regression:
    raise BitbertError(f'config.teacher={config.teacher!r} has {has}, but task {task.name!r} '
                       f'needs {want} ({kind}); valid: a checkpoint fine-tuned on '
                       f'{task.name!r}, or config.teacher=\'\' with a finetune stage')
