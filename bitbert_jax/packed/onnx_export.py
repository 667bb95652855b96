"""ONNX export: a packed directory (or a trained student) -> an ONNX Runtime model directory.

  model.onnx       the graph of `onnx_graph` (packed uint8 weights)
  tokenizer.json   the fast tokenizer (+ the packed directory's other tokenizer files), so that
                   `bitbert_serve` tokenizes with `tokenizers` alone as predict does
  manifest.json    `bitbert_serve.manifest.onnx_manifest`: format bitbert-onnx, labels, inputs,
                   opset, and the sha256 and size of every file

Written into a temporary directory and renamed, like the packed directory.
"""
import os
import shutil

from bitbert_jax.packed import load
from bitbert_jax.packed import student as student_lib
from bitbert_jax.packed import write
from bitbert_jax.packed.format import MANIFEST, WEIGHTS, read_json, write_json
from bitbert_serve import encoding
from bitbert_serve import manifest as onnx_manifest_lib


def _is_packed(directory):
  return os.path.isfile(os.path.join(directory, MANIFEST)) and os.path.isfile(
      os.path.join(directory, WEIGHTS))


def _write_fast_tokenizer(packed_dir, manifest, out_dir):
  """Copies the tokenizer files; writes tokenizer.json from vocab.txt when it is missing."""
  files = manifest.get('tokenizer_files') or []
  for name in files:
    shutil.copy2(os.path.join(packed_dir, name), out_dir)
  if files and onnx_manifest_lib.TOKENIZER not in files:
    import transformers  # pylint: disable=g-import-not-at-top
    tok = transformers.AutoTokenizer.from_pretrained(packed_dir, use_fast=True)
    tok.backend_tokenizer.save(os.path.join(out_dir, onnx_manifest_lib.TOKENIZER))


def build_from_packed(packed_dir, verify=True, precision='float32'):
  """(ModelProto, load.PackedDir) of a packed directory; precision: of the float ops
  (`onnx_graph.build`)."""
  from bitbert_jax.packed import onnx_graph  # pylint: disable=g-import-not-at-top
  packed = load.read(packed_dir, verify)
  model = onnx_graph.build(packed.config, packed.policy, packed.tensors, packed.manifest,
                           precision)
  return model, packed


def export_onnx(source, out_dir, tokenizer_dir=None, overwrite=False, float_dtype='float16',
                precision='float32'):
  """Writes the ONNX model directory of a packed directory or of a trained student.

  source: a packed directory (`write.pack`), or anything `student.load_student` reads (it is
    packed first, with float_dtype, into a temporary directory).
  tokenizer_dir: tokenizer files for a student (default: the ones its workdir records).
  precision: the graph's float ops: 'float32' (fast; logits within ~0.04 of predict's) or
    'float64' (reproduces `predict(precision='float64')` bit for bit; several times slower).
  Returns the absolute out_dir.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed import onnx_graph  # pylint: disable=g-import-not-at-top
  source = os.fspath(source)
  out_dir, tmp = write.staging_dir(out_dir, overwrite)
  try:
    packed_dir = source
    if not _is_packed(source):
      s = student_lib.load_student(source)
      packed_dir = os.path.join(tmp, '.packed')
      write.pack(s.config, s.params, s.policy, packed_dir,
                 tokenizer_dir=tokenizer_dir or s.tokenizer_dir, float_dtype=float_dtype,
                 model_state=s.model_state)
    model, packed = build_from_packed(packed_dir, precision=precision)
    onnx.save_model(model, os.path.join(tmp, onnx_manifest_lib.MODEL))
    if packed.manifest.get('tokenizer_files'):
      _write_fast_tokenizer(packed_dir, packed.manifest, tmp)
    if packed_dir != source:
      shutil.rmtree(packed_dir)
    config, policy = packed.config, packed.policy
    manifest = onnx_manifest_lib.onnx_manifest(
        tmp, precision=precision, opset=onnx_graph.OPSET, num_labels=config.num_labels,
        problem_type=config.problem_type,
        labels=encoding.label_names(config.num_labels, config.label_names, config.problem_type),
        policy=policy.name, split=policy.split,
        packed_weights_sha256=packed.manifest['weights_sha256'],
        packed_weights_bytes=packed.manifest['weights_bytes'])
    write_json(os.path.join(tmp, MANIFEST), manifest)
    write.commit_dir(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def format_sizes(out_dir):
  """Two lines: model.onnx against the packed weights it came from."""
  m = read_json(os.path.join(out_dir, MANIFEST))
  mib = lambda b: f'{b / 2**20:.2f} MiB'
  return (f'model.onnx        {mib(m["model_bytes"])}\n'
          f'packed weights    {mib(m["packed_weights_bytes"])} '
          f'(onnx/packed = {m["model_bytes"] / m["packed_weights_bytes"]:.3f})')
