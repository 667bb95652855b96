"""The one path layer of a run's workdir files: a local directory, or a bucket (gs://...).

A local path goes through os and shutil as it always has (a temp file then os.replace; whole
directories renamed into place). A URI goes through etils.epath, the layer Orbax writes its
checkpoints through (gcsfs, or TensorFlow's gfile where TensorFlow is installed). A bucket has
no rename, no append and no lock, so: `write_text` is one object upload (an object appears whole
or not at all), `published` uploads a finished local directory with its marker file last, and
the claim of a bucket workdir is a lease object (lease.py).
"""
import contextlib
import errno
import os
import posixpath
import shutil
import tempfile

from etils import epath

from bitbert_jax.errors import BitbertError

try:  # Several hosts share a bucket: a listing one of them cached would hide another's files.
  import fsspec
  fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False
except ImportError:  # fsspec comes with datasets; epath says what is missing on first use
  pass


def is_uri(path):
  """A bucket path such as gs://bucket/prefix (any scheme://), not a local one."""
  return '://' in os.fspath(path)


def join(path, *names):
  return posixpath.join(path, *names) if is_uri(path) else os.path.join(path, *names)


def basename(path):
  return posixpath.basename(os.fspath(path).rstrip('/'))


def exists(path):
  return epath.Path(path).exists() if is_uri(path) else os.path.exists(path)


def isdir(path):
  return epath.Path(path).is_dir() if is_uri(path) else os.path.isdir(path)


def isfile(path):
  return epath.Path(path).is_file() if is_uri(path) else os.path.isfile(path)


def listdir(path):
  return [p.name for p in epath.Path(path).iterdir()] if is_uri(path) else os.listdir(path)


def getsize(path):
  return epath.Path(path).stat().length if is_uri(path) else os.path.getsize(path)


def makedirs(path):
  if not is_uri(path):  # a bucket has no directories: an object's name makes its prefix
    os.makedirs(path, exist_ok=True)


def remove(path):
  """Deletes a file; a missing one is no error."""
  if is_uri(path):
    if epath.Path(path).exists():
      epath.Path(path).unlink()
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path):
  """Deletes a directory tree; a missing one is no error."""
  if is_uri(path):
    if epath.Path(path).exists():
      epath.Path(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def open_file(path, mode='r'):
  return epath.Path(path).open(mode) if is_uri(path) else open(path, mode)


def read_text(path):
  if is_uri(path):  # bytes: a bucket file's text is UTF-8 whatever this host's locale
    return epath.Path(path).read_bytes().decode('utf-8')
  with open(path) as f:
    return f.read()


def write_text(path, text):
  """Writes a whole file that no reader sees half-written: locally a temp file renamed over the
  target; in a bucket one upload (GCS publishes an object only once it is complete)."""
  if is_uri(path):
    epath.Path(path).write_bytes(text.encode('utf-8'))
    return
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):  # the write failed midway: leave no debris
      os.remove(tmp)


def files(directory):
  """Sorted relative paths (with '/') of the files under `directory`."""
  if not is_uri(directory):
    return sorted(os.path.relpath(os.path.join(root, n), directory)
                  for root, _, names in os.walk(directory) for n in names)
  out, todo = [], ['']
  while todo:  # listing one level at a time: epath's walk drops the scheme from its roots
    rel = todo.pop()
    for p in epath.Path(join(directory, rel) if rel else directory).iterdir():
      name = posixpath.join(rel, p.name) if rel else p.name
      (todo if p.is_dir() else out).append(name)
  return sorted(out)


def upload(local_file, dst):
  epath.Path(local_file).copy(epath.Path(dst), overwrite=True)


def publish_dir(local_dir, dst, marker):
  """Uploads a finished local directory to the URI `dst`, `marker` last.

  A bucket has no directory rename: the old copy's marker goes first and `marker` comes last,
  so a reader that checks the marker (`is_published`) never takes a half-uploaded copy as done.
  """
  remove(join(dst, marker))
  rmtree(dst)
  names = files(local_dir)
  for name in sorted(names, key=lambda n: n == marker):
    upload(os.path.join(local_dir, name), join(dst, name))


def is_published(path, marker):
  """A directory written whole: locally it exists (it was renamed into place whole); in a
  bucket its marker, uploaded last, exists."""
  return exists(join(path, marker)) if is_uri(path) else exists(path)


@contextlib.contextmanager
def published(out_dir, marker):
  """A local directory path to write `out_dir` to: `out_dir` itself when it is local (the writer
  renames its own temp dir into place), else a temp path uploaded on success, `marker` last."""
  if not is_uri(out_dir):
    yield out_dir
    return
  with tempfile.TemporaryDirectory(prefix='bitbert_upload_') as tmp:
    local = os.path.join(tmp, basename(out_dir))
    yield local
    publish_dir(local, out_dir, marker)


# --- free space: a save that cannot fit stops before it writes, with one line that says so ---
_HEADROOM = 64 << 20  # logs, manifests and metadata written beside the arrays


def free_bytes(path):
  """Bytes free on the filesystem that holds (or will hold) local `path`; None for a bucket."""
  if is_uri(path):
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path):  # the directory to be created lives on its nearest ancestor
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _mib(n):
  return f'{n / (1 << 20):,.0f} MiB'


def disk_full(path, what, needed=None, removed=True):
  """The BitbertError for a save to `path` that does not fit (what: e.g. 'checkpoint step 228');
  `removed`: nothing of the save is left on disk."""
  free = free_bytes(path)
  need = f'needs about {_mib(needed)}, ' if needed else 'did not fit: '
  room = f'its filesystem has {_mib(free)} free' if free is not None else 'the bucket is full'
  kept = 'Nothing of it was kept; free' if removed else 'Free'
  return BitbertError(
      f'disk full: {what} at {path} {need}{room}. {kept} space (the stages/*/checkpoints of '
      f'finished runs can go) or use another --workdir, then run the same command again: it '
      f'resumes from the last complete stage or checkpoint')


def require_space(path, nbytes, what):
  """Raises `disk_full` before anything is written when `nbytes` (+ headroom) do not fit."""
  free = free_bytes(path)
  if free is not None and free < nbytes + _HEADROOM:
    raise disk_full(path, what, nbytes + _HEADROOM)


def is_disk_full(e):
  """True when exception `e` (or one it was raised from) is a write that ran out of space:
  an OSError ENOSPC, or Orbax/TensorStore's RESOURCE_EXHAUSTED wrapping one."""
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if 'No space left on device' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False
