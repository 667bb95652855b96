"""Quantizers: exact values on hand-computed tensors, straight-through gradients, dtypes."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax.errors import BitbertError
from bitbert_jax.quant import policy_from_name, quantizers
from bitbert_jax.quant.layers import QEmbed
from bitbert_jax.quant.quantizers import asymmetric, binary, sign, symmetric, ternary


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _vjp(fn, x, g):
  _, pullback = jax.vjp(fn, x)
  return pullback(g)[0]


# --- values ---------------------------------------------------------------------------------


def test_sign_of_zero_is_plus_one():
  np.testing.assert_array_equal(sign(_f32([-2.0, -0.0, 0.0, 3.0])), [-1, 1, 1, 1])


def test_binary_groups_zero_and_negative_rows():
  x = _f32([[1, -2, 0, 3],  # alpha = 6/4; sign(0) = +1
            [0, 0, 0, 0],  # all zero: alpha = 0, no NaN
            [-1, -2, -3, -2]])  # negative only: alpha = 2
  np.testing.assert_array_equal(binary(x, 3),
                                [[1.5, -1.5, 1.5, 1.5], [0, 0, 0, 0], [-2, -2, -2, -2]])
  # One group over the whole tensor: alpha = 14 / 12.
  np.testing.assert_allclose(binary(x, 1), np.where(np.asarray(x) >= 0, 1, -1) * 14 / 12,
                             rtol=1e-6)


def test_groups_are_consecutive_rows_of_the_flattened_tensor():
  x = _f32([[1, 3, -2, -6], [4, -4, 0, 8]])
  # 4 groups of 2: [1, 3], [-2, -6], [4, -4], [0, 8].
  np.testing.assert_array_equal(binary(x, 4), [[2, 2, -4, -4], [4, -4, 4, 4]])
  np.testing.assert_array_equal(binary(x.reshape(8), 4), binary(x, 4).reshape(8))


def test_ternary_values():
  x = _f32([[0.1, -1.0, 2.0, 0.5],  # delta = 0.63: keep -1, 2 -> alpha 1.5
            [-1, -1, -4, -0.2],  # negative only: delta = 1.085, keep -4
            [7, 13, 10, 10],  # delta = 0.7 * 10 = 7: an entry at the threshold is dropped
            [0, 0, 0, 0]])  # every entry at (= below) the threshold 0: zeros, no NaN
  np.testing.assert_allclose(ternary(x, 4), [[0, -1.5, 1.5, 0], [0, 0, -4, 0], [0, 11, 11, 11],
                                             [0, 0, 0, 0]], rtol=1e-6)


def test_symmetric_reference_values_and_clamp():
  # 3 bits, max|x| = 4: s = 2 * 4 / 8 = 1, codes in [-4, 3]; the +max is clamped to 3.
  x = _f32([-4, -1.2, 0.3, 2.6, 4])
  np.testing.assert_array_equal(symmetric(x, 3), [-4, -1, 0, 3, 3])
  # Two groups, each its own scale (s = 1 and s = 0.25 at 3 bits).
  x2 = _f32([[-4, -1.2, 0.3, 4], [0.1, -0.6, 0.2, 1.0]])
  np.testing.assert_array_equal(symmetric(x2, 3, 2), [[-4, -1, 0, 3], [0, -0.5, 0.25, 0.75]])


def test_symmetric_textbook_divides_by_two_pow_b_minus_one():
  x = _f32([-3.0, 0.4, 1.0, 2.0])  # 2 bits, max 3: s = 6 / 3 = 2, codes in [-2, 1]
  # -1.5 rounds (half to even) to code -2: the negative extreme grows by half a step.
  np.testing.assert_array_equal(symmetric(x, 2, reference=False), [-4, 0, 0, 2])
  np.testing.assert_array_equal(symmetric(x, 2), [-3, 0, 1.5, 1.5])  # s = 6 / 4


def test_asymmetric_values():
  x = _f32([-1, 0, 0.5, 2])
  # Reference: s = 3/4, z = round(-4/3) s = -0.75; codes 0..3, the max clamped to 3.
  np.testing.assert_allclose(asymmetric(x, 2), [-0.75, 0, 0.75, 1.5], rtol=1e-6)
  # Textbook: s = 3/3 = 1, z = -1: min and max land exactly on codes 0 and 3.
  np.testing.assert_allclose(asymmetric(x, 2, reference=False), [-1, 0, 1, 2], atol=1e-6)


def test_uniform_degenerate_groups():
  zeros = jnp.zeros((2, 4))
  for fn in (symmetric, asymmetric):
    out = fn(zeros, 4, 2)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, zeros)
  const = jnp.full((4,), 3.0)  # a constant group is exactly representable
  np.testing.assert_array_equal(asymmetric(const, 4), const)
  np.testing.assert_array_equal(_vjp(lambda v: asymmetric(v, 4), const, jnp.ones(4)), jnp.ones(4))


def test_quantize_weight_and_activation_dispatch():
  w = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  np.testing.assert_array_equal(quantizers.quantize_weight(w, 1, 6), binary(w, 6))
  np.testing.assert_array_equal(quantizers.quantize_weight(w, 2, 3), ternary(w, 3))
  np.testing.assert_array_equal(quantizers.quantize_weight(w, 8, 2), symmetric(w, 8, 2))
  assert quantizers.quantize_weight(w, 32) is w
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4))
  # Dynamic activations: one scale per token (row of the last dim).
  np.testing.assert_array_equal(quantizers.quantize_activation(x, 8),
                                symmetric(x.reshape(6, 4), 8, 6).reshape(2, 3, 4))


@pytest.mark.parametrize('groups', [5, 0, -1, 2.0, True, 'row'])
def test_bad_num_groups_raise(groups):
  with pytest.raises(BitbertError, match='num_groups'):
    binary(jnp.ones((3, 4)), groups)
  with pytest.raises(BitbertError, match='num_groups'):
    symmetric(jnp.ones((3, 4)), 8, groups)


def test_bad_bits_raise():
  with pytest.raises(BitbertError, match='bits=1'):
    symmetric(jnp.ones(4), 1)
  with pytest.raises(BitbertError, match='quantize_weight'):
    quantizers.quantize_weight(jnp.ones(4), 0)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize('fn', [lambda v: binary(v, 2), lambda v: ternary(v, 2)])
def test_binary_ternary_gradient_is_identity(fn):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  g = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  np.testing.assert_array_equal(_vjp(fn, x, g), g)


def test_uniform_gradient_is_masked_where_clamped():
  g = _f32([1.0, 2.0, 3.0, 4.0, 5.0])
  # symmetric 3 bits on [-4, -1.2, 0.3, 2.6, 4]: only +4 (code 4 > 3) is clamped.
  x = _f32([-4, -1.2, 0.3, 2.6, 4])
  np.testing.assert_array_equal(_vjp(lambda v: symmetric(v, 3), x, g), [1, 2, 3, 4, 0])
  # asymmetric reference 2 bits on [-1, 0, 0.5, 2]: the max (code 4 > 3) is clamped.
  x = _f32([-1, 0, 0.5, 2])
  np.testing.assert_array_equal(_vjp(lambda v: asymmetric(v, 2), x, g[:4]), [1, 2, 3, 0])
  # textbook asymmetric: nothing is clamped.
  np.testing.assert_array_equal(_vjp(lambda v: asymmetric(v, 2, reference=False), x, g[:4]),
                                g[:4])
  # Per-group masks: the clamped entry of each group is the one at its positive max.
  x2 = _f32([[-1, 0.5, 2], [3, -0.5, -6]])  # group 2's max|x| is negative: nothing clamped
  np.testing.assert_array_equal(_vjp(lambda v: symmetric(v, 4, 2), x2, jnp.ones((2, 3))),
                                [[1, 1, 0], [1, 1, 1]])


def test_symmetric_clip_gradient_and_values():
  x = _f32([-3.0, -0.4, 0.6, 1.0, 2.5])
  clip = 1.0  # 3 bits: s = 0.25, codes in [-4, 3]
  out, pullback = jax.vjp(lambda v, c: quantizers.symmetric_clip(v, c, 3), x, clip)
  np.testing.assert_array_equal(out, [-1.0, -0.5, 0.5, 0.75, 0.75])
  gx, gc = pullback(jnp.ones(5))
  np.testing.assert_array_equal(gx, [0, 1, 1, 0, 0])
  assert gc == 0


# --- idempotence ----------------------------------------------------------------------------


@pytest.mark.parametrize('fn', [lambda v: binary(v, 4), lambda v: ternary(v, 4),
                                lambda v: asymmetric(v, 4, 4, reference=False)])
def test_idempotent_forms(fn):
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
  once = fn(x)
  np.testing.assert_allclose(fn(once), once, rtol=1e-6, atol=1e-6)


def test_reference_uniform_forms_are_not_idempotent():
  # Documented: dividing by 2^b clips the positive extreme, so the next scale shrinks.
  x = _f32([0.3, 1.0])
  once = symmetric(x, 2)  # s = 0.5: [0.5, 0.5]
  np.testing.assert_array_equal(once, [0.5, 0.5])
  np.testing.assert_array_equal(symmetric(once, 2), [0.25, 0.25])
  once = asymmetric(_f32([0, 1, 2, 3]), 2)
  assert not np.allclose(asymmetric(once, 2), once)


# --- bfloat16 -------------------------------------------------------------------------------


@pytest.mark.parametrize('fn', [lambda v: binary(v, 2), lambda v: ternary(v, 2),
                                lambda v: symmetric(v, 8, 2), lambda v: asymmetric(v, 8, 2),
                                lambda v: quantizers.quantize_activation(v, 8)])
def test_bfloat16_computes_in_float32(fn):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 1024)).astype(jnp.bfloat16)
  out = fn(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, fn(x.astype(jnp.float32)).astype(jnp.bfloat16))
  grad = _vjp(fn, x, jnp.ones_like(x))
  assert grad.dtype == jnp.bfloat16


def test_bfloat16_ternary_counts_are_exact():
  # 600 kept entries of 1 and 400 of 0.5 plus one large one: a bfloat16 count (spacing 4 at 600)
  # or sum would move alpha; float32 statistics give alpha exactly (600 + 8) / 601.
  x = jnp.concatenate([jnp.ones(600), jnp.full(399, 0.5), jnp.array([8.0])]).astype(jnp.bfloat16)
  alpha = jnp.max(ternary(x).astype(jnp.float32))
  np.testing.assert_allclose(alpha, np.asarray(jnp.bfloat16(608 / 601)), rtol=0)


# --- per-row embedding scales ---------------------------------------------------------------


class _Embeddings(nn.Module):
  policy: object

  @nn.compact
  def __call__(self, ids):
    return QEmbed(10, 6, self.policy, name='word_embeddings')(ids)


class _Model(nn.Module):
  policy: object

  @nn.compact
  def __call__(self, ids):
    return _Embeddings(self.policy, name='embeddings')(ids)


def test_qembed_one_scale_per_row():
  model = _Model(policy_from_name('1-1-8'))
  ids = jnp.array([[3, 7, 3, 0]])
  params = model.init(jax.random.PRNGKey(0), ids)['params']
  table = np.asarray(nn.meta.unbox(params)['embeddings']['word_embeddings']['embedding'])
  out = np.asarray(model.apply({'params': params}, ids))
  for j, i in enumerate(ids[0]):
    row = table[i]
    np.testing.assert_allclose(out[0, j], np.abs(row).mean() * np.where(row >= 0, 1, -1),
                               rtol=1e-6)
  assert not np.isclose(np.abs(out[0, 0]).max(), np.abs(out[0, 1]).max())  # distinct scales


# --- learned scales -------------------------------------------------------------------------


def _lsq_autodiff_reference(x, step, qn, qp):
  """LSQ via autodiff with a straight-through round and a gradient-scaled step."""
  scale = 1.0 / math.sqrt(x.size * qp)
  s = step * scale + jax.lax.stop_gradient(step - step * scale)  # value step, grad * scale
  v = jnp.clip(x / s, qn, qp)
  return (v + jax.lax.stop_gradient(jnp.round(v) - v)) * s


def test_lsq_values_and_gradients():
  x = _f32([-3.0, -0.4, 0.2, 0.9, 5.0])
  # 3 bits signed: codes [-4, 3]; v = x / 0.5 = [-6, -0.8, 0.4, 1.8, 10].
  out, pullback = jax.vjp(lambda v, s: quantizers.lsq(v, s, 3), x, _f32(0.5))
  np.testing.assert_allclose(out, [-2.0, -0.5, 0.0, 1.0, 1.5])
  gx, gs = pullback(jnp.ones(5))
  np.testing.assert_array_equal(gx, [0, 1, 1, 1, 0])
  # d/ds: Qn, round(v) - v, ..., Qp = -4 - 0.2 - 0.4 + 0.2 + 3, scaled by 1 / sqrt(5 * 3).
  np.testing.assert_allclose(gs, -1.4 / math.sqrt(15), rtol=1e-5)
  g = jax.random.normal(jax.random.PRNGKey(0), (5,))
  ref = jax.grad(lambda s: jnp.vdot(_lsq_autodiff_reference(x, s, -4, 3), g))(0.5)
  np.testing.assert_allclose(jax.grad(lambda s: jnp.vdot(quantizers.lsq(x, s, 3), g))(0.5), ref,
                             rtol=1e-5)


def test_lsq_unsigned_levels():
  assert quantizers.lsq_levels(4, signed=False) == (0, 15)
  assert quantizers.lsq_levels(4) == (-8, 7)
  np.testing.assert_allclose(quantizers.lsq(_f32([-1.0, 0.26, 9.0]), 0.5, 2, signed=False),
                             [0.0, 0.5, 1.5])


def test_elastic_signed_values_and_gradients():
  x = _f32([-1.5, -0.2, 0.0, 0.3, 2.5])
  beta = _f32([0.0, 0.0, 0.0, 0.3, 0.0])
  out, pullback = jax.vjp(lambda v, a, b: quantizers.elastic_binary(v, a, b), x, _f32(2.0), beta)
  np.testing.assert_array_equal(out, [-2, -2, 2, 2, 2])  # sign(0) = +1, also at x = beta
  g = _f32([1.0, 2.0, 3.0, 4.0, 5.0])
  gx, ga, gb = pullback(g)
  # v = (x - beta) / alpha = [-0.75, -0.1, 0, 0, 1.25]: the last is outside [-1, 1].
  np.testing.assert_array_equal(gx, [1, 2, 3, 4, 0])
  np.testing.assert_array_equal(gb, -gx)
  np.testing.assert_allclose(ga, (-1 - 2 + 3 + 4 + 5) / math.sqrt(5), rtol=1e-6)


def test_elastic_unsigned_values_and_gradients():
  x = _f32([[-0.5, 0.2, 0.6, 1.0, 3.0]])
  beta = jnp.zeros((5,))
  out, pullback = jax.vjp(
      lambda v, a, b: quantizers.elastic_binary(v, a, b, signed=False), x, _f32(1.0), beta)
  np.testing.assert_array_equal(out, [[0, 0, 1, 1, 1]])
  gx, ga, gb = pullback(jnp.ones((1, 5)))
  np.testing.assert_array_equal(gx, [[0, 1, 1, 1, 0]])
  assert gb.shape == (5,)
  # d/dalpha: 0 below, round(v) - v inside (-0.2, 0.4, 0), 1 above; / sqrt(5).
  np.testing.assert_allclose(ga, 1.2 / math.sqrt(5), rtol=1e-6)
