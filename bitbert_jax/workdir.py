"""The run's working directory: one writer at a time, whole files only."""
import fcntl
import json
import os

from bitbert_jax.errors import BitbertError


def write_json(path, obj):
  """Writes JSON atomically (temp file + rename), so readers never see half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


class Lock:
  """An exclusive lock on workdir/.lock; a second run on the same workdir is refused."""

  def __init__(self, workdir):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, '.lock')
    self._f = None

  def __enter__(self):
    self._f = open(self.path, 'a+')
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      self._f.close()
      raise BitbertError(f'workdir {os.path.dirname(self.path)} is in use by another run '
                         f'(lock {self.path}); wait for it or pick another --workdir') from e
    self._f.seek(0)
    self._f.truncate()
    self._f.write(str(os.getpid()))
    self._f.flush()
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()
