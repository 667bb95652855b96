"""A new user's first run: paths relative to the current directory, the offline default (the
real labelled set shipped in the package, hub decided once), SIGTERM while tokenizing."""
import logging
import os
import signal

import datasets
import pytest

from bitbert_jax import data as data_lib
from bitbert_jax import paths, pipeline, preempt
from bitbert_jax.errors import BitbertError
from bitbert_jax.main import run
from helpers import load_config  # pylint: disable=g-bad-import-order


def test_every_path_is_made_absolute_from_the_current_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs('models/bert')
  c = load_config('multistage', 'preset=smoke,pretrained=models/bert,teacher=org/name,'
                  'augment=True')
  c.tokenizer = './tok'
  c.corpus = 'wiki.txt,hub:wikitext/wikitext-2-raw-v1:train:text,more'
  c.task.glue_dir, c.task.train_file, c.task.dev_file = 'glue', 'd/train.tsv', '../dev.tsv'
  c.stages.augment.glove = '~/glove.txt'
  paths.absolute_config(c)
  here = str(tmp_path)
  assert c.pretrained == f'{here}/models/bert'
  assert c.teacher == 'org/name'  # a hub id, not a folder here
  assert c.tokenizer == f'{here}/tok'
  assert c.corpus == f'{here}/wiki.txt,hub:wikitext/wikitext-2-raw-v1:train:text,{here}/more'
  assert (c.task.glue_dir, c.task.train_file) == (f'{here}/glue', f'{here}/d/train.tsv')
  assert c.task.dev_file == os.path.join(os.path.dirname(here), 'dev.tsv')
  assert c.stages.augment.glove == os.path.expanduser('~/glove.txt')
  c.pretrained, c.task.glue_dir, c.corpus = 'minilm', '', ''
  paths.absolute_config(c)
  assert (c.pretrained, c.task.glue_dir, c.corpus) == ('minilm', '', '')


def test_shipped_set_is_small_real_and_licensed():
  d = pipeline.SHIPPED_DIR
  assert sorted(os.listdir(d)) == ['LICENSE', 'SOURCE.md', 'dev.tsv', 'train.tsv']
  assert sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) < 1_000_000
  assert 'CC BY 4.0' in open(os.path.join(d, 'SOURCE.md')).read()
  task, train_split, devs = pipeline.shipped_task()
  dev = devs['validation']
  assert (len(train_split), len(dev)) == (2400, 600)
  assert task.label_names == ('negative', 'positive') and task.metric_names == ('accuracy',)
  assert set(train_split['label']) == set(dev['label']) == {0, 1}
  # The originals repeat 18 sentences; one of them ('Works great!.') falls on both sides.
  assert set(train_split['sentence']) & set(dev['sentence']) == {'Works great!.'}
  assert 'Crust is not good.' in train_split['sentence']  # real review text, not a template


def test_offline_default_is_the_shipped_set_with_one_warning(tmp_path, minilm, monkeypatch,
                                                             caplog):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  data_lib.hub_offline.cache_clear()
  monkeypatch.setattr(datasets, 'load_dataset', lambda *a, **k: pytest.fail('hub was asked'))
  c = load_config('multistage', 'preset=smoke')
  c.task.glue_dir = ''
  try:
    with caplog.at_level(logging.WARNING, logger='bitbert_jax'):
      task, data, source = pipeline.load_task_data(c, minilm)
  finally:
    data_lib.hub_offline.cache_clear()
  assert (task.name, source) == ('sentiment', 'shipped:sentiment')
  assert len(data.train) == c.task.max_train_examples and len(data.dev['validation']) == 32
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and 'hub is unreachable (HF_HUB_OFFLINE is set)' in warnings[0]


class SlowTokenizer:
  """The real tokenizer; its 2nd call brings a SIGTERM, as if the user stopped a long encode."""

  def __init__(self, real):
    self.real, self.calls = real, 0

  def __getattr__(self, name):
    return getattr(self.real, name)

  def __call__(self, *args, **kwargs):
    self.calls += 1
    if self.calls == 2:
      signal.raise_signal(signal.SIGTERM)
    return self.real(*args, **kwargs)


def test_sigterm_while_tokenizing_stops_cleanly_and_writes_nothing(tmp_path, tiny_pretrained,
                                                                   glue, monkeypatch):
  from bitbert_jax.data import tokenize as tokenize_lib
  monkeypatch.setattr(tokenize_lib, '_CHUNK', 16)  # 64 training rows: 4 chunks
  tokenizers = []
  real_load = data_lib.load_tokenizer
  monkeypatch.setattr(data_lib, 'load_tokenizer',
                      lambda d: tokenizers.append(SlowTokenizer(real_load(d))) or tokenizers[-1])
  c = load_config('xtc', f'preset=smoke,pretrained={tiny_pretrained},layers=1')
  c.task.glue_dir = glue
  workdir = str(tmp_path / 'runs' / 'x')
  with pytest.raises(preempt.Preempted, match=r'^preempted during tokenization; re-run the same '
                     'command to resume$'):
    run(c, workdir)
  assert tokenizers[0].calls == 2  # stopped at the next chunk, not after the split
  assert not os.path.exists(tmp_path / 'runs')  # left as it found it: nothing half-written


def test_headerless_custom_task_by_column_names(tmp_path, minilm):
  from bitbert_jax import validate  # pylint: disable=g-import-not-at-top
  for split, rows in (('train', 'pos\tgreat\nneg\tdull\npos\tfine\n'), ('dev', 'neg\tbad\n')):
    (tmp_path / f'{split}.tsv').write_text(rows)
  c = load_config('xtc', 'preset=smoke')
  c.task.train_file, c.task.dev_file = str(tmp_path / 'train.tsv'), str(tmp_path / 'dev.tsv')
  c.task.columns, c.task.label_names = 'label,text', 'neg,pos'
  validate.validate_config(c, 1)
  task, data, _ = pipeline.load_task_data(c, minilm)
  assert task.text_fields == ('text',)  # every column but the label
  assert sorted(data.raw_train['label']) == [0, 1, 1] and len(data.dev['validation']) == 1
  c.task.label_column = 'y'
  with pytest.raises(BitbertError, match=r"config.task.label_column='y' is not among "
                     r"config.task.columns='label,text'"):
    validate.validate_config(c, 1)
  c.task.label_column, c.task.text_columns = 'label', 'sentence'
  with pytest.raises(BitbertError, match=r"config.task.text_columns='sentence': not among "
                     r"config.task.columns='label,text'"):
    validate.validate_config(c, 1)
