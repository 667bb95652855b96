"""Deterministic, length-bucketed, fixed-shape batches (few shapes = few jit recompiles).

An epoch is first planned as a list of global index arrays (cheap: one permutation and a few
sorts), then batches are materialised lazily, so resuming at (epoch, k) costs nothing extra.
`TaskBatches` and `StreamBatches` are what the trainer steps through: epochs of a tokenized
split or of a corpus stream, each resumable at any batch.
"""
import dataclasses
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from bitbert_jax.data.tokenize import EncodedSplit
from bitbert_jax.errors import BitbertError

# Sort by length inside windows of this many batches: little padding, still random order.
WINDOW_BATCHES = 50


def default_bucket_lengths(max_length: int, step: int = 32) -> tuple[int, ...]:
  """Multiples of `step` below max_length, then max_length itself (e.g. 32, 64, 96, 128)."""
  return tuple(range(step, max_length, step)) + (max_length,)


def num_batches(encoded: 'EncodedSplit | int', batch_size: int,
                drop_remainder: bool = False) -> int:
  """Global batches per epoch for `epoch_batches` with the same arguments."""
  n = encoded if isinstance(encoded, int) else len(encoded)
  return n // batch_size if drop_remainder else -(-n // batch_size)


def _check_args(n: int, batch_size: int, process_index: int, process_count: int) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise BitbertError(f'batch_size={batch_size!r}: must be a positive int')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise BitbertError(f'process_index={process_index} / process_count={process_count}: '
                       'need 0 <= process_index < process_count')
  if batch_size % process_count:
    raise BitbertError(f'batch_size={batch_size} (global) is not divisible by '
                       f'process_count={process_count}; choose a multiple of {process_count}')
  if n == 0:
    raise BitbertError('cannot batch an empty split (0 examples)')


def _check_buckets(bucket_lengths: Sequence[int], max_length: int) -> tuple[int, ...]:
  buckets = tuple(sorted(set(int(b) for b in bucket_lengths)))
  if not buckets or buckets[0] < 1:
    raise BitbertError(f'bucket_lengths={list(bucket_lengths)!r}: need positive ints')
  if buckets[-1] < max_length:
    raise BitbertError(f'bucket_lengths={list(buckets)}: largest bucket {buckets[-1]} is '
                       f'below the encoded max_length {max_length}; add {max_length}')
  return buckets


def batch_plan(lengths: np.ndarray, batch_size: int, seed: int = 0, epoch: int = 0,
               shuffle: bool = True, drop_remainder: bool = False,
               window_batches: int = WINDOW_BATCHES) -> list[np.ndarray]:
  """Global example indices of each batch of one epoch.

  Args:
    lengths: [N] token counts.
    batch_size: global batch size B.
    seed, epoch: the order is a pure function of (seed, epoch).
    shuffle: False gives the eval order: sorted by length, fixed.
    drop_remainder: drop the last partial batch instead of padding it.
    window_batches: shuffle mode sorts by length inside windows of this many batches.

  Returns:
    List of int64 [B] arrays; -1 marks padding rows (only in the last partial batch).
  """
  lengths = np.asarray(lengths)
  n = len(lengths)
  if shuffle:
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(n)
    window = window_batches * batch_size
    order = np.concatenate([
        order[s:s + window][np.argsort(lengths[order[s:s + window]], kind='stable')]
        for s in range(0, n, window)])
  else:
    order = np.argsort(lengths, kind='stable')
  full = n // batch_size
  batches = list(order[:full * batch_size].reshape(full, batch_size))
  if n % batch_size and not drop_remainder:
    last = np.full(batch_size, -1, np.int64)
    last[:n % batch_size] = order[full * batch_size:]
    batches.append(last)
  if shuffle:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return [np.asarray(b, np.int64) for b in batches]


def make_batch(encoded: EncodedSplit, indices: np.ndarray, bucket_lengths: Sequence[int],
               process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """Pads this process's rows of one global batch to the global batch's bucket length.

  Args:
    encoded: the split.
    indices: [B] global example indices, -1 for padding rows.
    bucket_lengths: sorted allowed sequence lengths.
    process_index, process_count: this host gets rows [p*B/P, (p+1)*B/P).

  Returns:
    input_ids, attention_mask, token_type_ids: int32 [B/P, S]; labels [B/P] (int32 or
    float32); weights float32 [B/P] (0 for padding rows); index int32 [B/P] (example index,
    -1 for padding rows, to map predictions back to the split's order).
  """
  real = indices[indices >= 0]
  longest = int(encoded.lengths[real].max())
  pos = int(np.searchsorted(bucket_lengths, longest))
  if pos == len(bucket_lengths):
    raise BitbertError(f'an example has {longest} tokens, more than the largest bucket '
                       f'{bucket_lengths[-1]}; raise bucket_lengths or re-encode')
  seq = bucket_lengths[pos]
  local = len(indices) // process_count
  rows = indices[process_index * local:(process_index + 1) * local]
  ids = np.full((local, seq), encoded.pad_id, np.int32)
  types = np.zeros((local, seq), np.int32)
  mask = np.zeros((local, seq), np.int32)
  labels = np.zeros(local, encoded.labels.dtype)
  for r, i in enumerate(rows):
    if i < 0:
      continue
    length = encoded.lengths[i]
    ids[r, :length] = encoded.input_ids[i]
    types[r, :length] = encoded.token_type_ids[i]
    mask[r, :length] = 1
    labels[r] = encoded.labels[i]
  return {
      'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types, 'labels': labels,
      'weights': (rows >= 0).astype(np.float32), 'index': rows.astype(np.int32),
  }


def epoch_batches(encoded: EncodedSplit, batch_size: int, seed: int = 0, epoch: int = 0,
                  shuffle: bool = True, bucket_lengths: Sequence[int] | None = None,
                  drop_remainder: bool = False, process_index: int = 0,
                  process_count: int = 1, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one epoch, from batch `start` on (resume without building earlier ones).

  Args:
    encoded: the split.
    batch_size: global batch size B (divisible by process_count).
    seed, epoch: order is a pure function of both; all hosts must pass the same values.
    shuffle: False = eval order (sorted by length, every example once).
    bucket_lengths: allowed S values; default `default_bucket_lengths(encoded.max_length)`.
    drop_remainder: drop the last partial batch (else padded, weights 0).
    process_index, process_count: multi-host row sharding of each global batch.
    start: index of the first batch to yield.

  Returns:
    Iterator of batch dicts (see `make_batch`), `num_batches(...) - start` of them.
  """
  _check_args(len(encoded), batch_size, process_index, process_count)
  if shuffle and not (int(seed) == seed >= 0 and int(epoch) == epoch >= 0):
    raise BitbertError(f'seed={seed!r}, epoch={epoch!r}: both must be non-negative ints')
  buckets = _check_buckets(bucket_lengths or default_bucket_lengths(encoded.max_length),
                           encoded.max_length)
  plan = batch_plan(encoded.lengths, batch_size, seed, epoch, shuffle, drop_remainder)
  if not 0 <= start <= len(plan):
    raise BitbertError(f'start={start}: epoch has {len(plan)} batches')
  return (make_batch(encoded, idx, buckets, process_index, process_count)
          for idx in plan[start:])


def eval_batches(encoded: EncodedSplit, batch_size: int,
                 bucket_lengths: Sequence[int] | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, sorted by length; the last batch padded (weights 0)."""
  return epoch_batches(encoded, batch_size, shuffle=False, bucket_lengths=bucket_lengths,
                       process_index=process_index, process_count=process_count)


def padding_fraction(batches: Iterable[dict[str, np.ndarray]]) -> float:
  """Share of token positions (padding rows included) that are padding."""
  total = real = 0
  for b in batches:
    total += b['attention_mask'].size
    real += int(b['attention_mask'].sum())
  if not total:
    raise BitbertError('padding_fraction: no batches given')
  return 1.0 - real / total


@dataclasses.dataclass
class TaskBatches:
  """Epochs over a tokenized split, resumable at (epoch, batch)."""
  encoded: Any
  batch_size: int
  seed: int

  def steps_per_epoch(self):
    return num_batches(self.encoded, self.batch_size, drop_remainder=True)

  def epoch(self, epoch, start=0):
    return epoch_batches(self.encoded, self.batch_size, seed=self.seed, epoch=epoch,
                                  drop_remainder=True, start=start,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())


@dataclasses.dataclass
class StreamBatches:
  """An unlabelled stream (general-KD corpus) cut into epochs of `batches_per_epoch` batches.

  `make(epoch, repeat)` restarts pass `repeat` of the stream for an epoch deterministically
  (its StopIteration value, if any, counts the stream's sequences). A stream shorter than an
  epoch starts its next pass when `wrap`, else stops with an error naming `name`; so an epoch
  is a pure function of its number and resumes at any batch.
  """
  make: Callable[[int, int], Iterator[dict]]
  batches_per_epoch: int
  batch_size: int = 0
  name: str = 'corpus'
  field: str = 'config'
  wrap: bool = True

  def steps_per_epoch(self):
    return self.batches_per_epoch

  def epoch(self, epoch, start=0):
    # resume: skipping `start` batches replays the same pure function of (seed, epoch, pass)
    return itertools.islice(self._passes(epoch), start, self.batches_per_epoch)

  def _passes(self, epoch):
    for repeat in itertools.count():
      it, yielded = self.make(epoch, repeat), 0
      while True:
        try:
          batch = next(it)
        except StopIteration as stop:
          sequences = stop.value
          break
        yielded += 1
        yield batch
      if not yielded or not self.wrap:
        raise BitbertError(self._short(sequences, yielded))

  def _short(self, sequences, yielded):
    held = f'{sequences} sequences' if isinstance(sequences, int) else f'{yielded} batches'
    wanted = f'{self.batches_per_epoch} batches of {self.batch_size}'
    if not yielded:
      return (f'{self.field}: corpus {self.name} holds {held}, fewer than one batch of '
              f'{self.batch_size}; give more text or lower {self.field}.batch_size')
    return (f'{self.field}: corpus {self.name} holds {held}; the stage asks for {wanted} '
            f'(= {self.batches_per_epoch * self.batch_size} sequences) per epoch; set '
            f'{self.field}.wrap_corpus=True to start its next pass, or lower '
            f'{self.field}.steps_per_epoch')
