"""Exact resume through the real CLI: a run killed with SIGKILL at a random step of a random
stage, then re-run with the same command, ends bitwise equal to an uninterrupted run; SIGTERM
writes a checkpoint and exits 75, and its re-run also ends equal.

The moment is drawn from BITBERT_RESUME_SEED (printed; random when unset). The three first runs
(clean, SIGKILL, SIGTERM) go concurrently, as do the two re-runs: startup dominates.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bitbert_jax import pipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
STAGES = ('00_finetune', '01_reduce', '02_quantize', '03_kd_1bit')
TRAINING = {'finetune': '00_finetune', 'kd_1bit': '03_kd_1bit'}
STEPS = 8  # smoke preset: 64 examples / batch 8, one epoch per training stage
SEED = int(os.environ.get('BITBERT_RESUME_SEED') or random.SystemRandom().randrange(2**31))


def command(tiny, glue, workdir):
  return [sys.executable, '-m', 'bitbert_jax.main',
          f'--config=configs/xtc.py:preset=smoke,pretrained={tiny},layers=1',
          '--config.train.checkpoint_every_steps=1', f'--config.task.glue_dir={glue}',
          f'--workdir={workdir}']


def start(cmd, log):
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def newest_checkpoint(workdir, stage):
  d = os.path.join(workdir, 'stages', TRAINING[stage], 'checkpoints')
  steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=0)


def interrupt(procs, dirs, logs, plan, timeout=600):
  """Sends each run its signal `delay` seconds after its stage's checkpoint `step` exists.

  plan: {run: (stage, step, signal, delay)}; all runs are watched at once.
  """
  deadline, due = time.time() + timeout, {}
  while len(due) < len(plan) or any(t is not None for t in due.values()):
    for k, (stage, step, sig, delay) in plan.items():
      if k not in due and newest_checkpoint(dirs[k], stage) >= step:
        due[k] = time.time() + delay
      if due.get(k) is not None and time.time() >= due[k]:
        procs[k].send_signal(sig)
        due[k] = None
      elif k not in due and procs[k].poll() is not None:
        pytest.fail(f'{k} run ended (status {procs[k].returncode}) before checkpoint '
                    f'{stage}/{step}; seed {SEED}:\n' + open(logs[k]).read()[-3000:])
    if time.time() > deadline:
      pytest.fail(f'runs did not reach their checkpoints in {timeout}s; seed {SEED}')
    time.sleep(0.01)


def finish(proc, log_path, timeout=600):
  proc.wait(timeout=timeout)
  return proc.returncode, open(log_path).read()


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_pretrained, glue):
  """{'clean' | 'killed' | 'preempted': (workdir, facts)} once every run has completed."""
  rng = random.Random(SEED)
  kill_stage, term_stage = rng.choice(list(TRAINING)), rng.choice(list(TRAINING))
  kill_step, term_step = rng.randint(1, STEPS - 2), rng.randint(1, STEPS - 2)
  kill_delay = rng.uniform(0.0, 0.3)
  print(f'BITBERT_RESUME_SEED={SEED}: SIGKILL {kill_delay:.2f}s after checkpoint '
        f'{kill_stage}/{kill_step}, SIGTERM after checkpoint {term_stage}/{term_step}')
  base = tmp_path_factory.mktemp('resume')
  dirs = {k: str(base / k) for k in ('clean', 'killed', 'preempted')}
  logs = {k: str(base / f'{k}.log') for k in dirs}
  procs = {k: start(command(tiny_pretrained, glue, d), open(logs[k], 'w'))
           for k, d in dirs.items()}
  facts = {'kill': (kill_stage, kill_step), 'term': (term_stage, term_step)}

  interrupt(procs, dirs, logs, {
      'killed': (kill_stage, kill_step, signal.SIGKILL, kill_delay),
      'preempted': (term_stage, term_step, signal.SIGTERM, 0.0)})

  status, log = finish(procs['killed'], logs['killed'])
  facts['killed_status'] = status
  status, log = finish(procs['preempted'], logs['preempted'])
  facts['preempted_status'], facts['preempted_log'] = status, log
  facts['preempted_checkpoints'] = {
      s: sorted(os.listdir(os.path.join(dirs['preempted'], 'stages', d, 'checkpoints')))
      for s, d in TRAINING.items()
      if os.path.isdir(os.path.join(dirs['preempted'], 'stages', d, 'checkpoints'))}
  status, log = finish(procs['clean'], logs['clean'])
  assert status == 0, log[-3000:]

  again = {k: start(command(tiny_pretrained, glue, dirs[k]), open(logs[k] + '.2', 'w'))
           for k in ('killed', 'preempted')}
  for k, proc in again.items():
    status, log = finish(proc, logs[k] + '.2')
    assert status == 0, f'seed {SEED}: re-run of the {k} run failed:\n{log[-3000:]}'
    facts[f'{k}_rerun_log'] = log
  return dirs, facts


def results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def assert_same_run(workdir, clean):
  for stage in STAGES:
    a, info_a = pipeline.load_stage_output(os.path.join(workdir, 'stages', stage))
    b, info_b = pipeline.load_stage_output(os.path.join(clean, 'stages', stage))
    assert info_a['dev'] == info_b['dev'], (stage, SEED)
    assert info_a['rng'] == info_b['rng'], (stage, SEED)
    for x, y in zip(jax.tree.leaves((a.params, a.model_state)),
                    jax.tree.leaves((b.params, b.model_state)), strict=True):
      assert np.array_equal(x, y), f'{stage}: parameters differ (seed {SEED})'
  mine, theirs = results(workdir), results(clean)
  assert mine['final'] == theirs['final'], SEED
  assert {s: r['dev'] for s, r in mine['stages'].items()} == \
      {s: r['dev'] for s, r in theirs['stages'].items()}, SEED
  rows = [open(os.path.join(d, 'metrics.jsonl')).read().splitlines() for d in (workdir, clean)]
  assert rows[0] == rows[1], f'metrics.jsonl differs from the clean run\'s (seed {SEED})'
  packed = [load_file(os.path.join(d, 'packed', 'weights.safetensors')) for d in (workdir, clean)]
  assert sorted(packed[0]) == sorted(packed[1])
  for name, value in packed[0].items():
    assert np.array_equal(value, packed[1][name]), f'packed {name} differs (seed {SEED})'
  leftovers = [os.path.join(r, n) for r, ds, fs in os.walk(workdir) for n in ds + fs
               if n.endswith('.tmp') or '.orbax-checkpoint-tmp' in n]
  assert not leftovers, leftovers


def test_sigkill_mid_stage_then_rerun_equals_clean_run(runs):
  dirs, facts = runs
  assert facts['killed_status'] == -signal.SIGKILL, SEED
  assert 'resumed from step' in facts['killed_rerun_log'], SEED
  assert_same_run(dirs['killed'], dirs['clean'])


def test_sigterm_checkpoints_exits_75_then_rerun_equals_clean_run(runs):
  dirs, facts = runs
  stage, step = facts['term']
  assert facts['preempted_status'] == 75, (SEED, facts['preempted_log'][-3000:])
  last = facts['preempted_log'].strip().splitlines()[-1]
  assert last.startswith(f'preempted at stage {stage} step ') and \
      last.endswith('; re-run the same command to resume'), last
  stopped = int(last.split(' step ')[1].split(';')[0])
  assert stopped >= step and str(stopped) in facts['preempted_checkpoints'][stage], facts
  assert f'[{stage}] resumed from step {stopped}' in facts['preempted_rerun_log'], SEED
  assert_same_run(dirs['preempted'], dirs['clean'])
