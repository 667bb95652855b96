"""Task registry: aliases, shapes of the label space, GLUE main-score conventions."""

import dataclasses

import pytest

from bitbert_jax.data import tasks
from bitbert_jax.errors import BitbertError


@pytest.mark.parametrize('alias,name', [
    ('SST-2', 'sst2'), ('sst-2', 'sst2'), ('sst2', 'sst2'), ('SST_2', 'sst2'),
    ('STS-B', 'stsb'), ('sts-b', 'stsb'), ('MNLI-mm', 'mnli'), ('MNLI-m', 'mnli'),
    ('CoLA', 'cola'), ('QQP', 'qqp'), ('qnli', 'qnli'), ('RTE', 'rte'), ('WNLI', 'wnli'),
    ('MRPC', 'mrpc'),
])
def test_aliases(alias, name):
  assert tasks.get_task(alias).name == name


def test_all_nine_glue_tasks():
  assert set(tasks.GLUE_TASKS) == {
      'cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli', 'rte', 'wnli'}
  assert tasks.get_task('mnli').num_labels == 3
  assert tasks.get_task('mnli').dev_splits == ('validation_matched', 'validation_mismatched')
  assert tasks.get_task('rte').dev_splits == ('validation',)
  stsb = tasks.get_task('stsb')
  assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_names is None
  assert tasks.get_task('mrpc').text_fields == ('sentence1', 'sentence2')
  assert tasks.get_task('sst2').text_fields == ('sentence',)
  assert not tasks.get_task('cola').is_regression and tasks.get_task('cola').num_labels == 2


def test_unknown_task_lists_valid_names():
  with pytest.raises(BitbertError) as e:
    tasks.get_task('sst3')
  msg = str(e.value)
  assert "'sst3'" in msg
  for name in tasks.GLUE_TASKS:
    assert name in msg


def test_spec_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    tasks.get_task('rte').name = 'x'


@pytest.mark.parametrize('task,metrics,expected', [
    ('mrpc', {'f1': 0.9, 'accuracy': 0.8}, 0.85),
    ('qqp', {'f1': 0.7, 'accuracy': 0.9}, 0.8),
    ('stsb', {'pearson': 0.88, 'spearman': 0.86}, 0.87),
    ('cola', {'mcc': 0.5, 'accuracy': 0.9}, 0.5),
    ('sst2', {'accuracy': 0.93}, 0.93),
    ('mnli', {'validation_matched/accuracy': 0.84, 'validation_mismatched/accuracy': 0.80},
     0.84),
    ('mnli', {'accuracy': 0.81}, 0.81),
])
def test_score_conventions(task, metrics, expected):
  assert tasks.get_task(task).score(metrics) == pytest.approx(expected)


def test_score_missing_metric():
  with pytest.raises(BitbertError, match="'f1'.*accuracy"):
    tasks.get_task('mrpc').score({'accuracy': 0.8})


def test_custom_task():
  reg = tasks.custom_task('MyReg', ['a', 'b'], None)
  assert reg.name == 'myreg' and reg.is_regression and reg.metric_names == ('pearson', 'spearman')
  cls = tasks.custom_task('topic', ('text',), ['x', 'y', 'z'])
  assert cls.num_labels == 3 and cls.label_names == ('x', 'y', 'z')
  assert cls.score({'accuracy': 0.5}) == 0.5
  with pytest.raises(BitbertError, match='valid choices'):
    tasks.custom_task('t', ('text',), ['a', 'b'], metric_names=('bleu',))
  with pytest.raises(BitbertError, match='one or two'):
    tasks.custom_task('t', ('a', 'b', 'c'), ['a', 'b'])
  with pytest.raises(BitbertError, match='distinct'):
    tasks.custom_task('t', ('a',), ['a', 'a'])
