"""Orbax checkpoints of a stage: periodic (steps and wall time), last N kept, damage detected.

A checkpoint holds the whole TrainState pytree plus the best-on-dev parameters, and a JSON
part with the stage's bookkeeping (best score, step); a damaged latest one falls back to the
previous one with a warning that names what was wrong.
"""
import logging
import os
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger('bitbert_jax')


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings when given) for an Orbax restore target."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class StageCheckpoints:
  """Checkpoints under `directory`; `every_steps`/`every_secs` = 0 disables that trigger."""

  def __init__(self, directory, keep=2, every_steps=0, every_secs=0.0):
    self.directory = os.path.abspath(directory)
    self.every_steps, self.every_secs = every_steps, every_secs
    self._last_time = time.time()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def due(self, step):
    by_steps = self.every_steps and step % self.every_steps == 0
    by_time = self.every_secs and time.time() - self._last_time >= self.every_secs
    return bool(by_steps or by_time)

  def save(self, step, tree, meta):
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()  # a checkpoint must be whole before training moves on
    self._last_time = time.time()

  def restore_latest(self, abstract_tree):
    """(tree, meta) of the newest readable checkpoint, or None; damaged ones are skipped."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_tree), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta
      except Exception as e:  # pylint: disable=broad-except
        log.warning('checkpoint %s is damaged (%s: %s); falling back to the previous one',
                    os.path.join(self.directory, str(step)), type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else '')
    return None

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
