"""The claim of a bucket workdir: a lease object, since a bucket has no lock that dies with its
holder.

`workdir/.lock` holds the run's identity (host, pid, a run id) and when it was last refreshed.
It is created only if absent (GCS's ifGenerationMatch=0), so of two runs starting together one
gets it; a thread refreshes it every REFRESH_S seconds; the run deletes it when it ends. A lease
not refreshed for TTL_S seconds belongs to a dead run (SIGKILL, a lost Spot VM) and is taken
over, so the relaunched run resumes.

What it cannot guarantee: a live run whose refreshes stall for TTL_S (a frozen VM, a network
partition) is taken for dead; two runs taking over the same stale lease at the same moment are
kept apart only by the delete being conditional on the generation read (real GCS enforces it,
emulators may not), and a run whose lease was taken learns it at its next refresh (an error in
its log), not before.
"""
import json
import logging
import os
import socket
import threading
import time
import uuid

from bitbert_jax.errors import BitbertError

log = logging.getLogger('bitbert_jax')
TTL_S = 300.0  # a lease this old is a dead run's
REFRESH_S = 60.0


def _filesystem(uri):
  """gcsfs itself: epath has no create-if-absent, which the lease needs."""
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.core.url_to_fs(uri)


class Lease:
  """`with Lease('gs://bucket/run/.lock'):` holds the workdir; BitbertError if a live run does."""

  def __init__(self, path):
    self.path = path
    self.identity = {'host': socket.gethostname(), 'pid': os.getpid(), 'run': uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread = None
    self._fs, self._key = None, None

  def _body(self):
    return json.dumps(self.identity | {'refreshed': time.time()}).encode()

  def _holder(self):
    """(the lease's content, its generation); FileNotFoundError when there is none."""
    generation = self._fs.info(self._key).get('generation')
    return json.loads(self._fs.cat_file(self._key)), generation

  def _create(self):
    self._fs.pipe_file(self._key, self._body(), mode='create')

  def __enter__(self):
    self._fs, self._key = _filesystem(self.path)
    try:
      self._create()
    except FileExistsError:
      self._take_over()
    log.info('claimed %s: a lease refreshed every %.0f s (a bucket has no lock; a run silent '
             'for %.0f s is taken for dead and its workdir resumed by the next one)', self.path,
             REFRESH_S, TTL_S)
    self._thread = threading.Thread(target=self._refresh, name='bitbert-lease', daemon=True)
    self._thread.start()
    return self

  def _take_over(self):
    try:
      holder, generation = self._holder()
    except FileNotFoundError:  # released meanwhile
      holder, generation = {}, None
    except ValueError:  # unreadable: a lease whose writer died mid-upload cannot exist on GCS
      holder, generation = {}, self._fs.info(self._key).get('generation')
    age = time.time() - float(holder.get('refreshed', 0))
    if age < TTL_S:
      who = ', '.join(f'{k} {holder.get(k)}' for k in ('host', 'pid', 'run'))
      raise BitbertError(
          f'workdir {os.path.dirname(self.path)} is in use by another run ({who}), whose lease '
          f'{self.path} was refreshed {age:.0f} s ago; wait for it to finish or pick another '
          f'--workdir (if that run is dead, its lease expires {TTL_S - age:.0f} s from now, or '
          'delete the lease object)')
    log.warning('lease %s of %s was last refreshed %.0f s ago: that run is taken for dead and '
                'its workdir is resumed', self.path, holder or 'an unreadable lease', age)
    if generation is not None:
      bucket, key, _ = self._fs.split_path(self._key)
      try:  # only the lease read above: a run that took it over meanwhile keeps it
        self._fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=generation)
      except FileNotFoundError:
        pass
      except OSError as e:
        raise BitbertError(f'{self.path}: another run took over the lease first ({e})') from e
    try:
      self._create()
    except FileExistsError:
      raise BitbertError(f'{self.path}: another run took over the lease first; pick another '
                         '--workdir or wait for it') from None

  def _refresh(self):
    while not self._stop.wait(REFRESH_S):
      try:
        holder, _ = self._holder()
        if holder.get('run') != self.identity['run']:
          log.error('lease %s was taken over by another run (%s): two runs may now write this '
                    'workdir; stop one of them', self.path, holder)
          return
        self._fs.pipe_file(self._key, self._body())
      except Exception as e:  # pylint: disable=broad-except
        log.warning('lease %s: refresh failed (%s); retrying in %.0f s', self.path, e, REFRESH_S)

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      if self._holder()[0].get('run') == self.identity['run']:
        self._fs.rm_file(self._key)
    except (OSError, ValueError):  # gone already, or never ours
      pass
