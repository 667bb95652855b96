"""Metrics to a JSON-lines file and TensorBoard (process 0 only); what the console shows of
them; the reports of a non-finite step and of the step's memory needs."""
import json
import logging
import tempfile
import time

import jax
import numpy as np

from bitbert_jax import fs
from bitbert_jax import sharding
from bitbert_jax.data import batching
from bitbert_jax.errors import BitbertError

log = logging.getLogger('bitbert_jax')


class NonFiniteError(BitbertError):
  """A NaN or infinite loss or gradient norm."""


def _scalar(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def _after(line, stage, step):
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return True  # a torn last line from a kill mid-write
  return row.get('stage') == stage and row.get('step', 0) > step


class MetricsWriter:
  """Appends `{"stage": ..., "step": ..., **metrics}` lines to workdir/metrics.jsonl.

  A bucket object cannot be appended to: in a bucket workdir the rows are kept here and the
  object rewritten whole by `flush` (at most every FLUSH_S seconds, before each checkpoint and
  at the end), so a resumed run finds every row up to its checkpoint.
  """
  FLUSH_S = 30.0

  def __init__(self, workdir, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._path = fs.join(workdir, 'metrics.jsonl')
    self._tb = None
    self._rows = None  # a bucket's rows: None for a local file, appended to as it goes
    self._flushed = time.monotonic()
    if self.enabled:
      fs.makedirs(workdir)
      if fs.is_uri(workdir):
        self._rows = (fs.read_text(self._path).splitlines(keepends=True)
                      if fs.exists(self._path) else [])
      self._tb = _tensorboard(fs.join(workdir, 'tensorboard'))

  def write(self, stage, step, metrics):
    if not self.enabled:
      return
    row = {'stage': stage, 'step': int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    if self._rows is None:
      with open(self._path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    else:
      self._rows.append(json.dumps(row) + '\n')
      if time.monotonic() - self._flushed >= self.FLUSH_S:
        self.flush()
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, float):
          self._tb.add_scalar(f'{stage}/{k}', v, int(step))

  def rewind(self, stage, step):
    """Drops `stage`'s rows after `step`: a resumed stage logs them again from its checkpoint."""
    if not self.enabled:
      return
    if self._rows is not None:
      self._rows = [l for l in self._rows if not _after(l, stage, step)]
      self.flush()
      return
    if not fs.exists(self._path):
      return
    with open(self._path) as f:
      lines = f.readlines()
    keep = [l for l in lines if not _after(l, stage, step)]
    if len(keep) < len(lines):
      fs.write_text(self._path, ''.join(keep))  # atomic: a kill mid-rewrite leaves the old file

  def flush(self):
    """Writes a bucket's rows (one object upload); a local file is appended to as rows come."""
    if self.enabled and self._rows is not None:
      fs.write_text(self._path, ''.join(self._rows))
      self._flushed = time.monotonic()

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.close()


def _tensorboard(directory):
  """tensorboardX's writer of `directory`; it writes gs:// through google-cloud-storage (a
  dependency of gcsfs), else its event files go to a local temp dir, said in one line."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    log.warning('tensorboardX not installed: no TensorBoard event files')
    return None
  try:
    return SummaryWriter(directory)
  except Exception as e:  # pylint: disable=broad-except
    if not fs.is_uri(directory):
      raise
    # gs:// needs google-cloud-storage and credentials; TensorBoard is not worth the run.
    local = tempfile.mkdtemp(prefix='bitbert_tensorboard_')
    log.warning('TensorBoard cannot write %s (%s): its event files go to %s on this host',
                directory, e, local)
    return SummaryWriter(local)


def console_metrics(m):
  """The progress line's metrics: summed terms (no per-layer ones) and the recent flip rate."""
  shown = {k: v for k, v in m.items() if '/' not in k and k != 'nonfinite'}
  if 'signflip_recent/all' in m:
    shown['flips'] = m['signflip_recent/all']  # near 0: the binary weights have stopped moving
  return shown


def nonfinite_error(name, step, m, ckpts, writer, settings):
  """Stops the stage: the faulty step is logged; the newest checkpoint predates it."""
  loss, grad_norm = float(m['loss']), float(m['grad_norm'])
  writer.write(name, step, {'loss': loss, 'grad_norm': grad_norm, 'nonfinite': 1.0})
  good = [s for s in ckpts.all_steps() if s < step]
  kept = (f'the newest checkpoint, step {max(good)}, is kept under {ckpts.directory}' if good
          else 'no checkpoint was written before it')
  raise NonFiniteError(
      f'stage {name!r}: non-finite loss or gradient norm at step {step} (loss={loss}, '
      f'grad_norm={grad_norm}); {kept}. Lower {settings.field}.lr, or set '
      f'config.train.skip_nonfinite=True to skip such batches')


def report_step_memory(step_fn, state, batches, mesh, teacher_params, name):
  """Compiles the step ahead of time for the longest bucket and logs its memory needs."""
  first = next(iter(batches.epoch(0)))
  s_max = first['input_ids'].shape[1]
  if hasattr(batches, 'encoded'):
    s_max = max(batching.default_bucket_lengths(batches.encoded.max_length))
  pad = lambda a: np.zeros(a.shape[:1] + (s_max,) + a.shape[2:], a.dtype) if a.ndim == 2 else a
  shapes = sharding.device_batch(mesh, {k: pad(np.asarray(v)) for k, v in first.items()})
  try:
    stats = step_fn.lower(state, shapes, teacher_params).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    log.info('[%s] memory analysis unavailable: %s', name, e)
    return None
  if stats is None:
    return None
  mib = lambda b: b / 2**20
  report = dict(arguments_mib=mib(stats.argument_size_in_bytes),
                outputs_mib=mib(stats.output_size_in_bytes),
                temporaries_mib=mib(stats.temp_size_in_bytes),
                generated_code_mib=mib(stats.generated_code_size_in_bytes))
  log.info('[%s] step memory at sequence %d (per device): %s', name, s_max,
           ', '.join(f'{k} {v:.1f}' for k, v in report.items()))
  return report
