"""The workdir: one run at a time (a second is refused, in-process and through the CLI), whole
JSON files only, and a run failing before its commit leaves the workdir as it found it."""
import json
import os
import signal
import subprocess
import sys

import pytest

from bitbert_jax import workdir as workdir_lib
from bitbert_jax.errors import BitbertError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
HOLD = ('import sys, time\n'
        'from bitbert_jax.workdir import Lock\n'
        'with Lock(sys.argv[1]):\n'
        '  print("locked", flush=True)\n'
        '  time.sleep(600)\n')


@pytest.fixture
def holder(tmp_path):
  """A second process holding the workdir's lock (as a running training would)."""
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen([sys.executable, '-c', HOLD, workdir], stdout=subprocess.PIPE,
                          text=True, cwd=ROOT)
  assert proc.stdout.readline().strip() == 'locked'
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def test_second_run_is_refused_while_the_first_holds_the_lock(holder):
  workdir, proc = holder
  with pytest.raises(BitbertError, match=rf'in use by another run \(pid {proc.pid}\).*another '
                     r'--workdir'):
    with workdir_lib.Lock(workdir):
      pass
  proc.send_signal(signal.SIGKILL)  # a crashed run never blocks its own re-run
  proc.wait()
  with workdir_lib.Lock(workdir):
    pass


def test_run_on_a_busy_workdir_writes_nothing(holder, tiny_pretrained, glue):
  from bitbert_jax.main import run
  from helpers import load_config  # pylint: disable=g-import-not-at-top
  workdir, _ = holder
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write('{"first": "run"}')
  before = sorted(os.listdir(workdir))
  config = load_config('xtc', f'preset=smoke,pretrained={tiny_pretrained},layers=1')
  config.task.glue_dir = glue
  with pytest.raises(BitbertError, match='in use by another run'):
    run(config, workdir)
  assert sorted(os.listdir(workdir)) == before
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == {'first': 'run'}


def test_cli_second_run_exits_2_with_one_line(holder, tiny_pretrained, glue):
  workdir, proc = holder
  out = subprocess.run(
      [sys.executable, '-m', 'bitbert_jax.main',
       f'--config=configs/xtc.py:preset=smoke,pretrained={tiny_pretrained},layers=1',
       f'--config.task.glue_dir={glue}', f'--workdir={workdir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 2, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and f'pid {proc.pid}' in lines[0], out.stderr
  assert 'Traceback' not in out.stderr
  assert os.listdir(workdir) == ['.lock']


def test_write_json_is_whole_or_nothing(tmp_path):
  path = str(tmp_path / 'results.json')
  workdir_lib.write_json(path, {'a': 1})

  class Bad:
    def __float__(self):
      raise ValueError('not serialisable')

  with pytest.raises(ValueError):
    workdir_lib.write_json(path, {'a': 2, 'b': Bad()})
  assert os.listdir(tmp_path) == ['results.json']  # no results.json.tmp left behind
  with open(path) as f:
    assert json.load(f) == {'a': 1}


def test_claim_undoes_a_failed_start_in_a_new_workdir(tmp_path):
  workdir = str(tmp_path / 'new' / 'run')
  with pytest.raises(BitbertError):
    with workdir_lib.Claim(workdir):
      os.makedirs(os.path.join(workdir, 'sample_glue'))
      raise BitbertError('bad input')
  assert os.listdir(tmp_path) == []  # even the parent it created is gone


def test_claim_keeps_what_existed(tmp_path):
  workdir = str(tmp_path)
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(KeyboardInterrupt):
    with workdir_lib.Claim(workdir):
      (tmp_path / 'config.json').write_text('{}')
      raise KeyboardInterrupt
  assert os.listdir(workdir) == ['notes.txt']


def test_claim_keeps_everything_after_commit(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(BitbertError):
    with workdir_lib.Claim(workdir) as claim:
      claim.commit()
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write('{}')
      raise BitbertError('a NaN at step 7')
  assert sorted(os.listdir(workdir)) == ['.lock', 'config.json']
