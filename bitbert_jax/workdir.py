"""The run's working directory: one writer at a time, whole files only, no debris on bad input.

A local directory or a bucket (gs://...); its files go through `fs`, and a bucket, which has no
lock, is claimed with a lease object (`lease`).
"""
import fcntl
import json
import os
import shutil
import tempfile

from bitbert_jax import fs
from bitbert_jax.errors import BitbertError
from bitbert_jax.lease import Lease

LOCK = '.lock'


def write_json(path, obj):
  """Writes JSON whole (`fs.write_text`), so readers never see half a file."""
  fs.write_text(path, json.dumps(obj, indent=2, default=float))


class Lock:
  """An exclusive lock on workdir/.lock; a second run on the same workdir is refused.

  The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed run never
  blocks the re-run that resumes it.
  """

  def __init__(self, workdir):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, LOCK)
    self._f = None

  def __enter__(self):
    self._f = open(self.path, 'a+')
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      self._f.seek(0)
      holder = self._f.read().strip()
      self._f.close()
      who = f' (pid {holder})' if holder else ''
      raise BitbertError(f'workdir {os.path.dirname(self.path)} is in use by another run{who}, '
                         f'which holds {self.path}; wait for it to finish or pick another '
                         '--workdir') from e
    self._f.seek(0)
    self._f.truncate()
    self._f.write(str(os.getpid()))
    self._f.flush()
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()


class Claim:
  """A locked workdir that a run failing before `commit()` leaves as it found it.

  Everything this run created before the commit (the workdir itself, the lock file, generated
  samples) is removed again when the block raises; after the commit (config.json written,
  training under way) what was written stays, to be resumed.
  """

  def __init__(self, workdir, active=True):
    self.workdir = workdir if fs.is_uri(workdir) else os.path.abspath(workdir)
    self.active = active  # False on the other hosts of a pod: only process 0 writes
    self._created = []  # directories made by this run, outermost first
    self._committed = False
    self._lock = None
    self._lock_existed = False
    self._before = set()

  def __enter__(self):
    if not self.active:
      return self
    uri = fs.is_uri(self.workdir)
    try:
      if fs.exists(self.workdir) and not fs.isdir(self.workdir):
        raise BitbertError(f'--workdir {self.workdir}: exists and is not a directory; give a '
                           'directory (new or of an earlier run of this config)')
      parent = self.workdir
      while not uri and not os.path.exists(parent):
        self._created.insert(0, parent)
        parent = os.path.dirname(parent)
      self._lock_existed = fs.exists(fs.join(self.workdir, LOCK))
      self._lock = Lease(fs.join(self.workdir, LOCK)) if uri else Lock(self.workdir)
      self._lock.__enter__()
    except ImportError as e:  # epath and the lease reach gs:// through gcsfs
      raise BitbertError(f'--workdir {self.workdir}: a bucket workdir needs gcsfs ({e}); '
                         'pip install gcsfs') from e
    except OSError as e:
      self._remove_created_dirs()
      raise BitbertError(f'--workdir {self.workdir}: cannot create or lock it '
                         f'({e.strerror or e}); give a writable directory') from e
    except BaseException:
      self._remove_created_dirs()
      raise
    # Listed under the lock: no other run changes the workdir from here on.
    self._before = set(fs.listdir(self.workdir))
    return self

  def commit(self):
    self._committed = True

  def __exit__(self, exc_type, exc, tb):
    if not self.active:
      return
    try:
      if exc_type is not None and not self._committed:
        self._undo()
    finally:
      self._lock.__exit__(exc_type, exc, tb)
      if exc_type is not None and not self._committed:
        self._remove_created_dirs()

  def _undo(self):
    for name in sorted(set(fs.listdir(self.workdir)) - self._before):
      path = fs.join(self.workdir, name)
      if fs.isdir(path) and not os.path.islink(path):
        fs.rmtree(path)
      else:
        fs.remove(path)
    if not self._lock_existed:
      fs.remove(self._lock.path)

  def _remove_created_dirs(self):
    for d in reversed(self._created):
      try:
        os.rmdir(d)  # only if still empty: another run may have started in it meanwhile
      except OSError:
        return


def replace_dir(src, dst):
  """Renames src to dst; an existing dst is moved aside first and removed only on success."""
  if not os.path.exists(dst):
    os.rename(src, dst)
    return
  old = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.old-', dir=os.path.dirname(dst))
  os.rmdir(old)
  os.rename(dst, old)
  try:
    os.rename(src, dst)
  except OSError:
    os.rename(old, dst)
    raise
  shutil.rmtree(old, ignore_errors=True)
