"""Checkpoints: last N kept, steps/time triggers, damage detected (previous one used), exact
resume of `train.train` after a crash, and the best-on-dev parameters surviving a restart."""
import gc
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax import checkpoint as ckpt_lib
from bitbert_jax import evaluate as evaluate_lib
from bitbert_jax import preempt as preempt_lib
from bitbert_jax import sharding, train
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import init_params
from bitbert_jax.train_state import new_state
from helpers import TINY, Batches, Crash, assert_trees_equal, fake_evaluate, tiny_train


# StageCheckpoints on its own.


def tree(value):
  return {'a': jnp.full((4, 8), value, jnp.float32), 'b': {'c': jnp.arange(5, dtype=jnp.int32)}}


@pytest.fixture
def saved(tmp_path):
  """Checkpoints of steps 1..4 with keep=2: steps 3 and 4 remain."""
  ckpts = ckpt_lib.StageCheckpoints(tmp_path / 'ck', keep=2)
  for step in range(1, 5):
    assert ckpts.save(step, tree(float(step)), {'step': step})
  ckpts.close()
  return str(tmp_path / 'ck')


def restore(directory):
  ckpts = ckpt_lib.StageCheckpoints(directory, keep=2)
  try:
    return ckpts.restore_latest(ckpt_lib.abstract_like(tree(0.0))), ckpts.all_steps()
  finally:
    ckpts.close()


def test_keeps_last_n_and_restores_newest(saved):
  (restored, meta), steps = restore(saved)
  assert steps == [3, 4] and meta == {'step': 4}
  assert_trees_equal(restored, tree(4.0))


def largest_file(step_dir):
  """The biggest array data file (not our manifest) of a checkpoint step."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f != ckpt_lib.MANIFEST]
  return max(files, key=os.path.getsize)


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def flip_byte(path):
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(data)


@pytest.mark.parametrize('damage,needle', [(truncate, 'bytes, expected'),
                                           (os.remove, 'is missing'),
                                           (flip_byte, 'wrong CRC-32')])
def test_damaged_latest_falls_back_to_previous(saved, damage, needle, caplog):
  victim = largest_file(os.path.join(saved, '4'))
  damage(victim)
  with caplog.at_level(logging.WARNING, logger='bitbert_jax'):
    (restored, meta), steps = restore(saved)
  assert meta == {'step': 3} and steps == [3]  # the damaged step is gone, so it can be redone
  assert_trees_equal(restored, tree(3.0))
  warning = ' '.join(r.getMessage() for r in caplog.records)
  assert os.path.join(saved, '4') in warning and needle in warning and victim in warning
  assert 'using step 3 instead' in warning


def test_all_damaged_means_start_over(saved, caplog):
  for step in ('3', '4'):
    os.remove(largest_file(os.path.join(saved, step)))
  with caplog.at_level(logging.WARNING, logger='bitbert_jax'):
    restored, steps = restore(saved)
  assert restored is None and steps == []
  assert 'starting over' in caplog.text


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_intact_checkpoint_of_another_model_is_refused_not_deleted(saved):
  ckpts = ckpt_lib.StageCheckpoints(saved, keep=2)
  other = ckpt_lib.abstract_like({'a': jnp.zeros((4, 9)), 'b': {'c': jnp.zeros(5, jnp.int32)}})
  with pytest.raises(BitbertError, match=r'does not fit this stage.*another config'):
    ckpts.restore_latest(other)
  ckpts.close()
  gc.collect()  # Orbax's aborted reads complain when collected: here, under the filter
  assert sorted(os.listdir(saved)) == ['3', '4']


def test_saving_a_saved_step_again_is_a_no_op(saved):
  ckpts = ckpt_lib.StageCheckpoints(saved, keep=2)
  assert not ckpts.save(4, tree(9.0), {'step': 4})
  ckpts.close()
  (restored, _), _ = restore(saved)
  assert_trees_equal(restored, tree(4.0))


def test_triggers_by_steps_and_wall_time(tmp_path, monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(ckpt_lib.time, 'time', lambda: now[0])
  ckpts = ckpt_lib.StageCheckpoints(tmp_path / 'ck', every_steps=5, every_secs=60.0)
  assert [s for s in range(1, 11) if ckpts.due(s)] == [5, 10]
  now[0] += 61
  assert ckpts.due(7)
  ckpts.save(7, tree(7.0), {'step': 7})
  assert not ckpts.due(8)  # the clock restarts at each save
  ckpts.close()
  never = ckpt_lib.StageCheckpoints(tmp_path / 'ck2')
  assert not any(never.due(s) for s in range(1, 100))
  never.close()


def test_half_written_save_is_cleaned_up(saved):
  tmp = os.path.join(saved, '5.orbax-checkpoint-tmp-1234')
  os.makedirs(os.path.join(tmp, 'state'))
  (_, meta), steps = restore(saved)
  assert meta == {'step': 4} and steps == [3, 4]
  assert not os.path.exists(tmp)


def test_manifest_names_the_problem(tmp_path):
  d = tmp_path / 'out'
  (d / 'sub').mkdir(parents=True)
  (d / 'sub' / 'x.bin').write_bytes(b'abcdef')
  ckpt_lib.write_manifest(str(d))
  assert ckpt_lib.verify_manifest(str(d)) is None
  (d / 'sub' / 'x.bin').write_bytes(b'abc')
  assert 'x.bin has 3 bytes, expected 6' in ckpt_lib.verify_manifest(str(d))
  assert ckpt_lib.verify_manifest(str(tmp_path / 'nothing')).endswith('is missing')


# Through train.train: crash, damage, resume.


@pytest.fixture(scope='module')
def clean_run(tmp_path_factory):
  batches = Batches()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate_lib, 'evaluate', fake_evaluate(batches))
    return tiny_train(str(tmp_path_factory.mktemp('clean')), batches, eval_every=2)


def test_crash_damage_resume_equals_uninterrupted(clean_run, tmp_path, monkeypatch, caplog):
  workdir = str(tmp_path)
  batches = Batches(crash_at=8)
  monkeypatch.setattr(evaluate_lib, 'evaluate', fake_evaluate(batches))
  with pytest.raises(Crash):
    tiny_train(workdir, batches, eval_every=2)
  ck = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ck)) == ['6', '7']
  victim = largest_file(os.path.join(ck, '7'))
  truncate(victim)  # the newest checkpoint is damaged: resume from step 6
  batches.crash_at = None
  with caplog.at_level(logging.INFO, logger='bitbert_jax'):
    state, evals = tiny_train(workdir, batches, eval_every=2)
  assert victim in caplog.text and 'resumed from step 6' in caplog.text
  clean_state, clean_evals = clean_run
  # The best (first) evaluation, at step 2, was only in the checkpoints: it survived.
  assert evals == clean_evals and evals['score'] == -2.0
  assert_trees_equal(state.params, clean_state.params)
  assert_trees_equal(state.model_state, clean_state.model_state)


def test_resume_after_the_last_step_returns_the_same(clean_run, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  batches = Batches()
  monkeypatch.setattr(evaluate_lib, 'evaluate', fake_evaluate(batches))
  first_state, first_evals = tiny_train(workdir, batches, eval_every=2, keep_best=False)
  # A re-run (stage output lost, checkpoints kept) trains nothing and returns the same.
  monkeypatch.setattr(evaluate_lib, 'evaluate', lambda *a: pytest.fail('evaluated again'))
  state, evals = tiny_train(workdir, Batches(crash_at=1), eval_every=2, keep_best=False)
  assert evals == first_evals and evals['score'] == -12.0  # the last evaluation, step 12
  assert_trees_equal(state.params, first_state.params)


def test_damaged_stage_output_is_redone_not_loaded(tmp_path, caplog):
  from bitbert_jax import pipeline  # pylint: disable=g-import-not-at-top
  stage_dir = str(tmp_path / '00_finetune')
  state = new_state(TINY, init_params(TINY, rng=jax.random.PRNGKey(0)),
                    rng=jax.random.PRNGKey(7))
  save = pipeline._save_stage  # pylint: disable=protected-access
  save(stage_dir, state, {'kind': 'finetune', 'dev': None})
  loaded, info = pipeline.load_stage_output(stage_dir)
  assert_trees_equal(loaded.params, state.params)
  np.testing.assert_array_equal(loaded.rng, state.rng)  # the next stage's randomness
  assert info['kind'] == 'finetune' and os.listdir(stage_dir) == ['output']
  victim = largest_file(os.path.join(stage_dir, 'output'))
  truncate(victim)
  with caplog.at_level(logging.WARNING, logger='bitbert_jax'):
    assert pipeline.load_stage_output(stage_dir) is None
  assert victim in caplog.text and 'running the stage again' in caplog.text


def test_metrics_rewind_drops_the_resumed_stages_later_rows(tmp_path):
  from bitbert_jax import logs  # pylint: disable=g-import-not-at-top
  writer = logs.MetricsWriter(str(tmp_path), enabled=True)
  for stage, step in (('finetune', 4), ('finetune', 8), ('kd', 4), ('kd', 8), ('kd', 12)):
    writer.write(stage, step, {'loss': float(step)})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"stage": "kd", "st')  # torn by a kill mid-write
  writer.rewind('kd', 8)
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [(r['stage'], r['step']) for r in rows] == [('finetune', 4), ('finetune', 8),
                                                     ('kd', 4), ('kd', 8)]
  writer.close()


def test_sigterm_during_an_evaluation_checkpoints_and_redoes_it_on_resume(clean_run, tmp_path,
                                                                          monkeypatch):
  """The evaluation at step 4 is cut short by SIGTERM: the checkpoint at step 4 says so, and the
  resumed run evaluates step 4 before stepping on, ending equal to an uninterrupted run."""
  import signal  # pylint: disable=g-import-not-at-top
  from bitbert_jax import preempt  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  batches = Batches()
  done = fake_evaluate(batches)
  evaluated = []

  def evaluate(*args):
    if batches.step == 4 and 'resume' not in evaluated:
      signal.raise_signal(signal.SIGTERM)
      preempt.check('evaluation')  # as evaluate.predict does between eval batches
    evaluated.append(batches.step)
    return done(*args)
  monkeypatch.setattr(evaluate_lib, 'evaluate', evaluate)
  with pytest.raises(preempt_lib.Preempted,
                     match=r'^preempted at stage tiny step 4 during evaluation'):
    tiny_train(workdir, batches, eval_every=2)
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(workdir, 'checkpoints'))
  try:
    assert ckpts.all_steps()[-1] == 4
    meta = ckpts._manager.restore(4).meta  # pylint: disable=protected-access
  finally:
    ckpts.close()
  assert meta['pending_eval'] is True and meta['last_evals']['score'] == -2.0
  evaluated.append('resume')
  state, evals = tiny_train(workdir, batches, eval_every=2)
  assert evaluated == [2, 'resume', 4, 6, 8, 10, 12]
  clean_state, clean_evals = clean_run
  assert evals == clean_evals
  assert_trees_equal(state.params, clean_state.params)
