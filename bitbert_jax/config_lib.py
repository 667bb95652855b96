"""Shared pieces of the `configs/*.py` files: defaults, the `:arg` parser, stage builders.

Configs are data: every field below can be overridden on the command line
(`--config.optim.lr=3e-5`, `--config.stages.kd_1bit.epochs=2`). A value that a rule chose
(a preset, an `auto` switch, a given `layers`) is set with `rule`, which records why in
`config.rules`; `--dry_run` prints the reasons.
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

from bitbert_jax.distill import stage_config
from bitbert_jax.errors import BitbertError

PRESETS = ('smoke', 'quick', 'paper')
_SWITCH = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}


def switch(name, value, extra=()):
  """'true' | 'false' (or 1/0, yes/no) -> bool; anything else is refused, naming the argument."""
  if str(value).lower() not in _SWITCH:
    valid = ', '.join(list(extra) + ['true', 'false'])
    raise BitbertError(f'config argument {name}={value!r}; valid: {valid}')
  return _SWITCH[str(value).lower()]


def parse_arg(arg, **defaults):
  """'task=mrpc,preset=quick' -> ConfigDict over `defaults`; unknown keys are refused."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise BitbertError(f'config argument {item!r}: expected key=value with key in '
                         f'{", ".join(sorted(defaults))}')
    kind = type(defaults[key])
    try:
      out[key] = switch(key, value) if kind is bool else kind(value)
    except ValueError:
      raise BitbertError(f'config argument {item!r}: {key} takes {kind.__name__} values, e.g. '
                         f'{key}={defaults[key]}') from None
  if out.get('preset', 'paper') not in PRESETS:
    raise BitbertError(f'config argument preset={out["preset"]!r}; valid: {", ".join(PRESETS)}')
  return ml_collections.ConfigDict(out)


def base_config(args):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = args.get('pretrained', 'minilm')  # pre-trained BERT: dir, hub id, or 'minilm'
  c.teacher = args.get('teacher', '')  # fine-tuned task teacher; '' = the finetune stage makes one
  c.tokenizer = ''  # '' = the teacher's (or pre-trained checkpoint's) own tokenizer files
  # general-KD text: files/folders, or hub:DATASET/CONFIG:SPLIT:COLUMN, comma-separated;
  # '' = the WikiText-2 excerpt shipped in the package (bitbert_jax/data/wikitext/)
  c.corpus = ''
  c.task = ml_collections.ConfigDict(dict(
      name=args.get('task', 'mrpc'), glue_dir=os.environ.get('GLUE_DIR', ''),
      train_file='', dev_file='', text_columns='', label_column='label', label_names='',
      columns='',  # a headerless TSV/CSV's column names in order, e.g. 'label,text'
      # without label_names, auto: integer or named labels are classes, non-integer numbers a
      # regression; or 'classification' / 'regression'
      problem='auto',
      max_length=128, max_train_examples=-1, max_dev_examples=-1))
  c.model = ml_collections.ConfigDict(dict(dtype='float32', remat=False))
  # weight_groups is a string so the command line can say 'row' as well as a count ('64').
  # warmin: fraction of a stage over which quantization ramps in (0 = off); binary_mode: 'bwn'
  # (alpha * sign(w)) or 'centered' (BiT: alpha * sign(w - mean) + mean).
  c.quant = ml_collections.ConfigDict(dict(weight_groups='1', ffn_output_bits=0, act_mode='',
                                           warmin=0.0, binary_mode='bwn'))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # float_lr/float_warmup: the non-quantized parameters' own lr (0 = lr) and warmup (unset = warmup).
  c.optim = ml_collections.ConfigDict(dict(lr=5e-5, weight_decay=0.01, warmup=0.1, clip_norm=1.0,
                                           float_lr=0.0, float_warmup=placeholder(float)))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, log_every=50, eval_every=0, checkpoint_every_steps=0,
      checkpoint_every_secs=600.0, keep_checkpoints=2, skip_nonfinite=False, grad_accum_steps=1,
      report_memory=True))
  c.export = ml_collections.ConfigDict(dict(packed=True, float_dtype='float16'))
  c.stages = ml_collections.ConfigDict()
  c.pipeline = ''
  # Values a rule chose, at their fields' paths: (value, why); see `rule`.
  c.rules = ml_collections.ConfigDict(type_safe=False)
  return c


def stage(kind, **fields):
  """One stage section: `kind`'s fields (stage_config.KINDS) with their defaults, then `fields`."""
  return ml_collections.ConfigDict(dict(kind=kind, **{**stage_config.defaults(kind), **fields}),
                                   type_safe=False)


def rule(c, path, value, why):
  """Sets the field at dotted `path` of `c` to `value`, which a rule chose because `why`
  ('': no rule); `--dry_run` shows the reason for as long as the field holds that value."""
  *parents, leaf = path.split('.')
  node, notes = c, c.rules
  for p in parents:
    node = node[p]
    if p not in notes:
      notes[p] = ml_collections.ConfigDict(type_safe=False)
    notes = notes[p]
  node[leaf] = value
  if why:
    notes[leaf] = (value, why)


def why(c, path):
  """The reason `rule` recorded for the field at dotted `path`, or '' (none, or overridden)."""
  node, notes = c, c.get('rules') or {}
  for p in path.split('.'):
    if p not in notes or p not in node:
      return ''
    node, notes = node[p], notes[p]
  value, reason = notes
  return reason if node == value else ''


def apply_preset(c, preset):
  """smoke: seconds, for tests; quick: minutes on a laptop CPU on real data; paper: the recipe."""
  if preset == 'smoke':
    c.task.max_length, c.task.max_train_examples, c.task.max_dev_examples = 32, 64, 32
    c.train.log_every, c.train.report_memory = 4, False
    rule(c, 'train.batch_size', 8, 'preset=smoke')
  elif preset == 'quick':
    c.task.max_length, c.task.max_train_examples = 128, 1000
    c.train.log_every = 20
    rule(c, 'train.batch_size', 16, 'preset=quick')


def smoke_epochs(c, preset, names):
  """preset=smoke: every training stage of `names` runs one short epoch."""
  for n in names:
    if preset == 'smoke' and c.stages[n].kind in stage_config.TRAINING_KINDS:
      rule(c, f'stages.{n}.epochs', 1.0, 'preset=smoke: one epoch per training stage')
