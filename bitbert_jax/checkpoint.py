"""Orbax checkpoints of a stage: periodic (steps and wall time), last N kept, damage detected.

A checkpoint holds the whole TrainState pytree plus the best-on-dev parameters, and a JSON
part with the stage's bookkeeping (step, best score, last evals, skipped batches). Orbax writes
each step into a temporary directory and renames it, so a kill mid-save leaves no partial step;
a manifest of every file's size and CRC-32 then catches later damage (truncation, deletion, bit
rot), which Orbax alone may restore silently. A damaged latest checkpoint is deleted with a
warning that names what was wrong, and the previous one is used.
"""
import json
import logging
import time
import zlib

import jax
import orbax.checkpoint as ocp

from bitbert_jax import fs
from bitbert_jax import paths
from bitbert_jax.errors import BitbertError

log = logging.getLogger('bitbert_jax')
MANIFEST = 'bitbert_manifest.json'
_CHUNK = 1 << 22


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings when given) for an Orbax restore target."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _crc32(path):
  crc = 0
  with fs.open_file(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(directory):
  """Relative paths of the files under `directory`, the manifest itself excluded."""
  return [rel for rel in fs.files(directory) if rel != MANIFEST]


def write_manifest(directory):
  """Records size and CRC-32 of every file under `directory` (written atomically)."""
  files = {rel: [fs.getsize(fs.join(directory, rel)),
                 _crc32(fs.join(directory, rel))] for rel in _files(directory)}
  fs.write_text(fs.join(directory, MANIFEST),
                json.dumps({'files': files}, indent=1, sort_keys=True))


def verify_manifest(directory):
  """None if every file matches the manifest, else what is wrong (one line).

  A directory without a manifest (killed between the save and the manifest) passes: the save
  itself is atomic, and a restore error still counts as damage.
  """
  path = fs.join(directory, MANIFEST)
  if not fs.isdir(directory):
    return f'{directory} is missing'
  if not fs.exists(path):
    return None
  try:
    files = json.loads(fs.read_text(path))['files']
  except (OSError, ValueError, KeyError) as e:
    return f'{path}: unreadable manifest ({type(e).__name__}: {e})'
  for rel, (size, crc) in sorted(files.items()):
    file = fs.join(directory, rel)
    if not fs.isfile(file):
      return f'file {file} is missing'
    actual = fs.getsize(file)
    if actual != size:
      return f'file {file} has {actual} bytes, expected {size} (truncated or overwritten)'
    if _crc32(file) != crc:
      return f'file {file} has a wrong CRC-32 (its content changed since it was written)'
  return None


class StageCheckpoints:
  """Checkpoints under `directory`; `every_steps`/`every_secs` = 0 disables that trigger."""

  def __init__(self, directory, keep=2, every_steps=0, every_secs=0.0):
    if keep < 1:
      raise BitbertError(f'config.train.keep_checkpoints={keep}: must be >= 1')
    self.directory = paths.absolute(directory)
    self.every_steps, self.every_secs = every_steps, every_secs
    self._last_time = time.time()
    # cleanup_tmp_directories: a save killed midway leaves an Orbax temp dir; remove it.
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True))

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def due(self, step):
    by_steps = self.every_steps and step % self.every_steps == 0
    by_time = self.every_secs and time.time() - self._last_time >= self.every_secs
    return bool(by_steps or by_time)

  def save(self, step, tree, meta):
    """Saves `tree` and the JSON `meta` at `step`, unless that step is already saved."""
    if step in self._manager.all_steps():
      return False
    what = f'checkpoint step {step}'
    fs.require_space(self.directory, tree_bytes(tree), what)
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()  # a checkpoint must be whole before training moves on
    except Exception as e:  # pylint: disable=broad-except
      if not fs.is_disk_full(e):
        raise
      self._remove_partial(step)
      raise fs.disk_full(self.directory, what) from None
    if jax.process_index() == 0:
      write_manifest(self._step_dir(step))
    self._last_time = time.time()
    return True

  def _remove_partial(self, step):
    """Deletes what a failed save of `step` left (Orbax's temp dir): the space goes back."""
    if jax.process_index() == 0 and fs.isdir(self.directory):
      for name in fs.listdir(self.directory):
        if name == str(step) or name.startswith(f'{step}.orbax-checkpoint-tmp'):
          fs.rmtree(fs.join(self.directory, name))

  def _step_dir(self, step):
    return fs.join(self.directory, str(step))

  def restore_latest(self, abstract_tree, check_meta=None):
    """(tree, meta) of the newest intact checkpoint, or None.

    A damaged one (a file missing, truncated or changed; unreadable) is deleted with a warning
    naming the problem, and the previous one is tried. `abstract_tree` may be a function of the
    checkpoint's meta (a tree whose layout depends on it). `check_meta(meta, where)` may raise a
    BitbertError when an intact checkpoint does not belong to this run's settings.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      where = self._step_dir(step)
      if jax.process_index() == 0 and fs.exists(fs.join(where, MANIFEST + '.tmp')):
        fs.remove(fs.join(where, MANIFEST + '.tmp'))  # killed while writing the manifest
      problem = verify_manifest(where)
      if problem is None:
        try:
          meta = self._manager.restore(step, args=ocp.args.Composite(
              meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # pylint: disable=broad-except
          problem = f'unreadable bookkeeping ({one_line(e)})'
      if problem is None:
        if check_meta is not None:
          check_meta(meta, where)
        try:
          target = abstract_tree(meta) if callable(abstract_tree) else abstract_tree
          restored = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
          return restored.state, restored.meta
        except Exception as e:  # pylint: disable=broad-except
          if fs.exists(fs.join(where, MANIFEST)):  # intact files: another model
            raise BitbertError(
                f'checkpoint {where} does not fit this stage ({one_line(e)}); it was written '
                f'with another config (model size, policy, task head): restore that config, '
                f'or move {self.directory} away to start the stage over') from None
          problem = f'unreadable arrays ({one_line(e)})'
      self._discard(step, problem)
    return None

  def _discard(self, step, problem):
    """Deletes a damaged step, so training can write that step again."""
    previous = [s for s in self._manager.all_steps() if s < step]
    then = f'using step {max(previous)} instead' if previous else 'no older one: starting over'
    log.warning('checkpoint %s is damaged: %s; deleting it and %s', self._step_dir(step),
                problem, then)
    try:
      self._manager.delete(step)  # every process calls it; Orbax deletes on the primary one
    except Exception:  # pylint: disable=broad-except
      if jax.process_index() == 0:
        fs.rmtree(self._step_dir(step))
    self._manager.reload()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def tree_bytes(tree):
  """Bytes of the arrays in `tree` (global sizes): what a checkpoint of it writes, about."""
  return sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(tree))


def one_line(e):
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:300] if text else ""}'


def fingerprint(settings, total, steps_per_epoch, objective):
  """Settings that fix the step sequence; a resumed stage should match its checkpoint's."""
  return dict(total_steps=total, steps_per_epoch=steps_per_epoch,
              batch_size=settings.batch_size, lr=settings.lr, warmup=settings.warmup,
              float_lr=settings.float_lr, float_warmup=settings.float_warmup,
              warmin=settings.warmin,
              grad_accum_steps=settings.grad_accum_steps, losses=list(objective.losses),
              loss_weights=[list(w) for w in objective.weights], attn_loss=objective.attn_loss,
              temperature=objective.temperature)


def check_fingerprint(name, field, fingerprint):
  """The `check(meta, where)` of `StageCheckpoints.restore_latest`: warns on changed settings."""
  def check(meta, where):
    old = meta.get('fingerprint') or {}
    changed = [f'{k}: {old[k]!r} -> {v!r}' for k, v in fingerprint.items()
               if k in old and old[k] != v]
    if changed:  # allowed (e.g. a lower lr after a NaN), but no longer an exact resume
      log.warning('[%s] resuming from %s written with other settings (%s; see %s): the run '
                  'will differ from an uninterrupted one', name, where, '; '.join(changed), field)
  return check
