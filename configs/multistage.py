"""Pipeline A (TinyBERT/BinaryBERT lineage): general KD on a corpus, task KD, ternary, splitting, 1-bit.

  finetune (teacher) -> init_student -> general KD -> Stage-I -> Stage-II (FP32)
  -> 2-bit Stage-I -> Stage-II -> weight splitting -> 1-bit Stage-I -> Stage-II

  python -m bitbert_jax.main --config=configs/multistage.py --workdir=runs/multistage
Arguments: task, teacher, layers/hidden (student depth/width; 0 = half the teacher's depth, its
width), width (DynaBERT's width multiplier: the fraction of attention heads and FFN neurons the
student keeps, hidden size kept; 0.5 is BinaryBERT's half-width ternary student, whose split
encoder holds the bits of a full-width 1-bit one; default 1; with a teacher and a copied start,
the narrow student copies the teacher's layers, keeping what has the most Taylor importance on
the task), init (the student's start: random,
as TinyBERT, or pretrained, a copy of some of config.pretrained's layers; default random, but
pretrained for the quick preset, whose short general KD cannot train a random student), bits
(final W-E-A; the ternary stage uses 2-2-A, or 2-1-A when width < 1: 1-bit word embeddings keep
one plane after splitting, so the half-width student's file has the 1-bit student's size),
augment (TinyBERT data augmentation), corpus (general-KD text: files/folders/hub specs; default
$CORPUS_DIR, else the WikiText-2 excerpt shipped in the package), preset.
`--dry_run` prints the stages these arguments give, and which rule chose each value.
"""
import os

from bitbert_jax import config_lib

KD = ['fp32_stage1', 'fp32_stage2', 'ternary_stage1', 'ternary_stage2', 'binary_stage1',
      'binary_stage2']


def get_config(arg=None):
  args = config_lib.parse_arg(arg, task='mrpc', preset='paper', teacher='', pretrained='minilm',
                              layers=0, hidden=0, width=1.0, init='', bits='1-1-8', augment=False,
                              corpus=os.environ.get('CORPUS_DIR', ''))
  c = config_lib.base_config(args)
  act = args.bits.split('-')[-1]
  c.corpus = args.corpus
  data = 'augmented' if args.augment else 'task'
  s = config_lib.stage
  c.stages.finetune = s('finetune', epochs=3.0, lr=5e-5)
  c.stages.init_student = s('init_student', num_layers=args.layers, hidden_size=args.hidden)
  if args.width != 1.0:
    config_lib.rule(c, 'stages.init_student.width', args.width,
                    f'width={args.width:g}: the student keeps {args.width:g} x the attention heads '
                    'and FFN neurons of each layer, the most important ones (DynaBERT), hidden '
                    'size kept; split, the two binary planes of each encoder matrix hold the '
                    'bits of one full-width plane')
  if not args.init:
    quick = args.preset == 'quick'
    config_lib.rule(c, 'stages.init_student.init', 'pretrained' if quick else 'random',
                    "init='': pretrained for preset=quick (its short general KD cannot train a "
                    'random student), else random' if quick else "init='': random (TinyBERT)")
  else:
    c.stages.init_student.init = args.init
  if args.width < 1 and args.teacher and c.stages.init_student.init == 'pretrained' and (
      args.pretrained == 'minilm'):
    # Narrowed from MiniLM's general layers the student fit its training pairs but not the task
    # (STS-B, 3 layers: 7.0 after FP32 Stage-I); from the fine-tuned teacher's, 80.9.
    why = ('width<1 with a teacher: the narrow student copies the fine-tuned teacher\'s layers '
           'and keeps what matters for the task (docs/RESULTS.md, the half-width route); '
           'pretrained=minilm --config.stages.init_student.importance=magnitude for the other '
           'start')
    config_lib.rule(c, 'pretrained', args.teacher, why)
    config_lib.rule(c, 'stages.init_student.importance', 'taylor', why)
  c.stages.general_kd = s('general_kd', epochs=3.0, lr=5e-5, batch_size=256)
  c.stages.augment = s('augment')
  c.stages.fp32_stage1 = s('task_kd', losses='stage1', epochs=20.0, lr=5e-5, data=data)
  c.stages.fp32_stage2 = s('task_kd', losses='stage2', epochs=3.0, lr=3e-5, data=data)
  c.stages.quantize_2bit = s('quantize', bits=f'2-2-{act}')
  if args.width < 1:
    config_lib.rule(c, 'stages.quantize_2bit.bits', f'2-1-{act}',
                    'width<1: 1-bit embeddings in the ternary stage keep one plane after '
                    'splitting, so the file has the 1-bit student\'s size')
  # Quantized KD at 5e-4, 10x XTC's 5e-5 (BinaryBERT's 2.5e-5..1.25e-4 barely moves the
  # signs); STS-B 6L, quick: 2-bit 98.1%, 1-bit (split) 99.5% of the teacher (docs/RESULTS.md).
  qlr = 5e-4
  for n in KD[2:]:
    c.stages[n] = s('task_kd', losses=n.split('_')[1], epochs=2.0, lr=qlr, batch_size=16,
                    data=data)
  c.stages.split = s('split')
  names = (['finetune', 'init_student', 'general_kd'] + (['augment'] if args.augment else []) +
           KD[:2] + ['quantize_2bit'] + KD[2:4] + ['split'] + KD[4:])
  c.pipeline = ','.join(names)
  config_lib.apply_preset(c, args.preset)
  if args.preset == 'quick':  # XTC quick's budget: the whole training set, batch 32, 9 KD epochs
    c.task.max_train_examples = -1
    config_lib.rule(c, 'train.batch_size', 32, "preset=quick: XTC quick's batch")
  if args.preset != 'paper':
    config_lib.rule(c, 'stages.general_kd.steps_per_epoch', 8 if args.preset == 'smoke' else 200,
                    f'preset={args.preset}')
    for n in names:
      if c.stages[n].get('batch_size') is not None:
        config_lib.rule(c, f'stages.{n}.batch_size', c.train.batch_size,
                        f'preset={args.preset}: every stage at config.train.batch_size')
  if args.preset == 'quick':
    c.stages.finetune.epochs = 2.0
    # 100 x 16 corpus sequences: ~7 min on 2 cores, enough for a pre-trained start.
    why = 'preset=quick: 100 x 16 corpus sequences, enough for a pre-trained start'
    config_lib.rule(c, 'stages.general_kd.epochs', 1.0, why)
    config_lib.rule(c, 'stages.general_kd.steps_per_epoch', 100, why)
    config_lib.rule(c, 'stages.general_kd.batch_size', 16, why)
    kd_epochs = dict(fp32_stage1=1.0, fp32_stage2=1.0, ternary_stage1=2.0, ternary_stage2=1.0,
                     binary_stage1=2.0, binary_stage2=2.0)
    for n, epochs in kd_epochs.items():
      config_lib.rule(c, f'stages.{n}.epochs', epochs, "preset=quick: XTC quick's 9 KD epochs")
    # One FP32 epoch each at 5e-5 / 3e-5 left the 3-layer student at 24.7; at 5e-4 it is 82.5.
    for n in KD[:2]:
      config_lib.rule(c, f'stages.{n}.lr', qlr, 'preset=quick: one FP32 epoch needs the '
                      'quantized lr (3-layer STS-B: 24.7 at 5e-5, 82.5 at 5e-4)')
  config_lib.smoke_epochs(c, args.preset, names)
  return c
