"""GLUE TSV loading on the real files, synthetic bad inputs, custom splits, hub path (mocked)."""

import collections
import json
import os

import datasets
import numpy as np
import pytest

from bitbert_jax.data import glue
from bitbert_jax.errors import BitbertError
from conftest import require_glue

_glue_dir = require_glue


def _write(path, text, encoding='utf-8'):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode(encoding))
  return path


@pytest.mark.parametrize('task,split,rows', [
    ('mrpc', 'train', 3668), ('mrpc', 'validation', 408),
    ('rte', 'train', 2490), ('rte', 'validation', 277),
    ('stsb', 'train', 5749), ('stsb', 'validation', 1500),
    ('sst2', 'validation', 872), ('cola', 'validation', 1043),
    ('qnli', 'validation', 5463), ('wnli', 'train', 635), ('wnli', 'validation', 71),
])
def test_real_row_counts(task, split, rows):
  ds = glue.load_split(task, split, _glue_dir())
  assert len(ds) == rows
  assert ds.column_names[-1] == 'label'


@pytest.mark.parametrize('task,split,counts', [
    ('mrpc', 'train', {1: 2474, 0: 1194}),
    ('rte', 'validation', {0: 146, 1: 131}),  # 0 = entailment.
    ('qnli', 'validation', {0: 2702, 1: 2761}),
    ('cola', 'validation', {1: 721, 0: 322}),
    ('sst2', 'validation', {1: 444, 0: 428}),
    ('wnli', 'train', {1: 312, 0: 323}),
])
def test_real_label_distributions(task, split, counts):
  ds = glue.load_split(task, split, _glue_dir())
  assert ds.features['label'].dtype == 'int64'
  assert dict(collections.Counter(ds['label'])) == counts


def test_mrpc_bom_and_first_row():
  g = _glue_dir()
  with open(os.path.join(g, 'MRPC', 'train.tsv'), 'rb') as f:
    assert f.read(3) == b'\xef\xbb\xbf'
  ds = glue.load_split('MRPC', 'train', g)
  assert ds.column_names == ['sentence1', 'sentence2', 'label']
  assert ds[0]['sentence1'].startswith('Amrozi accused his brother, whom he called "the witness"')
  assert ds[0]['sentence2'].startswith('Referring to him as only "the witness"')
  assert ds[0]['label'] == 1
  # The header's first column reads 'Quality', not '\ufeffQuality'.
  custom = glue.load_custom_split(os.path.join(g, 'MRPC', 'dev.tsv'),
                                  ('#1 String', '#2 String'), 'Quality')
  assert len(custom) == 408 and custom[0]['label'] == 1


def test_cola_headerless_without_final_newline():
  ds = glue.load_split('cola', 'validation', _glue_dir())
  assert ds[0] == {'sentence': 'The sailors rode the breeze clear of the rocks.', 'label': 1}
  assert ds[-1] == {'sentence': 'John talked to Bill about himself.', 'label': 1}


def test_stsb_regression_labels():
  ds = glue.load_split('STS-B', 'validation', _glue_dir())
  assert ds.features['label'].dtype == 'float32'
  labels = np.asarray(ds['label'])
  assert ds[0]['label'] == 5.0 and ds[1]['label'] == 4.75
  assert labels.min() == 0.0 and labels.max() == 5.0


def test_rte_string_labels_and_quotes_kept():
  ds = glue.load_split('rte', 'train', _glue_dir())
  assert ds[0] == {'sentence1': 'No Weapons of Mass Destruction Found in Iraq Yet.',
                   'sentence2': 'Weapons of Mass Destruction Found in Iraq.', 'label': 1}
  # QUOTE_NONE: MRPC dev row 0 keeps its unbalanced leading quote.
  mrpc = glue.load_split('mrpc', 'validation', _glue_dir())
  assert mrpc[0]['sentence2'].startswith('"The foodservice pie')


def test_task_folder_accepted_as_glue_dir():
  ds = glue.load_split('wnli', 'validation', os.path.join(_glue_dir(), 'WNLI'))
  assert len(ds) == 71


_RTE_HEADER = 'index\tsentence1\tsentence2\tlabel\n'


def test_wrong_column_count_names_file_and_line(tmp_path):
  path = _write(tmp_path / 'RTE' / 'dev.tsv',
                _RTE_HEADER + '0\ta\tb\tentailment\n1\tonly two\tentailment\n')
  with pytest.raises(BitbertError) as e:
    glue.load_split('rte', 'validation', tmp_path)
  msg = str(e.value)
  assert f'{path}:3' in msg and 'expected 4' in msg and 'got 3' in msg


def test_bad_label_names_value_and_choices(tmp_path):
  _write(tmp_path / 'RTE' / 'train.tsv', _RTE_HEADER + '0\ta\tb\tmaybe\n')
  with pytest.raises(BitbertError) as e:
    glue.load_split('rte', 'train', tmp_path)
  msg = str(e.value)
  assert 'train.tsv:2' in msg and "'maybe'" in msg
  assert 'entailment' in msg and 'not_entailment' in msg


def test_bad_regression_label(tmp_path):
  header = '\t'.join(['index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2',
                       'sentence1', 'sentence2', 'score']) + '\n'
  _write(tmp_path / 'STS-B' / 'dev.tsv', header + '0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n')
  with pytest.raises(BitbertError, match=r"dev.tsv:2.*'five'"):
    glue.load_split('stsb', 'validation', tmp_path)


def test_label_index_out_of_range(tmp_path):
  _write(tmp_path / 'SST-2' / 'dev.tsv', 'sentence\tlabel\ngood\t1\nbad\t2\n')
  with pytest.raises(BitbertError, match=r"dev.tsv:3.*'2'.*negative.*positive"):
    glue.load_split('sst2', 'validation', tmp_path)


def test_missing_file_lists_existing_files(tmp_path):
  _write(tmp_path / 'RTE' / 'train.tsv', _RTE_HEADER + '0\ta\tb\tentailment\n')
  with pytest.raises(BitbertError) as e:
    glue.load_split('rte', 'validation', tmp_path)
  assert 'dev.tsv' in str(e.value) and "['train.tsv']" in str(e.value)
  with pytest.raises(BitbertError, match='does not exist'):
    glue.load_split('mrpc', 'train', tmp_path)


def test_empty_split(tmp_path):
  _write(tmp_path / 'RTE' / 'dev.tsv', _RTE_HEADER)
  with pytest.raises(BitbertError, match='empty split'):
    glue.load_split('rte', 'validation', tmp_path)
  _write(tmp_path / 'CoLA' / 'dev.tsv', '')
  with pytest.raises(BitbertError, match='empty split'):
    glue.load_split('cola', 'validation', tmp_path)


def test_header_missing_column(tmp_path):
  _write(tmp_path / 'QNLI' / 'dev.tsv', 'index\tquestion\ttext\tlabel\n0\tq\ts\tentailment\n')
  with pytest.raises(BitbertError, match=r"dev.tsv:1.*'sentence'.*header columns"):
    glue.load_split('qnli', 'validation', tmp_path)


def test_unknown_split_lists_valid():
  with pytest.raises(BitbertError, match='validation_matched, validation_mismatched'):
    glue.load_split('mnli', 'validation', '/nonexistent')
  with pytest.raises(BitbertError, match='train, validation, test'):
    glue.load_split('rte', 'dev', '/nonexistent')


def test_synthetic_mnli_qqp_and_test_split(tmp_path):
  cols = ['index', 'promptID', 'pairID', 'genre', 's1b', 's2b', 's1p', 's2p', 'sentence1',
          'sentence2', 'label1', 'gold_label']
  rows = [['0', 'p', 'q', 'g', 'x', 'x', 'x', 'x', 'A "quoted', 'B', 'neutral', 'neutral'],
          ['1', 'p', 'q', 'g', 'x', 'x', 'x', 'x', 'C', 'D', 'contradiction', 'contradiction']]
  _write(tmp_path / 'MNLI' / 'dev_matched.tsv',
         '\n'.join('\t'.join(r) for r in [cols, *rows]) + '\n')
  ds = glue.load_split('MNLI-m', 'validation_matched', tmp_path)
  assert ds['premise'] == ['A "quoted', 'C'] and ds['hypothesis'] == ['B', 'D']
  assert ds['label'] == [1, 2]
  _write(tmp_path / 'QQP' / 'train.tsv',
         'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tq1?\tq2?\t1\n')
  assert glue.load_split('qqp', 'train', tmp_path)[0] == {
      'question1': 'q1?', 'question2': 'q2?', 'label': 1}
  # Test files have a header (CoLA too) and no labels.
  _write(tmp_path / 'CoLA' / 'test.tsv', 'index\tsentence\n0\tHello there.\n')
  assert glue.load_split('cola', 'test', tmp_path)[0] == {'sentence': 'Hello there.', 'label': -1}


def test_non_utf8_tsv(tmp_path):
  path = tmp_path / 'SST-2' / 'dev.tsv'
  path.parent.mkdir()
  path.write_bytes(b'sentence\tlabel\ngood\t1\n\xff\xfe bad\t0\n')
  with pytest.raises(BitbertError, match='not UTF-8'):
    glue.load_split('sst2', 'validation', tmp_path)


def test_custom_tsv_csv_jsonl(tmp_path):
  tsv = _write(tmp_path / 'd.tsv', 'text\ty\nhello\tpos\nbye\t0\n')
  ds = glue.load_custom_split(tsv, 'text', 'y', label_names=['neg', 'pos'])
  assert ds['text'] == ['hello', 'bye'] and ds['label'] == [1, 0]
  csv_path = _write(tmp_path / 'd.csv', 'a,b,score\n"x, y",z,1.5\nu,v,2\n')
  ds = glue.load_custom_split(csv_path, ['a', 'b'], 'score', regression=True)
  assert ds['a'] == ['x, y', 'u'] and ds['label'] == [1.5, 2.0]
  assert ds.features['label'].dtype == 'float32'
  jsonl = _write(tmp_path / 'd.jsonl', '\n'.join(json.dumps(o) for o in [
      {'q': 'a', 'label': 'neg'}, {'q': 'b', 'label': 1}, {'q': 'c', 'label': '0'}]) + '\n\n')
  ds = glue.load_custom_split(jsonl, ['q'], 'label', label_names=('neg', 'pos'))
  assert ds['label'] == [0, 1, 0]


def test_custom_errors(tmp_path):
  with pytest.raises(BitbertError, match=r"unsupported extension '\.txt'.*\.tsv, \.csv, \.jsonl"):
    glue.load_custom_split(_write(tmp_path / 'd.txt', 'x'), 'text', 'y')
  bad_json = _write(tmp_path / 'b.jsonl', '{"q": "a", "label": 0}\n{"q": "b", label: 1}\n')
  with pytest.raises(BitbertError, match=r'b.jsonl:2: invalid JSON'):
    glue.load_custom_split(bad_json, 'q', 'label')
  missing_key = _write(tmp_path / 'm.jsonl', '{"q": "a"}\n')
  with pytest.raises(BitbertError, match=r"m.jsonl:1: missing keys \['label'\]"):
    glue.load_custom_split(missing_key, 'q', 'label')
  bad_label = _write(tmp_path / 'l.csv', 'text,y\na,0\nb,-1\n')
  with pytest.raises(BitbertError, match=r"l.csv:3: bad label '-1'"):
    glue.load_custom_split(bad_label, 'text', 'y')
  with pytest.raises(BitbertError, match='missing file'):
    glue.load_custom_split(tmp_path / 'nope.tsv', 'text', 'y')


def test_hub_path_mocked(monkeypatch):
  calls = []

  def fake_load(path, name, split):
    calls.append((path, name, split))
    return datasets.Dataset.from_dict(
        {'sentence1': ['a'], 'sentence2': ['b'], 'label': [3.2], 'idx': [0]})

  monkeypatch.setattr(datasets, 'load_dataset', fake_load)
  ds = glue.load_split('STS-B', 'validation')
  assert calls == [('nyu-mll/glue', 'stsb', 'validation')]
  assert ds.column_names == ['sentence1', 'sentence2', 'label']
  assert ds.features['label'].dtype == 'float32'

  def failing_load(*args, **kwargs):
    raise ConnectionError('offline')

  monkeypatch.setattr(datasets, 'load_dataset', failing_load)
  with pytest.raises(BitbertError, match='glue_dir'):
    glue.load_split('rte', 'train')


def test_headerless_tsv_and_csv_read_with_named_columns(tmp_path):
  tsv = _write(tmp_path / 'd.tsv', 'pos\tgreat film\nneg\tdull\n')
  ds = glue.load_custom_split(tsv, 'text', 'label', label_names=['neg', 'pos'],
                              columns=('label', 'text'))
  assert ds['text'] == ['great film', 'dull'] and ds['label'] == [1, 0]  # no row lost to a header
  csv_path = _write(tmp_path / 'd.csv', '1,"a, b",c\n0,d,e\n')
  ds = glue.load_custom_split(csv_path, ['s1', 's2'], 'y', columns=['y', 's1', 's2'])
  assert ds['s1'] == ['a, b', 'd'] and ds['label'] == [1, 0]


def test_headerless_errors_name_file_line_and_columns(tmp_path):
  tsv = _write(tmp_path / 'd.tsv', '1\tgood\n0\tbad\textra\n')
  with pytest.raises(BitbertError, match=r"d.tsv:2: expected 2 tab/comma-separated columns "
                     r"\['label', 'text'\], got 3"):
    glue.load_custom_split(tsv, 'text', 'label', columns=('label', 'text'))
  with pytest.raises(BitbertError, match=r"d.tsv: no text column 'sentence' among the columns "
                     r"given for this headerless file: \['label', 'text'\]"):
    glue.load_custom_split(tsv, 'sentence', 'label', columns=('label', 'text'))
  with pytest.raises(BitbertError, match=r"d.tsv: column names \['text', 'text'\] must be "
                     'distinct'):
    glue.load_custom_split(tsv, 'text', 'label', columns=('text', 'text'))
  jsonl = _write(tmp_path / 'd.jsonl', '{"text": "a", "label": 0}\n')
  with pytest.raises(BitbertError, match=r'd.jsonl: column names .* are for headerless'):
    glue.load_custom_split(jsonl, 'text', 'label', columns=('label', 'text'))
  bad = _write(tmp_path / 'b.tsv', '1\tgood\n7\tbad\n')
  with pytest.raises(BitbertError, match=r"b.tsv:2: bad label '7'"):
    glue.load_custom_split(bad, 'text', 'label', label_names=('neg', 'pos'),
                           columns=('label', 'text'))


def test_hub_offline_is_decided_once(monkeypatch):
  for var in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'HTTPS_PROXY', 'https_proxy',
              'ALL_PROXY', 'all_proxy', 'HF_ENDPOINT'):
    monkeypatch.delenv(var, raising=False)
  calls = []

  def unreachable(address, timeout):
    calls.append((address, timeout))
    raise OSError(101, 'Network is unreachable')
  monkeypatch.setattr(glue.socket, 'create_connection', unreachable)
  glue.hub_offline.cache_clear()
  try:
    assert glue.hub_offline() == 'huggingface.co unreachable: Network is unreachable'
    assert glue.hub_offline() == 'huggingface.co unreachable: Network is unreachable'
    assert calls == [(('huggingface.co', 443), 3)]  # asked once, with a short timeout
    glue.hub_offline.cache_clear()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert glue.hub_offline() == 'HF_HUB_OFFLINE is set' and len(calls) == 1
  finally:
    glue.hub_offline.cache_clear()
