"""A full disk: a save that cannot fit stops with one line naming the path and the space, and
leaves nothing half-written. The disk is real: a small tmpfs (root only; skipped elsewhere)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import sample_data
from bitbert_jax import checkpoint as ckpt_lib
from bitbert_jax import fs
from bitbert_jax import pipeline
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import init_params
from bitbert_jax.train_state import new_state
from helpers import ROOT, TINY


@pytest.fixture
def small_disk(tmp_path):
  """A directory on its own 8 MiB filesystem."""
  where = tmp_path / 'disk'
  where.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(where)],
                           capture_output=True, check=False)
  if mounted.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.decode().strip()}')
  yield str(where)
  subprocess.run(['umount', '-l', str(where)], check=False)


def mib_tree(mib):
  # Random: Orbax compresses, and constant arrays would take no space at all.
  return {'w': jax.random.normal(jax.random.PRNGKey(0), (mib, 1 << 18), jnp.float32)}


def test_a_checkpoint_that_cannot_fit_stops_before_writing(small_disk):
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(small_disk, 'ck'))
  with pytest.raises(BitbertError) as e:
    ckpts.save(1, mib_tree(1), {'step': 1})
  message = str(e.value)
  assert message.startswith('disk full: checkpoint step 1 at ' + os.path.join(small_disk, 'ck'))
  assert 'needs about 65 MiB, its filesystem has 8 MiB free' in message
  assert os.listdir(os.path.join(small_disk, 'ck')) == [] and ckpts.all_steps() == []


def test_a_save_that_runs_out_midway_is_removed_and_named(small_disk, monkeypatch):
  monkeypatch.setattr(fs, 'require_space', lambda *a: None)  # the disk filled after the check
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(small_disk, 'ck'))
  with pytest.raises(BitbertError, match=r'^disk full: checkpoint step 3 at .* did not fit: its '
                                         r'filesystem has [0-9] MiB free'):
    ckpts.save(3, mib_tree(12), {'step': 3})
  assert os.listdir(os.path.join(small_disk, 'ck')) == []  # Orbax's temp dir is gone
  assert fs.free_bytes(small_disk) > 7 << 20  # and with it the space it took
  assert ckpts.save(4, mib_tree(1), {'step': 4}) and ckpts.all_steps() == [4]  # saves go on
  ckpts.close()


@pytest.mark.parametrize('check', [True, False], ids=['before_writing', 'midway'])
def test_a_stage_output_that_cannot_fit_leaves_no_output(small_disk, monkeypatch, check):
  if not check:
    monkeypatch.setattr(fs, 'require_space', lambda *a: None)
  big = TINY.replace(vocab_size=40000, hidden_size=64)  # 10 MiB of word embeddings
  state = new_state(big, init_params(big, rng=jax.random.PRNGKey(0)), rng=jax.random.PRNGKey(1))
  stage_dir = os.path.join(small_disk, '01_stage')
  with pytest.raises(BitbertError, match=r'^disk full: the stage output at '):
    pipeline._save_stage(stage_dir, state, {'kind': 'finetune', 'dev': None})  # pylint: disable=protected-access
  assert os.listdir(stage_dir) == [] and pipeline.load_stage_output(stage_dir) is None


def train_small(workdir, tmp_path, tiny_pretrained):
  """The CLI on a smoke-sized run in `workdir`, which must fail with exit 2: its last line."""
  glue = sample_data.write_sample_glue(str(tmp_path / 'glue'), tasks=('mrpc',), train_size=40,
                                       dev_size=16)
  out = subprocess.run(
      [sys.executable, '-m', 'bitbert_jax.main',
       f'--config=configs/xtc.py:preset=smoke,pretrained={tiny_pretrained},layers=1',
       f'--config.task.glue_dir={glue}', f'--workdir={workdir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  return out.stderr.strip().splitlines()[-1]


def test_the_cli_on_a_full_disk_exits_2_with_one_line(small_disk, tmp_path, tiny_pretrained):
  workdir = os.path.join(small_disk, 'run')
  last = train_small(workdir, tmp_path, tiny_pretrained)
  assert last.startswith(f'error: disk full: checkpoint step 5 at {workdir}/'), last
  assert not [r for r, _, files in os.walk(workdir) for f in files if f == 'stage.json']


def test_the_cli_on_a_disk_that_fills_up_exits_2_with_one_line(small_disk, tmp_path,
                                                               tiny_pretrained):
  filler = os.path.join(small_disk, 'filler')
  with open(filler, 'wb') as f:  # every block taken, then 256 KiB given back: room for the
    try:                         # workdir's lock and config, not for the tokenizer's files
      while True:
        f.write(b'\0' * (1 << 16))
        f.flush()
    except OSError:
      pass
  os.truncate(filler, os.path.getsize(filler) - (256 << 10))
  workdir = os.path.join(small_disk, 'run')
  last = train_small(workdir, tmp_path, tiny_pretrained)
  assert last.startswith(f'error: disk full: a write at {workdir}/'), last  # the file written
  assert 'its filesystem has 0 MiB free' in last, last
