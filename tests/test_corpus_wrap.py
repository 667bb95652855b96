"""A general-KD corpus shorter than an epoch: the next pass starts (deterministic, resumable at
any step, also across the wrap), or, with wrap_corpus=False, one error naming the corpus and the
counts; an epoch that yields no batch is refused; SIGTERM in a slow corpus phase checkpoints."""
import os
import signal

import jax
import numpy as np
import pytest

from bitbert_jax import pipeline, preempt, sharding, train
from bitbert_jax.data import batching, get_task, load_tokenizer
from bitbert_jax.distill.objective import Objective
from bitbert_jax.errors import BitbertError
from bitbert_jax.logs import MetricsWriter
from bitbert_jax.model import init_params
from bitbert_jax.train_state import new_state
from helpers import TINY, Crash, assert_trees_equal, tiny_split

MAX_LENGTH, BATCH, STEPS_PER_EPOCH = 16, 2, 5
# Each line is its own packed sequence (two never fit in 14 tokens): 5 lines, 2 batches a pass.
LINES = ['the quick brown fox jumps over the lazy dog again today',
         'a second line of plain text about rivers and small towns',
         'numbers such as three and four appear in this third line',
         'the fourth line speaks of weather rain snow and bright sun',
         'finally the fifth line closes the tiny corpus for the test']


@pytest.fixture(scope='module')
def tokenizer(minilm):
  return load_tokenizer(minilm)


def write_corpus(path, lines):
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


def stream(tokenizer, path, wrap=True, steps_per_epoch=STEPS_PER_EPOCH):
  corpus = pipeline.Corpus([path], tokenizer, MAX_LENGTH, seed=0)
  return batching.StreamBatches(lambda epoch, repeat: corpus(BATCH, epoch, repeat), steps_per_epoch,
                             BATCH, name=corpus.name, field='config.stages.general_kd',
                             wrap=wrap)


def ids(batches):
  return [b['input_ids'].tolist() for b in batches]


def test_short_corpus_starts_its_next_pass_and_resumes_at_any_batch(tmp_path, tokenizer):
  batches = stream(tokenizer, write_corpus(tmp_path / 'c.txt', LINES))
  whole = ids(batches.epoch(0))
  assert len(whole) == STEPS_PER_EPOCH  # 3 passes of 2 batches, cut at 5
  assert whole == ids(batches.epoch(0))  # a pure function of the epoch
  for start in range(STEPS_PER_EPOCH):
    assert ids(batches.epoch(0, start)) == whole[start:]
  passes = [whole[0:2], whole[2:4]]
  assert passes[0] != passes[1]  # each pass is shuffled anew, not a replay
  rows = lambda batch_ids: sorted(map(tuple, (r for b in batch_ids for r in b)))
  assert len(set(rows(whole))) >= 4  # the rows are the corpus's sequences, none invented


def test_short_corpus_without_wrap_names_the_corpus_and_the_counts(tmp_path, tokenizer):
  path = write_corpus(tmp_path / 'c.txt', LINES)
  with pytest.raises(BitbertError) as e:
    ids(stream(tokenizer, path, wrap=False).epoch(0))
  assert str(e.value) == (
      f'config.stages.general_kd: corpus {path} holds 5 sequences; the stage asks for 5 batches '
      'of 2 (= 10 sequences) per epoch; set config.stages.general_kd.wrap_corpus=True to start '
      'its next pass, or lower config.stages.general_kd.steps_per_epoch')
  assert len(ids(stream(tokenizer, path, wrap=False, steps_per_epoch=2).epoch(0))) == 2


def test_corpus_smaller_than_one_batch_is_refused_not_looped(tmp_path, tokenizer):
  path = write_corpus(tmp_path / 'c.txt', LINES[:1])
  with pytest.raises(BitbertError, match=rf'corpus {path} holds 1 sequences, fewer than one '
                     r'batch of 2; give more text or lower config.stages.general_kd.batch_size'):
    ids(stream(tokenizer, path).epoch(0))


WIDE = TINY.replace(vocab_size=30522)  # the real tokenizer's ids


def run_stage(workdir, batches, epochs=2.0):
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  settings = train.Settings(lr=1e-3, epochs=epochs, batch_size=BATCH, warmup=0.1, log_every=1,
                            checkpoint_every_steps=1, checkpoint_every_secs=0.0,
                            keep_checkpoints=2, report_memory=False,
                            field='config.stages.general_kd')
  state = new_state(WIDE, init_params(WIDE, rng=jax.random.PRNGKey(0)), rng=jax.random.PRNGKey(1))
  writer = MetricsWriter(workdir, enabled=True)
  try:
    return train.train(state, name='general_kd', objective=Objective(('label',)),
                       settings=settings, batches=batches, mesh=mesh, workdir=workdir,
                       writer=writer, task=None, dev_sets=None)
  finally:
    writer.close()


class Counted(batching.StreamBatches):
  """StreamBatches that crash before global step `crash_at` (a kill between two steps)."""

  def __init__(self, inner, crash_at):
    super().__init__(inner.make, inner.batches_per_epoch, inner.batch_size, inner.name,
                     inner.field, inner.wrap)
    self.crash_at = crash_at

  def epoch(self, epoch, start=0):
    for i, batch in enumerate(super().epoch(epoch, start)):
      if epoch * self.batches_per_epoch + start + i + 1 == self.crash_at:
        raise Crash(f'killed before step {self.crash_at}')
      yield batch


@pytest.mark.parametrize('crash_at', [4, 7])  # inside the 2nd pass of epoch 0; epoch 1's 1st
def test_kill_and_resume_across_the_wrap_is_exact(tmp_path, tokenizer, crash_at):
  path = write_corpus(tmp_path / 'c.txt', LINES)
  clean, _ = run_stage(str(tmp_path / 'clean'), stream(tokenizer, path))
  killed = str(tmp_path / 'killed')
  with pytest.raises(Crash):
    run_stage(killed, Counted(stream(tokenizer, path), crash_at=crash_at))
  resumed, _ = run_stage(killed, stream(tokenizer, path))
  assert int(resumed.step) == int(clean.step) == 2 * STEPS_PER_EPOCH
  assert_trees_equal(resumed.params, clean.params)


def test_sigterm_while_streaming_a_big_corpus_checkpoints_and_resumes(tmp_path, tokenizer,
                                                                      monkeypatch):
  """2,000 lines streamed in chunks of 100; SIGTERM comes while epoch 1 re-streams them."""
  from bitbert_jax.data import corpus as corpus_lib
  monkeypatch.setattr(corpus_lib, '_LINES_PER_CALL', 100)
  path = write_corpus(tmp_path / 'big.txt', [f'{LINES[i % 5]} number {i}' for i in range(2000)])
  real, seen, term_at = corpus_lib._token_lines, [], [None]

  def tokenized(sources, tok):
    for tokens in real(sources, tok):
      seen.append(1)
      if len(seen) == term_at[0]:
        signal.raise_signal(signal.SIGTERM)
      yield tokens
  monkeypatch.setattr(corpus_lib, '_token_lines', tokenized)
  long_stream = lambda: stream(tokenizer, path, steps_per_epoch=2)
  clean, _ = run_stage(str(tmp_path / 'clean'), long_stream())
  assert len(seen) == 2 * 2000  # one whole pass per epoch (the shuffle buffer holds them all)
  seen.clear()
  term_at[0] = 2000 + 300  # mid-way through epoch 1's pass
  workdir = str(tmp_path / 'term')
  with pytest.raises(preempt.Preempted) as e:
    run_stage(workdir, long_stream())
  assert str(e.value) == ('preempted at stage general_kd step 2 during corpus streaming; re-run '
                          'the same command to resume')
  assert len(seen) <= 2000 + 400  # stopped at the next chunk, not at the end of the pass
  steps = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  assert max(steps) == 2
  term_at[0] = None
  resumed, _ = run_stage(workdir, long_stream())
  assert int(resumed.step) == 4
  assert_trees_equal(resumed.params, clean.params)


class Dry(batching.TaskBatches):
  """An epoch that yields nothing; after 3 tries the test fails instead of hanging."""

  def __init__(self):
    super().__init__(tiny_split(), 8, seed=0)
    self.tries = 0

  def epoch(self, epoch, start=0):
    self.tries += 1
    if self.tries > 3:
      raise AssertionError('the loop asked for the empty epoch again and again')
    return iter(())


def test_loop_refuses_an_epoch_that_yields_no_batch(tmp_path):
  with pytest.raises(BitbertError, match=r"stage 'general_kd': epoch 0 gave no batch at step 0 "
                     r'\(from batch 0 of 6 per epoch\): its data ran out; lower '
                     r'config.stages.general_kd.steps_per_epoch or give more data'):
    run_stage(str(tmp_path), Dry())
