"""BiT-style mean-centred binarization: the formula, its planes, the model, and the export refusal."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax.packed import write
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig, BertModel, init_params
from bitbert_jax.quant import policy_from_name
from bitbert_jax.quant.layers import quantized_kernel_planes
from bitbert_jax.quant.policy import QuantPolicy, WeightQuant
from bitbert_jax.quant.quantizers import centered_binary, quantize_weight

CFG = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, num_labels=2)


def _expected(w, groups):
  g = np.asarray(w, np.float64).reshape(groups, -1)
  mu = g.mean(1, keepdims=True)
  d = g - mu
  return (np.abs(d).mean(1, keepdims=True) * np.where(d >= 0, 1, -1) + mu).reshape(w.shape)


def test_formula_per_tensor_and_per_row():
  w = jnp.asarray(np.random.default_rng(0).normal(0.3, 1.0, (6, 8)), jnp.float32)
  for groups in (1, 6):
    np.testing.assert_allclose(centered_binary(w, groups), _expected(w, groups), rtol=1e-5,
                               atol=1e-6)
  assert len(np.unique(np.asarray(centered_binary(w, 1)))) == 2  # still two values per group
  np.testing.assert_array_equal(quantize_weight(w, 1, 1, 'bwn'), quantize_weight(w, 1))
  # sign(0) = +1: an element equal to the mean goes up.
  z = jnp.array([1.0, 2.0, 3.0, 2.0])
  np.testing.assert_allclose(centered_binary(z), [1.5, 2.5, 2.5, 2.5])
  g = jax.grad(lambda x: jnp.sum(centered_binary(x) * jnp.arange(48.0).reshape(6, 8)))(w)
  np.testing.assert_array_equal(g, jnp.arange(48.0).reshape(6, 8))  # straight-through


def test_layer_planes_carry_offsets_and_match_the_quantizer():
  policy = policy_from_name('1-1-8', weight_groups='row', binary_mode='centered')
  path = 'encoder/layer_0/intermediate/kernel'
  k = jnp.asarray(np.random.default_rng(1).normal(0.1, 1.0, (16, 32)), jnp.float32)
  planes = quantized_kernel_planes(policy, path, k, 32)
  assert planes.offsets.shape == (1, 32)
  np.testing.assert_allclose(planes.value(), _expected(k.T, 32).T, rtol=1e-5, atol=1e-6)


def test_model_uses_centered_weights_and_policy_round_trips():
  bwn, centered = policy_from_name('1-1-8'), policy_from_name('1-1-8', binary_mode='centered')
  assert all(q.mode == 'centered' for _, q in centered.rules)
  assert QuantPolicy.from_dict(centered.to_dict()) == centered
  assert QuantPolicy.from_dict({k: v for k, v in bwn.to_dict().items()}) == bwn
  ternary = policy_from_name('2-2-8', binary_mode='centered')  # no 1-bit rule: nothing changes
  assert all(q.mode == 'bwn' for _, q in ternary.rules)
  params = init_params(CFG, bwn)
  params['encoder']['layer_0']['intermediate']['kernel'] += 0.05  # a mean to centre away
  ids = jnp.asarray([[2, 7, 19, 33, 50, 3]], jnp.int32)
  logits = lambda policy, p: np.asarray(
      jax.jit(BertModel(CFG, policy).apply)({'params': p}, ids).logits)
  # The same model with float weights (same 8-bit activations), fed the centred binarization.
  float_weights = dataclasses.replace(centered, rules=tuple(
      (pattern, WeightQuant(32)) for pattern, _ in centered.rules))
  binarized = jax.tree.map(lambda w: w, params)  # own dicts, same arrays
  layer = binarized['encoder']['layer_0']
  for name in ('query', 'key', 'value', 'output'):
    kernel = layer['attention'][name]['kernel']
    layer['attention'][name]['kernel'] = jnp.asarray(_expected(kernel, 1), jnp.float32)
  for name in ('intermediate', 'output'):
    layer[name]['kernel'] = jnp.asarray(_expected(layer[name]['kernel'], 1), jnp.float32)
  words = binarized['embeddings']['word_embeddings']
  words['embedding'] = jnp.asarray(_expected(words['embedding'], CFG.vocab_size), jnp.float32)
  expected = logits(float_weights, binarized)
  np.testing.assert_allclose(logits(centered, params), expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits(bwn, params), expected, atol=1e-3)  # bwn is another model


def test_export_refuses_centered_naming_the_field(tmp_path):
  policy = policy_from_name('1-1-8', binary_mode='centered')
  with pytest.raises(BitbertError, match="binary_mode='centered'"):
    write.pack(CFG, init_params(CFG, policy), policy, str(tmp_path / 'packed'))


def test_config_refuses_centered_with_packed_export():
  from bitbert_jax import config_lib
  from bitbert_jax.distill import stage_config
  c = config_lib.base_config({})
  c.quant.binary_mode = 'centered'
  c.stages.q = config_lib.stage('quantize', bits='1-1-8')
  with pytest.raises(BitbertError, match='config.export.packed=False'):
    stage_config.check_bits(c, '1-1-8', 'config.stages.q.bits')
  c.export.packed = False
  stage_config.check_bits(c, '1-1-8', 'config.stages.q.bits')
