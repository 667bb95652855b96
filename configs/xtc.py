"""Pipeline B (XTC): layer reduction -> optional FP32 KD -> one long single-stage 1-bit KD.

  python -m bitbert_jax.main --config=configs/xtc.py:task=mrpc,layers=3 --workdir=runs/xtc_mrpc
Arguments: task, teacher ('' = fine-tune `pretrained` first), layers (student depth; 0 = the
teacher's), bits (W-E-A), fp32_kd (the FP32 KD polish before quantizing: auto = on for a reduced
student, `layers` given, except in smoke; true; false), preset (smoke | quick | paper), epochs (of
the 1-bit KD, or of the whole ladder; 0 = the preset's: paper 18, quick 9), ladder (precision
ladder, e.g. '8-2-1': quantize_8/kd_8 -> quantize_2/kd_2 -> quantize_1/kd_1bit, each from the last;
'' = off), ladder_epochs (epochs per rung, e.g. '2-4-12'; '' = `epochs` split evenly), augment
(TinyBERT data augmentation after the FP32 polish, for the quantized KD, which trains on the
originals and `copies` copies of each, over the same number of steps: `epochs` count task-set
passes; auto = on for a reduced student, except in smoke; true; false), copies (augmented copies per
example).
`--dry_run` prints the stages these arguments give, and which rule chose each value.
"""
from bitbert_jax import config_lib
from bitbert_jax.errors import BitbertError


def _rungs(args, total_epochs):
  """[(weight bits, W-E-A bits, epochs, why)] of the ladder; the last rung is `bits` itself."""
  widths = [int(b) for b in args.ladder.split('-')]
  act = args.bits.split('-')[-1]
  if widths[-1] != int(args.bits.split('-')[0]):
    raise BitbertError(f'config argument ladder={args.ladder!r}: the last rung must be the '
                       f'weight bits of bits={args.bits!r}')
  epochs = ([float(e) for e in args.ladder_epochs.split('-')] if args.ladder_epochs
            else [total_epochs / len(widths)] * len(widths))
  if len(epochs) != len(widths):
    raise BitbertError(f'config argument ladder_epochs={args.ladder_epochs!r}: one number per '
                       f'rung of ladder={args.ladder!r}')
  why = '' if args.ladder_epochs else (f"ladder_epochs='': {total_epochs:g} epochs split evenly "
                                       f'over {len(widths)} rungs')
  bits = [f'{w}-{w}-{act}' for w in widths[:-1]] + [args.bits]
  return [(w, b, e, why) for w, b, e in zip(widths, bits, epochs)]


def _switch(args, name):
  """(on, why): auto | true | false -> bool; auto = on for a reduced student (`layers` given),
  not in smoke; why: the reason, when auto decided."""
  if str(args[name]).lower() != 'auto':
    return config_lib.switch(name, args[name], extra=['auto']), ''
  on = args.layers > 0 and args.preset != 'smoke'
  reason = ('a reduced student (layers given)' if on else 'preset=smoke stays short'
            if args.layers > 0 else 'a full-depth student (layers=0)')
  return on, f'{name}=auto: {"on" if on else "off"} for {reason}'


def get_config(arg=None):
  args = config_lib.parse_arg(arg, task='mrpc', preset='paper', teacher='', pretrained='minilm',
                              layers=0, bits='1-1-8', fp32_kd='auto', epochs=0.0, ladder='',
                              ladder_epochs='', augment='auto', copies=8)
  fp32_kd, fp32_why = _switch(args, 'fp32_kd')
  augment, augment_why = _switch(args, 'augment')
  if args.copies < 1:
    raise BitbertError(f'config argument copies={args.copies}: at least 1 augmented copy')
  c = config_lib.base_config(args)
  # 9 epochs: STS-B 6L 95.3% of its teacher at 5e-4 (3 epochs: 92.1%), 96.6% at 1e-3 + KL.
  preset_epochs = {'quick': 9.0}.get(args.preset, 18.0)
  epochs = args.epochs or preset_epochs
  epochs_why = [] if args.epochs else [
      f"epochs=0: the preset's {preset_epochs:g} task-set passes ({args.preset})"]
  data = 'augmented' if augment else 'task'
  # Augmentation (auto: a reduced student): STS-B 3L 72.95 -> 75.99 at the same 1616 steps
  # (docs/RESULTS.md). An augmented epoch is copies + 1 task epochs: keep `epochs`' step budget.
  passes = 1.0 / (args.copies + 1) if augment else 1.0
  if augment:
    epochs_why.append(f'augmented data: / (copies + 1 = {args.copies + 1}), an augmented epoch '
                      'being that many task-set passes')
  c.stages.finetune = config_lib.stage('finetune', epochs=3.0)  # at config.optim.lr
  c.stages.reduce = config_lib.stage('reduce_layers', num_layers=args.layers)
  if augment:
    c.stages.augment = config_lib.stage('augment', copies=args.copies)
  # A reduced student (a subset of the teacher's layers) needs KD before it is quantized: 2
  # epochs at 5e-4 take the 3-layer STS-B student to 82.6 (multi-stage's FP32 lr; docs/RESULTS.md).
  # It trains on the task data: augmented, its 2 epochs would be copies + 1 times longer.
  c.stages.kd_fp32 = config_lib.stage('task_kd', epochs=2.0, lr=5e-4)

  def quantized_kd(name, stage_epochs, why, warmup, warmup_why=''):
    # 20x XTC's 5e-5 with KL attention, at every depth: above 5e-4 + mse on STS-B 3L (3 seeds)
    # and 6L (2 seeds, +1.3 points of the teacher), tied on MRPC 6L (docs/RESULTS.md).
    c.stages[name] = config_lib.stage('task_kd', data=data, lr=1e-3, attn_loss='kl')
    config_lib.rule(c, f'stages.{name}.epochs', stage_epochs * passes, '; '.join(why))
    config_lib.rule(c, f'stages.{name}.warmup', warmup, warmup_why)

  if not args.ladder:
    c.stages.quantize = config_lib.stage('quantize', bits=args.bits)
    # Warm-up: one task epoch (as a fraction of the stage when augmented: its epochs are longer).
    warmup = min(0.5, 1.0 / epochs) if augment else 1.0
    quantized_kd('kd_1bit', epochs, epochs_why, warmup,
                 f'one task-set pass of {epochs:g} (at most half the stage)' if augment else '')
    quantized = ['quantize', 'kd_1bit']
  else:
    quantized = []
    for width, bits, rung_epochs, why in _rungs(args, epochs):  # in all: as the 1-bit stage
      kd = 'kd_1bit' if width == 1 else f'kd_{width}'
      c.stages[f'quantize_{width}'] = config_lib.stage('quantize', bits=bits)
      # warmup 10% of the rung: a 1-epoch warmup would be all of a 1-epoch rung (lr never decays)
      quantized_kd(kd, rung_epochs, epochs_why + [why] if why else epochs_why, 0.1)
      quantized += [f'quantize_{width}', kd]
  names = (['finetune', 'reduce'] + (['kd_fp32'] if fp32_kd else []) +
           (['augment'] if augment else []) + quantized)
  config_lib.rule(c, 'pipeline', ','.join(names), '; '.join(w for w in (fp32_why, augment_why)
                                                            if w))
  config_lib.apply_preset(c, args.preset)
  if args.preset == 'quick':  # the whole training set, XTC's batch: 35 min for STS-B 6L on 2 cores
    c.task.max_train_examples = -1
    config_lib.rule(c, 'train.batch_size', 32, "preset=quick: XTC's batch 32")
  config_lib.smoke_epochs(c, args.preset, names)
  return c
