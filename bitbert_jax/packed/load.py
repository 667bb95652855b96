"""Reading a packed directory: manifest, integrity, config, policy and tensors, checked once.

`read` is the one reader: the JAX model (`model.load_packed`) and the ONNX export
(`onnx_export`) both start from it. It checks the manifest's format and version, the weights
file's size and sha256 (verify=True), and every tensor's name, shape and dtype against the packed
model that config.json and policy.json describe (`model.shapes.check_shapes`), naming the first
that does not fit, and each record's plane count against policy.json (`check_planes`).
"""
import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from bitbert_jax.errors import BitbertError
from bitbert_jax.model.bert import BertModel
from bitbert_jax.model.config import BertConfig
from bitbert_jax.model.shapes import check_shapes
from bitbert_jax.packed import layers
from bitbert_jax.packed.format import (CODES_SUFFIX, CONFIG, MANIFEST, POLICY, STATE_SEP,
                                      read_json, read_manifest, weights_path)
from bitbert_jax.quant.policy import QuantPolicy


@dataclasses.dataclass(frozen=True)
class PackedDir:
  """A packed directory as read: tensors stay as stored (uint8 codes, float32 scales, float16 or
  float32 float parts), numpy arrays by name; policy has packed=True."""
  directory: str
  manifest: dict
  config: BertConfig
  policy: QuantPolicy
  tensors: dict

  @property
  def params(self):
    """{param path: array} of the parameters (codes, scales, float parts)."""
    return {n: v for n, v in self.tensors.items() if STATE_SEP not in n}

  @property
  def state(self):
    """{collection: nested dict} of the non-param variables (e.g. quant_stats), maybe empty."""
    state = {}
    for name, v in self.tensors.items():
      if STATE_SEP in name:
        collection, path = name.split(STATE_SEP, 1)
        state.setdefault(collection, {})[path] = v
    return {c: traverse_util.unflatten_dict(t, sep='/') for c, t in state.items()}


@functools.lru_cache(maxsize=16)
def packed_shapes(config, policy):
  """Path -> ShapeDtypeStruct of the parameters of BertModel(config, packed policy)."""
  with layers.packed_mode():
    abstract = jax.eval_shape(lambda: nn.meta.unbox(BertModel(config, policy).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']))
  return traverse_util.flatten_dict(dict(abstract), sep='/')


def check_tensors(weights, params, config, policy):
  """Raises BitbertError naming the first parameter tensor whose name, shape or dtype does not
  fit the packed model of config and policy; weights: the file, for the message."""
  expected = packed_shapes(config, policy)
  check_shapes({p: s.shape for p, s in expected.items()}, params, weights,
               f'the packed model of {CONFIG} and {POLICY}')
  for name, arr in sorted(params.items()):
    if name.endswith(CODES_SUFFIX) and arr.dtype != np.uint8:
      raise BitbertError(f'{weights}: tensor {name!r} has dtype {arr.dtype}; codes are uint8')
    if not name.endswith(CODES_SUFFIX) and not np.issubdtype(arr.dtype, np.floating):
      raise BitbertError(f'{weights}: tensor {name!r} has dtype {arr.dtype}; expected a float')


def check_planes(manifest, policy, where):
  """Raises BitbertError naming the first codes or scale record whose `planes` (2: split, 1: one
  plane) is not what the policy gives its parameter: readers (the ONNX graph) go by the record."""
  for name, rec in sorted(manifest.get('tensors', {}).items()):
    if 'planes' not in rec or not rec.get('param'):
      continue
    want = 2 if policy.is_split(rec['param']) else 1
    if rec['planes'] != want:
      raise BitbertError(f'{where}: tensor {name!r} records planes={rec["planes"]!r}, but '
                         f'{POLICY} gives {rec["param"]} {want} plane(s)')


def read(directory, verify=True):
  """Reads and checks a packed directory -> PackedDir.

  verify: check the weights file's size and sha256 against manifest.json (catches truncated or
  damaged copies).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise BitbertError(f'packed model {directory}: no such directory')
  manifest = read_manifest(directory)
  weights = weights_path(directory, manifest, verify)
  try:
    config = BertConfig.from_dict(read_json(os.path.join(directory, CONFIG)))
  except (TypeError, ValueError) as e:
    raise BitbertError(f'{directory}/{CONFIG}: not a BertConfig ({e})') from e
  try:
    policy = QuantPolicy.from_dict(read_json(os.path.join(directory, POLICY)))
  except (TypeError, KeyError, ValueError) as e:
    raise BitbertError(f'{directory}/{POLICY}: not a QuantPolicy ({e})') from e
  policy = dataclasses.replace(policy, packed=True)
  try:
    tensors = load_file(weights)
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(f'{weights}: unreadable safetensors file ({type(e).__name__}: {e})') from e
  packed = PackedDir(directory, manifest, config, policy, tensors)
  check_tensors(weights, packed.params, config, policy)
  check_planes(manifest, policy, os.path.join(directory, MANIFEST))
  return packed
