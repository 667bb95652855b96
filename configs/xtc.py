"""Pipeline B (XTC): layer reduction -> optional FP32 KD -> one long single-stage 1-bit KD.

  python -m bitbert_jax.main --config=configs/xtc.py:task=mrpc,layers=3 --workdir=runs/xtc_mrpc
Arguments: task, teacher ('' = fine-tune `pretrained` first), layers (student depth; 0 = the
teacher's; a depth given also sets the quantized KD to lr 1e-3 with KL attention), bits (W-E-A),
fp32_kd (the FP32 KD polish before quantizing: auto = on for a reduced student, `layers` given,
except in smoke; true; false), preset (smoke | quick | paper),
epochs (of the 1-bit KD, or of the whole ladder; 0 = the preset's: paper 18, quick 9), ladder (precision ladder, e.g. '8-2-1':
quantize_8/kd_8 -> quantize_2/kd_2 -> quantize_1/kd_1bit, each from the last; '' = off),
ladder_epochs (epochs per rung, e.g. '2-4-12'; '' = `epochs` split evenly), augment (TinyBERT
data augmentation before the KD stages, which then train on it).
"""
from bitbert_jax import config_lib
from bitbert_jax.errors import BitbertError


def _rungs(args, total_epochs):
  """[(weight bits, W-E-A bits, epochs)] of the ladder; the last rung is `bits` itself."""
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
  bits = [f'{w}-{w}-{act}' for w in widths[:-1]] + [args.bits]
  return list(zip(widths, bits, epochs))


def get_config(arg=None):
  args = config_lib.parse_arg(arg, task='mrpc', preset='paper', teacher='', pretrained='minilm',
                              layers=0, bits='1-1-8', fp32_kd='auto', epochs=0.0, ladder='',
                              ladder_epochs='', augment=False)
  switch = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}
  fp32_kd = (args.layers > 0 and args.preset != 'smoke') if args.fp32_kd == 'auto' else (
      switch.get(args.fp32_kd.lower()))
  if fp32_kd is None:
    raise BitbertError(f'config argument fp32_kd={args.fp32_kd!r}; valid: auto, true, false')
  c = config_lib.base_config(args)
  # 9 epochs at 5e-4: STS-B 6L 95.3% of its teacher (3 epochs: 92.1%; docs/RESULTS.md).
  epochs = args.epochs or {'quick': 9.0}.get(args.preset, 18.0)
  c.optim.lr = 5e-5  # the teacher's fine-tuning (the KD stages set their own)
  # Quantized KD at 10x XTC's 5e-5: measured on MiniLM STS-B 6L, 3 epochs, 50.0 -> 78 Pearson
  # (docs/RESULTS.md); BiT also trains its binary BERT at 5e-4.
  qlr, attn_loss = 5e-4, 'mse'
  if args.layers > 0:  # `layers` given: 1e-3 and KL attention, measured on STS-B 3L (RESULTS s10)
    qlr, attn_loss = 1e-3, 'kl'
  data = 'augmented' if args.augment else 'task'
  c.stages.finetune = config_lib.stage('finetune', epochs=3.0)
  c.stages.reduce = config_lib.stage('reduce_layers', num_layers=args.layers)
  if args.augment:
    c.stages.augment = config_lib.stage('augment', copies=20, probability=0.4, candidates=15,
                                        glove='')
  # A reduced student (a subset of the teacher's layers) needs KD before it is quantized: 2
  # epochs at 5e-4 take the 3-layer STS-B student to 82.6 (multi-stage's FP32 lr; docs/RESULTS.md).
  c.stages.kd_fp32 = config_lib.stage('task_kd', losses='all', epochs=2.0, data=data, lr=5e-4)
  c.stages.quantize = config_lib.stage('quantize', bits=args.bits)
  c.stages.kd_1bit = config_lib.stage('task_kd', losses='all', epochs=epochs, warmup=1.0,
                                      data=data, lr=qlr, attn_loss=attn_loss)
  quantized = ['quantize', 'kd_1bit']
  if args.ladder:
    quantized = []
    for width, bits, rung_epochs in _rungs(args, epochs):  # the ladder's total: as the 1-bit stage
      kd = 'kd_1bit' if width == 1 else f'kd_{width}'
      c.stages[f'quantize_{width}'] = config_lib.stage('quantize', bits=bits)
      # warmup 10% of the rung: a 1-epoch warmup would be all of a 1-epoch rung (lr never decays)
      c.stages[kd] = config_lib.stage('task_kd', losses='all', epochs=rung_epochs, warmup=0.1,
                                      data=data, lr=qlr, attn_loss=attn_loss)
      quantized += [f'quantize_{width}', kd]
  names = (['finetune', 'reduce'] + (['augment'] if args.augment else []) +
           (['kd_fp32'] if fp32_kd else []) + quantized)
  c.pipeline = ','.join(names)
  config_lib.apply_preset(c, args.preset)
  if args.preset == 'quick':  # the whole training set, XTC's batch: 35 min for STS-B 6L on 2 cores
    c.task.max_train_examples, c.train.batch_size = -1, 32
  config_lib.smoke_epochs(c, args.preset, names, {})
  return c
