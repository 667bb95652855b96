"""Metrics to a JSON-lines file, TensorBoard and the console (process 0 only), with rate/ETA."""
import json
import logging
import os
import time

import jax

log = logging.getLogger('bitbert_jax')


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
  """Appends `{"stage": ..., "step": ..., **metrics}` lines to workdir/metrics.jsonl."""

  def __init__(self, workdir, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        log.warning('tensorboardX not installed: no TensorBoard event files')

  def write(self, stage, step, metrics):
    if not self.enabled:
      return
    row = {'stage': stage, 'step': int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    with open(self._path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if isinstance(v, float):
          self._tb.add_scalar(f'{stage}/{k}', v, int(step))

  def rewind(self, stage, step):
    """Drops `stage`'s rows after `step`: a resumed stage logs them again from its checkpoint."""
    if not self.enabled or not os.path.exists(self._path):
      return
    with open(self._path) as f:
      lines = f.readlines()
    keep = [l for l in lines if not _after(l, stage, step)]
    if len(keep) < len(lines):
      tmp = self._path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(keep)
      os.replace(tmp, self._path)  # atomic: a kill mid-rewrite leaves the old file

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Console progress lines with steps/s, examples/s and ETA."""

  def __init__(self, stage, total_steps, start_step=0, batch_size=1):
    self.stage, self.total, self.batch_size = stage, total_steps, batch_size
    self._t0, self._s0 = time.time(), start_step

  def line(self, step, metrics):
    elapsed = max(time.time() - self._t0, 1e-9)
    rate = (step - self._s0) / elapsed
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    shown = ' '.join(f'{k}={float(v):.4g}' for k, v in sorted(metrics.items()))
    return (f'[{self.stage}] step {step}/{self.total} {shown} | {rate:.2f} steps/s '
            f'{rate * self.batch_size:.1f} ex/s | ETA {_duration(eta)}')


def _duration(seconds):
  if seconds != seconds:  # NaN: no rate yet
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
