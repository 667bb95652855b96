"""Packed directory layout, format version 1 (written by `write.pack`, read by `load`).

  weights.safetensors  quantized weights as packed uint8 codes `<module>/<leaf>_codes` with
                       float32 per-group scales `<module>/<leaf>_scale`; every other parameter
                       as float16/float32 under its param path; non-param state as float32
                       `<collection>:<path>`.
  config.json, policy.json, manifest.json, tokenizer files.

Codes of one weight: rows of the output-major matrix (kernels [in, out] stored [out, in], tables
[vocab, hidden] as is), `bits` bits per code, LSB first, rows padded to whole bytes; a split
weight has a leading plane axis of 2. `unpack_steps` says how a reader turns bytes into codes,
so the jnp unpacker and the ONNX graph follow one description.

The standard library only: the ONNX builder and light readers import this module. The names
both directory formats share (manifest, tokenizer files) and the integrity check are
`bitbert_serve.manifest`'s, which serving reads without JAX.
"""
import json
import math
import os

from bitbert_jax.errors import BitbertError
from bitbert_serve.manifest import MANIFEST, TOKENIZER_FILES, sha256_file, verify_file  # noqa: F401

FORMAT = 'bitbert-packed'
FORMAT_VERSION = 1
WEIGHTS = 'weights.safetensors'
CONFIG = 'config.json'
POLICY = 'policy.json'
FLOAT_DTYPES = ('float16', 'float32')
# Float ops of serving (predict, the ONNX graph): float32 is fast; float64 makes the two agree
# exactly.
PRECISIONS = ('float32', 'float64')
STATE_SEP = ':'  # '<collection>:<path>' names a non-param variable, e.g. quant_stats ranges
CODES_SUFFIX = '_codes'
SCALE_SUFFIX = '_scale'
CODE_MEANING = {
    '1': 'sign bit: 1 -> +1, 0 -> -1 (sign(0) = +1)',
    '2': "ternary, 2-bit two's complement: 00 -> 0, 01 -> +1, 11 -> -1",
    '3-8': "symmetric uniform, b-bit two's complement in [-2^(b-1), 2^(b-1)-1]",
}
BIT_ORDER = ('rows of an output-major [out, in] matrix (kernels) or of a [vocab, hidden] table; '
             'code i of a row at stream bits [i*b, (i+1)*b), LSB first; stream bit k = bit k%8 '
             '(LSB = 0) of the row\'s byte k//8; rows padded to whole bytes')


def row_bytes(n, bits):
  """Bytes that hold one row of n codes of `bits` bits."""
  return math.ceil(n * bits / 8)


def unpack_steps(bits):
  """How bytes become signed codes: (shifts, sign) for byte-aligned widths, else (None, sign).

  shifts: the right shifts that bring each of the 8 // bits fields of a byte to bit 0 (in stream
  order; field = (byte >> shift) mod 2^bits); None: codes straddle bytes, so a reader expands
  the bytes to the bit stream (bit k of byte j is stream bit 8 j + k) and regroups `bits` bits
  LSB first. sign: 'pm1' (field 1 -> +1, 0 -> -1) or 'twos' (b-bit two's complement).
  """
  shifts = tuple(range(0, 8, bits)) if 8 % bits == 0 else None
  return shifts, 'pm1' if bits == 1 else 'twos'


def read_json(path):
  """A JSON file's content; BitbertError naming the file when missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise BitbertError(f'{path}: missing') from None
  except (OSError, ValueError) as e:
    raise BitbertError(f'{path}: unreadable JSON ({e})') from e


def write_json(path, obj):
  """JSON with sorted keys, indented, newline-terminated: the same bytes for the same content."""
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


def read_manifest(out_dir):
  """manifest.json of a packed directory, with its format and version checked."""
  manifest = read_json(os.path.join(out_dir, MANIFEST))
  if manifest.get('format') != FORMAT:
    raise BitbertError(f'{out_dir}/{MANIFEST}: format {manifest.get("format")!r} is not '
                       f'{FORMAT!r}; is this a packed bitbert_jax export?')
  if manifest.get('format_version') != FORMAT_VERSION:
    raise BitbertError(f'{out_dir}/{MANIFEST}: format_version {manifest.get("format_version")!r}'
                       f'; this bitbert_jax reads version {FORMAT_VERSION}')
  return manifest


def weights_path(directory, manifest, verify=True):
  """The weights file of a packed directory, checked to exist and (verify) to match the size
  and sha256 its manifest records."""
  weights = os.path.join(directory, manifest['weights_file'])
  record = {'bytes': manifest.get('weights_bytes'), 'sha256': manifest['weights_sha256']}
  verify_file(weights, record if verify else {})
  return weights
