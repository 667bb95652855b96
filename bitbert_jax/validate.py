"""A run's inputs, checked before anything is written: config fields, paths, then model fit.

`validate_config` needs the config alone (plus the device count and a look at the files it
names); `check_models` runs once the checkpoints and the tokenizer are loaded and checks that
they fit the pipeline (layer lists, widths, heads, vocabulary, the teacher's head). Every
failure is a BitbertError that names the config field, file or tensor and the valid choices.
"""
import math
import numbers
import os

from bitbert_jax import paths
from bitbert_jax.errors import BitbertError

TRAINING_KINDS = ('finetune', 'general_kd', 'task_kd')
LOSSES = ('stage1', 'stage2', 'all')
DATA = ('task', 'augmented')
_SNIFF_BYTES = 1 << 16


def stage_names(config):
  """The pipeline's stage names, each defined in config.stages with a known kind."""
  from bitbert_jax.distill import stages as stages_lib  # pylint: disable=g-import-not-at-top
  names = [n.strip() for n in str(config.pipeline).split(',') if n.strip()]
  if not names:
    raise BitbertError('config.pipeline is empty; list stage names, comma-separated (defined: '
                       f'{", ".join(config.stages) or "none"})')
  for n in names:
    if n not in config.stages:
      raise BitbertError(f'config.pipeline names stage {n!r}, which is not in config.stages '
                         f'(defined: {", ".join(config.stages)})')
    kind = config.stages[n].get('kind')
    if kind not in stages_lib.STAGES:
      raise BitbertError(f'config.stages.{n}.kind={kind!r} is not a stage; valid: '
                         f'{", ".join(stages_lib.STAGES)}')
  return names


def validate_config(config, num_devices=None):
  """Checks every field of a run's config; returns the pipeline's stage names."""
  names = stage_names(config)
  _check_int(config.seed, 'config.seed', 0)
  _check_task(config.task)
  _check_choice(config.model.dtype, 'config.model.dtype', _dtypes())
  _check_bool(config.model.remat, 'config.model.remat')
  _check_optim(config.optim)
  _check_train(config.train)
  data_parallel = _check_mesh(config.mesh, num_devices)
  for i, name in enumerate(names):
    _check_stage(config, name, names[:i], data_parallel)
  _check_export(config.export)
  _check_paths(config, names)
  return names


# Field helpers: one message shape, `field=value: what is wrong; valid: ...`.


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(v, field, lo, what=''):
  if not _is_int(v) or v < lo:
    raise BitbertError(f'{field}={v!r}: need an integer >= {lo}{what}')


def _check_number(v, field, lo=None, positive=False, what=''):
  bad = not _is_number(v) or (positive and v <= 0) or (lo is not None and v < lo)
  if bad:
    bound = '> 0' if positive else f'>= {lo}' if lo is not None else 'finite'
    raise BitbertError(f'{field}={v!r}: need a number {bound}{what}')


def _check_bool(v, field):
  if not isinstance(v, bool):
    raise BitbertError(f'{field}={v!r}: need True or False')


def _check_choice(v, field, valid):
  if v not in valid:
    raise BitbertError(f'{field}={v!r}: valid: {", ".join(map(str, valid))}')


def _dtypes():
  from bitbert_jax.model.config import TRAIN_DTYPES  # pylint: disable=g-import-not-at-top
  return TRAIN_DTYPES


def _check_task(t):
  from bitbert_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  _check_int(t.max_length, 'config.task.max_length', 3, ' ([CLS], [SEP] and a token)')
  _check_int(t.max_train_examples, 'config.task.max_train_examples', -1, ' (-1 or 0: all)')
  _check_int(t.max_dev_examples, 'config.task.max_dev_examples', -1, ' (-1 or 0: all)')
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
  _check_int(t.max_length, 'config.task.max_length', 2 * len(task.text_fields) + 1,
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
  _check_number(o.lr, 'config.optim.lr', positive=True, what=' (the learning rate)')
  _check_number(o.weight_decay, 'config.optim.weight_decay', lo=0)
  _check_number(o.warmup, 'config.optim.warmup', lo=0,
                what=' (a fraction of the steps if < 1, else epochs)')
  _check_number(o.clip_norm, 'config.optim.clip_norm', lo=0, what=' (0: no clipping)')
  _check_number(o.get('float_lr', 0.0), 'config.optim.float_lr', lo=0, what=' (0: lr)')
  if o.get('float_warmup') is not None:
    _check_number(o.float_warmup, 'config.optim.float_warmup', lo=0)


def _check_train(t):
  _check_int(t.batch_size, 'config.train.batch_size', 1)
  _check_int(t.log_every, 'config.train.log_every', 1)
  _check_int(t.eval_every, 'config.train.eval_every', 0, ' (0: every epoch)')
  _check_int(t.checkpoint_every_steps, 'config.train.checkpoint_every_steps', 0, ' (0: off)')
  _check_number(t.checkpoint_every_secs, 'config.train.checkpoint_every_secs', lo=0,
                what=' (0: off)')
  _check_int(t.keep_checkpoints, 'config.train.keep_checkpoints', 1)
  _check_bool(t.skip_nonfinite, 'config.train.skip_nonfinite')
  _check_int(t.get('grad_accum_steps', 1), 'config.train.grad_accum_steps', 1)
  _check_bool(t.get('report_memory', False), 'config.train.report_memory')


def _check_mesh(mesh, num_devices):
  """The data-parallel size (data x fsdp) of the mesh on `num_devices` (None: not checked)."""
  from bitbert_jax import sharding  # pylint: disable=g-import-not-at-top
  for axis in sharding.MESH_AXES:
    v = mesh.get(axis, 1)
    if not _is_int(v) or v == 0 or v < -1:
      raise BitbertError(f'config.mesh.{axis}={v!r}: need a positive integer or -1 (the rest '
                         'of the devices)')
  if num_devices is None:
    return 1
  shape = sharding.mesh_shape(mesh, num_devices)
  return math.prod(s for a, s in zip(sharding.MESH_AXES, shape) if a in sharding.BATCH_AXES)


def _check_stage(config, name, before, data_parallel):
  s = config.stages[name]
  field = f'config.stages.{name}'
  kind = s.kind
  if kind in TRAINING_KINDS:
    _check_training_stage(config, s, field, data_parallel)
    data = s.get('data') or 'task'
    _check_choice(data, f'{field}.data', DATA)
    if data == 'augmented' and not any(config.stages[b].kind == 'augment' for b in before):
      raise BitbertError(f'{field}.data=\'augmented\' but no augment stage runs before it in '
                         f'config.pipeline ({config.pipeline}); valid: add one, or data=\'task\'')
  if kind == 'task_kd':
    _check_choice(s.get('losses', 'all'), f'{field}.losses', LOSSES)
    _check_number(s.get('temperature', 1.0), f'{field}.temperature', positive=True)
    for term in ('pred', 'attn', 'hidden'):
      _check_number(s.get(f'{term}_weight', 1.0), f'{field}.{term}_weight', lo=0)
    _check_choice(s.get('attn_loss', 'mse'), f'{field}.attn_loss', ('mse', 'kl'))
  if kind in ('task_kd', 'general_kd', 'reduce_layers'):
    _check_layer_list(s.get('layers') or [], f'{field}.layers')
  if kind in ('reduce_layers', 'init_student'):
    _check_int(s.get('num_layers') or 0, f'{field}.num_layers', 0, ' (0: the default depth)')
  if kind == 'init_student':
    _check_int(s.get('hidden_size') or 0, f'{field}.hidden_size', 0, " (0: the teacher's)")
    _check_int(s.get('intermediate_size') or 0, f'{field}.intermediate_size', 0,
               ' (0: 4 x hidden_size)')
  if kind == 'general_kd':
    _check_int(s.get('steps_per_epoch') or 0, f'{field}.steps_per_epoch', 1)
    _check_bool(s.get('wrap_corpus', True), f'{field}.wrap_corpus')
  if kind == 'quantize':
    _check_bits(config, s.get('bits'), f'{field}.bits')
  if kind == 'augment':
    from bitbert_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
    check = augment_lib._check_settings  # pylint: disable=protected-access
    check(s.get('copies', 20), s.get('probability', 0.4), s.get('candidates', 15), field)


def _check_training_stage(config, s, field, data_parallel):
  own = lambda k: s.get(k) is not None
  lr = s.lr if own('lr') else config.optim.lr
  _check_number(lr, f'{field}.lr' if own('lr') else 'config.optim.lr', positive=True,
                what=' (the learning rate)')
  if own('warmup'):
    _check_number(s.warmup, f'{field}.warmup', lo=0)
  warmin = s.warmin if own('warmin') else config.quant.get('warmin', 0.0)
  if not _is_number(warmin) or not 0 <= warmin <= 1:
    raise BitbertError(f'{field + ".warmin" if own("warmin") else "config.quant.warmin"}='
                       f'{warmin!r}: need a fraction of the stage in [0, 1] (0: off)')
  if own('float_lr'):
    _check_number(s.float_lr, f'{field}.float_lr', lo=0, what=' (0: lr)')
  if own('float_warmup'):
    _check_number(s.float_warmup, f'{field}.float_warmup', lo=0)
  max_steps = s.get('max_steps', -1)
  if not _is_int(max_steps):
    raise BitbertError(f'{field}.max_steps={max_steps!r}: need an integer (<= 0: use epochs)')
  epochs = s.get('epochs', 1.0)
  if max_steps <= 0 and (not _is_number(epochs) or epochs <= 0):
    raise BitbertError(f'{field}.epochs={epochs!r}: need a number > 0 (or set '
                       f'{field}.max_steps > 0)')
  batch = s.batch_size if own('batch_size') else config.train.batch_size
  batch_field = f'{field}.batch_size' if own('batch_size') else 'config.train.batch_size'
  _check_int(batch, batch_field, 1)
  if batch % data_parallel:
    raise BitbertError(f'{batch_field}={batch} is not divisible by the data-parallel mesh size '
                       f'{data_parallel} (config.mesh data x fsdp); valid: a multiple of '
                       f'{data_parallel}')
  if own('eval_every'):
    _check_int(s.eval_every, f'{field}.eval_every', 0, ' (0: every epoch)')
  if own('keep_best'):
    _check_bool(s.keep_best, f'{field}.keep_best')


def _check_layer_list(layers, field):
  layers = list(layers)
  if not all(_is_int(l) for l in layers):
    raise BitbertError(f'{field}={layers!r}: need a list of 0-based teacher layer indices')
  bad = [l for l in layers if l < 0]
  if bad:
    raise BitbertError(f'{field}={layers}: layers {bad} are negative; valid: 0-based indices')
  if sorted(set(layers)) != layers:
    raise BitbertError(f'{field}={layers}: layers must be strictly increasing')


def _check_bits(config, bits, field):
  from bitbert_jax.quant import policy as policy_lib  # pylint: disable=g-import-not-at-top
  q = config.quant
  if q.act_mode and q.act_mode not in policy_lib.ACT_MODES:
    raise BitbertError(f'config.quant.act_mode={q.act_mode!r}: valid: \'\' (the default for '
                       f'the bits), {", ".join(policy_lib.ACT_MODES)}')
  try:
    policy = policy_lib.policy_from_name(bits, weight_groups=q.weight_groups,
                                         ffn_output_bits=q.ffn_output_bits or None,
                                         act_mode=q.act_mode or None,
                                         binary_mode=q.get('binary_mode', 'bwn'))
  except BitbertError as e:
    raise BitbertError(f'{field}={bits!r} (with config.quant): {e}') from None
  centered = any(r.mode == 'centered' for _, r in policy.rules)
  if centered and config.export.packed:
    raise BitbertError(f'config.quant.binary_mode=\'centered\' ({field}={bits!r}) cannot be '
                       'packed: the packed format stores sign bits and scales, not the group '
                       'means; set config.export.packed=False (or binary_mode=\'bwn\')')


def _check_export(e):
  _check_bool(e.packed, 'config.export.packed')
  try:
    from bitbert_jax.export import FLOAT_DTYPES  # pylint: disable=g-import-not-at-top
  except ImportError:
    FLOAT_DTYPES = ('float16', 'float32')  # pylint: disable=invalid-name
  _check_choice(e.float_dtype, 'config.export.float_dtype', FLOAT_DTYPES)


def needs_pretrained(config, names):
  """Whether a stage reads config.pretrained (finetune is skipped when config.teacher is set)."""
  kinds = ('init_student', 'general_kd') + (() if config.teacher else ('finetune',))
  return any(config.stages[n].kind in kinds for n in names)


def _check_paths(config, names):
  """Checkpoint dirs that are local paths hold a config.json; corpus files are text."""
  if needs_pretrained(config, names):
    _check_checkpoint_dir(config.pretrained, 'config.pretrained')
  if config.teacher:
    _check_checkpoint_dir(config.teacher, 'config.teacher')
  elif any(config.stages[n].kind in ('task_kd', 'reduce_layers') for n in names) and not any(
      config.stages[n].kind == 'finetune' for n in names):
    raise BitbertError('config.teacher is empty and config.pipeline has no finetune stage, but '
                       'task_kd/reduce_layers need a fine-tuned teacher; valid: set '
                       'config.teacher to a checkpoint dir, or add a finetune stage')
  if config.tokenizer and not os.path.isdir(config.tokenizer):
    raise BitbertError(f'config.tokenizer={config.tokenizer!r}: no such directory; valid: a '
                       'folder with tokenizer.json or vocab.txt, or \'\' for the checkpoint\'s')
  if any(config.stages[n].kind == 'general_kd' for n in names):
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
  if teacher is not None and any(config.stages[n].kind in ('task_kd', 'reduce_layers')
                                 for n in names):
    _check_teacher_head(config, teacher, task)
  task_teacher = (teacher, 'config.teacher') if teacher is not None else (
      pretrained, 'config.pretrained (fine-tuned by the finetune stage)')
  student, student_layers = pretrained, None
  for n in names:
    s, field, kind = config.stages[n], f'config.stages.{n}', config.stages[n].kind
    if kind == 'init_student':
      student, student_layers = _init_student_config(pretrained, s, field)
    elif kind == 'reduce_layers':
      depth = task_teacher[0].num_hidden_layers
      student_layers = _copied_layers(s, field, s.get('num_layers') or 0, depth, task_teacher[1])
      student = task_teacher[0].replace(num_hidden_layers=len(student_layers))
    elif kind in ('general_kd', 'task_kd') and student is None:
      raise BitbertError(f'{field}: no student to distil into; valid: an init_student or '
                         'reduce_layers stage before it (or a finetune stage, without '
                         'config.teacher)')
    elif kind == 'general_kd':
      _check_pair(student, pretrained, s, field, 'config.pretrained', student_layers)
    elif kind == 'task_kd':
      _check_pair(student, task_teacher[0], s, field, task_teacher[1], student_layers)


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


def _init_student_config(base, s, field):
  hidden = s.get('hidden_size') or base.hidden_size
  if hidden % base.num_attention_heads:
    raise BitbertError(f'{field}.hidden_size={hidden}: not a multiple of the teacher\'s '
                       f'{base.num_attention_heads} attention heads')
  # As stages._student_config: default depth half the teacher's, so the uniform map applies.
  depth = s.get('num_layers') or max(1, base.num_hidden_layers // 2)
  init = s.get('init', 'random')
  if init == 'random':
    return base.replace(num_hidden_layers=depth, hidden_size=hidden), None
  if init != 'pretrained':
    raise BitbertError(f'{field}.init={init!r}: valid: random, pretrained')
  for key, have in (('hidden_size', hidden), ('intermediate_size', s.get('intermediate_size'))):
    want = getattr(base, key)
    if have and have != want:
      raise BitbertError(f'{field}.{key}={have}: init=pretrained copies config.pretrained\'s '
                         f'layers, so the student keeps its {key} {want}; valid: 0 or {want}, '
                         'or init=random')
  layers = _copied_layers(s, field, depth, base.num_hidden_layers, 'config.pretrained')
  return base.replace(num_hidden_layers=len(layers)), layers


def _copied_layers(s, field, num_layers, depth, source_field):
  """The source layers a copied student keeps (as stages._copied_student): the stage's `layers`,
  else the XTC default for `num_layers` (0: all)."""
  layers = list(s.get('layers') or [])
  if layers:
    _check_in_depth(layers, depth, f'{field}.layers', source_field)
  elif num_layers > depth:
    raise BitbertError(f'{field}.num_layers={num_layers}: the teacher ({source_field}) '
                       f'has only {depth} layers; valid: 1..{depth} (0: all)')
  return layers or xtc_default_layers(depth, num_layers or depth)


def xtc_default_layers(depth, num_layers):
  from bitbert_jax.distill import layer_map  # pylint: disable=g-import-not-at-top
  return layer_map.xtc_default_layers(depth, num_layers)


def _check_in_depth(layers, depth, field, teacher_field):
  if len(layers) > depth:
    raise BitbertError(f'{field}={layers}: {len(layers)} layers but the teacher '
                       f'({teacher_field}) has only {depth}; valid: indices 0..{depth - 1}')
  bad = [l for l in layers if l >= depth]
  if bad:
    raise BitbertError(f'{field}={layers}: layers {bad} out of range for the teacher '
                       f'({teacher_field}, {depth} layers); valid: 0..{depth - 1}')


def _check_pair(student, teacher, s, field, teacher_field, student_layers):
  """A distillation pair: attention maps and hidden states must be comparable."""
  if student.hidden_size > teacher.hidden_size:
    raise BitbertError(f'{field}: the student (hidden_size {student.hidden_size}) is wider than '
                       f'its teacher {teacher_field} (hidden_size {teacher.hidden_size}); '
                       f'valid: a student hidden_size <= {teacher.hidden_size}')
  if student.num_attention_heads != teacher.num_attention_heads:
    raise BitbertError(f'{field}: the student has {student.num_attention_heads} attention heads '
                       f'but its teacher {teacher_field} has {teacher.num_attention_heads}; the '
                       'attention loss needs equal head counts (a checkpoint of another model '
                       'size?)')
  layers = list(s.get('layers') or student_layers or [])
  depth, mine = teacher.num_hidden_layers, student.num_hidden_layers
  if layers:
    _check_in_depth(layers, depth, f'{field}.layers', teacher_field)
    if len(layers) != mine:
      raise BitbertError(f'{field}.layers={layers}: {len(layers)} layers for a student of '
                         f'{mine}; valid: one teacher layer per student layer')
  elif mine > depth or depth % mine:
    raise BitbertError(f'{field}: a {mine}-layer student cannot map uniformly onto its '
                       f'{depth}-layer teacher {teacher_field}; valid: a student depth dividing '
                       f'{depth}, or an explicit {field}.layers list')
