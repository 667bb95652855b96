"""Each stage kind's config section: its fields and their defaults, its checks, its model fit.

`config_lib.stage` builds a section from `defaults`; `validate` asks each stage's kind to check
its section (`Kind.check`) and, once the checkpoints are loaded, that the models fit it
(`Kind.fit`). The seven fields a training stage shares with the run (`INHERITED`) are resolved
by `resolve`, for the trainer, the checks and `--dry_run` alike. No JAX here: configs import it.
"""
import dataclasses
from typing import Any, Callable

import ml_collections
from ml_collections.config_dict import placeholder

from bitbert_jax import checks
from bitbert_jax.distill import layer_map as layer_map_lib
from bitbert_jax.errors import BitbertError

# Training-stage fields that fall back to a run-wide section: field -> (section, type).
INHERITED = {'lr': ('optim', float), 'batch_size': ('train', int), 'warmup': ('optim', float),
             'eval_every': ('train', int), 'float_lr': ('optim', float),
             'float_warmup': ('optim', float), 'warmin': ('quant', float)}
LOSS_SETS = {'stage1': ('attn', 'hidden'), 'stage2': ('pred',), 'all': ('pred', 'attn', 'hidden')}
DATA = ('task', 'augmented')
FP32 = '32-32-32'  # the bits of an unquantized model
INITS = ('random', 'pretrained')
IMPORTANCE = ('magnitude', 'taylor')  # how init_student ranks heads and neurons (narrow.py)


def _training_fields():
  # Typed placeholders (None until set), so that `--config.stages.X.lr=...` parses.
  fields = {k: placeholder(kind) for k, (_, kind) in INHERITED.items()}
  return dict(epochs=1.0, max_steps=-1, data='task', keep_best=placeholder(bool), **fields)


@dataclasses.dataclass(frozen=True)
class Value:
  """A resolved setting: its value, the config field that holds it (None: a rule chose it),
  and the rule's reason."""
  value: Any
  field: str | None
  why: str = ''


@dataclasses.dataclass
class Models:
  """What `Kind.fit` follows through the pipeline: BertConfigs (None: not loaded)."""
  pretrained: Any
  teacher: Any
  teacher_field: str
  student: Any
  student_layers: list | None = None


@dataclasses.dataclass(frozen=True)
class Kind:
  """A stage kind's config side. fields(): its own fields and defaults; check(config, name,
  before kinds, data_parallel): its section's values; fit(s, field, models) -> models: the
  loaded checkpoints against its section; trains: runs the trainer; uses: the checkpoints it
  reads ('pretrained', 'teacher'); makes_teacher: it fine-tunes the teacher (skipped when
  config.teacher is given); uses_corpus: it reads config.corpus; bits(s, before): the W-E-A
  bits of the model it returns; augments: it makes the augmented data."""
  fields: Callable[[], dict] = dict
  check: Callable = lambda config, name, before, data_parallel: None
  fit: Callable = lambda s, field, models: models
  trains: bool = False
  uses: tuple[str, ...] = ()
  makes_teacher: bool = False
  uses_corpus: bool = False
  bits: Callable = lambda s, before: before
  augments: bool = False


def defaults(kind):
  """A fresh dict of `kind`'s fields and their defaults."""
  return dict(KINDS[kind].fields())


def section(s):
  """A stage's section with every field of its kind: the given values over the defaults."""
  return ml_collections.ConfigDict({**defaults(s.kind), **{k: s[k] for k in s.keys()}},
                                  type_safe=False)


def resolve(config, name, batches_per_epoch=None):
  """{field: Value} of training stage `name`: the seven INHERITED fields (the stage's own,
  else the run's), epochs, max_steps, keep_best. batches_per_epoch(batch_size): the task
  data's batches per epoch, for the rule that evaluates augmented stages once per task epoch."""
  s, field = section(config.stages[name]), f'config.stages.{name}'
  out = {}
  for k, (where, _) in INHERITED.items():
    own = s.get(k) is not None
    out[k] = Value(s[k], f'{field}.{k}') if own else Value(config[where][k], f'config.{where}.{k}')
  out['epochs'], out['max_steps'] = Value(s.epochs, f'{field}.epochs'), Value(
      s.max_steps, f'{field}.max_steps')
  if not out['eval_every'].value and s.data == 'augmented' and batches_per_epoch is not None:
    out['eval_every'] = Value(max(1, batches_per_epoch(out['batch_size'].value)), None,
                              'an augmented epoch is copies + 1 task epochs: evaluate (and keep '
                              'the best) once per task epoch')
  if s.keep_best is not None:
    out['keep_best'] = Value(s.keep_best, f'{field}.keep_best')
  elif s.get('losses') == 'stage1':
    out['keep_best'] = Value(False, None, 'losses=stage1: intermediate losses say nothing '
                                          'about dev accuracy')
  else:
    out['keep_best'] = Value(True, None)
  return out


# Checks of a section's values, before anything is loaded.


def _check_training(config, name, before, data_parallel):
  s, field = section(config.stages[name]), f'config.stages.{name}'
  v = resolve(config, name)
  checks.check_number(v['lr'].value, v['lr'].field, positive=True, what=' (the learning rate)')
  if s.warmup is not None:
    checks.check_number(s.warmup, f'{field}.warmup', lo=0)
  warmin = v['warmin']
  if not checks.is_number(warmin.value) or not 0 <= warmin.value <= 1:
    raise BitbertError(f'{warmin.field}={warmin.value!r}: need a fraction of the stage in '
                       '[0, 1] (0: off)')
  if s.float_lr is not None:
    checks.check_number(s.float_lr, f'{field}.float_lr', lo=0, what=' (0: lr)')
  if s.float_warmup is not None:
    checks.check_number(s.float_warmup, f'{field}.float_warmup', lo=0)
  if not checks.is_int(s.max_steps):
    raise BitbertError(f'{field}.max_steps={s.max_steps!r}: need an integer (<= 0: use epochs)')
  if s.max_steps <= 0 and (not checks.is_number(s.epochs) or s.epochs <= 0):
    raise BitbertError(f'{field}.epochs={s.epochs!r}: need a number > 0 (or set '
                       f'{field}.max_steps > 0)')
  batch = v['batch_size']
  checks.check_int(batch.value, batch.field, 1)
  if batch.value % data_parallel:
    raise BitbertError(f'{batch.field}={batch.value} is not divisible by the data-parallel mesh '
                       f'size {data_parallel} (config.mesh data x fsdp); valid: a multiple of '
                       f'{data_parallel}')
  if s.eval_every is not None:
    checks.check_int(s.eval_every, f'{field}.eval_every', 0, ' (0: every epoch)')
  if s.keep_best is not None:
    checks.check_bool(s.keep_best, f'{field}.keep_best')
  data = s.data or 'task'
  checks.check_choice(data, f'{field}.data', DATA)
  if data == 'augmented' and 'augment' not in before:
    raise BitbertError(f'{field}.data=\'augmented\' but no augment stage runs before it in '
                       f'config.pipeline ({config.pipeline}); valid: add one, or data=\'task\'')


def check_layer_list(layers, field):
  layers = list(layers)
  if not all(checks.is_int(l) for l in layers):
    raise BitbertError(f'{field}={layers!r}: need a list of 0-based teacher layer indices')
  bad = [l for l in layers if l < 0]
  if bad:
    raise BitbertError(f'{field}={layers}: layers {bad} are negative; valid: 0-based indices')
  if sorted(set(layers)) != layers:
    raise BitbertError(f'{field}={layers}: layers must be strictly increasing')


def _check_task_kd(config, name, before, data_parallel):
  _check_training(config, name, before, data_parallel)
  s, field = section(config.stages[name]), f'config.stages.{name}'
  checks.check_choice(s.losses, f'{field}.losses', tuple(LOSS_SETS))
  checks.check_number(s.temperature, f'{field}.temperature', positive=True)
  for term in ('pred', 'attn', 'hidden'):
    checks.check_number(s[f'{term}_weight'], f'{field}.{term}_weight', lo=0)
  checks.check_choice(s.attn_loss, f'{field}.attn_loss', ('mse', 'kl'))
  check_layer_list(s.layers or [], f'{field}.layers')


def _check_general_kd(config, name, before, data_parallel):
  _check_training(config, name, before, data_parallel)
  s, field = section(config.stages[name]), f'config.stages.{name}'
  check_layer_list(s.layers or [], f'{field}.layers')
  checks.check_int(s.steps_per_epoch or 0, f'{field}.steps_per_epoch', 1)
  checks.check_bool(s.wrap_corpus, f'{field}.wrap_corpus')


def _check_reduce_layers(config, name, before, data_parallel):
  del before, data_parallel
  s, field = section(config.stages[name]), f'config.stages.{name}'
  check_layer_list(s.layers or [], f'{field}.layers')
  checks.check_int(s.num_layers or 0, f'{field}.num_layers', 0, ' (0: the default depth)')


def _check_init_student(config, name, before, data_parallel):
  del before, data_parallel
  s, field = section(config.stages[name]), f'config.stages.{name}'
  checks.check_int(s.num_layers or 0, f'{field}.num_layers', 0, ' (0: the default depth)')
  checks.check_int(s.hidden_size or 0, f'{field}.hidden_size', 0, " (0: the teacher's)")
  checks.check_int(s.intermediate_size or 0, f'{field}.intermediate_size', 0,
                   ' (0: 4 x hidden_size)')
  checks.check_choice(s.init, f'{field}.init', INITS)
  check_layer_list(s.layers or [], f'{field}.layers')
  check_width(s.width, f'{field}.width')
  checks.check_int(s.heads or 0, f'{field}.heads', 0, " (0: width x the teacher's)")
  checks.check_choice(s.importance, f'{field}.importance', IMPORTANCE)
  checks.check_int(s.importance_batches, f'{field}.importance_batches', 1)


def check_width(width, field):
  if not checks.is_number(width) or not 0 < width <= 1:
    raise BitbertError(f'{field}={width!r}: need a fraction in (0, 1] of the heads and FFN '
                       'neurons (1: full width)')


def policy(bits, quant):
  """The QuantPolicy of W-E-A `bits` under the run's config.quant section."""
  from bitbert_jax.quant import policy as policy_lib  # pylint: disable=g-import-not-at-top
  return policy_lib.policy_from_name(bits, weight_groups=quant.weight_groups,
                                     ffn_output_bits=quant.ffn_output_bits or None,
                                     act_mode=quant.act_mode or None,
                                     binary_mode=quant.binary_mode)


def check_bits(config, bits, field):
  from bitbert_jax.quant import policy as policy_lib  # pylint: disable=g-import-not-at-top
  q = config.quant
  if q.act_mode and q.act_mode not in policy_lib.ACT_MODES:
    raise BitbertError(f'config.quant.act_mode={q.act_mode!r}: valid: \'\' (the default for '
                       f'the bits), {", ".join(policy_lib.ACT_MODES)}')
  try:
    p = policy(bits, q)
  except BitbertError as e:
    raise BitbertError(f'{field}={bits!r} (with config.quant): {e}') from None
  centered = any(r.mode == 'centered' for _, r in p.rules)
  if centered and config.export.packed:
    raise BitbertError(f'config.quant.binary_mode=\'centered\' ({field}={bits!r}) cannot be '
                       'packed: the packed format stores sign bits and scales, not the group '
                       'means; set config.export.packed=False (or binary_mode=\'bwn\')')


def _check_quantize(config, name, before, data_parallel):
  del before, data_parallel
  check_bits(config, config.stages[name].get('bits'), f'config.stages.{name}.bits')


def _check_augment(config, name, before, data_parallel):
  del before, data_parallel
  from bitbert_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  s = section(config.stages[name])
  augment_lib.check_settings(s.copies, s.probability, s.candidates, f'config.stages.{name}')


# The students the constructors build, and the fit of each distillation pair.


def _scaled(width, n):
  return max(1, int(round(width * n)))


def student_config(s, field, base, model=None):
  """init_student's student: `s.num_layers` deep (default: half of `base`, so that the uniform
  layer map applies), `s.hidden_size` wide (default `base`'s), with `s.heads` attention heads
  (default: `s.width` x `base`'s) of size hidden_size / `base`'s heads and `s.intermediate_size`
  FFN neurons (default: `s.width` x 4 x hidden_size), headless; `model`: config.model (dtype,
  remat; None: `base`'s)."""
  hidden = s.hidden_size or base.hidden_size
  if hidden % base.num_attention_heads:  # the attention loss needs the teacher's head count
    raise BitbertError(f'{field}.hidden_size={hidden}: not a multiple of the teacher\'s '
                       f'{base.num_attention_heads} attention heads')
  depth = s.num_layers or max(1, base.num_hidden_layers // 2)
  model = model or base
  head_size = base.head_dim if hidden == base.hidden_size else hidden // base.num_attention_heads
  heads = _student_heads(s, field, base)
  return base.replace(num_hidden_layers=depth, hidden_size=hidden, num_attention_heads=heads,
                      attention_head_size=head_size,
                      intermediate_size=s.intermediate_size or _scaled(s.width, 4 * hidden),
                      num_labels=0, label_names=(), dtype=model.dtype, remat=model.remat)


def _student_heads(s, field, base):
  """`s.heads`, else `s.width` x `base`'s heads; never more than `base` has (each student head
  learns the attention of one of its heads)."""
  heads = s.heads or _scaled(s.width, base.num_attention_heads)
  if heads > base.num_attention_heads:
    raise BitbertError(f'{field}.heads={heads}: more attention heads than the teacher\'s '
                       f'{base.num_attention_heads}; valid: 1..{base.num_attention_heads} (0: '
                       'width x the teacher\'s)')
  return heads


def narrow_width(s, field, base):
  """(heads, FFN neurons) a student copied from `base` keeps: `s.heads` and
  `s.intermediate_size`, else `s.width` x `base`'s."""
  neurons = s.intermediate_size or _scaled(s.width, base.intermediate_size)
  if neurons > base.intermediate_size:
    raise BitbertError(f'{field}.intermediate_size={neurons}: init=pretrained copies '
                       f'config.pretrained\'s layers, so the student keeps at most its '
                       f'{base.intermediate_size} FFN neurons; valid: 1..'
                       f'{base.intermediate_size} (0: width x its), or init=random')
  return _student_heads(s, field, base), neurons


def copied_layers(s, field, num_layers, depth, source_field):
  """The source layers a copied student keeps: `s.layers`, else the XTC default for
  `num_layers` (0: all) of a `depth`-layer source."""
  layers = list(s.layers or [])
  if layers:
    _check_in_depth(layers, depth, f'{field}.layers', source_field)
    return layers
  if num_layers > depth:
    raise BitbertError(f'{field}.num_layers={num_layers}: the teacher ({source_field}) '
                       f'has only {depth} layers; valid: 1..{depth} (0: all)')
  return layer_map_lib.xtc_default_layers(depth, num_layers or depth)


def _check_in_depth(layers, depth, field, teacher_field):
  if len(layers) > depth:
    raise BitbertError(f'{field}={layers}: {len(layers)} layers but the teacher '
                       f'({teacher_field}) has only {depth}; valid: indices 0..{depth - 1}')
  bad = [l for l in layers if l >= depth]
  if bad:
    raise BitbertError(f'{field}={layers}: layers {bad} out of range for the teacher '
                       f'({teacher_field}, {depth} layers); valid: 0..{depth - 1}')


def _split_bits(s, before):
  """Weight splitting turns 2-bit weights (and embeddings) into two 1-bit planes."""
  del s
  w, e, a = before.split('-')
  return '-'.join(['1' if b == '2' else b for b in (w, e)] + [a])


def _fp32(s, before):
  del s, before
  return FP32


def _fit_init_student(s, field, m):
  base = m.pretrained
  student = student_config(s, field, base)
  if s.init == 'random':
    return dataclasses.replace(m, student=student, student_layers=None)
  if student.hidden_size != base.hidden_size:
    raise BitbertError(f'{field}.hidden_size={student.hidden_size}: init=pretrained copies '
                       f'config.pretrained\'s layers, so the student keeps its hidden_size '
                       f'{base.hidden_size}; valid: 0 or {base.hidden_size}, or init=random')
  layers = copied_layers(s, field, student.num_hidden_layers, base.num_hidden_layers,
                         'config.pretrained')
  from bitbert_jax.distill import narrow  # pylint: disable=g-import-not-at-top
  heads, neurons = narrow_width(s, field, base)
  narrowing = (heads, neurons) != (base.num_attention_heads, base.intermediate_size)
  if narrowing and s.importance == 'taylor':
    check_taylor_teacher(m.teacher, base, field)
  copied = narrow.narrow_config(base.replace(num_hidden_layers=len(layers)), heads, neurons)
  return dataclasses.replace(m, student=copied, student_layers=layers)


def check_taylor_teacher(teacher, student, field):
  """importance=taylor compares the copied student with the fine-tuned teacher head for head."""
  if teacher is None:
    raise BitbertError(f'{field}.importance=taylor measures the Stage-I loss against the '
                       'fine-tuned teacher on task data, which are not loaded; valid: '
                       'config.teacher or a finetune stage before it, or importance=magnitude')
  t = teacher
  if (t.hidden_size, t.num_attention_heads) != (student.hidden_size, student.num_attention_heads):
    raise BitbertError(f'{field}.importance=taylor: the teacher ({t.hidden_size} wide, '
                       f'{t.num_attention_heads} heads) and the copied student '
                       f'({student.hidden_size} wide, {student.num_attention_heads} heads) do not '
                       'compare head for head; valid: importance=magnitude')


def _fit_reduce_layers(s, field, m):
  depth = m.teacher.num_hidden_layers
  layers = copied_layers(s, field, s.num_layers or 0, depth, m.teacher_field)
  return dataclasses.replace(m, student=m.teacher.replace(num_hidden_layers=len(layers)),
                             student_layers=layers)


def _fit_pair(teacher_of):
  """fit of a distillation stage whose teacher is `teacher_of(models)`: (config, field)."""
  def fit(s, field, m):
    if m.student is None:
      raise BitbertError(f'{field}: no student to distil into; valid: an init_student or '
                         'reduce_layers stage before it (or a finetune stage, without '
                         'config.teacher)')
    check_pair(m.student, *teacher_of(m), s, field, m.student_layers)
    return m
  return fit


def check_pair(student, teacher, teacher_field, s, field, student_layers):
  """A distillation pair: attention maps and hidden states must be comparable."""
  if student.hidden_size > teacher.hidden_size:
    raise BitbertError(f'{field}: the student (hidden_size {student.hidden_size}) is wider than '
                       f'its teacher {teacher_field} (hidden_size {teacher.hidden_size}); '
                       f'valid: a student hidden_size <= {teacher.hidden_size}')
  if student.num_attention_heads > teacher.num_attention_heads:
    raise BitbertError(f'{field}: the student has {student.num_attention_heads} attention heads '
                       f'but its teacher {teacher_field} has {teacher.num_attention_heads}; the '
                       'attention loss compares each student head with one of the teacher\'s '
                       '(a checkpoint of another model size?)')
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


KINDS = {
    'finetune': Kind(_training_fields, _check_training, trains=True, uses=('pretrained',),
                     makes_teacher=True, bits=_fp32),
    # init: 'random' (TinyBERT) or 'pretrained' (copy `layers` of config.pretrained, its hidden
    # size); num_layers/hidden_size/intermediate_size 0: half the depth, the hidden size, width x
    # 4 x hidden_size (pretrained: width x its FFN neurons).
    # width: DynaBERT's multiplier of the heads and FFN neurons (hidden kept); heads 0: width x
    # the pre-trained model's; importance: how a copied student picks what it keeps
    # (narrow.IMPORTANCE), measured over importance_batches task batches for 'taylor'.
    'init_student': Kind(lambda: dict(num_layers=0, hidden_size=0, intermediate_size=0,
                                      init='random', layers=[], width=1.0, heads=0,
                                      importance='magnitude', importance_batches=4),
                         _check_init_student, _fit_init_student, uses=('pretrained',),
                         bits=_fp32),
    # layers: the teacher layers the student copies ([] = the XTC default for num_layers, 0: all).
    'reduce_layers': Kind(lambda: dict(num_layers=0, layers=[]), _check_reduce_layers,
                          _fit_reduce_layers, uses=('teacher',), bits=_fp32),
    # wrap_corpus: a corpus shorter than an epoch starts its next pass (False: an error).
    'general_kd': Kind(lambda: dict(_training_fields(), steps_per_epoch=1000, layers=[],
                                    wrap_corpus=True),
                       _check_general_kd,
                       _fit_pair(lambda m: (m.pretrained, 'config.pretrained')),
                       trains=True, uses=('pretrained',), uses_corpus=True),
    # Loss weights per term; attn_loss: 'mse' (pre-softmax scores) or 'kl' (probabilities).
    'task_kd': Kind(lambda: dict(_training_fields(), losses='all', temperature=1.0, layers=[],
                                 pred_weight=1.0, attn_weight=1.0, hidden_weight=1.0,
                                 attn_loss='mse'),
                    _check_task_kd, _fit_pair(lambda m: (m.teacher, m.teacher_field)),
                    trains=True, uses=('teacher',)),
    'quantize': Kind(lambda: dict(bits='1-1-8'), _check_quantize,
                     bits=lambda s, before: s.bits),
    'split': Kind(bits=_split_bits),
    # TinyBERT's augmentation: copies per example, per-word replacement probability,
    # candidates per word; glove: a GloVe text file ('' = the model's own embeddings).
    'augment': Kind(lambda: dict(copies=20, probability=0.4, candidates=15, glove=''),
                    _check_augment, augments=True),
}
TRAINING_KINDS = tuple(k for k, v in KINDS.items() if v.trains)
