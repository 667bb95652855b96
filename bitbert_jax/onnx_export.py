"""ONNX export: a packed directory (or a trained student) -> an ONNX Runtime model directory.

  model.onnx       the graph of `bitbert_jax.packed.onnx_graph` (packed uint8 weights)
  tokenizer.json   the fast tokenizer (+ the packed directory's other tokenizer files), so that
                   `bitbert_jax.serve` tokenizes with `tokenizers` alone as predict does
  manifest.json    format bitbert-onnx, labels, inputs, opset, sha256 and sizes

Written into a temporary directory and renamed, like the packed directory.
"""
import os
import shutil

from bitbert_jax import export
from bitbert_jax.packed import format as fmt

FORMAT = 'bitbert-onnx'
FORMAT_VERSION = 1
MODEL = 'model.onnx'


def _is_packed(directory):
  return os.path.isfile(os.path.join(directory, fmt.MANIFEST)) and os.path.isfile(
      os.path.join(directory, fmt.WEIGHTS))


def _write_fast_tokenizer(packed_dir, manifest, out_dir):
  """Copies the tokenizer files; writes tokenizer.json from vocab.txt when it is missing."""
  files = manifest.get('tokenizer_files') or []
  for name in files:
    shutil.copy2(os.path.join(packed_dir, name), out_dir)
  if files and 'tokenizer.json' not in files:
    import transformers  # pylint: disable=g-import-not-at-top
    tok = transformers.AutoTokenizer.from_pretrained(packed_dir, use_fast=True)
    tok.backend_tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
  return sorted(os.listdir(out_dir))


def build_from_packed(packed_dir, verify=True, precision='float32'):
  """(ModelProto, config, policy, manifest) of a packed directory; precision: of the float ops
  (`onnx_graph.build`)."""
  import onnx  # pylint: disable=unused-import,g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from bitbert_jax.model.config import BertConfig  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed import onnx_graph  # pylint: disable=g-import-not-at-top
  from bitbert_jax.quant.policy import QuantPolicy  # pylint: disable=g-import-not-at-top
  manifest = fmt.read_manifest(packed_dir)
  weights = fmt.weights_path(packed_dir, manifest, verify)
  config = BertConfig.from_dict(fmt.read_json(os.path.join(packed_dir, fmt.CONFIG)))
  policy = QuantPolicy.from_dict(fmt.read_json(os.path.join(packed_dir, fmt.POLICY)))
  model = onnx_graph.build(config, policy, load_file(weights), manifest, precision)
  return model, config, policy, manifest


def export_onnx(source, out_dir, tokenizer_dir=None, overwrite=False, float_dtype='float16',
                precision='float32'):
  """Writes the ONNX model directory of a packed directory or of a trained student.

  source: a packed directory (`export.pack`), or anything `export.load_student` reads (it is
    packed first, with float_dtype, into a temporary directory).
  tokenizer_dir: tokenizer files for a student (default: the ones its workdir records).
  precision: the graph's float ops: 'float32' (fast; logits within ~0.04 of predict's) or
    'float64' (reproduces `predict(precision='float64')` bit for bit; several times slower).
  Returns the absolute out_dir.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed import onnx_graph  # pylint: disable=g-import-not-at-top
  source = os.fspath(source)
  out_dir, tmp = export._new_tmp_dir(out_dir, overwrite)  # pylint: disable=protected-access
  try:
    packed_dir = source
    if not _is_packed(source):
      s = export.load_student(source)
      packed_dir = os.path.join(tmp, '.packed')
      export.pack(s.config, s.params, s.policy, packed_dir,
                  tokenizer_dir=tokenizer_dir or s.tokenizer_dir, float_dtype=float_dtype,
                  model_state=s.model_state)
    model, config, policy, manifest = build_from_packed(packed_dir, precision=precision)
    model_path = os.path.join(tmp, MODEL)
    onnx.save_model(model, model_path)
    files = _write_fast_tokenizer(packed_dir, manifest, tmp) if manifest.get(
        'tokenizer_files') else []
    files = [f for f in files if f in fmt.TOKENIZER_FILES]
    onnx_manifest = {
        'format': FORMAT, 'format_version': FORMAT_VERSION, 'model_file': MODEL,
        'model_sha256': fmt.sha256_file(model_path), 'model_bytes': os.path.getsize(model_path),
        'opset': onnx_graph.OPSET, 'precision': precision, 'inputs': list(onnx_graph.INPUTS),
        'output': onnx_graph.OUTPUT, 'num_labels': config.num_labels,
        'problem_type': config.problem_type,
        'label_names': [] if config.is_regression else list(
            config.label_names or [f'LABEL_{i}' for i in range(config.num_labels)]),
        'policy': policy.name, 'split': policy.split, 'tokenizer_files': files,
        'packed_weights_sha256': manifest['weights_sha256'],
        'packed_weights_bytes': manifest['weights_bytes'],
    }
    if packed_dir != source:
      shutil.rmtree(packed_dir)
    export._write_json(os.path.join(tmp, fmt.MANIFEST), onnx_manifest)  # pylint: disable=protected-access
    export._commit_dir(tmp, out_dir)  # pylint: disable=protected-access
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def format_sizes(out_dir):
  """Two lines: model.onnx against the packed weights it came from."""
  m = fmt.read_json(os.path.join(out_dir, fmt.MANIFEST))
  mib = lambda b: f'{b / 2**20:.2f} MiB'
  return (f'model.onnx        {mib(m["model_bytes"])}\n'
          f'packed weights    {mib(m["packed_weights_bytes"])} '
          f'(onnx/packed = {m["model_bytes"] / m["packed_weights_bytes"]:.3f})')
