"""Can a student's start learn STS-B at all? Plain AdamW regression from a stage's output, a
fresh head, outside the trainer: the loss every 25 steps against the targets' variance.

  python bench/regression_probe.py STAGE_DIR TEACHER_STAGE_DIR LR PAIRS STEPS DROPOUT TARGET

PAIRS: the first training pairs of a fixed shuffle (512: can it memorise; 5749: all of them);
TARGET: `label` (gold scores) or `teacher` (the teacher's outputs, what Stage-II fits).
Constant lr, batch 32, length 64, no warmup or clipping. Reads $GLUE_DIR/STS-B.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import AutoTokenizer

from bitbert_jax import pipeline
from bitbert_jax.data import glue
from bitbert_jax.model import BertModel, init_params

BATCH, SEQ = 32, 64


def main(stage_dir, teacher_dir, lr, pairs, steps, dropout, target):
  lr, pairs, steps, dropout = float(lr), int(pairs), int(steps), float(dropout)
  train = glue.load_split('stsb', 'train', os.environ['GLUE_DIR'])
  rows = train.select(np.random.RandomState(0).permutation(len(train))[:pairs])
  tok = AutoTokenizer.from_pretrained(os.path.join(teacher_dir, 'hf'))
  enc = tok(list(rows['sentence1']), list(rows['sentence2']), padding='max_length', truncation=True,
            max_length=SEQ, return_tensors='np')
  inputs = [enc[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')]
  y = np.asarray(rows['label'], np.float32)
  if target == 'teacher':
    teacher, _ = pipeline.load_stage_output(teacher_dir)
    t_model = BertModel(teacher.model_config)
    y = np.concatenate([np.asarray(t_model.apply(
        {'params': teacher.params}, *(x[i:i + 64] for x in inputs)).logits[:, 0])
                        for i in range(0, pairs, 64)])
  state, _ = pipeline.load_stage_output(stage_dir)
  cfg = state.model_config.replace(num_labels=1, problem_type='regression',
                                   hidden_dropout_prob=dropout,
                                   attention_probs_dropout_prob=dropout)
  params = dict(state.params, classifier=init_params(cfg)['classifier'])
  params = jax.tree.map(jnp.asarray, params)
  model, opt = BertModel(cfg), optax.adamw(lr, weight_decay=0.01)

  def loss_fn(p, batch, yy, rng):
    out = model.apply({'params': p}, *batch, deterministic=dropout == 0,
                      rngs={'dropout': rng})
    return jnp.mean((out.logits[:, 0] - yy) ** 2)

  @jax.jit
  def step(p, s, batch, yy, rng):
    loss, g = jax.value_and_grad(loss_fn)(p, batch, yy, rng)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  opt_state = opt.init(params)
  for i in range(steps):
    j = np.random.RandomState(i).choice(pairs, BATCH, replace=False)
    params, opt_state, loss = step(params, opt_state, tuple(x[j] for x in inputs), y[j],
                                   jax.random.PRNGKey(i))
    if i % 25 == 0 or i == steps - 1:
      print(f'step {i}: MSE {float(loss):.3f}', flush=True)
  print(f'target variance {y.var():.3f}')


if __name__ == '__main__':
  main(*sys.argv[1:])
