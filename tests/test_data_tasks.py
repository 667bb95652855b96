"""Task registry: aliases, shapes of the label space, GLUE main-score conventions, and a user
task's labels read as meant (classes or a regression, inferred from its training file)."""

import dataclasses
import logging

import pytest

from bitbert_jax import config_lib, pipeline, validate
from bitbert_jax.data import glue, tasks
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


# --- a user task's labels ----------------------------------------------------------------

@pytest.mark.parametrize('labels,problem,names', [
    (['1', '0', '1'], 'auto', ('0', '1')),
    (['10', '2', '1', '2'], 'auto', ('1', '2', '10')),  # numerically, not as text
    (['-1', '1', '+1', '01'], 'auto', ('-1', '1')),  # one class however it is spelled
    (['1.0', '2', '3.00'], 'auto', ('1', '2', '3')),  # integer values written as floats
    (['pos', 'neg', 'neutral'], 'auto', ('neg', 'neutral', 'pos')),
    (['2', 'other', '10'], 'auto', ('10', '2', 'other')),  # names: sorted as text
    (['0.5', '1', '2.25'], 'auto', None),  # non-integer numbers: a regression
    (['0.5', '2.25', '1'], 'classification', ('0.5', '1', '2.25')),
    (['0', '1', '1'], 'regression', None),
])
def test_label_names_inferred(labels, problem, names):
  assert tasks.infer_label_names(labels, problem, 'train.tsv') == names


def test_one_label_and_a_bad_problem_are_refused():
  with pytest.raises(BitbertError, match=r"train.tsv: every training label is '1'; a single "
                     'label is nothing to learn'):
    tasks.infer_label_names(['1', '1', '01'], 'auto', 'train.tsv')
  with pytest.raises(BitbertError, match=r"config.task.problem='classify'; valid: auto, "
                     'classification, regression'):
    tasks.infer_label_names(['0', '1'], 'classify', 'train.tsv')
  with pytest.raises(BitbertError, match='problem=regression with config.task.label_names'):
    tasks.check_problem('regression', 'neg,pos')


def _files(tmp_path, train, dev, ext='tsv'):
  paths = []
  for split, rows in (('train', train), ('dev', dev)):
    path = tmp_path / f'{split}.{ext}'
    path.write_text(''.join(f'{label}\t{text}\n' for label, text in rows))
    paths.append(str(path))
  return paths


def test_integer_labels_are_classes_and_the_log_says_so(tmp_path, caplog):
  train, dev = _files(tmp_path, [(1, 'good'), (0, 'bad'), (1, 'fine'), (2, 'meh')],
                      [(1, 'nice'), (1, 'great'), (0, 'awful'), (2, 'so-so')])
  with caplog.at_level(logging.INFO, logger='bitbert_jax'):
    task, tr, dv = glue.load_custom_task('mine', train, dev, ('text',),
                                         columns=('label', 'text'))
  assert not task.is_regression and task.label_names == ('0', '1', '2')
  assert tr['label'] == [1, 0, 1, 2] and dv['label'] == [1, 1, 0, 2]
  assert tr.features['label'].dtype == 'int64'
  lines = [r.getMessage() for r in caplog.records if 'read as' in r.getMessage()]
  assert len(lines) == 1
  for part in ('CLASSIFICATION, 3 classes', "['0', '1', '2']", "'0': 1, '1': 2, '2': 1",
               "dev majority class '1' is 50.0% of its 4 rows", 'config.task.problem=regression'):
    assert part in lines[0], lines[0]


def test_non_integer_numbers_are_a_regression(tmp_path, caplog):
  train, dev = _files(tmp_path, [(0.5, 'a'), (4.25, 'b'), (3, 'c')], [(1, 'd'), (2.5, 'e')])
  with caplog.at_level(logging.INFO, logger='bitbert_jax'):
    task, tr, dv = glue.load_custom_task('sts', train, dev, ('text',), columns=('label', 'text'))
  assert task.is_regression and task.metric_names == ('pearson', 'spearman')
  assert tr['label'] == [0.5, 4.25, 3.0] and dv['label'] == [1.0, 2.5]
  assert any('read as a REGRESSION' in r.getMessage() and 'problem=classification'
             in r.getMessage() for r in caplog.records)


def test_asked_for_regression_integers_stay_numbers(tmp_path):
  train, dev = _files(tmp_path, [(1, 'a'), (5, 'b'), (3, 'c')], [(4, 'd')])
  task, tr, dv = glue.load_custom_task('stars', train, dev, ('text',), problem='regression',
                                       columns=('label', 'text'))
  assert task.is_regression and tr['label'] == [1.0, 5.0, 3.0] and dv['label'] == [4.0]


def test_a_dev_label_unseen_in_train_names_file_line_and_value(tmp_path):
  train, dev = _files(tmp_path, [(0, 'a'), (1, 'b')], [(1, 'c'), (0, 'd'), (2, 'e')])
  with pytest.raises(BitbertError, match=r"dev.tsv:3: label '2' does not occur in the training "
                     r"file .*train.tsv; its classes: \['0', '1'\]"):
    glue.load_custom_task('mine', train, dev, ('text',), columns=('label', 'text'))


def test_a_one_class_training_file_is_refused(tmp_path):
  train, dev = _files(tmp_path, [('pos', 'a'), ('pos', 'b')], [('pos', 'c')])
  with pytest.raises(BitbertError, match=r"train.tsv: every training label is 'pos'"):
    glue.load_custom_task('mine', train, dev, ('text',), columns=('label', 'text'))


def test_jsonl_numbers_and_given_label_names(tmp_path):
  for split, labels in (('train', [3, 1, 2, 1]), ('dev', [2.0, 3])):
    (tmp_path / f'{split}.jsonl').write_text(''.join(f'{{"t": "x", "y": {v}}}\n' for v in labels))
  task, tr, dv = glue.load_custom_task('stars', tmp_path / 'train.jsonl', tmp_path / 'dev.jsonl',
                                       ('t',), 'y')
  assert task.label_names == ('1', '2', '3') and tr['label'] == [2, 0, 1, 0]
  assert dv['label'] == [1, 2]
  # Given names keep their meaning: a label is a name or an integer index into them.
  (tmp_path / 'dev.jsonl').write_text('{"t": "x", "y": "b"}\n')
  task, tr, _ = glue.load_custom_task('stars', tmp_path / 'train.jsonl', tmp_path / 'dev.jsonl',
                                      ('t',), 'y', label_names=('a', 'b', 'c', 'd'))
  assert task.label_names == ('a', 'b', 'c', 'd') and tr['label'] == [3, 1, 2, 1]


def _config():
  c = config_lib.base_config({})
  c.stages.finetune, c.pipeline = config_lib.stage('finetune'), 'finetune'
  return c


def _custom_config(tmp_path, **task):
  c = _config()
  c.task.update(train_file=str(tmp_path / 'train.tsv'), dev_file=str(tmp_path / 'dev.tsv'),
                columns='label,text', max_length=16, **task)
  return c


def test_the_pipeline_reads_a_headerless_01_file_as_classes(tmp_path, minilm):
  _files(tmp_path, [(0, 'dull'), (1, 'great'), (1, 'fine')], [(0, 'bad'), (1, 'good')])
  c = _custom_config(tmp_path)
  validate.validate_config(c, 1)
  task, data, _ = pipeline.load_task_data(c, minilm)
  assert task.label_names == ('0', '1') and data.train.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize('fields,message', [
    (dict(problem='ordinal'), r"config.task.problem='ordinal'; valid: auto, classification"),
    (dict(problem='regression', label_names='neg,pos'),
     r'problem=regression with config.task.label_names'),
])
def test_config_problem_is_checked(tmp_path, fields, message):
  _files(tmp_path, [(0, 'a'), (1, 'b')], [(0, 'c')])
  with pytest.raises(BitbertError, match=message):
    validate.validate_config(_custom_config(tmp_path, **fields), 1)


def test_config_problem_is_for_custom_tasks_only():
  c = _config()
  c.task.problem = 'regression'
  with pytest.raises(BitbertError, match=r"config.task.problem='regression' is for custom tasks"):
    validate.validate_config(c, 1)
