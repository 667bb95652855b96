"""Task specifications: the nine GLUE tasks plus user-defined ones."""

import dataclasses
import math
import re
from typing import Mapping, Sequence

from bitbert_jax.errors import BitbertError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a sentence(-pair) task looks like to the loaders, model and metrics.

  Attributes:
    name: lowercase canonical name, e.g. 'mrpc'.
    text_fields: dataset column names of the one or two input texts.
    label_names: class names in index order, or None for regression.
    metric_names: metrics whose mean is the task's main score (GLUE convention).
    dev_splits: evaluation split names; the first one carries the main score.
  """
  name: str
  text_fields: tuple[str, ...]
  label_names: tuple[str, ...] | None
  metric_names: tuple[str, ...]
  dev_splits: tuple[str, ...] = ('validation',)

  @property
  def is_regression(self) -> bool:
    return self.label_names is None

  @property
  def num_labels(self) -> int:
    return 1 if self.label_names is None else len(self.label_names)

  @property
  def is_pair(self) -> bool:
    return len(self.text_fields) == 2

  def score(self, metrics: Mapping[str, float]) -> float:
    """Main score: mean of `metric_names` (F1/acc for MRPC, Pearson/Spearman for STS-B, ...).

    Args:
      metrics: output of `compute_metrics`, or a dict whose keys are prefixed by split
        ('validation_matched/accuracy'); with several dev splits the first one counts.

    Returns:
      The task's headline number as a Python float.
    """
    prefix = self.dev_splits[0] + '/'
    values = []
    for m in self.metric_names:
      if prefix + m in metrics:
        values.append(float(metrics[prefix + m]))
      elif m in metrics:
        values.append(float(metrics[m]))
      else:
        raise BitbertError(
            f'task {self.name!r}: metric {m!r} (or {prefix + m!r}) missing from metrics; '
            f'got keys {sorted(metrics)}; the score needs {list(self.metric_names)}')
    return sum(values) / len(values)


_ACC = ('accuracy',)
_F1_ACC = ('f1', 'accuracy')

GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t for t in (
        TaskSpec('cola', ('sentence',), ('unacceptable', 'acceptable'), ('mcc',)),
        TaskSpec('sst2', ('sentence',), ('negative', 'positive'), _ACC),
        TaskSpec('mrpc', ('sentence1', 'sentence2'), ('not_equivalent', 'equivalent'), _F1_ACC),
        TaskSpec('qqp', ('question1', 'question2'), ('not_duplicate', 'duplicate'), _F1_ACC),
        TaskSpec('stsb', ('sentence1', 'sentence2'), None, ('pearson', 'spearman')),
        TaskSpec('mnli', ('premise', 'hypothesis'), ('entailment', 'neutral', 'contradiction'),
                 _ACC, ('validation_matched', 'validation_mismatched')),
        TaskSpec('qnli', ('question', 'sentence'), ('entailment', 'not_entailment'), _ACC),
        TaskSpec('rte', ('sentence1', 'sentence2'), ('entailment', 'not_entailment'), _ACC),
        TaskSpec('wnli', ('sentence1', 'sentence2'), ('not_entailment', 'entailment'), _ACC),
    )
}

# Extra spellings people use; anything else is normalised by dropping '-', '_' and case.
_ALIASES = {
    'sst': 'sst2', 'sts': 'stsb', 'mnlim': 'mnli', 'mnlimm': 'mnli', 'mnlimatched': 'mnli',
    'mnlimismatched': 'mnli',
}


def _normalise(name: str) -> str:
  return re.sub(r'[\s_\-]', '', name).lower()


def get_task(name: 'str | TaskSpec') -> TaskSpec:
  """Looks up a GLUE task by case-insensitive name ('SST-2', 'sts-b', 'MNLI-mm', 'cola')."""
  if isinstance(name, TaskSpec):
    return name
  if not isinstance(name, str):
    raise BitbertError(f'task must be a name string, got {type(name).__name__}; '
                       f'valid tasks: {", ".join(GLUE_TASKS)}')
  key = _normalise(name)
  key = _ALIASES.get(key, key)
  if key not in GLUE_TASKS:
    raise BitbertError(f'unknown task {name!r}; valid tasks: {", ".join(GLUE_TASKS)} '
                       '(case-insensitive; dashes ignored, e.g. SST-2, STS-B, MNLI-mm)')
  return GLUE_TASKS[key]


def custom_task(name: str,
                text_fields: 'tuple[str, ...] | list[str]',
                label_names: 'tuple[str, ...] | list[str] | None',
                metric_names: 'tuple[str, ...] | None' = None) -> TaskSpec:
  """A user task; `label_names=None` means regression (default metrics Pearson/Spearman)."""
  text_fields = tuple(text_fields)
  if len(text_fields) not in (1, 2) or not all(isinstance(f, str) and f for f in text_fields):
    raise BitbertError(f'custom task {name!r}: text_fields must be one or two column names, '
                       f'got {text_fields!r}')
  if label_names is not None:
    label_names = tuple(str(n) for n in label_names)
    if len(label_names) < 2 or len(set(label_names)) != len(label_names):
      raise BitbertError(f'custom task {name!r}: label_names must be >= 2 distinct names, '
                         f'got {label_names!r} (use None for regression)')
  if metric_names is None:
    metric_names = ('pearson', 'spearman') if label_names is None else _ACC
  valid = ('accuracy', 'f1', 'mcc') if label_names is not None else ('pearson', 'spearman')
  bad = [m for m in metric_names if m not in valid]
  if bad or not metric_names:
    raise BitbertError(f'custom task {name!r}: metric_names {list(metric_names)!r} invalid; '
                       f'valid choices: {list(valid)}')
  if 'f1' in metric_names and len(label_names) != 2:
    raise BitbertError(f'custom task {name!r}: metric f1 needs exactly 2 labels, '
                       f'got {len(label_names)}')
  return TaskSpec(name.lower(), text_fields, label_names, tuple(metric_names))


PROBLEMS = ('auto', 'classification', 'regression')  # config.task.problem


def check_problem(problem: str, label_names: str = '') -> None:
  """config.task.problem is a known kind and agrees with config.task.label_names."""
  if problem not in PROBLEMS:
    raise BitbertError(f'config.task.problem={problem!r}; valid: {", ".join(PROBLEMS)} (auto: '
                       'integer or named labels are classes, non-integer numbers a regression)')
  if problem == 'regression' and label_names:
    raise BitbertError(f'config.task.problem=regression with config.task.label_names='
                       f'{label_names!r}: class names need a classification; drop one of them')


def label_key(text: str) -> 'int | float | str':
  """What identifies a class: its integer or number value (so '1', '01' and '1.0' agree), else
  its text."""
  try:
    return int(text)
  except ValueError:
    pass
  try:
    value = float(text)
  except ValueError:
    return text
  if not math.isfinite(value):
    return text
  return int(value) if value.is_integer() else value


def infer_label_names(labels: Sequence[str], problem: str,
                      source: str) -> 'tuple[str, ...] | None':
  """Class names in index order read off a training file's labels; None for a regression.

  Args:
    labels: the raw label texts of every training row.
    problem: 'auto' (integers or names: classes; non-integer numbers: a regression),
      'classification' or 'regression'.
    source: the training file, for the error messages.

  Returns:
    Sorted class names (numerically when every label is a number), or None for a regression.
  """
  check_problem(problem)
  names = {}  # key -> the name it gets: an integer's canonical text, else its first spelling
  for text in labels:
    key = label_key(text)
    names.setdefault(key, str(key) if isinstance(key, int) else text)
  numeric = all(not isinstance(k, str) for k in names)
  if len(names) < 2:
    only = next(iter(names.values()), None)
    raise BitbertError(f'{source}: every training label is {only!r}; a single label is nothing to '
                       'learn: a task needs >= 2 distinct labels')
  if problem == 'regression' or (problem == 'auto' and numeric and
                                 any(isinstance(k, float) for k in names)):
    return None
  order = sorted(names) if numeric else sorted(names, key=lambda k: names[k])
  return tuple(names[k] for k in order)
