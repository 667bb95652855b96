"""Load an ONNX model directory (`bitbert_jax.onnx_export`) and classify texts with it.

Tokenization mirrors `bitbert_jax.predict.encode_texts` with the `tokenizers` library alone:
the same tokenizer.json, longest_first truncation for pairs, padding to the longest example
rounded up to a multiple of 32, so ONNX Runtime sees the arrays predict feeds JAX.
"""
import dataclasses
import json
import os

import numpy as np

from bitbert_serve.errors import BitbertError

FORMAT = 'bitbert-onnx'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
BUCKET = 32  # as bitbert_jax.predict: sequence lengths padded to a multiple of this


@dataclasses.dataclass
class OnnxModel:
  """A loaded ONNX model directory: the ONNX Runtime session, tokenizer and manifest."""
  session: object
  tokenizer: object
  manifest: dict
  directory: str

  @property
  def label_names(self):
    return tuple(self.manifest['label_names'])

  @property
  def is_regression(self):
    return self.manifest['problem_type'] == 'regression'

  def logits(self, batch):
    """Encoded batch (dict of int arrays [B, S]) -> float32 logits [B, C]."""
    feed = {name: np.asarray(batch[name], np.int64) for name in self.manifest['inputs']}
    return self.session.run([self.manifest['output']], feed)[0]


def _read_manifest(directory):
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise BitbertError(f'{path}: missing; is {directory} an ONNX export '
                       f'(python -m bitbert_jax.export --format=onnx)?') from None
  except (OSError, ValueError) as e:
    raise BitbertError(f'{path}: unreadable JSON ({e})') from e
  if manifest.get('format') != FORMAT or manifest.get('format_version') != FORMAT_VERSION:
    raise BitbertError(f'{path}: format {manifest.get("format")!r} version '
                       f'{manifest.get("format_version")!r}; expected {FORMAT!r} version '
                       f'{FORMAT_VERSION} (a packed directory runs with bitbert_jax.predict)')
  return manifest


def load(directory, threads=None):
  """Loads an ONNX model directory -> OnnxModel (tokenizer None when the export has none).

  threads: ONNX Runtime intra-op threads (default: its own choice, all cores).
  """
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise BitbertError(f'ONNX model {directory}: no such directory')
  manifest = _read_manifest(directory)
  model_path = os.path.join(directory, manifest['model_file'])
  if not os.path.isfile(model_path):
    raise BitbertError(f'{model_path}: missing (listed in {MANIFEST})')
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  try:
    session = ort.InferenceSession(model_path, options, providers=['CPUExecutionProvider'])
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(f'{model_path}: ONNX Runtime cannot load it ({type(e).__name__}: '
                       f'{str(e)[:300]})') from e
  tokenizer = None
  tok_path = os.path.join(directory, 'tokenizer.json')
  if os.path.isfile(tok_path):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = Tokenizer.from_file(tok_path)
  return OnnxModel(session, tokenizer, manifest, directory)


def _is_pair(x):
  return isinstance(x, (tuple, list)) and len(x) == 2


def _pad_id(tokenizer):
  """The padding id transformers uses for this tokenizer.json (its padding section, else [PAD])."""
  if tokenizer.padding and tokenizer.padding.get('pad_id') is not None:
    return tokenizer.padding['pad_id']
  for token in ('[PAD]', '<pad>'):
    if tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  return 0


def encode_texts(tokenizer, texts, max_length):
  """Texts (str) or pairs ((a, b)) -> dict of int64 [N, L] arrays, L = longest rounded up to a
  multiple of 32 (at most max_length): `bitbert_jax.predict.encode_texts`'s arrays."""
  if not texts:
    raise BitbertError('predict: no input texts')
  pairs = _is_pair(texts[0])
  if any(_is_pair(t) != pairs for t in texts):
    raise BitbertError('predict: mix of single texts and text pairs; give one kind')
  pad = _pad_id(tokenizer)
  tokenizer.enable_truncation(max_length, strategy='longest_first')
  tokenizer.no_padding()
  encodings = tokenizer.encode_batch([tuple(t) for t in texts] if pairs else list(texts))
  longest = max(len(e.ids) for e in encodings)
  length = min(max_length, -(-longest // BUCKET) * BUCKET)
  out = {k: np.zeros((len(texts), length), np.int64)
         for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  out['input_ids'][:] = pad
  for i, e in enumerate(encodings):
    n = len(e.ids)
    out['input_ids'][i, :n] = e.ids
    out['attention_mask'][i, :n] = 1
    out['token_type_ids'][i, :n] = e.type_ids
  return out


def predict(model, texts, batch_size=32, max_length=128):
  """Predicts texts or text pairs with an OnnxModel -> (logits float32 [N, C], labels): label
  names (argmax) or, for regression, float scores; as `bitbert_jax.predict.predict`."""
  if model.tokenizer is None:
    raise BitbertError(f'{model.directory}: no tokenizer files; export with tokenizer_dir')
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  batch = encode_texts(model.tokenizer, texts, max_length)
  logits = np.concatenate([model.logits({k: v[lo:lo + batch_size] for k, v in batch.items()})
                           for lo in range(0, len(texts), batch_size)])
  if model.is_regression:
    return logits, [float(v) for v in logits[:, 0]]
  names = model.label_names
  return logits, [names[i] for i in logits.argmax(-1)]
