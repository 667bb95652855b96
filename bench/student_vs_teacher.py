"""Does a student fit its training pairs, and does it generalize? A regression (STS-B) student
and its teacher on the first N pairs of the train and validation splits, dropout off.

  python bench/student_vs_teacher.py STUDENT_STAGE_DIR TEACHER_STAGE_DIR [N=512]

STAGE_DIR: a completed stage of a workdir (workdir/stages/NN_name), e.g. a student's
fp32_stage2 and the teacher's 00_finetune. Reads $GLUE_DIR/STS-B. Prints per split the
student's MSE to the teacher's outputs and both models' Pearson with the gold scores.
"""
import os
import sys

import jax
import numpy as np
from transformers import AutoTokenizer

from bitbert_jax import pipeline
from bitbert_jax.data import glue
from bitbert_jax.model import BertModel

SEQ, BATCH = 128, 64


def pairs(split, n):
  rows = glue.load_split('stsb', split, os.environ['GLUE_DIR'])[:n]
  return rows['sentence1'], rows['sentence2'], np.asarray(rows['label'], np.float64)


def outputs(stage_dir):
  state, _ = pipeline.load_stage_output(stage_dir)
  model = BertModel(state.model_config)
  fn = jax.jit(lambda i, m, t: model.apply({'params': state.params}, i, m, t,
                                           deterministic=True).logits[:, 0])
  return lambda enc: np.concatenate([
      np.asarray(fn(*(enc[k][i:i + BATCH] for k in ('input_ids', 'attention_mask',
                                                     'token_type_ids'))))
      for i in range(0, len(enc['input_ids']), BATCH)])


def main(student_dir, teacher_dir, n=512):
  tok = AutoTokenizer.from_pretrained(os.path.join(teacher_dir, 'hf'))
  student, teacher = outputs(student_dir), outputs(teacher_dir)
  for split in ('train', 'validation'):
    a, b, gold = pairs(split, int(n))
    enc = tok(a, b, padding='max_length', truncation=True, max_length=SEQ, return_tensors='np')
    s, t = student(enc), teacher(enc)
    print(f'{split}: {len(gold)} pairs, MSE student-teacher {np.mean((s - t) ** 2):.3f}, '
          f'Pearson with gold: student {np.corrcoef(s, gold)[0, 1]:.3f}, '
          f'teacher {np.corrcoef(t, gold)[0, 1]:.3f}')


if __name__ == '__main__':
  main(*sys.argv[1:])
