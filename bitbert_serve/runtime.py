"""Load an ONNX model directory (`bitbert_jax.packed.onnx_export`) and classify texts with it.

Every file the manifest lists is checked against its size and sha256 before the model is served
(`verify=False` skips it). Texts become arrays and logits become labels in `encoding`, the
path `bitbert_jax.predict` takes too, so ONNX Runtime sees the arrays predict feeds JAX.
"""
import dataclasses
import os

import numpy as np

from bitbert_serve import encoding
from bitbert_serve import manifest as manifest_lib
from bitbert_serve.errors import BitbertError


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

  def encode(self, texts, max_length=128):
    """Texts or pairs -> the int64 input arrays (`encoding.encode_texts`)."""
    if self.tokenizer is None:
      raise BitbertError(f'{self.directory}: no tokenizer files; export with tokenizer_dir')
    return encoding.encode_texts(self.tokenizer, texts, max_length)

  def logits(self, batch):
    """Encoded batch (dict of int arrays [B, S]) -> float32 logits [B, C]."""
    feed = {name: np.asarray(batch[name], np.int64) for name in self.manifest['inputs']}
    return self.session.run([self.manifest['output']], feed)[0]


def load(directory, threads=None, verify=True):
  """Loads an ONNX model directory -> OnnxModel (tokenizer None when the export has none).

  threads: ONNX Runtime intra-op threads (default: its own choice, all cores).
  verify: check model.onnx and every other file the manifest lists against their recorded size
    and sha256 first (BitbertError naming the first that differs).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise BitbertError(f'ONNX model {directory}: no such directory')
  manifest = manifest_lib.read(directory)
  if verify:
    manifest_lib.verify(directory, manifest)
  model_path = os.path.join(directory, manifest['model_file'])
  if not os.path.isfile(model_path):
    raise BitbertError(f'{model_path}: missing (listed in {manifest_lib.MANIFEST})')
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  options = ort.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
  try:
    session = ort.InferenceSession(model_path, options, providers=['CPUExecutionProvider'])
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(f'{model_path}: ONNX Runtime cannot load it ({type(e).__name__}: '
                       f'{str(e)[:300]})') from e
  tokenizer = None
  tok_path = os.path.join(directory, manifest_lib.TOKENIZER)
  if os.path.isfile(tok_path):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = Tokenizer.from_file(tok_path)
  return OnnxModel(session, tokenizer, manifest, directory)


def predict(model, texts, batch_size=32, max_length=128):
  """Predicts texts or text pairs with an OnnxModel -> (logits float32 [N, C], labels): label
  names (argmax) or, for regression, float scores; as `bitbert_jax.predict`'s."""
  batch = model.encode(encoding.as_list(texts), max_length)
  n = len(batch['input_ids'])
  logits = np.concatenate([model.logits({k: v[lo:lo + batch_size] for k, v in batch.items()})
                           for lo in range(0, n, batch_size)])
  return logits, encoding.to_labels(logits, model.label_names, model.is_regression)
