"""The ONNX model directory and the integrity of exported files, written once for both sides.

  model.onnx       the graph (inputs `INPUTS`, output `OUTPUT`)
  tokenizer files  tokenizer.json (what `bitbert_serve` reads) and the packed directory's others
  manifest.json    format, version, labels, the graph's inputs and output, and `files`: the
                   sha256 and size of every other file in the directory

`bitbert_jax.packed.onnx_export` writes the manifest with `onnx_manifest`; `bitbert_serve` reads
it with `read` and checks the files with `verify` before serving. The packed directory
(`bitbert_jax.packed.format`) takes its tokenizer file names and its sha256 from here.
Standard library only: this module is imported without numpy, JAX or ONNX Runtime.
"""
import hashlib
import json
import os

from bitbert_serve.errors import BitbertError

FORMAT = 'bitbert-onnx'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
MODEL = 'model.onnx'
TOKENIZER = 'tokenizer.json'  # what `tokenizers` reads; the other files serve transformers
TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'added_tokens.json')
INPUTS = ('input_ids', 'attention_mask', 'token_type_ids')
OUTPUT = 'logits'


def sha256_file(path, chunk=1 << 20):
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      h.update(block)
  return h.hexdigest()


def file_record(path):
  """{'bytes', 'sha256'} of a file, as manifests record it."""
  return {'bytes': os.path.getsize(path), 'sha256': sha256_file(path)}


def verify_file(path, record, listed_in=MANIFEST):
  """Raises BitbertError naming `path` when it is missing or differs from its record.

  record: {'bytes': size or None, 'sha256': hex digest or None}; None checks only presence.
  """
  if not os.path.isfile(path):
    raise BitbertError(f'{path}: missing (listed in {listed_in})')
  size = os.path.getsize(path)
  if record.get('bytes') is not None and size != record['bytes']:
    raise BitbertError(f'{path}: {size} bytes, {listed_in} says {record["bytes"]}; the file is '
                       'truncated or was replaced; re-export or copy it again')
  if record.get('sha256') is not None and sha256_file(path) != record['sha256']:
    raise BitbertError(f'{path}: sha256 differs from {listed_in}; the file is damaged or was '
                       'replaced; re-export or copy it again')


def onnx_manifest(directory, *, precision, opset, num_labels, problem_type, labels, policy,
                  split, packed_weights_sha256, packed_weights_bytes):
  """The manifest of an ONNX directory whose model and tokenizer files are already written."""
  model = os.path.join(directory, MODEL)
  tokenizer_files = sorted(n for n in os.listdir(directory) if n in TOKENIZER_FILES)
  return {
      'format': FORMAT, 'format_version': FORMAT_VERSION, 'model_file': MODEL,
      'model_sha256': sha256_file(model), 'model_bytes': os.path.getsize(model),
      'opset': opset, 'precision': precision, 'inputs': list(INPUTS), 'output': OUTPUT,
      'num_labels': num_labels, 'problem_type': problem_type, 'label_names': list(labels),
      'policy': policy, 'split': split, 'tokenizer_files': tokenizer_files,
      'files': {n: file_record(os.path.join(directory, n)) for n in [MODEL] + tokenizer_files},
      'packed_weights_sha256': packed_weights_sha256,
      'packed_weights_bytes': packed_weights_bytes,
  }


def read(directory):
  """manifest.json of an ONNX directory, its format and version checked."""
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise BitbertError(f'{path}: missing; is {directory} an ONNX export '
                       f'(python -m bitbert_jax.export --format=onnx)?') from None
  except (OSError, ValueError) as e:
    raise BitbertError(f'{path}: unreadable JSON ({e})') from e
  if manifest.get('format') != FORMAT or manifest.get('format_version') != FORMAT_VERSION:
    raise BitbertError(f'{path}: format {manifest.get("format")!r} version '
                       f'{manifest.get("format_version")!r}; expected {FORMAT!r} version '
                       f'{FORMAT_VERSION} (a packed directory runs with bitbert_jax.predict)')
  return manifest


def listed_files(manifest):
  """{file name: record} of every file the manifest lists (`verify_file` records)."""
  files = dict(manifest.get('files') or {})
  # Exports that predate `files` record the model's sha256 and size, the tokenizer's names.
  files.setdefault(manifest['model_file'], {'bytes': manifest.get('model_bytes'),
                                            'sha256': manifest.get('model_sha256')})
  for name in manifest.get('tokenizer_files') or ():
    files.setdefault(name, {})
  return files


def verify(directory, manifest):
  """Checks every file the manifest lists (presence, size, sha256); BitbertError naming the
  first that differs."""
  for name, record in sorted(listed_files(manifest).items()):
    verify_file(os.path.join(directory, name), record)
