"""README command 1 as a new user types it: parsed out of README.md, run from a fresh current
directory with its relative --workdir, offline without GLUE_DIR and with a relative GLUE_DIR.

Only the preset is swapped for `smoke` and the pipeline shortened (offline: teacher, general KD
on the shipped WikiText-2 excerpt, ternary, splitting, one 1-bit KD stage, the packed export; with GLUE:
the teacher alone, where a relative workdir must be made absolute); the install step is
checked against constraints.txt instead of being run.
"""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from helpers import assert_dev_metrics_are_the_packed_models

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
COMMAND_1 = ("pip install -c constraints.txt -e '.[test]' && python -m bitbert_jax.main "
             "--config=configs/multistage.py:preset=quick --workdir=runs/multistage")
COMMAND_2 = "pip install -c constraints.txt -e '.[test]' && python -m pytest -q -p no:cacheprovider"
PIPELINES = {'offline': 'finetune,init_student,general_kd,quantize_2bit,split,binary_stage2',
             'glue': 'finetune'}


def readme_commands():
  """The ```bash blocks of the README's 'Two commands' section, in order."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    section = f.read().split('## Two commands', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```bash\n(.*?)\n```', section, re.S)


def test_readme_commands_are_the_tested_ones():
  """Change the README's commands and this file together (and run the tests below)."""
  assert readme_commands() == [COMMAND_1, COMMAND_2]


def pins():
  with open(os.path.join(ROOT, 'constraints.txt')) as f:
    lines = [l.split('#')[0].strip() for l in f]
  return dict(l.split('==', 1) for l in lines if l)


def canonical(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def installed(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def test_constraints_pin_every_dependency_at_the_installed_version():
  """What `pip install -c constraints.txt` gives a fresh machine is what this suite runs on."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  wanted = project['dependencies'] + project['optional-dependencies']['test']
  pinned = {canonical(k): v for k, v in pins().items()}
  names = [canonical(re.split(r'[<>=!~\[; ]', r, maxsplit=1)[0]) for r in wanted]
  assert [n for n in names if n not in pinned] == [], 'regenerate constraints.txt (its header)'
  drift = {n: (pinned[n], installed(n)) for n in names if installed(n) != pinned[n]}
  assert drift == {}, 'installed versions differ from constraints.txt: reinstall or regenerate'


def user_command(pipeline):
  """Command 1's run step as argv, preset swapped for smoke, the pipeline shortened."""
  install, run = COMMAND_1.split(' && ')
  assert install.startswith('pip install -c constraints.txt')
  argv = run.split()
  assert argv[:3] == ['python', '-m', 'bitbert_jax.main'] and '--workdir=runs/multistage' in argv
  argv = [a.replace('preset=quick', 'preset=smoke') for a in argv]
  return [sys.executable] + argv[1:] + [f'--config.pipeline={pipeline}']


@pytest.fixture(scope='module')
def runs(tmp_path_factory, minilm):
  """Both runs at once (start-up and compiles dominate): {name: (cwd, status, log)}."""
  del minilm  # the default pretrained=minilm needs the package
  glue = os.environ.get('GLUE_DIR') or os.path.join(ROOT, '..', 'shared', 'data', 'glue')
  if not os.path.isdir(os.path.join(glue, 'MRPC')):
    pytest.skip('real GLUE data not found (set GLUE_DIR)')
  env = {k: v for k, v in os.environ.items() if k not in ('GLUE_DIR', 'CORPUS_DIR')}
  env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
  procs = {}
  for name in ('offline', 'glue'):
    cwd = str(tmp_path_factory.mktemp(name))  # a fresh clone's root: its configs/, nothing run
    os.symlink(os.path.join(ROOT, 'configs'), os.path.join(cwd, 'configs'))
    extra = {'GLUE_DIR': os.path.relpath(glue, cwd)} if name == 'glue' else {}
    log = open(os.path.join(cwd, 'log.txt'), 'w')
    proc = subprocess.Popen(user_command(PIPELINES[name]), cwd=cwd, env={**env, **extra},
                            stdout=log, stderr=subprocess.STDOUT)
    procs[name] = (cwd, log, proc)
  out = {}
  for name, (cwd, log, proc) in procs.items():
    status = proc.wait(timeout=900)
    log.close()
    with open(os.path.join(cwd, 'log.txt')) as f:
      out[name] = (cwd, status, f.read())
  return out, os.path.abspath(glue)


def results_of(cwd):
  workdir = os.path.join(cwd, 'runs', 'multistage')
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(workdir, 'config.json')) as f:
    return workdir, results, json.load(f)


def test_offline_without_glue_dir_trains_on_the_shipped_real_set(runs, tmp_path):
  (cwd, status, log), _ = runs[0]['offline'], runs[1]
  assert status == 0, log[-4000:]
  workdir, results, config = results_of(cwd)
  assert results['task'] == 'sentiment' and results['data'] == 'shipped:sentiment'
  assert list(results['stages']) == PIPELINES['offline'].split(',')
  from bitbert_jax import pipeline  # pylint: disable=g-import-not-at-top
  assert_dev_metrics_are_the_packed_models(
      workdir, results, pipeline.shipped_task()[0], os.path.join(pipeline.SHIPPED_DIR, 'dev.tsv'),
      ['0'], '1', str(tmp_path), header=False,
      atol=3e-3)  # a split student: ulp differences flip activation codes (predict.layer_diffs)
  assert results['final']['policy'] == '1-1-8' and results['packed']['weights_file_bytes'] > 0
  offline = [l for l in log.splitlines() if 'hub is unreachable' in l]
  assert len(offline) == 1 and 'HF_HUB_OFFLINE is set' in offline[0], log[-4000:]
  assert config['task']['glue_dir'] == '' and config['corpus'] == ''
  assert 'general KD trains on the WikiText-2 excerpt shipped in the package' in log
  assert os.path.isdir(os.path.join(workdir, 'packed'))


def test_with_a_relative_glue_dir_trains_on_glue_and_records_it_absolute(runs):
  (cwd, status, log), glue = runs[0]['glue'], runs[1]
  assert status == 0, log[-4000:]
  _, results, config = results_of(cwd)
  assert results['task'] == 'mrpc' and results['data'] == glue
  assert config['task']['glue_dir'] == glue
  assert set(results['final']['dev']['validation']) >= {'accuracy', 'f1'}
  assert os.path.isdir(os.path.join(cwd, 'runs', 'multistage', 'stages', '00_finetune', 'hf'))
  assert 'hub is unreachable' not in log
