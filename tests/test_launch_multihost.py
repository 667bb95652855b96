"""launch/: the multi-host launchers build the right per-process commands (DRY_RUN=1), and the
local one supervises its processes: a failure stops the rest, SIGTERM reaches every process.
Fake interpreters and SLURM commands stand in for JAX and the cluster, so these run in seconds."""
import os
import re
import signal
import subprocess
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
LOCAL = os.path.join(REPO, 'launch', 'local_processes.sh')
SLURM = os.path.join(REPO, 'launch', 'slurm_gpu.sbatch')
TPU_POD = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SCRUBBED = ('XLA_FLAGS', 'DRY_RUN', 'KEEP', 'GLUE_DIR', 'PORT', 'NUM_PROCESSES', 'CPU_DEVICES',
            'LOG_DIR', 'PYTHON', 'GRACE', 'REQUEUE', 'REPO_DIR', 'COORDINATOR_PORT')


def _env(extra=None):
  env = {k: v for k, v in os.environ.items()
         if k not in SCRUBBED and not k.startswith('SLURM_')}
  env.update(extra or {})
  return env


def _bash(script, *args, env=None, timeout=60):
  return subprocess.run(['bash', script, *args], capture_output=True, text=True,
                        env=_env(env), timeout=timeout)


def _commands(stdout):
  return [l[2:] for l in stdout.splitlines() if l.startswith('+ ')]


def _fake(path, body):
  path.parent.mkdir(exist_ok=True)
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(0o755)
  return str(path)


@pytest.mark.parametrize('script', [LOCAL, SLURM])
def test_scripts_parse_and_have_usage(script):
  assert os.access(script, os.X_OK), f'{script} is not executable'
  subprocess.run(['bash', '-n', script], check=True)
  p = _bash(script, '--help')
  assert p.returncode == 0 and p.stdout.startswith('Usage:') and 'DRY_RUN=1' in p.stdout


# --- local_processes.sh --------------------------------------------------------------------

def test_local_dry_run_gives_each_process_its_id():
  p = _bash(LOCAL, '--processes', '3', '--cpu-devices', '2', '--port', '4567', '--',
            '--config=configs/xtc.py:task=mrpc,preset=smoke', '--workdir=/tmp/w x',
            env={'DRY_RUN': '1'})
  assert p.returncode == 0, p.stderr
  cmds = _commands(p.stdout)
  assert len(cmds) == 3
  for i, c in enumerate(cmds):
    assert c.startswith('env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 ')
    assert re.search(r'python3? -m bitbert_jax\.main ', c), c
    for part in ('--config=configs/xtc.py:task=mrpc,preset=smoke', "'--workdir=/tmp/w x'",
                 '--coordinator_address=127.0.0.1:4567', '--num_processes=3',
                 f'--process_id={i} '):
      assert part in c + ' ', (part, c)
    assert c.endswith('&')  # all at once, not one after another


@pytest.mark.parametrize('args, message', [
    (['--processes', '0', '--', '--config=x'], '--processes'),
    (['--port', '70000', '--', '--config=x'], '--port'),
    (['--', '--config=x', '--process_id=1'], 'this script sets it'),
    (['--'], 'no bitbert_jax.main flags'),
    (['--no-such-flag'], 'unknown argument'),
])
def test_local_refuses_bad_arguments(args, message):
  p = _bash(LOCAL, *args, env={'DRY_RUN': '1'})
  assert p.returncode == 2 and message in p.stderr, p.stderr


def test_local_stops_the_others_when_one_fails(tmp_path):
  """Process 1 fails at once; process 0 would wait for ever (as on a dead peer's collective)."""
  python = _fake(tmp_path / 'bin' / 'python',
                 'for a; do case $a in --process_id=*) id=${a#*=};; esac; done\n'
                 'echo "started $id" >> "$LOG"\n'
                 '[[ $id == 1 ]] && exit 3\n'
                 'exec sleep 300\n')
  start = time.monotonic()
  p = _bash(LOCAL, '--processes', '2', '--grace', '1', '--python', python, '--', '--config=x',
            env={'LOG': str(tmp_path / 'log')}, timeout=60)
  assert p.returncode == 3, p.stderr  # the failing process's status, not the killed one's
  assert time.monotonic() - start < 30
  assert sorted((tmp_path / 'log').read_text().split('\n')[:-1]) == ['started 0', 'started 1']
  assert 'process 1 exited with status 3' in p.stderr
  assert 'killing them' in p.stderr and 'process 0 exited with status 137' in p.stderr


def test_local_passes_sigterm_to_every_process(tmp_path):
  """SIGTERM to the launcher (a scheduler's preemption): every process gets it, exits 75."""
  python = _fake(tmp_path / 'bin' / 'python',
                 'for a; do case $a in --process_id=*) id=${a#*=};; esac; done\n'
                 'trap \'echo "term $id" >> "$LOG"; exit 75\' TERM\n'
                 'echo "ready $id" >> "$LOG"\n'
                 'while true; do sleep 0.1; done\n')
  log = tmp_path / 'log'
  proc = subprocess.Popen(['bash', LOCAL, '--processes', '2', '--python', python, '--',
                           '--config=x'], env=_env({'LOG': str(log)}),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 30
    while (not log.exists() or log.read_text().count('ready') < 2) and time.monotonic() < deadline:
      time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 75, err
  assert sorted(l for l in log.read_text().split('\n') if l.startswith('term')) == ['term 0',
                                                                                 'term 1']


# --- slurm_gpu.sbatch ----------------------------------------------------------------------

def _slurm_bin(tmp_path):
  """Fake scontrol (expands 'gpu[01-02]'; logs requeue) and srun (runs the command once per
  task, locally, with that task's SLURM_PROCID, like srun --ntasks=N on N nodes)."""
  _fake(tmp_path / 'bin' / 'scontrol',
        'echo "scontrol $*" >> "$LOG"\n'
        '[[ $1 == show ]] && printf "gpu01\\ngpu02\\n"\n'
        'exit 0\n')
  _fake(tmp_path / 'bin' / 'srun',
        'echo "srun $*" >> "$LOG"\n'
        'n=1\n'
        'while [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#*=};; esac; shift; done\n'
        'rc=0\n'
        'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@" || rc=$?; done\n'
        'exit $rc\n')
  python = _fake(tmp_path / 'bin' / 'fakepython',
                 'echo "task $SLURM_PROCID: $*" >> "$LOG"\n'
                 'exit "${FAKE_RC:-0}"\n')
  env = {'PATH': f'{tmp_path / "bin"}:{os.environ["PATH"]}', 'LOG': str(tmp_path / 'log'),
         'SLURM_JOB_NODELIST': 'gpu[01-02]', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_JOB_ID': '1234',
         'SLURM_SUBMIT_DIR': '/shared/bitbert_jax', 'PYTHON': python}
  return env


def test_slurm_dry_run_prints_one_srun_with_the_first_node_as_coordinator(tmp_path):
  env = _slurm_bin(tmp_path)
  p = _bash(SLURM, '--config=configs/xtc.py:task=rte', '--workdir=/shared/runs/r',
            env=dict(env, DRY_RUN='1'))
  assert p.returncode == 0, p.stderr
  (srun,) = _commands(p.stdout)
  assert srun.startswith('srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 ')
  assert '--chdir=/shared/bitbert_jax' in srun
  for part in ('--coordinator_address=gpu01:21234', '--num_processes=2', '--config.mesh.data=-1',
               '--config=configs/xtc.py:task=rte', '--workdir=/shared/runs/r'):
    assert part in srun, part
  assert not (tmp_path / 'log').read_text().count('srun')  # printed, not run


def test_slurm_each_task_gets_its_process_id(tmp_path):
  """The generated command run by a fake srun: the per-task id is expanded by each task."""
  env = _slurm_bin(tmp_path)
  p = _bash(SLURM, "--config=configs/xtc.py:task=rte,preset=smoke", '--workdir=/shared/runs/a b',
            env=env)
  assert p.returncode == 0, p.stderr
  tasks = sorted(l for l in (tmp_path / 'log').read_text().splitlines() if l.startswith('task'))
  assert len(tasks) == 2
  for i, line in enumerate(tasks):
    assert line.startswith(f'task {i}: -m bitbert_jax.main --config.mesh.data=-1 '
                           '--config=configs/xtc.py:task=rte,preset=smoke '
                           '--workdir=/shared/runs/a b --coordinator_address=gpu01:21234 '
                           f'--num_processes=2 --process_id={i}'), line


def test_slurm_requeues_a_preempted_job_when_asked(tmp_path):
  env = dict(_slurm_bin(tmp_path), FAKE_RC='75')
  p = _bash(SLURM, '--config=x', '--workdir=/w', env=env)
  assert p.returncode == 75
  assert 'scontrol requeue' not in (tmp_path / 'log').read_text()
  p = _bash(SLURM, '--config=x', '--workdir=/w', env=dict(env, REQUEUE='1'))
  assert p.returncode == 75
  assert 'scontrol requeue 1234' in (tmp_path / 'log').read_text()


def test_slurm_refuses_outside_an_allocation_and_fixed_ids():
  p = _bash(SLURM, '--config=x', '--workdir=/w')
  assert p.returncode == 2 and 'not inside a SLURM allocation' in p.stderr
  p = _bash(SLURM, '--config=x', '--num_processes=4', env={'SLURM_JOB_NODELIST': 'a',
                                                           'SLURM_JOB_NUM_NODES': '1',
                                                           'SLURM_JOB_ID': '1'})
  assert p.returncode == 2 and 'this script sets it' in p.stderr


# --- tpu_pod.sh: the workdir all workers share ---------------------------------------------

def test_tpu_pod_results_uri_is_the_shared_workdir():
  p = _bash(TPU_POD, '--name', 'bb-gs', '--results-uri', 'gs://bucket/runs/',
            env={'DRY_RUN': '1'})
  assert p.returncode == 0, p.stderr
  cmds = _commands(p.stdout)
  (train,) = [c for c in cmds if '-m bitbert_jax.main' in c]
  assert '--workdir=gs://bucket/runs/bb-gs' in train and '$HOME' not in train
  assert 'JAX_COORDINATOR_ADDRESS=' in train
  (copy,) = [c for c in cmds if 'gcloud storage rsync' in c and 'gs://bucket/runs/bb-gs' in c]
  assert copy.startswith('gcloud storage rsync -r') and 'checkpoints' in copy  # skipped
  assert copy.endswith('gs://bucket/runs/bb-gs runs/bb-gs')  # from the bucket, not a worker
  assert "worker's own disk" not in p.stderr
  (install,) = [c for c in cmds if 'uv pip install' in c]
  assert ' gcsfs' in install  # the workers reach the bucket workdir through it


def test_tpu_pod_local_workdir_warns_that_it_cannot_resume():
  p = _bash(TPU_POD, '--name', 'bb-local', env={'DRY_RUN': '1'})
  assert p.returncode == 0, p.stderr
  (train,) = [c for c in _commands(p.stdout) if '-m bitbert_jax.main' in c]
  assert '--workdir=$HOME/runs/bb-local' in train
  (install,) = [c for c in _commands(p.stdout) if 'uv pip install' in c]
  assert 'gcsfs' not in install
  assert 'cannot resume' in p.stderr and '--results-uri' in p.stderr
