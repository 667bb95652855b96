"""Hugging Face BERT checkpoints <-> our config and parameter tree.

A Hugging Face checkpoint directory holds config.json and model.safetensors (or the older
pytorch_model.bin). One table (`hf_names`) maps our parameter paths to Hugging Face tensor names;
both directions use it. Linear weights are [out, in] in PyTorch and [in, out] here.
"""
import json
import logging
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bitbert_jax import workdir as workdir_lib
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import shapes as shapes_lib
from bitbert_jax.model.config import BertConfig, PROBLEM_TYPES

SAFETENSORS = 'model.safetensors'
TORCH_BIN = 'pytorch_model.bin'
CONFIG = 'config.json'
TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')
PREFIX = 'bert.'  # BertFor* models keep the encoder under this name; bare BertModel does not
_FLOAT_DTYPES = ('F16', 'BF16', 'F32', 'F64')
_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*(/[\w.-]+)?')

# (our module path, Hugging Face module name, kind); {i} is the layer index.
_MODULES = (
    ('embeddings/word_embeddings', 'embeddings.word_embeddings', 'embed'),
    ('embeddings/position_embeddings', 'embeddings.position_embeddings', 'embed'),
    ('embeddings/token_type_embeddings', 'embeddings.token_type_embeddings', 'embed'),
    ('embeddings/LayerNorm', 'embeddings.LayerNorm', 'norm'),
    ('encoder/layer_{i}/attention/query', 'encoder.layer.{i}.attention.self.query', 'dense'),
    ('encoder/layer_{i}/attention/key', 'encoder.layer.{i}.attention.self.key', 'dense'),
    ('encoder/layer_{i}/attention/value', 'encoder.layer.{i}.attention.self.value', 'dense'),
    ('encoder/layer_{i}/attention/output', 'encoder.layer.{i}.attention.output.dense', 'dense'),
    ('encoder/layer_{i}/attention/LayerNorm', 'encoder.layer.{i}.attention.output.LayerNorm',
     'norm'),
    ('encoder/layer_{i}/intermediate', 'encoder.layer.{i}.intermediate.dense', 'dense'),
    ('encoder/layer_{i}/output', 'encoder.layer.{i}.output.dense', 'dense'),
    ('encoder/layer_{i}/output_LayerNorm', 'encoder.layer.{i}.output.LayerNorm', 'norm'),
    ('pooler', 'pooler.dense', 'dense'),
)
_HEAD = ('classifier', 'classifier', 'dense')  # outside the `bert.` prefix in BertFor* models
# kind -> (our leaf name, Hugging Face leaf name).
_LEAVES = {
    'embed': (('embedding', 'weight'),),
    'norm': (('scale', 'weight'), ('bias', 'bias')),
    'dense': (('kernel', 'weight'), ('bias', 'bias')),
}
# Old TF-converted checkpoints spell LayerNorm parameters gamma/beta.
_OLD_LEAVES = {'gamma': 'weight', 'beta': 'bias'}

log = logging.getLogger(__name__)


def hf_names(num_layers, with_head, prefix=''):
  """The one name table: [(our path 'a/b/kernel', HF name 'a.b.weight', transpose?)]."""
  rows = []
  for ours, theirs, kind in _MODULES:
    layers = range(num_layers) if '{i}' in ours else (None,)
    for i in layers:
      for leaf, hf_leaf in _LEAVES[kind]:
        rows.append((f'{ours.format(i=i)}/{leaf}', f'{prefix}{theirs.format(i=i)}.{hf_leaf}',
                     leaf == 'kernel'))
  if with_head:
    ours, theirs, kind = _HEAD
    rows += [(f'{ours}/{leaf}', f'{theirs}.{hf_leaf}', leaf == 'kernel')
             for leaf, hf_leaf in _LEAVES[kind]]
  return rows


def _flatten(tree, prefix=''):
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, path + '/'))
    else:
      out[path] = v
  return out


def _unflatten(flat):
  tree = {}
  for path, v in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _num_layers(flat):
  return len({p.split('/')[1] for p in flat if p.startswith('encoder/layer_')})


def params_to_hf_state_dict(params, prefix=None):
  """Our params -> {HF name: float32 numpy array in PyTorch layout}.

  prefix: put before encoder names; default 'bert.' with a classifier (the
  BertForSequenceClassification layout), '' without (the BertModel layout).
  """
  flat = _flatten(params)
  with_head = any(p.startswith('classifier/') for p in flat)
  prefix = (PREFIX if with_head else '') if prefix is None else prefix
  rows = hf_names(_num_layers(flat), with_head, prefix)
  unknown = sorted(set(flat) - {ours for ours, _, _ in rows})
  if unknown:
    raise BitbertError(f'params: no Hugging Face name for {", ".join(unknown)}')
  out = {}
  for ours, theirs, transpose in rows:
    if ours not in flat:
      raise BitbertError(f'params: {ours} missing (it becomes {theirs})')
    value = np.asarray(flat[ours], np.float32)
    out[theirs] = np.ascontiguousarray(value.T if transpose else value)
  return out


def _normalize_name(name):
  """'bert.encoder...LayerNorm.gamma' -> 'encoder...LayerNorm.weight'."""
  name = name.removeprefix(PREFIX)
  stem, _, leaf = name.rpartition('.')
  return f'{stem}.{_OLD_LEAVES[leaf]}' if leaf in _OLD_LEAVES and stem else name


def _is_ignored(name):
  # MLM/NSP heads and non-parameter buffers that BERT checkpoints often carry.
  return name.startswith('cls.') or name.endswith(('.position_ids', '.token_type_ids'))


def _spelled(hf_name, by_name):
  """hf_name as the file would spell it: with `bert.` when the file's encoder names have it."""
  prefixed = any(n.startswith(PREFIX) for n in by_name.values())
  return PREFIX + hf_name if prefixed and not hf_name.startswith('classifier.') else hf_name


def hf_state_dict_to_params(tensors, config, source='state dict', dtypes=None):
  """{HF name: array} -> our params for `config`, every shape checked.

  Accepts the `bert.` prefix and gamma/beta LayerNorm names; ignores MLM/NSP heads and buffers.
  dtypes: optional {HF name: dtype name} of non-float tensors (reported when needed).
  """
  dtypes = dtypes or {}
  by_name = {}
  for name in list(tensors) + list(dtypes):
    by_name.setdefault(_normalize_name(name), name)
  shapes = shapes_lib.expected_shapes(config)
  rows = hf_names(config.num_hidden_layers, bool(config.num_labels))
  missing_rows = sorted(set(shapes) - {ours for ours, _, _ in rows})
  if missing_rows:  # the model grew a parameter the table does not know
    raise BitbertError(f'bitbert_jax.hf: no Hugging Face name for {", ".join(missing_rows)}')
  flat, used = {}, set()
  for ours, theirs, transpose in rows:
    name = by_name.get(theirs)
    if name is None:
      raise BitbertError(f'{source}: tensor {_spelled(theirs, by_name)!r} missing (needed for '
                         f'{ours}); the file holds {len(by_name)} tensors')
    if name in dtypes:
      raise BitbertError(f'{source}: tensor {name!r} has dtype {dtypes[name]}; expected a '
                         f'float type ({", ".join(_FLOAT_DTYPES)})')
    value = np.asarray(tensors[name], np.float32)
    want = shapes[ours][::-1] if transpose else shapes[ours]  # in the file's (torch) layout
    if value.shape != want:
      raise BitbertError(f'{source}: tensor {name!r} has shape {list(value.shape)}; expected '
                         f'{list(want)} for this config.json')
    value = value.T if transpose else value
    flat[ours] = np.ascontiguousarray(value)
    used.add(name)
  extra = sorted(n for n in by_name.values() if n not in used and not _is_ignored(n))
  if extra:
    log.warning('%s: ignoring %d tensors not in a BERT encoder: %s', source, len(extra),
                ', '.join(extra[:10]))
  return _unflatten(flat)


def _listing(directory):
  files = sorted(os.listdir(directory))
  return ', '.join(files) if files else '(empty)'


def _resolve(path_or_hub_id):
  """A local checkpoint directory for a path or (with network) a Hugging Face hub id."""
  path = os.fspath(path_or_hub_id)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise BitbertError(f'{path}: is a file; pass the checkpoint directory holding {CONFIG} '
                       f'and {SAFETENSORS} (or {TORCH_BIN})')
  if not _HUB_ID.fullmatch(path) or path.startswith(('.', '~')):
    parent = os.path.dirname(os.path.abspath(path))
    where = f'; {parent} holds: {_listing(parent)}' if os.path.isdir(parent) else ''
    raise BitbertError(f'{path}: no such checkpoint directory{where}')
  return _download(path)


def _download(hub_id):
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(hub_id, allow_patterns=[CONFIG, SAFETENSORS, TORCH_BIN,
                                                     *TOKENIZER_FILES])
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(
        f'{hub_id}: not a local directory, and fetching it as a Hugging Face hub id failed '
        f'({type(e).__name__}: {e}); the hub may be unreachable or the id unknown: pass a local '
        f'directory holding {CONFIG} and {SAFETENSORS}') from e


def _read_config(directory):
  file = os.path.join(directory, CONFIG)
  if not os.path.isfile(file):
    raise BitbertError(f'{directory}: no {CONFIG}; files there: {_listing(directory)}')
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise BitbertError(f'{file}: unreadable JSON ({e})') from e


def _read_safetensors(file):
  """(float tensors as float32 numpy, {name: dtype} of the others)."""
  floats, others = {}, {}
  # The flax framework reads bfloat16, which numpy cannot.
  with safe_open(file, framework='flax') as f:
    for name in f.keys():
      dtype = f.get_slice(name).get_dtype()
      if dtype in _FLOAT_DTYPES:
        floats[name] = np.asarray(f.get_tensor(name), np.float32)
      else:
        others[name] = dtype
  return floats, others


def _read_torch_bin(file):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BitbertError(f'{file}: a PyTorch pickle; reading it needs torch (pip install torch), '
                       f'or convert it to {SAFETENSORS}') from e
  state = torch.load(file, map_location='cpu', weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f'holds a {type(state).__name__}, not a state dict')
  floats, others = {}, {}
  for name, t in state.items():
    if not isinstance(t, torch.Tensor):
      others[name] = type(t).__name__
    elif t.is_floating_point():
      floats[name] = t.detach().to(torch.float32).numpy()
    else:
      others[name] = str(t.dtype)
  return floats, others


def _read_weights(directory):
  """(file, float tensors, non-float dtypes); safetensors preferred over the pickle."""
  for name, reader in ((SAFETENSORS, _read_safetensors), (TORCH_BIN, _read_torch_bin)):
    file = os.path.join(directory, name)
    if os.path.isfile(file):
      try:
        return (file, *reader(file))
      except BitbertError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise BitbertError(f'{file}: cannot read the weights, the file may be truncated or '
                           f'corrupt ({type(e).__name__}: {e}); files there: '
                           f'{_listing(directory)}') from e
  raise BitbertError(f'{directory}: no weights file ({SAFETENSORS} or {TORCH_BIN}); '
                     f'files there: {_listing(directory)}')


def _head_labels(hf, rows, label_names):
  """Label names for a head of `rows` outputs: given, from id2label, or none."""
  if label_names:
    return tuple(label_names)
  id2label = hf.get('id2label') or {}
  names = tuple(id2label[k] for k in sorted(id2label, key=int))
  # transformers' placeholder names LABEL_i say nothing: keep none, as a fresh head does.
  if len(names) != rows or names == tuple(f'LABEL_{i}' for i in range(rows)):
    return ()
  return names


def _head_config(config, hf, file, floats, num_labels, problem_type, label_names):
  """The config's head (num_labels, labels, problem type) from the file and the arguments."""
  head = next((floats[n] for n in floats if _normalize_name(n) == 'classifier.weight'), None)
  file_labels = 0 if head is None else head.shape[0]
  if label_names is not None and num_labels is None:
    num_labels = len(label_names)
  if label_names is not None and len(label_names) != num_labels:
    raise BitbertError(f'label_names has {len(label_names)} names but num_labels is {num_labels}')
  if num_labels is None:
    num_labels = file_labels
  if file_labels and num_labels and num_labels != file_labels:
    raise BitbertError(f'{file}: tensor classifier.weight has shape {list(head.shape)} '
                       f'({file_labels} labels) but num_labels={num_labels} was asked; pass '
                       f'num_labels=None to keep the head or 0 to drop it')
  source = 'problem_type argument'
  if problem_type is None:
    source, problem_type = f'{os.path.dirname(file)}/{CONFIG}', hf.get('problem_type')
  if problem_type is None:  # transformers' default: one output means regression
    problem_type = 'regression' if num_labels == 1 else 'single_label_classification'
  if problem_type not in PROBLEM_TYPES:
    raise BitbertError(f'{source}: problem_type {problem_type!r} not supported; valid: '
                       f'{", ".join(PROBLEM_TYPES)}')
  labels = _head_labels(hf, num_labels, label_names) if num_labels else ()
  return config.replace(num_labels=num_labels, label_names=labels, problem_type=problem_type)


def _fresh_head(config, seed, stddev):
  """A classifier initialised like BERT: normal(0, initializer_range) kernel, zero bias."""
  kernel = stddev * jax.random.normal(jax.random.PRNGKey(seed),
                                      (config.hidden_size, config.num_labels), np.float32)
  return {'kernel': np.asarray(kernel), 'bias': np.zeros((config.num_labels,), np.float32)}


def load_hf_checkpoint(path_or_hub_id, num_labels=None, problem_type=None, label_names=None,
                       seed=0):
  """Reads a Hugging Face BERT checkpoint -> (BertConfig, params of float32 jax arrays).

  path_or_hub_id: a directory with config.json and model.safetensors / pytorch_model.bin, or a
    hub id (needs network). BertModel, BertForSequenceClassification and BertForPreTraining
    checkpoints load; MLM/NSP heads are dropped.
  num_labels: None keeps the checkpoint's classifier (if any); 0 drops it; a count attaches a
    fresh head (initialised with `seed`) to a headless checkpoint.
  problem_type: 'single_label_classification' or 'regression'; default from config.json.
  label_names: names of the labels (sets num_labels when that is None).
  """
  directory = _resolve(path_or_hub_id)
  hf = _read_config(directory)
  config = BertConfig.from_hf_dict(hf, source=os.path.join(directory, CONFIG))
  file, floats, others = _read_weights(directory)
  config = _head_config(config, hf, file, floats, num_labels, problem_type, label_names)
  has_head = any(_normalize_name(n) == 'classifier.weight' for n in floats)
  if config.num_labels and not has_head:
    body = hf_state_dict_to_params(floats, config.replace(num_labels=0), file, others)
    params = {**body, 'classifier': _fresh_head(config, seed, hf.get('initializer_range', 0.02))}
  else:
    params = hf_state_dict_to_params(floats, config, file, others)
  return config, jax.tree.map(jnp.asarray, params)


def _tokenizer_files(tokenizer_dir):
  if tokenizer_dir is None:
    return []
  files = [os.path.join(tokenizer_dir, n) for n in TOKENIZER_FILES
           if os.path.isfile(os.path.join(tokenizer_dir, n))]
  if not files:
    listing = _listing(tokenizer_dir) if os.path.isdir(tokenizer_dir) else '(no such directory)'
    raise BitbertError(f'{tokenizer_dir}: no tokenizer files ({", ".join(TOKENIZER_FILES)}); '
                       f'files there: {listing}')
  return files


def _write(tmp, hf_config, state_dict, tokenizer_files):
  with open(os.path.join(tmp, CONFIG), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  save_file(state_dict, os.path.join(tmp, SAFETENSORS), metadata={'format': 'pt'})
  for file in tokenizer_files:
    shutil.copy2(file, tmp)


def save_hf_checkpoint(config, params, out_dir, tokenizer_dir=None, overwrite=False):
  """Writes a directory that transformers' BertModel / BertForSequenceClassification loads.

  config.json, model.safetensors (HF names, PyTorch layout) and, from tokenizer_dir, the
  tokenizer files. Written into a temporary directory beside out_dir and renamed, so a failure
  leaves nothing half-written. overwrite: replace an existing out_dir. A narrow config (heads x
  head size != hidden_size) is refused: transformers' BertModel cannot hold it.
  """
  hf_config = config.to_hf_dict()
  shapes_lib.check_params(config, params, model='this config', split_hint=(
      'a Hugging Face checkpoint holds one float weight: merge or dequantize the split model '
      'before exporting'))
  state_dict = params_to_hf_state_dict(params)
  tokenizer_files = _tokenizer_files(tokenizer_dir)
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not (overwrite and os.path.isdir(out_dir)):
    raise BitbertError(f'{out_dir}: already exists; pass overwrite=True or a new directory')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  try:
    _write(tmp, hf_config, state_dict, tokenizer_files)
    workdir_lib.replace_dir(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


