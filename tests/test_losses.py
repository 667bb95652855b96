"""Distillation losses against hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax.distill import losses


def test_soft_cross_entropy_matches_definition_and_weights():
  s = jnp.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]])
  t = jnp.array([[0.5, 1.5, -1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
  w = jnp.array([1.0, 1.0, 0.0])  # the third row is batch padding
  p = jax.nn.softmax(t / 2.0)
  expect = -(p * jax.nn.log_softmax(s / 2.0)).sum(-1)[:2].mean()
  np.testing.assert_allclose(losses.soft_cross_entropy(s, t, w, 2.0), expect, rtol=1e-6)


def test_regression_uses_teacher_not_labels_and_is_not_identically_zero():
  s, t = jnp.array([[1.0], [2.0]]), jnp.array([[1.5], [0.0]])
  w = jnp.ones(2)
  np.testing.assert_allclose(losses.prediction_loss(s, t, w, True), (0.25 + 4.0) / 2)
  # Soft cross-entropy on one output is identically zero: the bug the reference code had.
  assert float(losses.soft_cross_entropy(s, t, w)) == 0.0
  assert float(losses.prediction_loss(s, t, w, True)) > 0.0


def test_attention_mse_ignores_padding_positions():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  w = np.ones(2)
  base = losses.attention_mse(s, t, mask, w)
  s2 = s.copy()
  s2[0, :, 3, :] += 100.0  # padded query row
  s2[1, :, :, 2:] -= 100.0  # padded keys
  np.testing.assert_allclose(losses.attention_mse(s2, t, mask, w), base, rtol=1e-6)
  valid = mask[:, None, :, None] * mask[:, None, None, :]
  expect = (((s - t) * valid)**2).mean(axis=(1, 2, 3)).mean()
  np.testing.assert_allclose(base, expect, rtol=1e-6)


def test_hidden_mse_with_projection():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 6))
  proj = {'kernel': rng.normal(size=(4, 6)), 'bias': rng.normal(size=(6,))}
  got = losses.hidden_mse(s, t, np.ones(2), proj)
  np.testing.assert_allclose(got, ((s @ proj['kernel'] + proj['bias'] - t)**2).mean(), rtol=1e-5)


@pytest.mark.parametrize('regression', [False, True])
def test_label_loss(regression):
  logits = jnp.array([[2.0, -1.0], [0.3, 0.1]])
  if regression:
    labels = jnp.array([1.0, 0.0])
    np.testing.assert_allclose(losses.label_loss(logits[:, :1], labels, jnp.ones(2), True),
                               ((2.0 - 1.0)**2 + 0.3**2) / 2, rtol=1e-6)
  else:
    labels = jnp.array([0, 1])
    lp = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(losses.label_loss(logits, labels, jnp.ones(2), False),
                               -(lp[0, 0] + lp[1, 1]) / 2, rtol=1e-6)


def test_attention_kl_matches_a_hand_computation():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(2, 2, 4, 4)), rng.normal(size=(2, 2, 4, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  w = np.array([1.0, 1.0])
  per_example = []
  for b in range(2):
    n = int(mask[b].sum())
    kls = []
    for h in range(2):
      for q in range(n):
        pt = np.exp(t[b, h, q, :n]) / np.exp(t[b, h, q, :n]).sum()
        ps = np.exp(s[b, h, q, :n]) / np.exp(s[b, h, q, :n]).sum()
        kls.append(np.sum(pt * np.log(pt / ps)))
    per_example.append(np.mean(kls))
  got = losses.attention_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), jnp.asarray(w))
  np.testing.assert_allclose(got, np.mean(per_example), rtol=1e-5)
  assert float(losses.attention_kl(jnp.asarray(t), jnp.asarray(t), jnp.asarray(mask),
                                   jnp.asarray(w))) == pytest.approx(0.0, abs=1e-6)
  grad = jax.grad(lambda x: losses.attention_kl(x, jnp.asarray(t), jnp.asarray(mask),
                                                jnp.asarray(w)))(jnp.asarray(s))
  assert np.all(np.isfinite(grad)) and float(jnp.abs(grad[1, :, :, 2:]).max()) == 0.0
