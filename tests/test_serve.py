"""bitbert_serve: ONNX Runtime + tokenizers only; the same arrays, labels and input rules as
bitbert_jax.predict; every listed file checked before serving; installable alone (serving/)
without JAX or torch."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import venv

import conftest
import numpy as np
import pytest

import bitbert_serve
from bitbert_jax.model import BertConfig
from bitbert_jax.model.shapes import random_params
from bitbert_jax.packed import onnx_export, write
from bitbert_jax.packed.model import load_packed, predict
from bitbert_jax.quant import policy_from_name
from bitbert_serve import cli
from bitbert_serve.errors import BitbertError
from bitbert_serve.textio import read_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRPC = ('not_equivalent', 'equivalent')
CFG = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=128, num_labels=2,
                 label_names=MRPC)


@pytest.fixture(scope='module')
def dirs(tmp_path_factory, minilm):
  policy = policy_from_name('1-1-8')
  root = tmp_path_factory.mktemp('serve')
  packed = write.pack(CFG, random_params(CFG, policy, seed=5), policy, root / 'packed',
                      tokenizer_dir=minilm)
  return packed, onnx_export.export_onnx(packed, root / 'onnx')


def _dev_texts(n=40):
  path = os.path.join(conftest.glue_dir() or '', 'MRPC', 'dev.tsv')
  if not os.path.isfile(path):
    pytest.skip(f'{path} missing (set GLUE_DIR)')
  return read_texts(path, ['#1 String', '#2 String'])[:n]


def test_tokenizes_like_predict(dirs):
  """The export's tokenizer.json, read by `tokenizers` alone, gives predict's arrays."""
  packed, onnx_dir = dirs
  texts = _dev_texts() + [('a ' * 200, 'b'), ('', 'x')]  # truncation of a long pair, empty text
  want = load_packed(packed).encode(texts, 128)
  got = bitbert_serve.load(onnx_dir).encode(texts, 128)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_predicts_the_labels_predict_gives(dirs):
  packed, onnx_dir = dirs
  texts = _dev_texts()
  logits, labels = predict(load_packed(packed), texts)
  got_logits, got_labels = bitbert_serve.predict(bitbert_serve.load(onnx_dir), texts)
  assert got_labels == labels
  np.testing.assert_allclose(got_logits, logits, atol=1e-2, rtol=0)


class _Stdin:

  def __init__(self, data):
    self.buffer = io.BytesIO(data)


@pytest.mark.parametrize('data,rc,want', [
    (b'a\tb\nc\td\ne\tf\n', 0, 3),
    (b'a\tb\n\nc\td\n', 1, 'error: <stdin>:2: empty line; need 2 tab-separated fields'),
    (b'a\tb\nc\xff\td\n', 1, 'error: <stdin>:2: not UTF-8 text (byte 0xff at column 2)'),
])
def test_cli_one_line_per_input_line_or_an_error(dirs, capsys, monkeypatch, data, rc, want):
  monkeypatch.setattr('sys.stdin', _Stdin(data))
  assert cli.main([f'--model={dirs[1]}', '--no_header', '--text_columns', '0', '1']) == rc
  out, err = capsys.readouterr()
  if rc == 0:
    assert len(out.splitlines()) == want and set(out.split()) <= set(MRPC)
  else:
    assert out == '' and err.startswith(want)


def test_cli_refuses_a_packed_directory(dirs, capsys, monkeypatch):
  monkeypatch.setattr('sys.stdin', _Stdin(b'a\tb\n'))
  assert cli.main([f'--model={dirs[0]}', '--no_header']) == 1
  assert 'expected \'bitbert-onnx\'' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Integrity: every file the manifest lists, before serving.


def _damaged(onnx_dir, tmp_path, name, how):
  """A copy of the ONNX directory with one file damaged: 'flip' a byte in its middle,
  'truncate' it, or 'remove' it."""
  copy = tmp_path / 'onnx'
  shutil.copytree(onnx_dir, copy)
  path = copy / name
  data = bytearray(path.read_bytes())
  if how == 'flip':
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
  elif how == 'truncate':
    path.write_bytes(bytes(data[:len(data) // 2]))
  else:
    path.unlink()
  return copy, str(path)


@pytest.mark.parametrize('name,how,message', [
    ('model.onnx', 'flip', 'sha256 differs from manifest.json'),
    ('model.onnx', 'truncate', r'\d+ bytes, manifest.json says \d+'),
    ('tokenizer.json', 'flip', 'sha256 differs from manifest.json'),
    ('tokenizer.json', 'truncate', r'\d+ bytes, manifest.json says \d+'),
    ('tokenizer.json', 'remove', r'missing \(listed in manifest.json\)'),
    ('vocab.txt', 'remove', r'missing \(listed in manifest.json\)'),
])
def test_a_damaged_file_is_refused_naming_it(dirs, tmp_path, capsys, monkeypatch, name, how,
                                             message):
  copy, path = _damaged(dirs[1], tmp_path, name, how)
  with pytest.raises(BitbertError, match=f'^{re.escape(path)}: {message}'):
    bitbert_serve.load(copy)
  monkeypatch.setattr('sys.stdin', _Stdin(b'a\tb\n'))
  assert cli.main([f'--model={copy}', '--no_header']) == 1
  out, err = capsys.readouterr()
  assert out == '' and len(err.splitlines()) == 1
  assert err.startswith(f'error: {path}: ')


def test_no_verify_serves_without_the_check(dirs, tmp_path, capsys, monkeypatch):
  copy, path = _damaged(dirs[1], tmp_path, 'vocab.txt', 'remove')  # tokenizers reads no vocab.txt
  with pytest.raises(BitbertError, match=f'{re.escape(path)}: missing'):
    bitbert_serve.load(copy)
  texts = [('a', 'b'), ('c', 'd')]
  want = bitbert_serve.predict(bitbert_serve.load(dirs[1]), texts)[1]
  assert bitbert_serve.predict(bitbert_serve.load(copy, verify=False), texts)[1] == want
  monkeypatch.setattr('sys.stdin', _Stdin(b'a\tb\nc\td\n'))
  assert cli.main([f'--model={copy}', '--no_header', '--no_verify']) == 0
  assert capsys.readouterr().out.split() == want


def test_manifest_lists_every_file_and_an_older_manifest_still_checks_the_model(dirs, tmp_path):
  manifest = json.loads(open(os.path.join(dirs[1], 'manifest.json')).read())
  assert sorted(manifest['files']) == sorted(set(os.listdir(dirs[1])) - {'manifest.json'})
  for name, record in manifest['files'].items():
    assert record['bytes'] == os.path.getsize(os.path.join(dirs[1], name))
  # A manifest written before `files` existed: the model's sha256 and size are still checked.
  copy, path = _damaged(dirs[1], tmp_path, 'model.onnx', 'flip')
  del manifest['files']
  (copy / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(BitbertError, match=f'{re.escape(path)}: sha256 differs'):
    bitbert_serve.load(copy)


# ---------------------------------------------------------------------------------------------
# No JAX: the module CLI, and the serving distribution alone.


def test_module_cli_imports_neither_jax_nor_torch(dirs):
  r = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'bitbert_jax.serve',
                      f'--model={dirs[1]}', '--no_header'], input=b'one text\nanother\n',
                     capture_output=True, env={**os.environ, 'PYTHONPATH': ROOT}, check=False)
  assert r.returncode == 0, r.stderr.decode()[-2000:]
  assert len(r.stdout.decode().splitlines()) == 2
  imported = {line.rsplit('|', 1)[-1].strip() for line in r.stderr.decode().splitlines()
              if line.startswith('import time:')}
  assert 'onnxruntime' in imported and 'tokenizers' in imported
  assert not {m for m in imported if m.split('.')[0] in ('jax', 'flax', 'torch', 'transformers')}


@pytest.mark.slow
def test_serving_distribution_installs_alone_in_a_clean_venv(dirs, tmp_path):
  """pip install ./serving (through constraints.txt) into a venv without system packages: no
  jax, flax or torch, and the CLI runs the export from outside the checkout. Needs a package
  index (PyPI or a mirror) for onnxruntime, tokenizers and numpy: without one it fails."""
  env_dir = tmp_path / 'venv'
  venv.create(env_dir, with_pip=True, system_site_packages=False)
  py = str(env_dir / 'bin' / 'python')
  r = subprocess.run([py, '-m', 'pip', 'install', '-q', '-c',
                      os.path.join(ROOT, 'constraints.txt'), os.path.join(ROOT, 'serving')],
                     capture_output=True, text=True, check=False)
  assert r.returncode == 0, f'pip install ./serving failed:\n{r.stderr[-2000:]}'
  listed = subprocess.run([py, '-m', 'pip', 'list', '--format=freeze'], capture_output=True,
                          text=True, check=True).stdout.lower()
  names = {line.split('==')[0] for line in listed.splitlines()}
  assert {'onnxruntime', 'tokenizers', 'bitbert-serve'} <= names
  assert not names & {'jax', 'jaxlib', 'flax', 'torch', 'transformers'}
  r = subprocess.run([py, '-m', 'bitbert_serve', f'--model={dirs[1]}', '--no_header'],
                     input='one text\nanother\n', capture_output=True, text=True,
                     cwd=str(tmp_path), env={'PATH': os.environ.get('PATH', '')}, check=False)
  assert r.returncode == 0, r.stderr
  assert len(r.stdout.splitlines()) == 2 and set(r.stdout.split()) <= set(MRPC)
  # A flipped byte is refused there too, naming the file.
  bad, path = _damaged(dirs[1], tmp_path / 'bad', 'model.onnx', 'flip')
  r = subprocess.run([py, '-m', 'bitbert_serve', f'--model={bad}', '--no_header'],
                     input='one text\n', capture_output=True, text=True, cwd=str(tmp_path),
                     env={'PATH': os.environ.get('PATH', '')}, check=False)
  assert r.returncode == 1 and r.stderr.startswith(f'error: {path}: sha256 differs')
