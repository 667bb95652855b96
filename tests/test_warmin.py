"""Quantization warm-in: lambda = 0 is the float model, 1 the quantized one, exactly; the latent
weights get the straight-through gradient; lambda ramps inside one compiled step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitbert_jax import train
from bitbert_jax.model import BertConfig, BertModel, init_params
from bitbert_jax.quant import policy_from_name
from bitbert_jax.quant.policy import ActQuant, QuantPolicy, WeightQuant
from bitbert_jax.quant.layers import QDense
from bitbert_jax.quant.quantizers import binary, quantize_activation

CFG = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, num_labels=2)
IDS = jnp.asarray(np.random.default_rng(0).integers(4, 64, (2, 8)), jnp.int32)


def _logits(policy, mix=None):
  params = init_params(CFG, policy)
  return np.asarray(BertModel(CFG, policy).apply({'params': params}, IDS, quant_mix=mix).logits)


def test_ends_are_the_float_and_the_quantized_models_exactly():
  for name in ('1-1-8', '2-2-8', '1-1-32'):
    policy = policy_from_name(name)
    quantized, floating = _logits(policy), _logits(policy_from_name('32-32-32'))
    np.testing.assert_array_equal(_logits(policy, jnp.float32(1.0)), quantized, err_msg=name)
    np.testing.assert_array_equal(_logits(policy, jnp.float32(0.0)), floating, err_msg=name)
    middle = _logits(policy, jnp.float32(0.5))
    assert not np.array_equal(middle, quantized) and not np.array_equal(middle, floating)


def test_dense_interpolates_and_passes_the_straight_through_gradient():
  # A lone module's parameter path is 'kernel': a rule for it, W1 A8 as in 1-1-8.
  policy = QuantPolicy(1, 32, ActQuant(8), rules=(('kernel', WeightQuant(1)),))
  layer = QDense(8, policy)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)), jnp.float32)
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x)['params'])
  w = params['kernel']
  lam = jnp.float32(0.3)
  x_mix = lam * quantize_activation(x, 8) + (1 - lam) * x
  w_mix = lam * binary(w) + (1 - lam) * w
  y = layer.apply({'params': params}, x, lam)
  np.testing.assert_allclose(y, x_mix @ w_mix + params['bias'], rtol=1e-6, atol=1e-6)
  r = jnp.asarray(np.random.default_rng(2).normal(size=y.shape), jnp.float32)
  g = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x, lam) * r))(params)['kernel']
  np.testing.assert_allclose(g, x_mix.T @ r, rtol=1e-5, atol=1e-6)  # dL/dw = dL/dw_mix


def test_lambda_ramps_with_the_step():
  steps = [float(train.warmin_lambda(jnp.int32(s), 4.0)) for s in (0, 1, 2, 4, 9)]
  assert steps == [0.0, 0.25, 0.5, 1.0, 1.0]
