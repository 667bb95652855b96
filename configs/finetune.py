"""Stage 0: fine-tune a pre-trained BERT on a task; the result is the distillation teacher.

  python -m bitbert_jax.main --config=configs/finetune.py:task=mrpc --workdir=runs/teacher_mrpc
Arguments: task (GLUE name), preset (smoke | quick | paper), pretrained (dir, hub id or 'minilm').
"""
from bitbert_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, task='mrpc', preset='paper', pretrained='minilm', epochs=3.0)
  c = config_lib.base_config(args)
  c.stages.finetune = config_lib.stage('finetune', epochs=args.epochs)
  c.pipeline = 'finetune'
  c.export.packed = False
  config_lib.apply_preset(c, args.preset)
  config_lib.smoke_epochs(c, args.preset, ['finetune'])
  return c
