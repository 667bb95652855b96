"""Writing the packed low-bit directory of a trained student (layout: `format`), its size
report, and the dequantized Hugging Face copy.

  weights.safetensors  quantized weights as packed uint8 codes (`<module>/<leaf>_codes`) with
                       float32 per-group scales (`<module>/<leaf>_scale`); every other parameter
                       (LayerNorms, biases, position and token-type embeddings, pooler,
                       classifier, unquantized weights) as `float_dtype` under its param path;
                       non-param state (static activation ranges) as float32
                       `<collection>:<path>`, e.g. `quant_stats:encoder/.../act_range`.
  config.json          BertConfig.to_dict() (plus model_type: bert for tokenizer loaders).
  policy.json          the QuantPolicy (packed: true).
  manifest.json        format, version, the weights file's sha256 and size, per-tensor records
                       and the size accounting (see `size_report`).
  tokenizer files      copied from tokenizer_dir (vocab.txt, tokenizer.json, ...).

The codes are the layers' own (`quant.layers.quantized_kernel_planes`), so code * scale is the
trained layer's quantized weight bit for bit. A split student (binary after ternary weight
splitting) is stored as two sign bit-planes [2, rows, row_bytes] with two scale sets [2, G] per
split weight, 2 bits of storage per weight like BinaryBERT's doubled-width binary model; its two
biases are stored summed, as the layer only uses b0 + b1. A weight that was already 1-bit before
splitting keeps one plane; each record's `planes` says which a tensor has.

Everything is written into a temporary directory beside the target and renamed, and the same
student gives the same bytes on every export (`save_safetensors`).
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save as safetensors_bytes

from bitbert_jax import preempt
from bitbert_jax import workdir as workdir_lib
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import shapes
from bitbert_jax.model.config import BertConfig
from bitbert_jax.packed import bits
from bitbert_jax.packed.format import (BIT_ORDER, CODE_MEANING, CODES_SUFFIX, CONFIG,
                                      FLOAT_DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, POLICY,
                                      SCALE_SUFFIX, STATE_SEP, TOKENIZER_FILES, WEIGHTS,
                                      read_json, read_manifest, sha256_file, write_json)
from bitbert_jax.quant import groups as groups_lib
from bitbert_jax.quant.layers import quantized_embedding_planes, quantized_kernel_planes
from bitbert_jax.quant.policy import QuantPolicy

MAX_OVERHEAD = 0.05  # file bytes over information content; the format promises less


# ---------------------------------------------------------------------------------------------
# Encoding.


def _module_of(path):
  return path.rpartition('/')[0]


def _split_biases(flat, policy):
  """Bias paths whose layer's kernel is split (stored summed)."""
  return {f'{_module_of(p)}/bias' for p in flat
          if p.endswith('/kernel') and policy.is_split(p) and f'{_module_of(p)}/bias' in flat}


# ---------------------------------------------------------------------------------------------
# Encoding.


def layer_planes(policy, path, value):
  """The codes and scales a layer computes with: (codes int8 [P, rows, cols], scales float32
  [P, G], groups), output-major (kernels [in, out] as [out, in]); P = 2 planes when split.

  value: the latent weight ([in, out] kernel or [V, H] table; split: leading axis of 2). The
  layers' own functions (`layers.quantized_kernel_planes` / `quantized_embedding_planes`)
  quantize it, so codes * scale is the layer's quantized weight bit for bit.
  """
  value = jnp.asarray(np.asarray(value, np.float32))
  if path.endswith('/kernel'):
    planes = quantized_kernel_planes(policy, path, value, value.shape[-1])
  else:
    planes = quantized_embedding_planes(policy, path, value)
  if planes.offsets is not None:  # the packed format has no per-group offset
    raise BitbertError(f'{path}: config.quant.binary_mode=\'centered\' weights (sign, scale and '
                       'group mean) cannot be packed; export them with binary_mode=\'bwn\' or '
                       'as float (config.export.packed=False)')
  codes = np.asarray(planes.output_major_codes())
  int_codes = codes.astype(np.int8)
  if not np.array_equal(int_codes, codes):
    raise BitbertError(f'{path}: quantized codes are not integers in int8 range')
  return int_codes, np.asarray(planes.scales, np.float32), planes.groups


def encode_weight(policy, path, value):
  """One quantized latent weight -> (codes uint8 [P?, rows, row_bytes], scales f32 [P?, G]).

  rows x cols is the output-major matrix (kernels [in, out] become [out, in]); P = 2 planes
  only when split. code * scale reproduces the layer's quantized weight bit for bit.
  """
  codes, scales, _ = layer_planes(policy, path, value)
  packed = bits.pack_codes(codes, policy.weight_quant(path).bits)
  return (packed, scales) if policy.is_split(path) else (packed[0], scales[0])


def _float_part(path, value, dtype):
  v = np.asarray(value, np.float32)
  if dtype == 'float16' and v.size and np.abs(v).max() > np.finfo(np.float16).max:
    raise BitbertError(f'{path}: values up to {np.abs(v).max():.4g} overflow float16 '
                       f'(max 65504); export with float_dtype="float32"')
  return v.astype(dtype)


def state_tensors(model_state):
  """Non-param collections (e.g. quant_stats, the static activation ranges) as float32 tensors
  named '<collection>:<path>'."""
  tensors = {}
  for collection, tree in (model_state or {}).items():
    if not tree:
      continue
    for path, v in shapes.flat(tree).items():
      tensors[f'{collection}{STATE_SEP}{path}'] = np.asarray(v, np.float32)
  return tensors


def packed_tensors(config, params, policy, float_dtype='float16', model_state=None):
  """The packed file's tensors and their manifest records.

  Returns:
    (tensors {name: numpy array}, records {name: dict}), names sorted like the param paths;
    model_state collections (e.g. quant_stats) are added as float32 '<collection>:<path>'.
  """
  if float_dtype not in FLOAT_DTYPES:
    raise BitbertError(f'float_dtype {float_dtype!r}; valid: {", ".join(FLOAT_DTYPES)}')
  if policy.packed:
    raise BitbertError('pack: the policy is already a packed (inference) policy; pass the '
                       'training policy of the student')
  flat = shapes.check_params(config, params, policy)
  summed = _split_biases(flat, policy)
  tensors, records = {}, {}
  for path in sorted(flat):
    preempt.check('export')  # packing BERT-base takes a while on CPU
    value = flat[path]
    quant = policy.weight_quant(path)
    if quant is None:
      v = np.asarray(value, np.float32)
      if path in summed:
        v = v[0] + v[1]  # float32, as the split layer computes bias.sum(0)
      tensors[path] = _float_part(path, v, float_dtype)
      records[path] = {'kind': 'float', 'dtype': float_dtype, 'param': path,
                       'summed_split_bias': path in summed}
      continue
    split = policy.is_split(path)
    codes, scales = encode_weight(policy, path, value)
    leaf = path.rpartition('/')[2]
    rows, cols = np.shape(value)[-2:][::-1] if leaf == 'kernel' else np.shape(value)[-2:]
    groups = groups_lib.resolve_groups(quant.num_groups, rows)
    codes_name, scale_name = f'{path}{CODES_SUFFIX}', f'{path}{SCALE_SUFFIX}'
    tensors[codes_name], tensors[scale_name] = codes, scales
    kind = {1: 'binary', 2: 'ternary'}.get(quant.bits, 'uniform')
    records[codes_name] = {
        'kind': f'{kind}_codes', 'dtype': 'uint8', 'param': path, 'bits': quant.bits,
        'planes': 2 if split else 1, 'logical_shape': [rows, cols],
        'param_shape': list(np.shape(value)),
        'orientation': ('output-major [out, in]' if leaf == 'kernel' else
                        'row-major [vocab, hidden]'),
        'num_groups': groups, 'group_rule': quant.num_groups, 'scale_tensor': scale_name}
    records[scale_name] = {'kind': 'scale', 'dtype': 'float32', 'param': path,
                           'num_groups': groups, 'planes': 2 if split else 1,
                           'codes_tensor': codes_name}
  for name, v in state_tensors(model_state).items():
    tensors[name] = v
    records[name] = {'kind': 'state', 'dtype': 'float32', 'param': name}
  for name, rec in records.items():
    arr = tensors[name]
    rec.update(shape=list(arr.shape), bytes=int(arr.nbytes),
               sha256=hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())
  return tensors, records


# ---------------------------------------------------------------------------------------------
# Size accounting.


def information_bits(record):
  """Bits a tensor carries: bits x weights (x planes) for codes, 32 per scale, dtype width."""
  if record['kind'].endswith('_codes'):
    rows, cols = record['logical_shape']
    return record['bits'] * rows * cols * record['planes']
  return 8 * np.dtype(record['dtype']).itemsize * math.prod(record['shape'])


def fp32_bytes(config):
  """Size of the float32 parameters of the (unsplit) model of this config."""
  return 4 * sum(math.prod(s) for s in shapes.expected_shapes(config, QuantPolicy()).values())


def _size_summary(records, weights_bytes, config):
  info = sum(information_bits(r) for r in records.values())
  by_kind = {}
  for r in records.values():
    kind = 'codes' if r['kind'].endswith('_codes') else r['kind']
    entry = by_kind.setdefault(kind, {'tensors': 0, 'bytes': 0, 'information_bytes': 0.0})
    entry['tensors'] += 1
    entry['bytes'] += r['bytes']
    entry['information_bytes'] += information_bits(r) / 8
  fp32 = fp32_bytes(config)
  return {'weights_file_bytes': weights_bytes, 'information_bytes': info / 8,
          'overhead': weights_bytes / (info / 8) - 1, 'fp32_bytes': fp32,
          'ratio_vs_fp32': fp32 / weights_bytes, 'by_kind': by_kind}


def _dir_bytes(directory):
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
             if os.path.isfile(os.path.join(directory, f)))


def size_report(out_dir, reference_fp32_bytes=None):
  """File sizes against information content for a packed directory.

  Returns a dict: weights_file_bytes, directory_bytes (all files incl. tokenizer and JSON),
  information_bytes (codes at their bits, scales at 32 bits, float parts at their dtype),
  overhead (weights file / information - 1; the format keeps it under 5%), fp32_bytes (this
  model's parameters as float32), ratio_vs_fp32 (fp32_bytes / weights file), and with
  reference_fp32_bytes (e.g. the 12-layer FP32 teacher) ratio_vs_reference; by_kind: per
  kind of tensor (codes, scale, float) count, bytes and information bytes.
  """
  manifest = read_manifest(out_dir)
  weights = os.path.join(out_dir, manifest['weights_file'])
  config = BertConfig.from_dict(read_json(os.path.join(out_dir, CONFIG)))
  report = _size_summary(manifest['tensors'], os.path.getsize(weights), config)
  report['directory_bytes'] = _dir_bytes(out_dir)
  report['ratio_vs_fp32_directory'] = report['fp32_bytes'] / report['directory_bytes']
  if reference_fp32_bytes:
    report['reference_fp32_bytes'] = reference_fp32_bytes
    report['ratio_vs_reference'] = reference_fp32_bytes / report['weights_file_bytes']
  return report


# ---------------------------------------------------------------------------------------------
# Writing.


def tokenizer_files(tokenizer_dir):
  """Tokenizer files present in tokenizer_dir (BitbertError when there is none)."""
  if tokenizer_dir is None:
    return []
  if not os.path.isdir(tokenizer_dir):
    raise BitbertError(f'tokenizer_dir {tokenizer_dir}: no such directory')
  files = [os.path.join(tokenizer_dir, n) for n in TOKENIZER_FILES
           if os.path.isfile(os.path.join(tokenizer_dir, n))]
  if not any(os.path.basename(f) in ('vocab.txt', 'tokenizer.json') for f in files):
    raise BitbertError(f'tokenizer_dir {tokenizer_dir}: no vocab.txt or tokenizer.json; files '
                       f'there: {", ".join(sorted(os.listdir(tokenizer_dir))) or "(none)"}')
  return files


def staging_dir(out_dir, overwrite):
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not (overwrite and os.path.isdir(out_dir)):
    raise BitbertError(f'{out_dir}: already exists; pass overwrite=True (--overwrite) or a new '
                       f'directory')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  return out_dir, tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def commit_dir(tmp, out_dir):
  """Renames tmp to out_dir; an existing out_dir is moved aside and removed only on success."""
  # mkdtemp makes 0700: give the artifact the modes a plain mkdir / open would have.
  mask = _umask()
  os.chmod(tmp, 0o777 & ~mask)
  for name in os.listdir(tmp):
    os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
  workdir_lib.replace_dir(tmp, out_dir)


def save_safetensors(tensors, path, metadata):
  """safetensors.numpy.save_file with the header's metadata in sorted key order.

  The library writes its metadata map in hash order, which changes from call to call; sorting
  it makes the file (and the sha256 the manifests record) the same for the same tensors.
  """
  data = safetensors_bytes(tensors, metadata=metadata)
  size = int.from_bytes(data[:8], 'little')
  header = json.loads(data[8:8 + size])
  header['__metadata__'] = dict(sorted(header['__metadata__'].items()))  # keeps its place
  text = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode()
  if len(text) > size:  # reordering keys cannot lengthen the header
    raise BitbertError(f'{path}: unexpected safetensors header layout')
  with open(path, 'wb') as f:
    f.write(data[:8] + text + b' ' * (size - len(text)) + data[8 + size:])


def pack(config, params, policy, out_dir, tokenizer_dir=None, float_dtype='float16',
         overwrite=False, model_state=None):
  """Writes the packed low-bit directory of a quantized student (see the module docstring).

  Args:
    config: BertConfig of the student.
    params: its parameter tree (float latent weights; split ones with their axis of 2).
    policy: its training QuantPolicy (packed=False).
    out_dir: directory to create (BitbertError if it exists, unless overwrite).
    tokenizer_dir: directory with the tokenizer files to copy, or None.
    float_dtype: 'float16' (default) or 'float32' for the unquantized parameters.
    overwrite: replace an existing out_dir (only once the new one is complete).
    model_state: the student's non-param collections (e.g. {'quant_stats': ...} with static
      activation ranges), stored float32; None or {} when there are none.

  Returns:
    The absolute out_dir.
  """
  tensors, records = packed_tensors(config, params, policy, float_dtype, model_state)
  tok_files = tokenizer_files(tokenizer_dir)
  out_dir, tmp = staging_dir(out_dir, overwrite)
  try:
    weights = os.path.join(tmp, WEIGHTS)
    save_safetensors(tensors, weights, {'format': FORMAT, 'format_version': str(FORMAT_VERSION)})
    write_json(os.path.join(tmp, CONFIG), {**config.to_dict(), 'model_type': 'bert'})
    write_json(os.path.join(tmp, POLICY), dataclasses.replace(policy, packed=True).to_dict())
    for f in tok_files:
      shutil.copy2(f, tmp)
    manifest = {
        'format': FORMAT, 'format_version': FORMAT_VERSION, 'weights_file': WEIGHTS,
        'weights_sha256': sha256_file(weights), 'weights_bytes': os.path.getsize(weights),
        'float_dtype': float_dtype, 'policy': policy.name, 'split': policy.split,
        'bit_order': BIT_ORDER, 'code_meaning': CODE_MEANING,
        'tokenizer_files': sorted(os.path.basename(f) for f in tok_files),
        'size': _size_summary(records, os.path.getsize(weights), config),
        'tensors': records,
    }
    write_json(os.path.join(tmp, MANIFEST), manifest)
    preempt.check('export')  # the last moment to stop with nothing half-written
    commit_dir(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# ---------------------------------------------------------------------------------------------
# Dequantized Hugging Face export.


def dequantized_params(params, policy):
  """The float weights the fake-quantized model computes with: split planes and biases merged.

  kernel = Q(k0) + Q(k1) (or Q(k)), embedding likewise, bias = b0 + b1; rest unchanged.
  """
  flat = shapes.flat(params)
  summed = _split_biases(flat, policy)
  out = {}
  for path, value in flat.items():
    quant = policy.weight_quant(path)
    v = np.asarray(value, np.float32)
    if quant is not None:
      codes, scales, groups = layer_planes(policy, path, v)
      planes = [bits.dequantize(c, s, groups) for c, s in zip(codes, scales)]
      merged = planes[0] if len(planes) == 1 else planes[0] + planes[1]
      v = merged.T if path.endswith('/kernel') else merged
    elif path in summed:
      v = v[0] + v[1]
    out[path] = np.ascontiguousarray(v, np.float32)
  return traverse_util.unflatten_dict(out, sep='/')


def export_dequantized_hf(config, params, policy, out_dir, tokenizer_dir=None, overwrite=False):
  """Writes the fake-quantized student as a Hugging Face BERT directory (float32 weights).

  Weights are dequantized (kernel = Q(k0) + Q(k1) for a split model, bias = b0 + b1), so
  transformers' BertForSequenceClassification computes our model's function with activation
  quantization off: Hugging Face BERT has no activation quantizer, so compare against our model
  with the policy's activation bits set to 32. The file is the FP32 size: use `pack` for size.
  """
  from bitbert_jax import hf  # pylint: disable=g-import-not-at-top
  shapes.check_params(config, params, policy)
  return hf.save_hf_checkpoint(config, dequantized_params(params, policy), out_dir,
                               tokenizer_dir=tokenizer_dir, overwrite=overwrite)


def format_report(report):
  mb = lambda b: f'{b / 2**20:.2f} MiB'
  return '\n'.join([
      f'weights file      {mb(report["weights_file_bytes"])}',
      f'information       {mb(report["information_bytes"])} '
      f'(overhead {100 * report["overhead"]:.2f}%)',
      f'directory         {mb(report["directory_bytes"])} (incl. tokenizer and JSON)',
      f'fp32 parameters   {mb(report["fp32_bytes"])}  ->  {report["ratio_vs_fp32"]:.1f}x smaller',
  ] + ([f'vs reference      {report["ratio_vs_reference"]:.1f}x smaller than '
        f'{mb(report["reference_fp32_bytes"])}'] if 'ratio_vs_reference' in report else []))


