"""General-distillation corpus: stream text lines, pack into [CLS] ... [SEP] fixed-shape batches."""

import dataclasses
import os
from typing import Iterator, Sequence

import numpy as np
import transformers

from bitbert_jax import preempt
from bitbert_jax.errors import BitbertError

# Tokenize this many lines per fast-tokenizer call (amortises the Python overhead).
_LINES_PER_CALL = 1024

# The real text general KD reads when no corpus is named: a WikiText-2 excerpt (SOURCE.md there).
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), 'wikitext')
SHIPPED_CORPUS = os.path.join(SHIPPED_DIR, 'wikitext-2-valid-excerpt.txt')


@dataclasses.dataclass(frozen=True)
class HubSource:
  """A streamed hub text column: load_dataset(path, name, split=split, streaming=True)[column]."""
  path: str
  name: str | None
  split: str
  column: str


def parse_source(spec: str) -> 'str | HubSource':
  """A local file path, or 'hub:DATASET/CONFIG:SPLIT:COLUMN' / 'hub:DATASET:CONFIG:SPLIT:COLUMN'.

  In the 3-field form a '/' separates dataset and config ('hub:wikitext/wikitext-103-raw-v1:
  train:text'); org/name datasets need the 4-field form (config may be empty:
  'hub:org/name::train:text').
  """
  spec = os.fspath(spec)
  if not spec.startswith('hub:'):
    return spec
  parts = spec[len('hub:'):].split(':')
  if len(parts) == 4:
    path, name, split, column = parts
  elif len(parts) == 3:
    path, split, column = parts
    path, _, name = path.partition('/')
  else:
    raise BitbertError(f'corpus source {spec!r}: expected hub:DATASET/CONFIG:SPLIT:COLUMN or '
                       'hub:DATASET:CONFIG:SPLIT:COLUMN')
  if not (path and split and column):
    raise BitbertError(f'corpus source {spec!r}: dataset, split and column must be non-empty')
  return HubSource(path, name or None, split, column)


def corpus_sources(spec: str) -> list[str]:
  """config.corpus (comma-separated files, folders, hub: specs) as a list; '' is the shipped
  WikiText-2 excerpt."""
  return [s for s in str(spec).split(',') if s] or [SHIPPED_CORPUS]


def is_heading(line: str) -> bool:
  """Wikitext section titles look like ' = Title = ' or ' = = Sub = = '."""
  s = line.strip()
  return len(s) >= 2 and s[0] == '=' and s[-1] == '='


def _file_lines(path: str) -> Iterator[str]:
  """Non-blank, non-heading lines of a UTF-8 text file; errors name the line and byte offset."""
  offset = 0
  with open(path, 'rb') as fh:
    for line_no, raw in enumerate(fh, start=1):
      try:
        text = raw.decode('utf-8-sig' if line_no == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        raise BitbertError(f'{path}:{line_no}: not UTF-8 text (byte offset {offset + e.start}: '
                           f'{e.reason}); the corpus must be plain UTF-8 text') from None
      if '\x00' in text:
        raise BitbertError(f'{path}:{line_no}: NUL byte at byte offset '
                           f'{offset + raw.index(0)}; this looks like a binary file, not text')
      offset += len(raw)
      if text.strip() and not is_heading(text):
        yield text.strip()


def _hub_lines(src: HubSource) -> Iterator[str]:
  import datasets  # Only hub sources need it; keeps plain-file use light.
  try:
    ds = datasets.load_dataset(src.path, src.name, split=src.split, streaming=True)
  except Exception as e:  # Network/cache/config errors come in many types.
    raise BitbertError(f'could not stream hub dataset {src.path!r} config {src.name!r} split '
                       f'{src.split!r} ({type(e).__name__}: {e})') from None
  for ex in ds:
    if src.column not in ex:
      raise BitbertError(f'hub dataset {src.path!r}: no column {src.column!r}; columns: '
                         f'{sorted(ex)}')
    text = ex[src.column]
    if isinstance(text, str) and text.strip() and not is_heading(text):
      yield text.strip()


def _resolve_sources(paths_or_hub: 'str | Sequence[str]') -> list['str | HubSource']:
  """Validates eagerly so a typo fails at startup, not hours into training."""
  specs = [paths_or_hub] if isinstance(paths_or_hub, (str, os.PathLike)) else list(paths_or_hub)
  if not specs:
    raise BitbertError('corpus: no sources given (need text file paths or hub: specs)')
  sources = []
  for spec in specs:
    src = parse_source(spec)
    if isinstance(src, HubSource):
      sources.append(src)
    elif os.path.isdir(src):
      files = sorted(os.path.join(src, f) for f in os.listdir(src)
                     if not f.startswith('.') and os.path.isfile(os.path.join(src, f)))
      if not files:
        raise BitbertError(f'corpus folder {src}: contains no files')
      sources.extend(files)
    elif not os.path.isfile(src):
      raise BitbertError(f'corpus file {src}: does not exist')
    else:
      sources.append(src)
  return sources


def pack_sequences(token_lines: Iterator[list[int]], body: int) -> Iterator[list[int]]:
  """Packs consecutive lines into <= body tokens; only lines longer than body get split.

  A line that fits in a fresh sequence is never cut (the current one is emitted instead);
  a longer line first fills the current sequence, then continues in new ones.
  """
  cur: list[int] = []
  for tokens in token_lines:
    while tokens:
      space = body - len(cur)
      if len(tokens) <= space:
        cur.extend(tokens)
        break
      if cur and len(tokens) <= body:
        yield cur
        cur = []
        continue
      cur.extend(tokens[:space])
      tokens = tokens[space:]
      yield cur
      cur = []
  if cur:
    yield cur


def corpus_batches(paths_or_hub: 'str | Sequence[str]',
                   tokenizer: transformers.PreTrainedTokenizerBase, max_length: int,
                   batch_size: int, seed: int = 0, epoch: int = 0,
                   shuffle_buffer: int = 10_000, drop_remainder: bool = False,
                   repeat: int = 0,
                   process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Streams packed sequences from text files / hub columns as fixed-shape batches.

  Every host reads the whole stream and keeps rows [p*B/P, (p+1)*B/P) of each global batch,
  so hosts agree on batch composition without communication.

  Args:
    paths_or_hub: text file(s), folder(s) of text files, or 'hub:...' specs (`parse_source`).
    tokenizer: fast BERT tokenizer.
    max_length: sequence length S, [CLS] and [SEP] included.
    batch_size: global batch size B (divisible by process_count).
    seed, epoch, repeat: the shuffle is a pure function of the three (`repeat` numbers the
      passes over a corpus shorter than an epoch; pass 0 shuffles as (seed, epoch) alone).
    shuffle_buffer: sequences held for the streaming shuffle (<= 1: corpus order).
    drop_remainder: drop the last partial batch (else padded with weight-0 rows).
    process_index, process_count: multi-host row sharding.

  Returns:
    Iterator of dicts: input_ids, attention_mask, token_type_ids (int32 [B/P, S], types all
    0), labels (int32 [B/P] zeros), weights (float32 [B/P], 0 for padding rows). Its return
    value (StopIteration.value) is the number of packed sequences in the whole stream.
  """
  if not isinstance(max_length, int) or max_length < 3:
    raise BitbertError(f'max_length={max_length!r}: need an int >= 3')
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
    raise BitbertError(f'batch_size={batch_size!r}: need a positive int divisible by '
                       f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise BitbertError(f'process_index={process_index}: need 0 <= index < {process_count}')
  sources = _resolve_sources(paths_or_hub)
  return _batches(sources, tokenizer, max_length, batch_size, (seed, epoch, repeat),
                  shuffle_buffer, drop_remainder, process_index, process_count)


def _token_lines(sources: list['str | HubSource'],
                 tokenizer: transformers.PreTrainedTokenizerBase) -> Iterator[list[int]]:
  def flush(lines):
    # verbose=False: long paragraphs are fine here (packing splits them), no length warning.
    return tokenizer(lines, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)['input_ids']
  for src in sources:
    lines = _hub_lines(src) if isinstance(src, HubSource) else _file_lines(src)
    chunk = []
    for line in lines:
      chunk.append(line)
      if len(chunk) == _LINES_PER_CALL:
        preempt.check('corpus streaming')  # a big corpus takes minutes to stream or skip
        yield from flush(chunk)
        chunk = []
    if chunk:
      yield from flush(chunk)


def _shuffled(items: Iterator[list[int]], buffer: int,
              rng: np.random.Generator) -> Iterator[list[int]]:
  if buffer <= 1:
    yield from items
    return
  pool: list[list[int]] = []
  for item in items:
    pool.append(item)
    if len(pool) == buffer:
      i = int(rng.integers(buffer))
      pool[i], pool[-1] = pool[-1], pool[i]
      yield pool.pop()
  for i in rng.permutation(len(pool)):
    yield pool[i]


def _batches(sources, tokenizer, max_length, batch_size, shuffle_key, shuffle_buffer,
             drop_remainder, process_index, process_count):
  cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
  seed, epoch, repeat = shuffle_key
  rng = np.random.default_rng((seed, epoch) if not repeat else (seed, epoch, repeat))
  seqs = _shuffled(pack_sequences(_token_lines(sources, tokenizer), max_length - 2),
                   shuffle_buffer, rng)
  local = batch_size // process_count
  lo = process_index * local
  rows: list[list[int]] = []
  produced = 0

  def emit(rows):
    ids = np.full((local, max_length), pad, np.int32)
    mask = np.zeros((local, max_length), np.int32)
    weights = np.zeros(local, np.float32)
    for r, seq in enumerate(rows[lo:lo + local]):
      full = [cls, *seq, sep]
      ids[r, :len(full)] = full
      mask[r, :len(full)] = 1
      weights[r] = 1.0
    return {'input_ids': ids, 'attention_mask': mask,
            'token_type_ids': np.zeros_like(ids), 'labels': np.zeros(local, np.int32),
            'weights': weights}

  for seq in seqs:
    produced += 1
    rows.append(seq)
    if len(rows) == batch_size:
      yield emit(rows)
      rows = []
  if not produced:
    names = [s if isinstance(s, str) else f'hub:{s.path}' for s in sources]
    raise BitbertError(f'corpus {names}: empty (no text lines after skipping blank lines and '
                       '= headings =)')
  if rows and not drop_remainder:
    yield emit(rows)
  return produced
