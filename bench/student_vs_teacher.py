"""Does a student fit its training pairs, and does it generalize? A regression (STS-B) student
and its teacher on the first N pairs of train.tsv and dev.tsv, dropout off.

  python bench/student_vs_teacher.py STUDENT_STAGE_DIR TEACHER_STAGE_DIR [N=512]

STAGE_DIR: a completed stage of a workdir (workdir/stages/NN_name), e.g. a student's
fp32_stage2 and the teacher's 00_finetune. Reads $GLUE_DIR/STS-B. Prints per split the
student's MSE to the teacher's outputs and both models' Pearson with the gold scores.
"""
import csv
import os
import sys

import jax
import numpy as np
from transformers import AutoTokenizer

from bitbert_jax import pipeline
from bitbert_jax.model import BertModel

SEQ, BATCH = 128, 64


def pairs(split, n):
  path = os.path.join(os.environ['GLUE_DIR'], 'STS-B', f'{split}.tsv')
  with open(path, encoding='utf-8') as f:
    rows = list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))[1:n + 1]
  return [r[7] for r in rows], [r[8] for r in rows], np.array([float(r[9]) for r in rows])


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
  for split in ('train', 'dev'):
    a, b, gold = pairs(split, int(n))
    enc = tok(a, b, padding='max_length', truncation=True, max_length=SEQ, return_tensors='np')
    s, t = student(enc), teacher(enc)
    print(f'{split}: {len(gold)} pairs, MSE student-teacher {np.mean((s - t) ** 2):.3f}, '
          f'Pearson with gold: student {np.corrcoef(s, gold)[0, 1]:.3f}, '
          f'teacher {np.corrcoef(t, gold)[0, 1]:.3f}')


if __name__ == '__main__':
  main(*sys.argv[1:])
