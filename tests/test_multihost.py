"""Multi-host for real, on one machine: launch/local_processes.sh starts 2 processes x 2 CPU
devices under JAX's multi-controller runtime (gloo collectives, a coordinator on a free loopback
port), against 1 process x 4 devices. Both have the same global mesh (fsdp=4: parameters and batch
split over all four devices) and global batch of the XTC smoke pipeline (tiny pre-trained model,
one student layer), so they compute the same numbers except for the order in which the gradient
reduction adds the processes' partial sums: float32 rounding then differs in the last bits (1-bit
codes equal), hence the tolerances of `assert_same_run(exact=False)`. An interrupted 2-process
run (SIGTERM to one process, resumed; SIGKILL of one process, relaunched) is compared with an
uninterrupted 2-process run bitwise: exact resume, which one process is the special case of.

Every run is bounded: the launcher kills the processes that outlive a failure by --grace
seconds, each wait has a timeout, and a test that fails kills its runs' process group.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bitbert_jax import distributed
from bitbert_jax import pipeline
from bitbert_jax.errors import BitbertError
from conftest import FAST_COMPILE

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
LAUNCHER = os.path.join(ROOT, 'launch', 'local_processes.sh')
STAGES = ('00_finetune', '01_reduce', '02_quantize', '03_kd_1bit')
RUN_TIMEOUT = 1200  # s for a whole pipeline on a loaded 2-core machine (about 4 min when idle)
HEARTBEAT = 10  # s: --heartbeat_timeout_seconds of the runs, how soon a dead peer is noticed
# Parameters sharded over all four devices, so over both processes: the hard case of a pod (no
# process holds a whole parameter; reading one for a save or an export needs a gather).
MESH = ('--config.mesh.data=1', '--config.mesh.fsdp=4')


def _env():
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(XLA_FLAGS=FAST_COMPILE, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1',
             HF_DATASETS_OFFLINE='1')
  return env


# --- start-up: the flags and their errors (nothing trains) ---------------------------------

def _main(*flags, timeout=120):
  return subprocess.run([sys.executable, '-m', 'bitbert_jax.main',
                         '--config=configs/xtc.py:task=mrpc,preset=smoke', *flags],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('flags, message', [
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=2', '--process_id=2'],
     'error: --process_id=2: out of range; valid: 0..1 (--num_processes=2)'),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=2'],
     'error: --process_id missing: a multi-host run needs all of'),
    (['--coordinator_address=10.0.0.2', '--num_processes=2', '--process_id=0'],
     'error: --coordinator_address=10.0.0.2: expected HOST:PORT'),
    (['--coordinator_address=h:1', '--num_processes=0', '--process_id=0'],
     'error: --num_processes=0: must be >= 1'),
    (['--coordinator_address=h:1', '--num_processes=2', '--process_id=0',
      '--initialization_timeout=0'], 'error: --initialization_timeout=0: must be >= 1'),
], ids=['process_id_out_of_range', 'missing_flag', 'no_port', 'no_processes', 'no_timeout'])
def test_bad_flag_value_is_one_line_and_status_2(tmp_path, flags, message):
  p = _main(*flags, f'--workdir={tmp_path / "run"}')
  assert p.returncode == 2, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1].startswith(message), p.stderr[-2000:]
  assert not (tmp_path / 'run').exists()  # refused before anything is written


@pytest.mark.parametrize('process_id, message', [
    (1, 'error: process 1: cannot reach the coordinator 127.0.0.1:{port} within '
        '--initialization_timeout=3 s'),
    (0, 'error: process 0: not all 2 processes joined the coordinator 127.0.0.1:{port} within '
        '--initialization_timeout=3 s'),
], ids=['peer_without_coordinator', 'coordinator_without_peer'])
def test_missing_process_stops_within_the_timeout(tmp_path, process_id, message):
  """Alone, either side of the rendezvous gives up after the timeout: one line, status 2."""
  port = _free_port()
  start = time.monotonic()
  p = _main(f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
            f'--process_id={process_id}', '--initialization_timeout=3',
            f'--workdir={tmp_path / "run"}')
  assert p.returncode == 2, p.stderr[-3000:]
  assert p.stderr.strip().splitlines()[-1].startswith(message.format(port=port)), p.stderr[-3000:]
  assert time.monotonic() - start < 90  # the timeout, plus imports on a loaded machine
  assert not (tmp_path / 'run').exists()


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('env, expected', [
    ({}, None),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.2:8476'}, 'JAX_COORDINATOR_ADDRESS'),
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, 'TPU_WORKER_HOSTNAMES'),
    ({'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '2'}, 'SLURM_NTASKS'),
    ({'SLURM_STEP_NODELIST': 'n1', 'SLURM_NTASKS': '1'}, None),  # one task: one process
    ({'SLURM_NTASKS': '2'}, None),  # the sbatch script itself, not an srun step
    ({'OMPI_COMM_WORLD_SIZE': '4'}, 'OMPI_COMM_WORLD_SIZE'),
])
def test_auto_detection_is_where_jax_reads_the_values_itself(monkeypatch, env, expected):
  for name in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_STEP_NODELIST',
               'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.auto_detected() == expected
  if expected:  # a partial set of flags is filled in by JAX there
    distributed.check('10.0.0.2:8476', None, None)
  else:
    with pytest.raises(BitbertError, match='--num_processes, --process_id missing'):
      distributed.check('10.0.0.2:8476', None, None)


def test_one_process_and_no_flags_start_nothing(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'SLURM_STEP_NODELIST',
               'OMPI_COMM_WORLD_SIZE'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize('127.0.0.1:1', 1, 0) is False
  assert not jax.distributed.is_initialized()


def _processes(tmp_path, per_process_flags, timeout=300):
  """Runs one process per flag list (2 CPU devices each) as one multi-host run; returns
  [(status, stderr, seconds)] in process order. All are killed if one outlives `timeout`."""
  port, n = _free_port(), len(per_process_flags)
  env = dict(_env(), JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'{FAST_COMPILE} --xla_force_host_platform_device_count=2')
  procs, start = [], time.monotonic()
  for i, extra in enumerate(per_process_flags):
    err = open(tmp_path / f'process_{i}.err', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'bitbert_jax.main', '--config=configs/xtc.py:task=mrpc,preset=smoke',
         f'--workdir={tmp_path / "run"}', f'--coordinator_address=127.0.0.1:{port}',
         f'--num_processes={n}', f'--process_id={i}', '--initialization_timeout=120',
         f'--heartbeat_timeout_seconds={HEARTBEAT}', *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
  ended = [None] * n
  try:
    while None in ended:
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.monotonic() - start
      if time.monotonic() - start > timeout:
        pytest.fail(f'processes still running after {timeout} s')
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, (tmp_path / f'process_{i}.err').read_text(), ended[i])
          for i, p in enumerate(procs)]


def test_an_error_on_every_process_exits_2_on_every_process(tmp_path, glue):
  """A bad input all processes see: each says so in one line and exits 2, none aborts."""
  bad = ['--config.train.batch_size=7', f'--config.task.glue_dir={glue}']
  (s0, e0, _), (s1, e1, _) = _processes(tmp_path, [bad, bad])
  for status, err in ((s0, e0), (s1, e1)):
    assert status == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        'error: config.train.batch_size=7 is not divisible by the data-parallel mesh size 4'), \
        err[-3000:]
    assert 'stopping alone' not in err


def test_an_error_on_one_process_stops_every_process(tmp_path, glue):
  """A bad input only process 1 sees (its GLUE copy is missing): reading the inputs is agreed,
  so process 1 reports its error and process 0 names process 1; both exit 2 together, neither
  waits a heartbeat timeout."""
  good = [f'--config.task.glue_dir={glue}']
  missing = [f'--config.task.glue_dir={tmp_path / "no_glue"}']
  (s0, e0, t0), (s1, e1, t1) = _processes(tmp_path, [good, missing])
  assert (s0, s1) == (2, 2), (e0[-3000:], e1[-3000:])
  assert 'no_glue' in e1.strip().splitlines()[-1], e1[-3000:]
  assert e0.strip().splitlines()[-1].startswith('error: process 1 stopped at '), e0[-3000:]
  assert 'stopping alone' not in e0 + e1
  assert abs(t0 - t1) < HEARTBEAT, (t0, t1)


# --- the harness: local processes through the launcher -------------------------------------

class Run:
  """One launch of launch/local_processes.sh (the launcher and its processes: one group)."""

  def __init__(self, base, name, processes, devices, flags, workdir=None):
    self.dir = base / name
    self.dir.mkdir()
    self.workdir = workdir or str(base / f'{name}_workdir')
    self.logs = self.dir / 'logs'
    self.out = self.dir / 'launcher.out'
    cmd = ['bash', LAUNCHER, '--processes', str(processes), '--cpu-devices', str(devices),
           '--log-dir', str(self.logs), '--grace', '30', '--initialization-timeout', '180',
           '--python', sys.executable, '--', *flags, f'--workdir={self.workdir}']
    with open(self.out, 'w') as out:
      self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)

  def pids(self, processes, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      found = dict(re.findall(r'== process (\d+): pid (\d+)', self.out.read_text()))
      if len(found) == processes:
        return {int(i): int(p) for i, p in found.items()}
      time.sleep(0.2)
    self.fail(f'the launcher did not start {processes} processes in {timeout} s')

  def wait(self, timeout=RUN_TIMEOUT):
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      self.fail(f'not done after {timeout} s')

  def kill(self):
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and every process it started
      self.proc.wait()

  def log(self, process):
    path = self.logs / f'process_{process}.log'
    return path.read_text() if path.exists() else ''

  def statuses(self):
    return {int(i): int(s) for i, s in
            re.findall(r'== process (\d+) exited with status (\d+)', self.out.read_text())}

  def fail(self, why):
    tails = '\n'.join(f'--- process {i} ---\n{self.log(i)[-2500:]}' for i in range(2))
    pytest.fail(f'{self.dir.name} (BITBERT_RESUME_SEED={SEED}): {why}\n'
                f'{self.out.read_text()[-1500:]}\n{tails}')

  def newest_checkpoint(self, stage):
    d = os.path.join(self.workdir, 'stages', stage, 'checkpoints')
    return max((int(n) for n in os.listdir(d) if n.isdigit()), default=0) \
        if os.path.isdir(d) else 0

  def wait_for_checkpoint(self, stage, step, timeout=RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while self.newest_checkpoint(stage) < step:
      if self.proc.poll() is not None:
        self.fail(f'ended (status {self.proc.returncode}) before checkpoint {stage}/{step}')
      if time.monotonic() > deadline:
        self.kill()
        self.fail(f'no checkpoint {stage}/{step} after {timeout} s')
      time.sleep(0.05)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  return tmp_path_factory.mktemp('multihost')


@pytest.fixture(scope='module')
def flags(tiny_pretrained, glue):
  return [f'--config=configs/xtc.py:task=mrpc,preset=smoke,pretrained={tiny_pretrained},layers=1',
          f'--config.task.glue_dir={glue}', f'--heartbeat_timeout_seconds={HEARTBEAT}',
          *MESH]


@pytest.fixture(scope='module')
def runs():
  started = []
  yield started
  for run in started:  # a failed test leaves nothing running
    run.kill()


def _launch(runs, base, name, processes, devices, flags, workdir=None):
  run = Run(base, name, processes, devices, flags, workdir)
  runs.append(run)
  return run


# The moments of the signals, drawn from BITBERT_RESUME_SEED (printed; random when unset): SIGTERM
# after a finetune checkpoint, SIGKILL a random delay after a 1-bit-stage checkpoint (so at times
# in the middle of the next checkpoint's write). Every step saves a checkpoint; 8 steps a stage.
SEED = int(os.environ.get('BITBERT_RESUME_SEED') or random.SystemRandom().randrange(2**31))
_draw = random.Random(SEED)
PREEMPT_STEP, KILL_STEP = _draw.randint(1, 5), _draw.randint(1, 5)
KILL_DELAY = _draw.uniform(0, 0.3)
CHECKPOINT_EVERY_STEP = '--config.train.checkpoint_every_steps=1'


@pytest.fixture(scope='module')
def launched(runs, base, flags):
  """The three first runs at once (start-up and compiles dominate): 1 x 4 devices, 2 x 2, and
  2 x 2 whose process 1 gets SIGTERM after finetune checkpoint PREEMPT_STEP."""
  print(f'BITBERT_RESUME_SEED={SEED}: SIGTERM after checkpoint finetune/{PREEMPT_STEP}, SIGKILL '
        f'{KILL_DELAY:.2f}s after checkpoint kd_1bit/{KILL_STEP}')
  started = {'single': _launch(runs, base, 'single', 1, 4, flags),
             'multi': _launch(runs, base, 'multi', 2, 2, flags),
             'sigterm': _launch(runs, base, 'sigterm', 2, 2, flags + [CHECKPOINT_EVERY_STEP])}
  pids = started['sigterm'].pids(2)
  started['sigterm'].wait_for_checkpoint('00_finetune', PREEMPT_STEP)
  os.kill(pids[1], signal.SIGTERM)
  return started


@pytest.fixture(scope='module')
def single(launched):
  launched['single'].wait()
  return launched['single']


@pytest.fixture(scope='module')
def multi(launched):
  launched['multi'].wait()
  return launched['multi']


@pytest.fixture(scope='module')
def interrupted(launched):
  launched['sigterm'].wait()
  return launched['sigterm']


def _require_done(run):
  if run.proc.returncode != 0:
    run.fail(f'exited with status {run.proc.returncode}')


def assert_same_run(workdir, reference, exact):
  """Stage outputs, dev metrics, metrics.jsonl and packed tensors of two workdirs: equal, or
  (exact=False) within float32 rounding of a differently ordered all-reduce."""
  # Not exact: 8 Adam steps turn the reduction's last-bit differences into up to ~2e-6 on
  # weights of ~0.1 (measured), far below one 1-bit code or dev prediction flip.
  close = (lambda a, b: np.array_equal(a, b)) if exact else \
      (lambda a, b: np.allclose(a, b, rtol=1e-5, atol=1e-5))
  for stage in STAGES:
    a, info_a = pipeline.load_stage_output(os.path.join(workdir, 'stages', stage))
    b, info_b = pipeline.load_stage_output(os.path.join(reference, 'stages', stage))
    assert info_a['dev'] == info_b['dev'], stage  # argmax predictions: no flip at this noise
    assert info_a['rng'] == info_b['rng'], stage
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path((a.params, a.model_state))[0],
                            jax.tree.leaves((b.params, b.model_state)), strict=True):
      assert close(np.asarray(x), np.asarray(y)), f'{stage}: {jax.tree_util.keystr(path)} differs'
  mine, theirs = [json.load(open(os.path.join(d, 'results.json'))) for d in (workdir, reference)]
  assert mine['final'] == theirs['final']
  assert {s: r['dev'] for s, r in mine['stages'].items()} == \
      {s: r['dev'] for s, r in theirs['stages'].items()}
  rows = [[json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))]
          for d in (workdir, reference)]
  assert [(r['stage'], r['step'], sorted(r)) for r in rows[0]] == \
      [(r['stage'], r['step'], sorted(r)) for r in rows[1]]  # one writer: no row twice
  for r, s in zip(*rows):
    for k, v in r.items():
      if isinstance(v, float):
        assert close(np.float64(v), np.float64(s[k])), (r['stage'], r['step'], k, v, s[k])
  packed = [load_file(os.path.join(d, 'packed', 'weights.safetensors'))
            for d in (workdir, reference)]
  assert sorted(packed[0]) == sorted(packed[1])
  for name, value in packed[0].items():
    other = packed[1][name]
    if value.dtype.kind in 'iu' or exact:  # the 1-bit codes themselves: always equal
      assert np.array_equal(value, other), f'packed {name} differs'
    else:  # float16 tensors: within one float16 step
      assert np.allclose(value, other, rtol=1e-3, atol=1e-6), f'packed {name} differs'
  leftovers = [os.path.join(r, n) for r, ds, fs in os.walk(workdir) for n in ds + fs
               if n.endswith('.tmp') or '.orbax-checkpoint-tmp' in n]
  assert not leftovers, leftovers  # an interrupted write is cleaned up on resume


# --- 2 processes x 2 devices == 1 process x 4 devices --------------------------------------

def test_two_processes_train_like_one(single, multi):
  _require_done(single)
  _require_done(multi)
  assert multi.statuses() == {0: 0, 1: 0}
  for i in range(2):  # really two processes of one run, each with two of the four devices
    assert f'process {i} of 2' in multi.log(i) and '2 local of 4 devices' in multi.log(i)
  assert_same_run(multi.workdir, single.workdir, exact=False)


# --- preemption and failures: one run preempted, resumed, killed, relaunched ---------------

def test_sigterm_to_one_process_stops_both_at_one_step(interrupted):
  """A preempted host: SIGTERM reaches one process; both save at the same step and exit 75."""
  run = interrupted
  assert run.proc.returncode == 75, run.statuses()
  assert run.statuses() == {0: 75, 1: 75}
  steps = [re.findall(r'preempted at stage finetune step (\d+)', run.log(i)) for i in range(2)]
  assert steps[0] and steps[0] == steps[1], steps  # the same step on both
  assert run.newest_checkpoint('00_finetune') == int(steps[0][0])


def test_resumed_then_killed_run_relaunches_to_the_uninterrupted_results(
    runs, base, flags, interrupted, multi):
  """The preempted run's command resumes at its checkpoint; then a host dies (SIGKILL of one
  process in the 1-bit stage): the other stops within the heartbeat timeout, naming the dead
  one, instead of waiting in a collective for ever; relaunching both resumes, and the result
  equals the uninterrupted 2-process run bitwise."""
  first, run_flags = interrupted, flags + [CHECKPOINT_EVERY_STEP]
  if first.statuses() != {0: 75, 1: 75}:
    first.fail('the preempted run did not stop with 75 on both processes')
  _require_done(multi)
  stopped_at = re.findall(r'preempted at stage finetune step (\d+)', first.log(0))[-1]
  run = _launch(runs, base, 'resumed', 2, 2, run_flags, workdir=first.workdir)
  pids = run.pids(2)
  run.wait_for_checkpoint('03_kd_1bit', KILL_STEP)
  assert f'resumed from step {stopped_at}' in run.log(0), run.log(0)[-3000:]
  time.sleep(KILL_DELAY)
  killed_at = time.monotonic()
  os.kill(pids[1], signal.SIGKILL)
  run.wait(timeout=HEARTBEAT + 120)
  statuses = run.statuses()
  assert statuses[1] == 128 + signal.SIGKILL and statuses[0] != 0, statuses
  assert time.monotonic() - killed_at < HEARTBEAT + 60  # stopped by JAX, not the launcher's grace
  # JAX names the dead process: its own heartbeat check, or the exit barrier that fails with it.
  assert re.search(r'stopped sending heartbeats\):\s*1\b|Task 1 heartbeat timeout', run.log(0)), \
      run.log(0)[-3000:]
  again = _launch(runs, base, 'relaunched', 2, 2, run_flags, workdir=first.workdir)
  again.wait()
  _require_done(again)
  assert 'resumed from step' in again.log(0)
  assert_same_run(first.workdir, multi.workdir, exact=True)  # the seed is printed above
