"""Numerical faults: a NaN/inf loss stops the stage naming stage and step, the newest checkpoint
predates it; with skip_nonfinite the batch is skipped, counted, and the count survives a resume."""
import json
import os

import jax
import numpy as np
import pytest

from bitbert_jax import checkpoint as ckpt_lib
from bitbert_jax import evaluate as evaluate_lib
from bitbert_jax import logs
from helpers import Batches, Crash, fake_evaluate, tiny_train


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def restore_newest(workdir):
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(workdir, 'checkpoints'))
  try:
    steps = ckpts.all_steps()
    return steps, ckpts._manager.restore(max(steps))  # pylint: disable=protected-access
  finally:
    ckpts.close()


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_nonfinite_loss_stops_with_stage_and_step(tmp_path, monkeypatch, value):
  workdir = str(tmp_path)
  batches = Batches(poison={5: value})
  monkeypatch.setattr(evaluate_lib, 'evaluate', fake_evaluate(batches))
  with pytest.raises(logs.NonFiniteError, match=r"stage 'tiny'.*at step 5 .*newest checkpoint, "
                     r'step 4, is kept.*skip_nonfinite=True') as e:
    tiny_train(workdir, batches, eval_every=2)
  assert '\n' not in str(e.value)
  steps, newest = restore_newest(workdir)
  assert steps == [3, 4]  # nothing from the faulty step was saved
  assert newest.meta['step'] == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(newest.state['state']['params']))
  last = rows(workdir)[-1]
  assert last['step'] == 5 and last['nonfinite'] == 1.0 and not np.isfinite(last['loss'])


def test_skip_nonfinite_skips_counts_and_resumes(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  batches = Batches(poison={3: np.nan, 5: np.inf}, crash_at=8)
  monkeypatch.setattr(evaluate_lib, 'evaluate', fake_evaluate(batches))
  with pytest.raises(Crash):
    tiny_train(workdir, batches, skip_nonfinite=True)
  by_step = {r['step']: r for r in rows(workdir) if 'loss' in r}
  assert by_step[3]['nonfinite'] == 1.0 and by_step[3]['nonfinite_skipped'] == 1
  assert by_step[7]['nonfinite_skipped'] == 2
  batches.crash_at = None
  state, _ = tiny_train(workdir, batches, skip_nonfinite=True)  # resumes at step 7
  by_step = {r['step']: r for r in rows(workdir) if 'loss' in r}
  assert by_step[12]['nonfinite_skipped'] == 2  # the counter came back from the checkpoint
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_skipped_batches_leave_parameters_unchanged(tmp_path, monkeypatch):
  """Every batch after the 2nd is poisoned: the final parameters are those of step 2."""
  workdir = str(tmp_path)
  batches = Batches(poison={s: np.nan for s in range(3, 13)})
  monkeypatch.setattr(evaluate_lib, 'evaluate', fake_evaluate(batches))
  state, _ = tiny_train(workdir, batches, skip_nonfinite=True, keep_best=False,
                        keep_checkpoints=20)
  assert [r for r in rows(workdir) if 'loss' in r][-1]['nonfinite_skipped'] == 10
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(workdir, 'checkpoints'), keep=20)
  try:
    at_2 = ckpts._manager.restore(2).state['state']['params']  # pylint: disable=protected-access
  finally:
    ckpts.close()
  for a, b in zip(jax.tree.leaves(at_2), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
