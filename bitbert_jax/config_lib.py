"""Shared pieces of the `configs/*.py` files: defaults, the `:arg` parser, stage builders.

Configs are data: every field below can be overridden on the command line
(`--config.optim.lr=3e-5`, `--config.stages.kd_1bit.epochs=2`).
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

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
  c.export = ml_collections.ConfigDict(dict(packed=True, hf=True, float_dtype='float16'))
  c.stages = ml_collections.ConfigDict()
  c.pipeline = ''
  return c


def stage(kind, **fields):
  """One stage section. Training stages take epochs/lr/batch_size/max_steps overrides."""
  base = dict(kind=kind)
  if kind in ('finetune', 'general_kd', 'task_kd'):
    # Typed placeholders (None until set), so that `--config.stages.X.lr=...` parses.
    base.update(epochs=1.0, lr=placeholder(float), batch_size=placeholder(int), max_steps=-1,
                warmup=placeholder(float), keep_best=placeholder(bool),
                eval_every=placeholder(int), data='task', float_lr=placeholder(float),
                float_warmup=placeholder(float), warmin=placeholder(float))
  if kind == 'task_kd':
    # Loss weights per term; attn_loss: 'mse' (pre-softmax scores) or 'kl' (probabilities).
    base.update(losses='all', temperature=1.0, layers=[], pred_weight=1.0, attn_weight=1.0,
                hidden_weight=1.0, attn_loss='mse')
  if kind in ('init_student',):
    # init: 'random' (TinyBERT) or 'pretrained' (copy `layers` of config.pretrained, same width).
    base.update(num_layers=0, hidden_size=0, intermediate_size=0, init='random', layers=[])
  if kind == 'general_kd':
    # wrap_corpus: a corpus shorter than an epoch starts its next pass (False: an error).
    base.update(steps_per_epoch=1000, layers=[], wrap_corpus=True)
  if kind == 'reduce_layers':
    base.update(num_layers=0, layers=[])
  if kind == 'quantize':
    base.update(bits='1-1-8')
  base.update(fields)
  return ml_collections.ConfigDict(base, type_safe=False)


def apply_preset(c, preset):
  """smoke: seconds, for tests; quick: minutes on a laptop CPU on real data; paper: the recipe."""
  if preset == 'smoke':
    c.task.max_length, c.task.max_train_examples, c.task.max_dev_examples = 32, 64, 32
    c.train.batch_size, c.train.log_every, c.train.report_memory = 8, 4, False
  elif preset == 'quick':
    c.task.max_length, c.task.max_train_examples = 128, 1000
    c.train.batch_size, c.train.log_every = 16, 20
  return c


def smoke_epochs(c, preset, stage_names, epochs):
  """Sets epochs on training stages: the given one unless smoke, where each runs one short epoch."""
  for n in stage_names:
    s = c.stages[n]
    if 'epochs' in s:
      s.epochs = 1.0 if preset == 'smoke' else epochs.get(n, s.epochs)
