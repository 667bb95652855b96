"""Train -> export -> predict with no extra flags, and prediction input that never loses a line.

The run trains the XTC smoke pipeline from a fine-tuned teacher given as config.teacher (so no
finetune stage writes a teacher export with tokenizer files into the workdir); export then
finds the tokenizer the run recorded, for the packed and for the ONNX directory.
"""
import io
import os

import pytest

import bitbert_serve
from bitbert_jax import export, hf, pipeline, predict
from bitbert_jax.model.shapes import random_params
from bitbert_jax.packed import write
from bitbert_jax.packed.student import load_student
from bitbert_serve import textio
from bitbert_jax.errors import BitbertError
from bitbert_jax.main import run
from bitbert_jax.model import BertConfig, init_params

from helpers import load_config

MRPC = ('not_equivalent', 'equivalent')
LINES = 'A man is playing a guitar.\tA man plays the guitar.\nThe cat sleeps.\tStocks fell today.\n'


class _Stdin:
  """sys.stdin stand-in whose .buffer holds raw bytes (predict reads bytes, then decodes)."""

  def __init__(self, data):
    self.buffer = io.BytesIO(data)


@pytest.fixture(scope='module')
def xtc_workdir(tmp_path_factory, minilm, glue):
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128, num_labels=2,
                   label_names=MRPC)
  teacher = str(tmp_path_factory.mktemp('teacher') / 'hf')
  hf.save_hf_checkpoint(cfg, init_params(cfg), teacher, tokenizer_dir=minilm)
  config = load_config('xtc', f'preset=smoke,teacher={teacher},layers=1')
  config.task.glue_dir = glue
  workdir = str(tmp_path_factory.mktemp('xtc'))
  run(config, workdir)
  return workdir


def _predict_cli(model_dir, data, capsys, monkeypatch, extra=()):
  monkeypatch.setattr('sys.stdin', _Stdin(data))
  rc = predict.main([f'--model={model_dir}', '--input=-', '--no_header', '--text_columns', '0',
                     '1', *extra])
  out, err = capsys.readouterr()
  return rc, out.splitlines(), err


def test_workdir_exports_with_its_tokenizer_and_predicts(xtc_workdir, minilm, tmp_path, capsys,
                                                         monkeypatch):
  assert not any(os.path.isdir(os.path.join(xtc_workdir, 'stages', d, 'hf'))
                 for d in os.listdir(os.path.join(xtc_workdir, 'stages')))  # no teacher export
  out = tmp_path / 'packed'
  assert export.main([f'--checkpoint={xtc_workdir}', f'--out={out}']) == 0
  assert 'warning' not in capsys.readouterr().err
  for name in ('vocab.txt', 'tokenizer.json'):  # the teacher's tokenizer, as the run recorded
    assert (out / name).read_bytes() == open(os.path.join(minilm, name), 'rb').read(), name
  rc, labels, err = _predict_cli(out, LINES.encode(), capsys, monkeypatch)
  assert rc == 0, err
  assert len(labels) == 2 and set(labels) <= set(MRPC)


def test_workdir_exports_onnx_with_its_tokenizer(xtc_workdir, minilm, tmp_path):
  out = tmp_path / 'onnx'
  stage = os.path.join(xtc_workdir, 'stages', sorted(os.listdir(
      os.path.join(xtc_workdir, 'stages')))[-1])
  assert export.main(['--format=onnx', f'--checkpoint={stage}', f'--out={out}']) == 0
  assert {'model.onnx', 'tokenizer.json', 'manifest.json'} <= set(os.listdir(out))
  assert (out / 'vocab.txt').read_bytes() == open(os.path.join(minilm, 'vocab.txt'), 'rb').read()
  _, labels = bitbert_serve.predict(bitbert_serve.load(out), textio.read_texts(
      io.BytesIO(LINES.encode()), [0, 1], header=False))
  assert len(labels) == 2 and set(labels) <= set(MRPC)


def test_old_workdir_without_tokenizer_copy_uses_its_config(xtc_workdir, tmp_path):
  """Workdirs made before workdir/tokenizer existed: the config's teacher names the files."""
  old = tmp_path / 'old'
  old.mkdir()
  os.symlink(os.path.join(xtc_workdir, 'stages'), old / 'stages')
  os.symlink(os.path.join(xtc_workdir, 'config.json'), old / 'config.json')
  student = load_student(old)
  assert student.tokenizer_dir is not None
  assert os.path.isfile(os.path.join(student.tokenizer_dir, 'vocab.txt'))
  assert os.path.realpath(student.tokenizer_dir) != os.path.realpath(
      os.path.join(xtc_workdir, pipeline.TOKENIZER))


# ---------------------------------------------------------------------------------------------
# Input lines.


@pytest.fixture(scope='module')
def packed_tiny(tmp_path_factory, minilm):
  from bitbert_jax.quant import policy_from_name  # pylint: disable=g-import-not-at-top
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=48, max_position_embeddings=128, num_labels=2,
                   label_names=MRPC)
  policy = policy_from_name('1-1-8')
  return write.pack(cfg, random_params(cfg, policy), policy,
                    tmp_path_factory.mktemp('tiny') / 'p', tokenizer_dir=minilm)


def test_empty_line_between_pairs_stops_naming_the_line(packed_tiny, capsys, monkeypatch):
  rc, labels, err = _predict_cli(packed_tiny, b'a\tb\n\nc\td\n', capsys, monkeypatch)
  assert rc == 1 and labels == []
  assert err.strip() == ('error: <stdin>:2: empty line; need 2 tab-separated fields (one '
                         'output line per input line: remove or fill this line)')


def test_non_utf8_line_stops_naming_the_line(packed_tiny, capsys, monkeypatch):
  rc, labels, err = _predict_cli(packed_tiny, b'a\tb\nc\xff\xfe\td\n', capsys, monkeypatch)
  assert rc == 1 and labels == []
  assert err.strip() == ('error: <stdin>:2: not UTF-8 text (byte 0xff at column 2); save the '
                         'input as UTF-8')


def test_one_output_line_per_input_line(packed_tiny, capsys, monkeypatch):
  data = b'one\n\nthree\r\n'
  monkeypatch.setattr('sys.stdin', _Stdin(data))
  assert predict.main([f'--model={packed_tiny}', '--input=-', '--no_header']) == 0
  assert len(capsys.readouterr().out.splitlines()) == 3  # the empty line is an empty text


def test_read_texts_lines_fields_and_bom(tmp_path):
  path = tmp_path / 'in.tsv'
  path.write_bytes(b'\xef\xbb\xbfs1\ts2\nx\ty\n\n')
  with pytest.raises(BitbertError, match=r'in.tsv:3: empty line; need 2'):
    textio.read_texts(str(path))
  path.write_bytes(b's1\ts2\nx\ty\nonly\n')
  with pytest.raises(BitbertError, match=r'in.tsv:3: 1 field; need 2'):
    textio.read_texts(str(path))
  path.write_bytes(b'\xef\xbb\xbfs1\ts2\n"q"\ty\n')
  assert textio.read_texts(str(path)) == [('"q"', 'y')]
