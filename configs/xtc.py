"""Pipeline B (XTC): layer reduction -> optional FP32 KD -> one long single-stage 1-bit KD.

  python -m bitbert_jax.main --config=configs/xtc.py:task=mrpc,layers=3 --workdir=runs/xtc_mrpc
Arguments: task, teacher ('' = fine-tune `pretrained` first), layers (student depth; 0 = the
teacher's), bits (W-E-A), fp32_kd (run the FP32 polish stage), preset (smoke | quick | paper).
"""
from bitbert_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, task='mrpc', preset='paper', teacher='', pretrained='minilm',
                              layers=0, bits='1-1-8', fp32_kd=False, epochs=18.0)
  c = config_lib.base_config(args)
  c.optim.lr = 5e-5
  c.stages.finetune = config_lib.stage('finetune', epochs=3.0)
  c.stages.reduce = config_lib.stage('reduce_layers', num_layers=args.layers)
  c.stages.kd_fp32 = config_lib.stage('task_kd', losses='all', epochs=3.0)
  c.stages.quantize = config_lib.stage('quantize', bits=args.bits)
  c.stages.kd_1bit = config_lib.stage('task_kd', losses='all', epochs=args.epochs, warmup=1.0)
  names = ['finetune', 'reduce'] + (['kd_fp32'] if args.fp32_kd else []) + ['quantize', 'kd_1bit']
  c.pipeline = ','.join(names)
  config_lib.apply_preset(c, args.preset)
  if args.preset == 'quick':
    c.stages.kd_1bit.epochs = 3.0
  config_lib.smoke_epochs(c, args.preset, names, {})
  return c
