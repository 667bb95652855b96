"""The package as installed, not only checked out: `--config=NAME` finds the configs shipped with
it; the wheel holds every module, the configs and the shipped data; installed from the wheel into
a fresh virtual environment (through constraints.txt) it runs the smoke preset by config name
from an empty directory (slow)."""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from bitbert_jax import main
from bitbert_jax.errors import BitbertError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
# What the wheel is built from (pyproject.toml names README.md as the long description).
SOURCES = ('pyproject.toml', 'README.md', 'bitbert_jax', 'bitbert_serve', 'configs')
CONFIGS = ('finetune', 'multistage', 'xtc')


def _source_tree(dest):
  os.makedirs(dest)
  for name in SOURCES:
    src = os.path.join(ROOT, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, name),
                      ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    else:
      shutil.copy(src, dest)
  return dest


def build_wheel(tmp, isolated):
  """`pip wheel --no-deps` of a copy of the sources (a build in the checkout writes build/)."""
  src = _source_tree(os.path.join(tmp, 'src'))
  out = os.path.join(tmp, 'wheel')
  cmd = [sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', out, src]
  p = subprocess.run(cmd + ([] if isolated else ['--no-build-isolation']), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  (wheel,) = glob.glob(os.path.join(out, '*.whl'))
  return wheel


def _files(top, ext=None):
  out = set()
  for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
    dirs[:] = [d for d in dirs if d != '__pycache__']
    out |= {os.path.relpath(os.path.join(folder, f), ROOT) for f in files
            if ext is None or f.endswith(ext)}
  return out


def test_config_names_resolve_to_the_shipped_files():
  assert main.config_names() == list(CONFIGS)
  assert main.config_file('xtc:task=rte,preset=smoke') == (
      os.path.join(ROOT, 'configs', 'xtc.py') + ':task=rte,preset=smoke')
  assert main.config_file('multistage') == os.path.join(ROOT, 'configs', 'multistage.py')
  for path in ('configs/xtc.py:task=rte', '/tmp/my.py', 'mine/xtc'):  # files stay files
    assert main.config_file(path) == path
  resolve = main._with_config_file  # pylint: disable=protected-access
  argv = resolve(['prog', '--config', 'finetune:task=rte', '-config=xtc'])
  assert argv == ['prog', '--config', os.path.join(ROOT, 'configs', 'finetune.py:task=rte'),
                  '-config=' + os.path.join(ROOT, 'configs', 'xtc.py')]
  with pytest.raises(BitbertError, match=r"--config=xtx:task=rte: no config named 'xtx'; valid "
                     r'names: finetune, multistage, xtc, or a config file such as configs/xtc.py'):
    main.config_file('xtx:task=rte')


def test_a_bad_config_name_is_one_line_and_status_2(tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  p = subprocess.run([sys.executable, '-m', 'bitbert_jax.main', '--config=xtc2:task=mrpc',
                      '--workdir=run'], cwd=tmp_path, env=env, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 2 and p.stderr.count('\n') == 1, p.stderr
  assert "no config named 'xtc2'; valid names: finetune, multistage, xtc" in p.stderr
  assert os.listdir(tmp_path) == []


def test_wheel_holds_every_module_the_configs_and_the_shipped_data(tmp_path):
  with zipfile.ZipFile(build_wheel(str(tmp_path), isolated=False)) as z:
    names = set(z.namelist())
    modules = {n for n in names if n.endswith('.py')}
    want = _files('bitbert_jax', '.py') | _files('bitbert_serve', '.py')
    want |= {os.path.join('bitbert_jax', p) for p in _files('configs', '.py')}
    assert modules == want  # every package listed in pyproject.toml, nothing from tests/
    assert {f'bitbert_jax/configs/{c}.py' for c in CONFIGS} <= modules
    data = _files(os.path.join('bitbert_jax', 'data', 'sentiment'))
    data |= _files(os.path.join('bitbert_jax', 'data', 'wikitext'))
    assert {'bitbert_jax/data/wikitext/wikitext-2-valid-excerpt.txt',
            'bitbert_jax/data/wikitext/SOURCE.md', 'bitbert_jax/data/wikitext/LICENSE',
            'bitbert_jax/data/sentiment/LICENSE'} <= data
    for path in data:
      with open(os.path.join(ROOT, path), 'rb') as f:
        assert z.read(path) == f.read(), path


@pytest.mark.slow
def test_installed_wheel_runs_the_smoke_preset_by_name_from_an_empty_dir(tmp_path, glue,
                                                                         tiny_pretrained):
  wheel = build_wheel(str(tmp_path), isolated=True)  # as `pip wheel --no-deps .` does
  venv = str(tmp_path / 'venv')
  subprocess.run([sys.executable, '-m', 'venv', venv], check=True, timeout=300)
  python = os.path.join(venv, 'bin', 'python')
  p = subprocess.run([python, '-m', 'pip', 'install', '-q', '-c',
                      os.path.join(ROOT, 'constraints.txt'), wheel], capture_output=True,
                     text=True, timeout=1800)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  empty = tmp_path / 'empty'
  empty.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'CORPUS_DIR')}
  env.update(GLUE_DIR=glue, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', JAX_PLATFORMS='cpu')
  where = subprocess.run([python, '-c', 'import bitbert_jax; print(bitbert_jax.__file__)'],
                         cwd=empty, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(venv), where.stdout  # the installed copy, not this checkout
  p = subprocess.run([python, '-m', 'bitbert_jax.main',
                      f'--config=xtc:task=mrpc,preset=smoke,pretrained={tiny_pretrained},layers=1',
                      '--workdir=run'], cwd=empty, env=env, capture_output=True, text=True,
                     timeout=1200)
  assert p.returncode == 0, p.stderr[-4000:]
  with open(empty / 'run' / 'results.json') as f:
    results = json.load(f)
  assert results['task'] == 'mrpc' and 0.0 <= results['final']['dev']['score'] <= 1.0
  with open(empty / 'run' / 'config.json') as f:
    config = json.load(f)
  assert config['task']['max_train_examples'] == 64  # the smoke preset of the shipped xtc.py
  shipped = os.path.join(os.path.dirname(where.stdout.strip()), 'data', 'wikitext',
                         'wikitext-2-valid-excerpt.txt')
  with open(shipped, 'rb') as a, open(os.path.join(ROOT, 'bitbert_jax', 'data', 'wikitext',
                                                   'wikitext-2-valid-excerpt.txt'), 'rb') as b:
    assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()
