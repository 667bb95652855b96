"""ONNX export: ONNX Runtime against `bitbert_jax.predict`, the graph's integer matmuls and packed
weights, its size, the CLI and bad input.

What "equal" means: the per-token 8-bit activation quantizer is discontinuous, so float32 ops
that round differently in XLA and ONNX Runtime (exp in softmax, erf, LayerNorm and attention
sums, XLA's fused multiply-adds) flip a few activation codes, and flips compound over layers.
Hence `precision='float64'`: the graph and `predict` both compute the float ops in float64:
  * end to end on real MRPC dev text, float64: the same labels, logits within 1e-4 (measured:
    0.0, bit-identical float32 logits, on all three students);
  * the default float32 graph against predict's default float32: the same labels, logits within
    1e-2 (measured 3.0e-3 on the 1-1-8 student);
  * every quantized linear layer of the float32 graph fed the JAX layer's input (teacher
    forcing): outputs within 1e-6 relative (measured <= 2.4e-7: one float32 rounding of the
    bias add).
"""
import json
import os
import subprocess
import sys

import conftest
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import utils as onnx_utils

import bitbert_serve
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig, init_params
from bitbert_jax.model.shapes import random_params
from bitbert_jax.packed import onnx_export, write
from bitbert_jax.packed.format import WEIGHTS, read_manifest
from bitbert_jax.packed.model import load_packed, predict, predict_logits
from bitbert_jax.packed.student import save_student
from bitbert_jax.quant import policy_from_name
from bitbert_jax.split import split_params
from bitbert_serve.textio import read_texts

GLUE_DIR = conftest.glue_dir() or ''
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRPC = ('not_equivalent', 'equivalent')
N_DEV = 64
TINY = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=128, num_labels=2,
                  label_names=MRPC)


def _mrpc_dev_texts():
  path = os.path.join(GLUE_DIR, 'MRPC', 'dev.tsv')
  if not os.path.isfile(path):
    pytest.skip(f'{path} missing (set GLUE_DIR)')
  return read_texts(path, ['#1 String', '#2 String'])[:N_DEV]


def _session(path):
  return ort.InferenceSession(path, providers=['CPUExecutionProvider'])


def _ort_logits(session, batch):
  return session.run(None, {k: np.asarray(v, np.int64) for k, v in batch.items()})[0]


def _student(minilm, variant):
  """Real MiniLM weights (+ a seeded head) under the variant's policy; split from ternary."""
  from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  config, params = load_hf_checkpoint(minilm, num_labels=2, label_names=MRPC)
  policy = policy_from_name('2-2-8' if variant == 'split' else variant)
  if variant == 'split':
    params, policy = split_params(params, policy)
  return config, params, policy


@pytest.fixture(scope='module', params=['1-1-8', '2-2-8', 'split'])
def exported(request, tmp_path_factory, minilm):
  """(packed dir, onnx dir, PackedModel, encoded MRPC dev batch, predict's logits)."""
  config, params, policy = _student(minilm, request.param)
  root = tmp_path_factory.mktemp(request.param)
  packed = write.pack(config, params, policy, root / 'packed', tokenizer_dir=minilm)
  onnx_dir = onnx_export.export_onnx(packed, root / 'onnx', precision='float64')
  model = load_packed(packed, precision='float64')
  texts = _mrpc_dev_texts()
  logits, labels = predict(model, texts)
  batch = model.encode(texts, 128)
  return packed, onnx_dir, model, batch, logits, labels


def test_onnx_runtime_reproduces_predict_labels(exported):
  _, onnx_dir, model, batch, logits, labels = exported
  got = _ort_logits(_session(os.path.join(onnx_dir, 'model.onnx')), batch)
  assert got.shape == logits.shape
  assert [model.label_names[i] for i in got.argmax(-1)] == labels
  assert model.precision == 'float64'
  np.testing.assert_allclose(got, logits, atol=1e-4, rtol=0)


def test_default_float32_graph_matches_predict_in_float32(exported, tmp_path):
  packed, _, _, batch, _, _ = exported
  model = load_packed(packed)  # the defaults: float32 on both sides
  assert model.precision == 'float32'
  want = predict_logits(model, batch)
  onnx_dir = onnx_export.export_onnx(packed, tmp_path / 'o32')
  assert json.load(open(os.path.join(onnx_dir, 'manifest.json')))['precision'] == 'float32'
  got = _ort_logits(_session(os.path.join(onnx_dir, 'model.onnx')), batch)
  assert (got.argmax(-1) == want.argmax(-1)).all()
  np.testing.assert_allclose(got, want, atol=1e-2, rtol=0)


def _layer_io(model, batch):
  """{QDense path: (input, output)} of the JAX packed model on batch, each layer computing
  from its recorded input passed in as an argument (inside one jit XLA may fuse the producer of
  an input into the layer and round it differently from the value it hands out)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bitbert_jax.model import BertModel  # pylint: disable=g-import-not-at-top
  bert = BertModel(model.config, model.policy)
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  dense_io = conftest.dense_io
  inputs, _ = jax.jit(lambda v, a: dense_io(bert, v['params'], a))(model.variables, args)
  _, outputs = jax.jit(lambda v, a, f: dense_io(bert, v['params'], a, f))(model.variables, args,
                                                                           inputs)
  return {p: (np.asarray(inputs[p]), np.asarray(outputs[p])) for p in inputs}


def _layer_ends(graph, module):
  """(input value, output value) of a dense layer's nodes in the graph (names start with it)."""
  nodes = [n for n in graph.node if n.name.startswith(module + '/')
           and n.name[len(module) + 1:].count('/') == 0]
  first = next(n for n in nodes if n.op_type == 'Abs')  # the token quantizer reads the input
  return first.input[0], nodes[-1].output[0]


def test_every_quantized_layer_equals_the_jax_layer_fed_its_input(exported, tmp_path):
  packed, _, model, batch, _, _ = exported
  small = {k: v[:8] for k, v in batch.items()}
  io = _layer_io(model, small)
  quantized = [p for p in io if model.policy.weight_quant(f'{p}/kernel') is not None]
  assert len(quantized) == 6 * model.config.num_hidden_layers
  full = onnx_export.build_from_packed(packed, precision='float32')[0]  # as the JAX layers
  worst = 0.0
  for module in quantized:
    x_name, y_name = _layer_ends(full.graph, module)
    full.graph.value_info.extend([onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT,
                                                                     None)
                                  for v in (x_name, y_name)])
    sub = onnx_utils.Extractor(full).extract_model([x_name], [y_name])
    x, want = io[module]
    got = ort.InferenceSession(sub.SerializeToString(), providers=['CPUExecutionProvider']).run(
        None, {x_name: x})[0]
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
  assert worst <= 1e-6, worst


def _constant_sources(graph):
  """{value: initializers it is computed from} for values that depend on no graph input."""
  sources = {i.name: {i.name} for i in graph.initializer}
  for node in graph.node:  # topological order
    if all(v in sources for v in node.input if v):
      deps = set().union(*(sources[v] for v in node.input if v))
      for out in node.output:
        sources[out] = deps
  return sources


def test_graph_multiplies_integers_and_stores_packed_bits(exported):
  packed, onnx_dir, model, _, _, _ = exported
  manifest = read_manifest(packed)
  graph = onnx.load(os.path.join(onnx_dir, 'model.onnx')).graph
  inits = {i.name: i for i in graph.initializer}
  codes = {n: r for n, r in manifest['tensors'].items() if r['kind'].endswith('_codes')}
  assert codes
  for name, rec in codes.items():
    rows, cols = rec['logical_shape']
    arr = onnx.numpy_helper.to_array(inits[name])
    assert arr.dtype == np.uint8
    assert arr.size == rec['planes'] * rows * -(-cols * rec['bits'] // 8)  # 8 // bits per byte
    assert rec['param'] not in inits  # the latent/float weight is not stored beside the codes
  sources = _constant_sources(graph)
  kernels = [r['param'][:-len('/kernel')] for r in codes.values()
             if r['param'].endswith('/kernel')]
  for module in kernels:
    ops = [n.op_type for n in graph.node if n.name.startswith(module + '/')
           and n.name[len(module) + 1:].count('/') == 0]
    assert 'MatMulInteger' in ops and 'MatMul' not in ops and 'Gemm' not in ops, module
  for node in graph.node:
    if node.op_type in ('MatMul', 'Gemm'):  # float matmuls: never on unpacked codes
      for v in node.input:
        assert not any(s.endswith('_codes') for s in sources.get(v, ())), node.name
    if node.op_type == 'MatMulInteger':  # int8/uint8 operands, int32 result
      assert any(s.endswith('_codes') for s in sources[node.input[1]]), node.name
  n_int = sum(n.op_type == 'MatMulInteger' for n in graph.node)
  assert n_int == len(kernels)  # one integer matmul per layer (1-2 bit codes: one K chunk)


def test_onnx_runtime_keeps_the_matmuls_integer(exported, tmp_path):
  _, onnx_dir, _, _, _, _ = exported
  so = ort.SessionOptions()
  so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
  so.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
  ort.InferenceSession(os.path.join(onnx_dir, 'model.onnx'), so,
                       providers=['CPUExecutionProvider'])
  ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
  # The unpacking is folded into int8 constants at load; the products stay integer (a
  # MatMulIntegerToFloat fusion would drop the per-token activation scale).
  assert ops.count('MatMulInteger') == 36 and 'MatMulIntegerToFloat' not in ops
  assert 'BitShift' in ops  # only the embedding rows, unpacked after their gather


def test_model_file_within_5_percent_of_packed_weights(exported):
  packed, onnx_dir, _, _, _, _ = exported
  weights = os.path.getsize(os.path.join(packed, WEIGHTS))
  size = os.path.getsize(os.path.join(onnx_dir, 'model.onnx'))
  assert abs(size / weights - 1) <= 0.05, (size, weights)
  manifest = json.load(open(os.path.join(onnx_dir, 'manifest.json')))
  assert manifest['model_bytes'] == size and manifest['packed_weights_bytes'] == weights
  assert manifest['label_names'] == list(MRPC)
  assert os.path.isfile(os.path.join(onnx_dir, 'tokenizer.json'))


# ---------------------------------------------------------------------------------------------
# Tiny models: other widths, dynamic axes, the CLI, bad input.


@pytest.mark.parametrize('name,groups', [('8-8-8', 1), ('4-4-8', 'row'), ('3-2-8', 1)])
def test_wider_codes_and_row_groups(tmp_path, name, groups):
  """3-8 bit codes (straddling bytes, zero-point uint8, K chunks at 8 bits), per-row scales."""
  policy = policy_from_name(name, weight_groups=groups)
  params = random_params(TINY, policy, seed=3)
  packed = write.pack(TINY, params, policy, tmp_path / 'p', float_dtype='float32')
  onnx_dir = onnx_export.export_onnx(packed, tmp_path / 'o', precision='float64')
  model = load_packed(packed, tokenizer=False, precision='float64')
  rng = np.random.default_rng(0)
  for b, s in ((1, 7), (3, 40)):  # dynamic batch and sequence axes
    batch = {'input_ids': rng.integers(0, TINY.vocab_size, (b, s)).astype(np.int32),
             'attention_mask': np.ones((b, s), np.int32),
             'token_type_ids': np.zeros((b, s), np.int32)}
    batch['attention_mask'][0, s // 2:] = 0
    want = np.asarray(model.logits(**batch))
    got = _ort_logits(_session(os.path.join(onnx_dir, 'model.onnx')), batch)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize('bits', ['2-2-8', '2-1-8'])
def test_narrow_split_student_runs_in_onnx_runtime_as_in_jax(tmp_path, bits):
  """A half-width split student (1 head of TINY's size 16, half the FFN neurons, two binary
  planes per encoder weight): the graph reshapes heads x head size, not hidden_size. From 2-1-8
  (the half-width route), the word embeddings were 1-bit before splitting and keep one plane."""
  narrow = TINY.replace(num_attention_heads=1, attention_head_size=16, intermediate_size=24)
  params, policy = split_params(random_params(narrow, policy_from_name(bits), seed=4),
                                policy_from_name(bits))
  packed = write.pack(narrow, params, policy, tmp_path / 'p', float_dtype='float32')
  assert json.load(open(os.path.join(packed, 'config.json')))['attention_head_size'] == 16
  emb = read_manifest(packed)['tensors']['embeddings/word_embeddings/embedding_codes']
  assert emb['planes'] == (1 if bits == '2-1-8' else 2)
  onnx_dir = onnx_export.export_onnx(packed, tmp_path / 'o', precision='float64')
  model = load_packed(packed, tokenizer=False, precision='float64')
  assert model.config == narrow and model.policy.split
  rng = np.random.default_rng(1)
  for b, s in ((1, 7), (3, 40)):
    batch = {'input_ids': rng.integers(0, TINY.vocab_size, (b, s)).astype(np.int32),
             'attention_mask': np.ones((b, s), np.int32),
             'token_type_ids': np.zeros((b, s), np.int32)}
    batch['attention_mask'][0, s // 2:] = 0
    want = np.asarray(model.logits(**batch))
    got = _ort_logits(_session(os.path.join(onnx_dir, 'model.onnx')), batch)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_cli_exports_a_trained_student(tmp_path, minilm):
  """The CLI packs a student into model.onnx; ONNX Runtime predicts what JAX predicts from the
  student's packed directory (float64 float ops on both sides: equal to 1e-4)."""
  policy = policy_from_name('1-1-8')
  params = init_params(TINY, policy)
  student = tmp_path / 'student'
  save_student(student, TINY, params, policy)
  out = tmp_path / 'onnx'
  env = {**os.environ, 'PYTHONPATH': ROOT, 'HF_HUB_OFFLINE': '1'}
  r = subprocess.run([sys.executable, '-m', 'bitbert_jax.export', '--format=onnx',
                      '--precision=float64', f'--checkpoint={student}', f'--out={out}',
                      f'--tokenizer_dir={minilm}'],
                     capture_output=True, text=True, env=env, check=False)
  assert r.returncode == 0, r.stderr
  assert 'model.onnx' in r.stdout
  assert sorted(os.listdir(out)) == ['manifest.json', 'model.onnx', 'special_tokens_map.json',
                                     'tokenizer.json', 'tokenizer_config.json', 'vocab.txt']
  assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []  # no temp debris
  texts = _mrpc_dev_texts()[:16] + [('One', 'Two')]
  got_logits, got_labels = bitbert_serve.predict(bitbert_serve.load(out), texts)
  packed = write.pack(TINY, params, policy, tmp_path / 'packed', tokenizer_dir=minilm)
  logits, labels = predict(load_packed(packed, precision='float64'), texts)
  assert got_labels == labels and set(labels) <= set(MRPC)
  np.testing.assert_allclose(got_logits, logits, atol=1e-4, rtol=0)


def test_unsupported_layers_are_refused_by_name_and_nothing_is_written(tmp_path):
  policy = policy_from_name('1-1-8', act_mode='static')
  packed = write.pack(TINY, random_params(TINY, policy), policy, tmp_path / 'p')
  with pytest.raises(BitbertError, match=r'encoder/layer_0/attention/query/kernel is not on '
                                         r'the integer grid'):
    onnx_export.export_onnx(packed, tmp_path / 'o')
  assert sorted(os.listdir(tmp_path)) == ['p']
  with pytest.raises(BitbertError, match='already exists'):
    onnx_export.export_onnx(packed, tmp_path / 'p')


def test_float64_gelu_is_the_erf_gelu_within_float32_rounding():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bitbert_jax.model import gelu_erf  # pylint: disable=g-import-not-at-top
  x = np.concatenate([np.linspace(-8, 8, 20001), [0.0, -1e-3, 1e-3, -30.0, 30.0]])
  with jax.enable_x64(True):
    got = np.asarray(gelu_erf.gelu(jnp.asarray(x, jnp.float64)))
    want = np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float64), approximate=False))
  assert got.dtype == np.float64
  # A&S 7.1.26: |erf error| <= 1.5e-7, so |gelu error| <= 0.75e-7 |x|.
  assert np.all(np.abs(got - want) <= 0.75e-7 * np.abs(x) + 1e-15)
  assert got[np.argmax(x == 30.0)] == 30.0 and got[np.argmax(x == -30.0)] == 0.0
