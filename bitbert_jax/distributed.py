"""Joining a multi-host run: every host runs the same command, JAX's multi-controller runtime
makes their processes one set of devices. Set up once, before any array exists.

Started by hand (or by launch/local_processes.sh, launch/slurm_gpu.sbatch) with the three values
of `jax.distributed.initialize`; on a Cloud TPU pod (JAX_COORDINATOR_ADDRESS or
TPU_WORKER_HOSTNAMES set), an `srun` with several tasks, or an `mpirun`, JAX reads them from the
environment itself. Without either, the run is one process and nothing happens here.

Once joined, the processes meet at barriers (`sync`) and share verdicts (`any_process`,
`agreed`) wherever one process deciding alone would leave the others waiting in a collective.
"""
import functools
import logging
import os
import socket
import sys
import threading
import time
import traceback

from bitbert_jax.errors import BitbertError

log = logging.getLogger('bitbert_jax')

INITIALIZATION_TIMEOUT = 300  # s; jax.distributed.initialize's default
HEARTBEAT_TIMEOUT = 100  # s; a process silent this long stops every other (JAX's default)
EX_USAGE = 2
_heartbeat_timeout = HEARTBEAT_TIMEOUT  # this run's, once initialized


def auto_detected():
  """The environment variable that marks a multi-process launch JAX can read itself, or None."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if os.environ.get('TPU_WORKER_HOSTNAMES'):
    return 'TPU_WORKER_HOSTNAMES'
  # srun's job steps: SLURM_STEP_NODELIST is set inside a step, not in the sbatch script itself.
  if os.environ.get('SLURM_STEP_NODELIST') and _int_env('SLURM_NTASKS') > 1:
    return 'SLURM_NTASKS'
  if _int_env('OMPI_COMM_WORLD_SIZE') > 1:
    return 'OMPI_COMM_WORLD_SIZE'
  return None


def _int_env(name):
  try:
    return int(os.environ.get(name, '0'))
  except ValueError:
    return 0


def check(coordinator_address, num_processes, process_id,
          initialization_timeout=INITIALIZATION_TIMEOUT,
          heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT):
  """Refuses bad values (BitbertError naming the flag) before anything connects anywhere."""
  given = {'--coordinator_address': coordinator_address, '--num_processes': num_processes,
           '--process_id': process_id}
  missing = [k for k, v in given.items() if v is None or v == '']
  if len(missing) < 3 and missing and auto_detected() is None:
    raise BitbertError(f'{", ".join(missing)} missing: a multi-host run needs all of '
                       '--coordinator_address=HOST:PORT --num_processes=N --process_id=I '
                       '(or a TPU pod / SLURM / MPI launch, where JAX reads them itself)')
  if coordinator_address:
    host, sep, port = str(coordinator_address).rpartition(':')
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise BitbertError(f'--coordinator_address={coordinator_address}: expected HOST:PORT with '
                         'a port in 1..65535, e.g. 10.0.0.2:8476 (process 0\'s host)')
  if num_processes is not None and num_processes < 1:
    raise BitbertError(f'--num_processes={num_processes}: must be >= 1')
  if process_id is not None and (process_id < 0 or num_processes and process_id >= num_processes):
    valid = f'0..{num_processes - 1} (--num_processes={num_processes})' if num_processes else '>= 0'
    raise BitbertError(f'--process_id={process_id}: out of range; valid: {valid}')
  for name, value in (('--initialization_timeout', initialization_timeout),
                      ('--heartbeat_timeout_seconds', heartbeat_timeout_seconds)):
    if value is None or value < 1:
      raise BitbertError(f'{name}={value}: must be >= 1 (seconds)')


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               initialization_timeout=INITIALIZATION_TIMEOUT,
               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT):
  """Joins this process to the run's others; returns True when the run is multi-process.

  Bad values raise BitbertError. Processes that do not all join within
  `initialization_timeout` seconds end this one with one line on stderr and status 2 (JAX would
  abort with a stack trace, later). Once running, a process that dies or hangs for
  `heartbeat_timeout_seconds` makes JAX stop every other one, naming the silent process.
  """
  check(coordinator_address, num_processes, process_id, initialization_timeout,
        heartbeat_timeout_seconds)
  explicit = {k: v for k, v in (('coordinator_address', coordinator_address or None),
                                ('num_processes', num_processes),
                                ('process_id', process_id)) if v is not None}
  source = 'flags' if explicit else auto_detected()
  if source is None or num_processes == 1 and len(explicit) == 3:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():  # a second run in this process (a notebook, tests)
    return jax.process_count() > 1
  # JAX's preemption notifier would take SIGTERM over; preempt.py agrees on it across hosts.
  jax.config.update('jax_enable_preemption_service', False)
  if jax.config.jax_cpu_collectives_implementation is None:  # CPU devices need it to talk
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if len(explicit) == 3:
    # All given: no cluster detection, which on SLURM would show each process one GPU only.
    explicit['cluster_detection_method'] = 'deactivate'
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or '(auto)'
  done = threading.Event()
  threading.Thread(target=_watchdog, daemon=True, name='bitbert-join-watchdog',
                   args=(done, address, num_processes, process_id,
                         initialization_timeout)).start()
  global _heartbeat_timeout
  _heartbeat_timeout = heartbeat_timeout_seconds
  try:
    jax.distributed.initialize(**explicit, initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except (ValueError, TypeError, RuntimeError) as e:
    text = ' '.join(str(e).split())[:400]
    if 'Failed to start RPC server' in text:  # process 0 could not listen
      text = f'port {address.rpartition(":")[2]} is in use on this host, or not ours to bind'
    raise BitbertError(f'multi-host start via {source} ({address}): {text}') from None
  finally:
    done.set()
  log.info('process %d of %d (coordinator %s, via %s): %d local of %d devices',
           jax.process_index(), jax.process_count(), address, source,
           jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def _watchdog(done, address, num_processes, process_id, timeout):
  """One line and status 2 when the processes have not all joined within `timeout` seconds."""
  host, _, port = address.rpartition(':')
  reached = process_id == 0 or not port.isdigit()  # process 0 is the coordinator
  deadline = time.monotonic() + timeout
  while (left := deadline - time.monotonic()) > 0:
    if done.wait(min(1.0, left)):
      return
    reached = reached or _reachable(host.strip('[]'), int(port))
  if done.is_set():
    return
  n = f' {num_processes}' if num_processes else ''
  why = (f'cannot reach the coordinator {address}' if not reached else
         f'not all{n} processes joined the coordinator {address}')
  print(f'error: process {process_id}: {why} within --initialization_timeout={timeout} s; '
        'start the same command on every host, each with its own --process_id, all with the '
        'same --coordinator_address (process 0\'s host) and --num_processes',
        file=sys.stderr, flush=True)
  os._exit(EX_USAGE)  # the main thread is blocked inside JAX's connect: nothing else ends it


def _reachable(host, port):
  try:
    with socket.create_connection((host, port), timeout=1.0):
      return True
  except OSError:
    return False


def exits_together(main):
  """`main(argv)`, but a multi-process run that fails leaves without leaving a peer waiting.

  When every process fails with the same status (a bad input, preemption), they meet at a
  barrier and exit normally. A process that fails alone waits for the others twice as long as
  JAX waits for a silent process (--heartbeat_timeout_seconds), then leaves at once (os._exit): its
  heartbeats stop, and JAX stops the others, which would otherwise wait in their next
  collective for it (and it, at exit, for them).
  """

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if status == 0 or not _several_processes():
        raise
    except BaseException:  # pylint: disable=broad-except
      if not _several_processes():
        raise
      traceback.print_exc()
      status = 1
    _leave(status)

  return wrapped


def _several_processes():
  jax = sys.modules.get('jax')
  return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def _leave(status):
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  # Twice the heartbeat timeout: a dead peer is then named by JAX's heartbeat check first.
  wait_ms = (2 * _heartbeat_timeout + 10) * 1000
  try:  # the coordination service's barrier: no collective, so a peer stuck in one is no matter
    client.wait_at_barrier(f'bitbert_exit_{status}', wait_ms)
  except Exception as e:  # pylint: disable=broad-except
    why = ' '.join(str(e).split())[:300]
    print(f'process {distributed.global_state.process_id}: stopping alone (status {status}); '
          f'the other processes stop when JAX notices (--heartbeat_timeout_seconds). {why}',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.shutdown()
    os._exit(status)
  sys.exit(status)


# --- what the processes agree on (each a no-op with one process) ---------------------------

def sync(name):
  """Waits until every process got here."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def fetch(tree):
  """jax.device_get that also reads arrays sharded over several processes' devices (fsdp or tensor
  axes across hosts), by gathering them; collective then: every process calls it at one point."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(one, tree)


def any_process(*flags):
  """Each flag OR-ed over the processes: the same decision on every one (one collective)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(v) for v in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))


def agreed(fn, what):
  """fn() on every process; a BitbertError on any one is raised on all (the others name it), so
  that no process goes on to a collective that the failed one never reaches."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return fn()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error, out = None, None
  try:
    out = fn()
  except BitbertError as e:
    error = e
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
  if error is not None:
    raise error
  if failed.any():
    raise BitbertError(f'process {int(np.argmax(failed))} stopped at {what} with an error (its '
                       'output names it); every process stops')
  return out
