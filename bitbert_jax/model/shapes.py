"""The parameter shapes of a BertModel, and the one check that a tree of tensors has them.

`check_shapes` names the first tensor that is missing, unknown or of the wrong shape; the
trained-student reader, the packed-directory reader and the Hugging Face writer all call it.
"""
import dataclasses
import functools

import flax
import jax
import numpy as np
from flax import traverse_util

from bitbert_jax.errors import BitbertError
from bitbert_jax.model.bert import init_params
from bitbert_jax.quant.policy import QuantPolicy


def flat(tree):
  """{'a': {'b': x}} (dicts or FrozenDicts) -> {'a/b': x}."""
  tree = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
  return traverse_util.flatten_dict(dict(tree), sep='/')


@functools.lru_cache(maxsize=64)
def expected_shapes(config, policy=QuantPolicy()):
  """Param path -> shape of BertModel(config, policy)'s float parameters (split weights carry
  their axis of 2)."""
  policy = dataclasses.replace(policy, packed=False)
  return {p: tuple(s.shape) for p, s in flat(jax.eval_shape(
      lambda: init_params(config, policy))).items()}


def check_shapes(expected, tensors, what, model, split_hint=None):
  """Raises BitbertError naming the first tensor of `tensors` that does not fit `expected`.

  expected: {path: shape}; tensors: {path: array}; what: where they come from (a file, a
  directory); model: what `expected` describes ('this config'); split_hint: the advice when a
  tensor has an extra leading axis of 2 (a split weight where one weight is expected).
  """
  for path in sorted(set(expected) | set(tensors)):
    if path not in tensors:
      raise BitbertError(f'{what}: {path} missing for {model} (shape {list(expected[path])})')
    if path not in expected:
      raise BitbertError(f'{what}: {path} is not a parameter of {model}')
    shape, want = tuple(np.shape(tensors[path])), tuple(expected[path])
    if shape == want:
      continue
    if split_hint and shape == (2,) + want:
      raise BitbertError(f'{what}: {path} has a split leading axis of 2 (shape {list(shape)}); '
                         f'{split_hint}')
    hint = ''
    if shape[1:] == want or shape == want[1:]:
      hint = ' (does the policy\'s split flag match the params?)'
    raise BitbertError(f'{what}: {path} has shape {list(shape)}; expected {list(want)} for '
                       f'{model}{hint}')


def describe(config, policy):
  """How `check_shapes` names the model of a config and policy."""
  split = ', split' if policy.split else ''
  return (f'this config (num_labels={config.num_labels}, layers={config.num_hidden_layers}, '
          f'policy {policy.name}{split})')


def check_params(config, params, policy=QuantPolicy(), what='params', model=None,
                 split_hint=None):
  """The flat params ({path: array}) after checking them against BertModel(config, policy);
  model: how errors name it (default `describe(config, policy)`)."""
  tensors = flat(params)
  check_shapes(expected_shapes(config, policy), tensors, what,
               model or describe(config, policy), split_hint)
  return tensors


def random_params(config, policy=QuantPolicy(), seed=0, stddev=0.02):
  """Random float32 params of BertModel(config, policy) without running its init (fast even
  for BERT-base): normal(0, stddev) weights and biases, LayerNorm scales 1 + normal(0, 0.1).
  For size benchmarks and tests."""
  rng = np.random.default_rng(seed)
  params = {}
  for path, shape in sorted(expected_shapes(config, policy).items()):
    if path.endswith('LayerNorm/scale'):
      params[path] = (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
    else:
      params[path] = (stddev * rng.standard_normal(shape, np.float32)).astype(np.float32)
  return traverse_util.unflatten_dict(params, sep='/')
