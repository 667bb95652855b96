"""Texts in, labels out: the one tokenization and label mapping of predict (JAX) and serve (ONNX).

`encode_texts` runs a `tokenizers.Tokenizer` (tokenizer.json, or the backend of the
transformers tokenizer a packed directory loads) with longest_first truncation for pairs and pads
to the longest example rounded up to a multiple of `BUCKET`, so both runtimes see the same arrays.
`to_labels` turns logits into label names (argmax) or regression scores.
"""
import numpy as np

from bitbert_serve.errors import BitbertError
from bitbert_serve.manifest import INPUTS

BUCKET = 32  # sequence lengths are padded to a multiple of this: few compiled shapes


def _is_pair(x):
  return isinstance(x, (tuple, list)) and len(x) == 2


def pad_id(tokenizer):
  """The padding id transformers uses for this tokenizer.json (its padding section, else [PAD])."""
  if tokenizer.padding and tokenizer.padding.get('pad_id') is not None:
    return tokenizer.padding['pad_id']
  for token in ('[PAD]', '<pad>'):
    if tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  return 0


def encode_texts(tokenizer, texts, max_length, pad=None):
  """Texts (str) or pairs ((a, b)) -> dict of int64 [N, L] arrays, L = the longest example
  rounded up to a multiple of BUCKET (at most max_length).

  tokenizer: a `tokenizers.Tokenizer` (its truncation and padding settings are replaced).
  pad: the padding id (default: `pad_id(tokenizer)`).
  """
  if not texts:
    raise BitbertError('predict: no input texts')
  pairs = _is_pair(texts[0])
  if any(_is_pair(t) != pairs for t in texts):
    raise BitbertError('predict: mix of single texts and text pairs; give one kind')
  pad = pad_id(tokenizer) if pad is None else pad
  tokenizer.enable_truncation(max_length, strategy='longest_first')
  tokenizer.no_padding()
  encodings = tokenizer.encode_batch([tuple(t) for t in texts] if pairs else list(texts))
  longest = max(len(e.ids) for e in encodings)
  length = min(max_length, -(-longest // BUCKET) * BUCKET)
  out = {k: np.zeros((len(texts), length), np.int64) for k in INPUTS}
  out['input_ids'][:] = pad
  for i, e in enumerate(encodings):
    n = len(e.ids)
    out['input_ids'][i, :n] = e.ids
    out['attention_mask'][i, :n] = 1
    out['token_type_ids'][i, :n] = e.type_ids
  return out


def label_names(num_labels, names, problem_type):
  """The names predictions carry: none for regression, else the model's names or LABEL_i."""
  if problem_type == 'regression':
    return ()
  return tuple(names or (f'LABEL_{i}' for i in range(num_labels)))


def to_labels(logits, names, is_regression):
  """Logits [N, C] -> label names (argmax) or, for regression, float scores."""
  if is_regression:
    return [float(v) for v in logits[:, 0]]
  return [names[i] for i in np.asarray(logits).argmax(-1)]


def as_list(texts):
  """One text (str) or a sequence of texts or pairs -> a list."""
  return [texts] if isinstance(texts, str) else list(texts)
