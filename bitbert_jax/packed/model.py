"""Inference from a packed directory with JAX: load, encode, logits, predict.

  model = load_packed('out/mrpc-1bit')
  logits, labels = predict(model, [('first sentence', 'second sentence'), ...])

The parameters stay packed in memory (uint8 codes, float32 scales, float16 float parts); the
quantized layers unpack their codes inside the jitted forward pass (`layers`). Texts become
arrays and logits become labels in `bitbert_serve.encoding`, the path the ONNX Runtime server
takes too.

Precision: the float ops (LayerNorm, softmax, GELU, attention, rescaling) run in float32 by
default, bit for bit the trainer's evaluation. `precision='float64'` (CPU, under
`jax.enable_x64`) computes them in float64 as the ONNX graph exported with
`--precision=float64` does, and ONNX Runtime then reproduces these logits bit for bit (in float32
the two round differently and a few 8-bit activation codes flip).
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bitbert_jax.errors import BitbertError
from bitbert_jax.model.bert import BertModel
from bitbert_jax.model.config import BertConfig
from bitbert_jax.packed import layers
from bitbert_jax.packed import load
from bitbert_jax.packed.format import PRECISIONS
from bitbert_jax.quant.policy import QuantPolicy
from bitbert_serve import encoding


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
    return encoding.label_names(self.config.num_labels, self.config.label_names,
                                self.config.problem_type)

  @functools.cached_property
  def _logits_fn(self):
    config = self.config
    if self.precision == 'float64':
      config = dataclasses.replace(config, dtype='float64')
    model = BertModel(config, self.policy)
    return jax.jit(lambda v, ids, mask, types: layers.apply(
        model, v, ids, mask, types).logits.astype(jnp.float32))

  @property
  def variables(self):
    return {'params': self.params, **self.state}

  def logits(self, input_ids, attention_mask, token_type_ids):
    """[B, S] int arrays -> float32 logits [B, C] (jitted; one compile per shape)."""
    with jax.enable_x64(self.precision == 'float64'):
      return self._logits_fn(self.variables, input_ids, attention_mask, token_type_ids)

  def encode(self, texts, max_length=128):
    """Texts or pairs -> int32 input arrays [N, L] (`encode_texts`)."""
    if self.tokenizer is None:
      raise BitbertError(f'{self.directory}: no tokenizer files; export with tokenizer_dir')
    return encode_texts(self.tokenizer, texts, max_length)


def encode_texts(tokenizer, texts, max_length):
  """Texts (str) or pairs ((a, b)) -> dict of int32 [N, L] arrays with a transformers fast
  tokenizer: `bitbert_serve.encoding.encode_texts` on its backend, with its padding id."""
  batch = encoding.encode_texts(tokenizer.backend_tokenizer, texts, max_length,
                                pad=tokenizer.pad_token_id)
  return {k: v.astype(np.int32) for k, v in batch.items()}


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

  verify: check the weights file's size and sha256 against manifest.json (catches truncated
    or damaged copies).
  tokenizer: load the tokenizer files too (needed by `predict`; not by `PackedModel.logits`).
  precision: of the float ops: 'float32' (the trainer's) or 'float64' (the float64 ONNX graph's).
  """
  if precision not in PRECISIONS:
    raise BitbertError(f'predict: precision {precision!r}; valid: {", ".join(PRECISIONS)}')
  packed = load.read(directory, verify)
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in packed.params.items()},
                                        sep='/')
  state = jax.tree.map(jnp.asarray, packed.state)
  tok = _load_tokenizer(packed.directory, packed.manifest) if tokenizer else None
  return PackedModel(packed.config, packed.policy, params, state, tok, packed.manifest,
                     packed.directory, precision)


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
  logits = predict_logits(model, model.encode(encoding.as_list(texts), max_length), batch_size)
  return logits, encoding.to_labels(logits, model.label_names, model.config.is_regression)
