"""GLUE metrics in numpy/scipy (no sklearn): accuracy, binary F1, MCC, Pearson, Spearman."""

import numpy as np
import scipy.stats

from bitbert_jax.data import tasks as tasks_lib
from bitbert_jax.errors import BitbertError


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(pred == labels))


def f1_binary(pred: np.ndarray, labels: np.ndarray) -> float:
  """F1 of the positive class 1; 0.0 when there are no true or predicted positives."""
  tp = np.sum((pred == 1) & (labels == 1))
  fp = np.sum((pred == 1) & (labels != 1))
  fn = np.sum((pred != 1) & (labels == 1))
  denom = 2 * tp + fp + fn
  return float(2 * tp / denom) if denom else 0.0


def matthews_corr(pred: np.ndarray, labels: np.ndarray) -> float:
  """Multi-class Matthews correlation (Gorodkin's R_K); 0.0 when undefined (constant input)."""
  classes = np.union1d(pred, labels)
  p = np.searchsorted(classes, pred)
  t = np.searchsorted(classes, labels)
  k = len(classes)
  conf = np.zeros((k, k), np.float64)
  np.add.at(conf, (t, p), 1.0)
  n = conf.sum()
  correct = np.trace(conf)
  t_sum, p_sum = conf.sum(1), conf.sum(0)
  cov_tp = correct * n - t_sum @ p_sum
  cov_pp = n * n - p_sum @ p_sum
  cov_tt = n * n - t_sum @ t_sum
  denom = np.sqrt(cov_pp * cov_tt)
  return float(cov_tp / denom) if denom else 0.0


def _corr(fn, x: np.ndarray, y: np.ndarray) -> float:
  # Constant predictions (early training) make correlation undefined: report 0, not NaN,
  # so best-checkpoint comparisons stay well-defined.
  if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return 0.0
  return float(fn(x, y)[0])


def compute_metrics(task: 'str | tasks_lib.TaskSpec', predictions: np.ndarray,
                    labels: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
  """GLUE metrics of one split.

  Args:
    task: TaskSpec or GLUE name.
    predictions: logits [N, C] (or class ids [N]) for classification; scores [N] or [N, 1]
      for regression.
    labels: [N] class ids or float targets.
    weights: optional [N]; rows with weight 0 (batch padding) are ignored.

  Returns:
    {'accuracy', 'f1' (MRPC/QQP), 'mcc' (CoLA), 'pearson', 'spearman' (STS-B), ...,
     'score': task.score(...)} as Python floats.
  """
  task = tasks_lib.get_task(task)
  predictions = np.asarray(predictions)
  labels = np.asarray(labels).reshape(-1)
  n = len(labels)
  if predictions.shape[:1] != (n,):
    raise BitbertError(f'compute_metrics({task.name}): predictions shape {predictions.shape} '
                       f'does not match labels [{n}]')
  keep = np.ones(n, bool) if weights is None else np.asarray(weights).reshape(-1) != 0
  if keep.shape != (n,):
    raise BitbertError(f'compute_metrics({task.name}): weights shape {keep.shape} != [{n}]')
  predictions, labels = predictions[keep], labels[keep]
  if not len(labels):
    raise BitbertError(f'compute_metrics({task.name}): no examples with non-zero weight')

  out = {}
  if task.is_regression:
    if predictions.ndim == 2 and predictions.shape[1] == 1:
      predictions = predictions[:, 0]
    if predictions.ndim != 1:
      raise BitbertError(f'compute_metrics({task.name}): regression predictions must be [N] '
                         f'or [N, 1], got {predictions.shape}')
    x, y = predictions.astype(np.float64), labels.astype(np.float64)
    out['pearson'] = _corr(scipy.stats.pearsonr, x, y)
    out['spearman'] = _corr(scipy.stats.spearmanr, x, y)
  else:
    if predictions.ndim == 2:
      if predictions.shape[1] != task.num_labels:
        raise BitbertError(f'compute_metrics({task.name}): logits have '
                           f'{predictions.shape[1]} classes, task has {task.num_labels} '
                           f'{list(task.label_names)}')
      predictions = predictions.argmax(-1)
    elif predictions.ndim != 1:
      raise BitbertError(f'compute_metrics({task.name}): predictions must be logits [N, C] '
                         f'or class ids [N], got {predictions.shape}')
    pred, y = predictions.astype(np.int64), labels.astype(np.int64)
    out['accuracy'] = accuracy(pred, y)
    if 'f1' in task.metric_names:
      out['f1'] = f1_binary(pred, y)
    if 'mcc' in task.metric_names:
      out['mcc'] = matthews_corr(pred, y)
  out['score'] = task.score(out)
  return out
