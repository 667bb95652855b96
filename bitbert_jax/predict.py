"""Inference from a packed directory (`bitbert_jax.export.pack`): load, predict, CLI.

  model = load_packed('out/mrpc-1bit')
  logits, labels = predict(model, [('first sentence', 'second sentence'), ...])

CLI (one label per input line on stdout):
  python -m bitbert_jax.predict --model=<dir> [--input=file.tsv|-] [--text_columns a b]

The parameters stay packed in memory (uint8 codes, float32 scales, float16 float parts); the
quantized layers unpack their codes inside the jitted forward pass (quant/packed_layers.py).

Precision: the float ops (LayerNorm, softmax, GELU, attention, rescaling) run in float32 by
default, bit for bit the trainer's evaluation. `precision='float64'` (CPU, under
`jax.enable_x64`) computes them in float64 as the ONNX graph exported with
`--precision=float64` does, and ONNX Runtime then reproduces these logits bit for bit (in float32
the two round differently and a few 8-bit activation codes flip).
"""
import argparse
import dataclasses
import functools
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from bitbert_jax import export
from bitbert_jax import paths
from bitbert_serve import textio
from bitbert_jax.packed import format as packed_format
from bitbert_jax.errors import BitbertError
from bitbert_jax.model.bert import BertModel
from bitbert_jax.model.config import BertConfig
from bitbert_jax.quant.policy import QuantPolicy

BUCKET = 32  # sequence lengths are padded to a multiple of this: few jit shapes
PRECISIONS = packed_format.PRECISIONS


@dataclasses.dataclass
class PackedModel:
  """A loaded packed directory.

  params: nested dict of jax arrays as stored: `*_codes` uint8, `*_scale` float32, the rest
    float16 (or float32). state: non-param collections (e.g. quant_stats), possibly empty.
    policy: the student's policy with packed=True.
  tokenizer: a transformers fast tokenizer, or None when the directory has no tokenizer files.
  """
  config: BertConfig
  policy: QuantPolicy
  params: Any
  state: Any
  tokenizer: Any
  manifest: dict
  directory: str
  precision: str = 'float32'  # of the float ops; 'float64' matches the ONNX graph

  @property
  def label_names(self):
    if self.config.is_regression:
      return ()
    return self.config.label_names or tuple(f'LABEL_{i}' for i in range(self.config.num_labels))

  @functools.cached_property
  def _logits_fn(self):
    config = self.config
    if self.precision == 'float64':
      config = dataclasses.replace(config, dtype='float64')
    model = BertModel(config, self.policy)
    return jax.jit(lambda v, ids, mask, types: model.apply(v, ids, mask, types).logits.astype(
        jnp.float32))

  @property
  def variables(self):
    return {'params': self.params, **self.state}

  def logits(self, input_ids, attention_mask, token_type_ids):
    """[B, S] int arrays -> float32 logits [B, C] (jitted; one compile per shape)."""
    with jax.enable_x64(self.precision == 'float64'):
      return self._logits_fn(self.variables, input_ids, attention_mask, token_type_ids)


@functools.lru_cache(maxsize=16)
def _expected(config, policy):
  """Path -> ShapeDtypeStruct of the packed model's parameters."""
  abstract = jax.eval_shape(lambda: nn.meta.unbox(BertModel(config, policy).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']))
  return traverse_util.flatten_dict(dict(abstract), sep='/')


def _check_tensors(directory, tensors, config, policy):
  expected = _expected(config, policy)
  weights = os.path.join(directory, export.WEIGHTS)
  for name in sorted(set(expected) | set(tensors)):
    if name not in tensors:
      raise BitbertError(f'{weights}: tensor {name!r} missing (shape '
                         f'{list(expected[name].shape)} for config.json and policy.json)')
    if name not in expected:
      raise BitbertError(f'{weights}: tensor {name!r} is not a parameter of the packed model '
                         f'described by config.json and policy.json')
    arr, want = tensors[name], expected[name]
    if tuple(arr.shape) != tuple(want.shape):
      raise BitbertError(f'{weights}: tensor {name!r} has shape {list(arr.shape)}; expected '
                         f'{list(want.shape)}')
    is_code = name.endswith(('_codes',))
    if is_code and arr.dtype != np.uint8:
      raise BitbertError(f'{weights}: tensor {name!r} has dtype {arr.dtype}; codes are uint8')
    if not is_code and not np.issubdtype(arr.dtype, np.floating):
      raise BitbertError(f'{weights}: tensor {name!r} has dtype {arr.dtype}; expected a float')


def _load_tokenizer(directory, manifest):
  if not manifest.get('tokenizer_files'):
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    return transformers.AutoTokenizer.from_pretrained(directory, use_fast=True)
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(f'{directory}: cannot load the tokenizer ({type(e).__name__}: {e})') from e


def load_packed(directory, verify=True, tokenizer=True, precision='float32'):
  """Loads a packed directory -> PackedModel (weights stay packed; nothing dequantized).

  verify: check the weights file's sha256 against manifest.json (catches truncated copies).
  tokenizer: load the tokenizer files too (needed by `predict`; not by `PackedModel.logits`).
  precision: of the float ops: 'float32' (the trainer's) or 'float64' (the float64 ONNX graph's).
  """
  if precision not in PRECISIONS:
    raise BitbertError(f'predict: precision {precision!r}; valid: {", ".join(PRECISIONS)}')
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise BitbertError(f'packed model {directory}: no such directory')
  manifest = export.read_manifest(directory)
  weights = packed_format.weights_path(directory, manifest, verify)
  try:
    config = BertConfig.from_dict(export.read_json(os.path.join(directory, export.CONFIG)))
  except (TypeError, ValueError) as e:
    raise BitbertError(f'{directory}/{export.CONFIG}: not a BertConfig ({e})') from e
  try:
    policy = QuantPolicy.from_dict(export.read_json(os.path.join(directory, export.POLICY)))
  except (TypeError, KeyError, ValueError) as e:
    raise BitbertError(f'{directory}/{export.POLICY}: not a QuantPolicy ({e})') from e
  policy = dataclasses.replace(policy, packed=True)
  try:
    tensors = load_file(weights)
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(f'{weights}: unreadable safetensors file ({type(e).__name__}: {e})') from e
  state = {}
  for name in [n for n in tensors if export.STATE_SEP in n]:
    collection, path = name.split(export.STATE_SEP, 1)
    state.setdefault(collection, {})[path] = jnp.asarray(tensors.pop(name))
  state = {c: traverse_util.unflatten_dict(t, sep='/') for c, t in state.items()}
  _check_tensors(directory, tensors, config, policy)
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in tensors.items()}, sep='/')
  tok = _load_tokenizer(directory, manifest) if tokenizer else None
  return PackedModel(config, policy, params, state, tok, manifest, directory, precision)


# ---------------------------------------------------------------------------------------------
# Prediction.


def _is_pair(x):
  return isinstance(x, (tuple, list)) and len(x) == 2


def encode_texts(tokenizer, texts, max_length):
  """Texts (str) or pairs ((a, b)) -> dict of int32 [N, L] arrays, L = longest rounded up."""
  if not texts:
    raise BitbertError('predict: no input texts')
  pairs = _is_pair(texts[0])
  if any(_is_pair(t) != pairs for t in texts):
    raise BitbertError('predict: mix of single texts and text pairs; give one kind')
  args = (list(t[0] for t in texts), list(t[1] for t in texts)) if pairs else (list(texts),)
  enc = tokenizer(*args, truncation='longest_first' if pairs else True, max_length=max_length,
                  padding='longest', return_attention_mask=True, return_token_type_ids=True,
                  return_tensors='np')
  length = min(max_length, -(-enc['input_ids'].shape[1] // BUCKET) * BUCKET)
  pad = lambda a, v: np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=v)
  return {'input_ids': pad(enc['input_ids'], tokenizer.pad_token_id).astype(np.int32),
          'attention_mask': pad(enc['attention_mask'], 0).astype(np.int32),
          'token_type_ids': pad(enc['token_type_ids'], 0).astype(np.int32)}


def predict_logits(model, batch, batch_size=32):
  """Logits [N, C] float32 numpy for an encoded batch dict; fixed batch shape (last one padded)."""
  n = batch['input_ids'].shape[0]
  out = []
  for lo in range(0, n, batch_size):
    chunk = {k: v[lo:lo + batch_size] for k, v in batch.items()}
    m = chunk['input_ids'].shape[0]
    if m < batch_size:  # pad rows so that every call has the same shape (one compile)
      chunk = {k: np.pad(v, ((0, batch_size - m), (0, 0))) for k, v in chunk.items()}
    logits = model.logits(chunk['input_ids'], chunk['attention_mask'], chunk['token_type_ids'])
    out.append(np.asarray(logits, np.float32)[:m])
  return np.concatenate(out)


def predict(model, texts, batch_size=32, max_length=128):
  """Predicts texts or text pairs with a PackedModel.

  Args:
    model: from `load_packed` (must have a tokenizer and a classification/regression head).
    texts: list of str, or list of (first, second) pairs.
    batch_size: rows per forward pass.
    max_length: tokens per example (longest_first truncation for pairs).

  Returns:
    (logits float32 [N, C], labels): label names (argmax) or, for regression, float scores.
  """
  if model.tokenizer is None:
    raise BitbertError(f'{model.directory}: no tokenizer files; export with tokenizer_dir')
  if not model.config.num_labels:
    raise BitbertError(f'{model.directory}: the model has no classification head '
                       '(num_labels = 0)')
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  logits = predict_logits(model, encode_texts(model.tokenizer, texts, max_length), batch_size)
  if model.config.is_regression:
    return logits, [float(v) for v in logits[:, 0]]
  names = model.label_names
  return logits, [names[i] for i in logits.argmax(-1)]


def _dense_io(model, params, args, feed=None):
  """Runs model; returns ({QDense path: input}, {path: output}), inputs replaced by feed[path]."""
  from bitbert_jax.quant.layers import QDense  # pylint: disable=g-import-not-at-top
  inputs, outputs = {}, {}

  def hook(next_fun, a, kw, context):
    if not (isinstance(context.module, QDense) and context.method_name == '__call__'):
      return next_fun(*a, **kw)
    path = '/'.join(context.module.scope.path)
    x = a[0] if feed is None else feed[path]
    y = next_fun(x, *a[1:], **kw)
    inputs[path], outputs[path] = x, y
    return y

  with nn.intercept_methods(hook):
    model.apply({'params': params}, *args)
  return inputs, outputs


def layer_diffs(model_a, params_a, model_b, params_b, batch):
  """Teacher-forced comparison of every QDense layer of two BERTs on one batch.

  Runs model_a and records each QDense's input and output; runs model_b with each QDense fed
  model_a's input at the same path. Activation quantization is discontinuous, so two models
  whose weights differ by an ulp drift apart through flipped activation codes; fed the same
  input, a faithful layer must agree to float rounding.

  Args:
    model_a, model_b: BertModel instances (e.g. fake-quantized and packed).
    params_a, params_b: their params.
    batch: dict with input_ids, attention_mask, token_type_ids.

  Returns:
    {layer path: max |y_b - y_a| / max |y_a|}.
  """
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  inputs, out_a = jax.jit(lambda p, a: _dense_io(model_a, p, a))(params_a, args)
  _, out_b = jax.jit(lambda p, a, f: _dense_io(model_b, p, a, f))(params_b, args, inputs)
  diffs = {}
  for path, ya in out_a.items():
    ya, yb = np.asarray(ya, np.float32), np.asarray(out_b[path], np.float32)
    diffs[path] = float(np.abs(yb - ya).max() / max(np.abs(ya).max(), 1e-30))
  return diffs


# ---------------------------------------------------------------------------------------------
# The CLI (inputs: `bitbert_serve.textio`, shared with the ONNX Runtime CLI).


read_texts = textio.read_texts  # kept here for callers of predict.read_texts


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m bitbert_jax.predict',
                                   description='Predict labels with a packed model.')
  parser.add_argument('--model', required=True, help='packed directory (bitbert_jax.export)')
  textio.add_arguments(parser)
  parser.add_argument('--precision', default='float32', choices=PRECISIONS,
                      help='float ops; float64 reproduces an ONNX export made with '
                           '--precision=float64 bit for bit (CPU)')
  args = parser.parse_args(argv)
  args.model = paths.absolute(args.model)
  if args.input != '-':
    args.input = paths.absolute(args.input)
  try:
    cols = textio.text_columns(args.text_columns)
    texts = read_texts(args.input, cols, header=not args.no_header)
    model = load_packed(args.model, precision=args.precision)
    logits, labels = predict(model, texts, args.batch_size, args.max_length)
  except BitbertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  textio.write_predictions(labels, logits, args.logits)
  return 0


if __name__ == '__main__':
  sys.exit(main())
