"""WordPiece tokenizer loading and ragged encoding of a split."""

import dataclasses
import os

import datasets
import numpy as np
import transformers

from bitbert_jax import preempt
from bitbert_jax.data import tasks as tasks_lib
from bitbert_jax.errors import BitbertError

# Either file is enough for a BERT fast tokenizer (vocab.txt is converted on the fly).
_TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt')
# Tokenize in chunks so a 400k-example split never holds all Python lists at once.
_CHUNK = 8192


def _looks_like_path(name: str) -> bool:
  return name.startswith(('/', './', '../', '~')) or os.path.exists(name)


def load_tokenizer(path_or_hub_id: str) -> transformers.PreTrainedTokenizerBase:
  """Loads a fast (Rust) tokenizer from a checkpoint folder or a hub id.

  Args:
    path_or_hub_id: folder with tokenizer.json and/or vocab.txt (plus tokenizer_config.json
      for casing), or a Hugging Face hub id such as 'bert-base-uncased'.

  Returns:
    A fast tokenizer (`is_fast`), needed for batch encoding speed.
  """
  name = os.path.expanduser(os.fspath(path_or_hub_id))
  if _looks_like_path(name):
    if not os.path.isdir(name):
      raise BitbertError(f'tokenizer path {name}: not a directory (expected a checkpoint folder '
                         f'with {" or ".join(_TOKENIZER_FILES)})')
    present = sorted(os.listdir(name))
    if not any(f in present for f in _TOKENIZER_FILES):
      raise BitbertError(f'tokenizer folder {name}: missing {" and ".join(_TOKENIZER_FILES)} '
                         f'(need at least one); files present: {present}')
  try:
    tok = transformers.AutoTokenizer.from_pretrained(name, use_fast=True)
  except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load".
    raise BitbertError(f'could not load a tokenizer from {name!r} ({type(e).__name__}: {e}); '
                       'give a checkpoint folder with tokenizer.json/vocab.txt or a '
                       'reachable hub id') from None
  if not getattr(tok, 'is_fast', False):
    raise BitbertError(f'tokenizer from {name!r} is not a fast tokenizer; add tokenizer.json '
                       'or vocab.txt to the folder')
  if tok.cls_token_id is None or tok.sep_token_id is None or tok.pad_token_id is None:
    raise BitbertError(f'tokenizer from {name!r} lacks [CLS]/[SEP]/[PAD] tokens; a BERT '
                       'WordPiece tokenizer is required')
  return tok


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
  """1-D object array of per-example arrays (np.array would stack equal lengths into 2-D)."""
  out = np.empty(len(arrays), dtype=object)
  for i, a in enumerate(arrays):
    out[i] = a
  return out


@dataclasses.dataclass
class EncodedSplit:
  """A tokenized split, unpadded.

  Attributes:
    input_ids: [N] object array of int32 [L_i] token ids ([CLS] a [SEP] (b [SEP])).
    token_type_ids: [N] object array of int32 [L_i] segment ids.
    labels: [N] int32 class indices or float32 regression targets.
    lengths: [N] int32, L_i <= max_length.
    max_length: truncation length used.
    pad_id: the tokenizer's [PAD] id.
  """
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray
  lengths: np.ndarray
  max_length: int
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.lengths)


def encode(dataset: datasets.Dataset, tokenizer: transformers.PreTrainedTokenizerBase,
           task: 'str | tasks_lib.TaskSpec', max_length: int) -> EncodedSplit:
  """Tokenizes a split's text fields ('longest_first' truncation for pairs).

  Args:
    dataset: has columns `task.text_fields` and 'label'.
    tokenizer: fast BERT tokenizer (see `load_tokenizer`).
    task: TaskSpec or GLUE name.
    max_length: maximum tokens per example, special tokens included.

  Returns:
    EncodedSplit with ragged int32 ids and N labels.
  """
  task = tasks_lib.get_task(task)
  min_len = 2 * len(task.text_fields) + 1
  if not isinstance(max_length, (int, np.integer)) or max_length < min_len:
    raise BitbertError(f'max_length={max_length!r} too small for task {task.name!r}: '
                       f'need an int >= {min_len} (room for special tokens)')
  missing = [c for c in (*task.text_fields, 'label') if c not in dataset.column_names]
  if missing:
    raise BitbertError(f'dataset for task {task.name!r} lacks columns {missing}; '
                       f'columns present: {dataset.column_names}')
  ids, types = [], []
  for start in range(0, len(dataset), _CHUNK):
    preempt.check('tokenization')  # a big split (QQP, MNLI) takes minutes
    chunk = dataset[start:start + _CHUNK]
    texts = [chunk[f] for f in task.text_fields]
    enc = tokenizer(*texts, truncation='longest_first' if task.is_pair else True,
                    max_length=max_length, padding=False, return_attention_mask=False,
                    return_token_type_ids=True)
    ids.extend(np.asarray(x, np.int32) for x in enc['input_ids'])
    types.extend(np.asarray(x, np.int32) for x in enc['token_type_ids'])
  labels = np.asarray(dataset['label'], np.float32 if task.is_regression else np.int32)
  lengths = np.fromiter((len(x) for x in ids), np.int32, count=len(ids))
  return EncodedSplit(ragged(ids), ragged(types), labels, lengths, max_length,
                      int(tokenizer.pad_token_id))
