"""Metrics against hand-computed values and scipy."""

import numpy as np
import pytest
import scipy.stats

from bitbert_jax.data import metrics
from bitbert_jax.errors import BitbertError


def _logits(pred, num_classes=2):
  return np.eye(num_classes)[np.asarray(pred)] * 3.0 - 1.0


def test_mrpc_f1_accuracy_by_hand():
  # tp=2 (rows 0,4), fp=1 (row 1), fn=1 (row 3), tn=1 (row 2).
  pred = [1, 1, 0, 0, 1]
  labels = [1, 0, 0, 1, 1]
  out = metrics.compute_metrics('mrpc', _logits(pred), labels)
  assert out['accuracy'] == pytest.approx(3 / 5)
  assert out['f1'] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  assert out['score'] == pytest.approx((3 / 5 + 4 / 6) / 2)


def test_cola_mcc_by_hand():
  pred = np.array([1, 1, 0, 0, 1])
  labels = np.array([1, 0, 0, 1, 1])
  # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
  out = metrics.compute_metrics('cola', _logits(pred), labels)
  assert out['mcc'] == pytest.approx(1 / 6)
  assert out['score'] == pytest.approx(1 / 6)
  assert metrics.matthews_corr(labels, labels) == pytest.approx(1.0)
  assert metrics.matthews_corr(1 - labels, labels) == pytest.approx(-1.0)
  assert metrics.matthews_corr(np.ones(5, int), labels) == 0.0  # Undefined -> 0.


def test_multiclass_mcc_matches_definition():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 200)
  p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 3, 200))
  # Definition: Pearson correlation of the one-hot indicator matrices (Gorodkin 2004).
  x1, x2 = np.eye(3)[p], np.eye(3)[y]
  x1, x2 = x1 - x1.mean(0), x2 - x2.mean(0)
  expected = (x1 * x2).sum() / np.sqrt((x1 ** 2).sum() * (x2 ** 2).sum())
  assert metrics.matthews_corr(p, y) == pytest.approx(expected)


def test_f1_no_positives_is_zero():
  assert metrics.f1_binary(np.zeros(4, int), np.zeros(4, int)) == 0.0


def test_weights_drop_padding_rows():
  pred = _logits([1, 0, 1, 1])
  labels = np.array([1, 0, 0, 0])
  out = metrics.compute_metrics('sst2', pred, labels, weights=np.array([1, 1, 0, 0], np.float32))
  assert out['accuracy'] == 1.0
  assert metrics.compute_metrics('sst2', pred, labels)['accuracy'] == 0.5


def test_stsb_against_scipy():
  rng = np.random.default_rng(1)
  y = rng.uniform(0, 5, 300).astype(np.float32)
  p = (y + rng.normal(0, 1.5, 300)).astype(np.float32)
  out = metrics.compute_metrics('stsb', p[:, None], y)
  pearson = scipy.stats.pearsonr(p.astype(np.float64), y.astype(np.float64))[0]
  spearman = scipy.stats.spearmanr(p, y)[0]
  assert out['pearson'] == pytest.approx(pearson, rel=1e-6)
  assert out['spearman'] == pytest.approx(spearman, rel=1e-6)
  assert out['score'] == pytest.approx((pearson + spearman) / 2, rel=1e-6)
  assert 0.5 < out['pearson'] < 1.0
  assert metrics.compute_metrics('stsb', p, y)['pearson'] == out['pearson']


def test_stsb_constant_predictions_give_zero_not_nan():
  out = metrics.compute_metrics('stsb', np.ones(10), np.arange(10.0))
  assert out['pearson'] == 0.0 and out['spearman'] == 0.0


def test_mnli_three_classes_and_class_id_predictions():
  labels = np.array([0, 1, 2, 2])
  logits = np.array([[5, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]], np.float32)
  assert metrics.compute_metrics('mnli', logits, labels)['accuracy'] == 0.75
  assert metrics.compute_metrics('mnli', np.array([0, 1, 1, 2]), labels)['accuracy'] == 0.75


def test_bad_shapes():
  with pytest.raises(BitbertError, match='3 classes, task has 2'):
    metrics.compute_metrics('rte', np.zeros((4, 3)), np.zeros(4))
  with pytest.raises(BitbertError, match='does not match labels'):
    metrics.compute_metrics('rte', np.zeros((5, 2)), np.zeros(4))
  with pytest.raises(BitbertError, match='non-zero weight'):
    metrics.compute_metrics('rte', np.zeros((2, 2)), np.zeros(2), weights=np.zeros(2))
