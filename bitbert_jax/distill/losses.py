"""Distillation losses: pure functions of model outputs (REFERENCE section 4).

Every loss takes per-example weights `w` [B] (0 = a padding row of a fixed-shape batch) and
returns a scalar averaged over the real examples.
"""
import jax
import jax.numpy as jnp


def _weighted_mean(per_example, w):
  return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)


def soft_cross_entropy(student_logits, teacher_logits, w, temperature=1.0):
  """-sum softmax(t/T) log_softmax(s/T) per example; logits [B, C] with C >= 2."""
  t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return _weighted_mean(-jnp.sum(t * s, axis=-1), w)


def regression_mse(student_logits, teacher_logits, w):
  """MSE against the teacher's output (never the gold label) for regression heads [B, 1]."""
  d = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
  return _weighted_mean(jnp.mean(d**2, axis=-1), w)


def prediction_loss(student_logits, teacher_logits, w, is_regression, temperature=1.0):
  if is_regression:
    return regression_mse(student_logits, teacher_logits, w)
  return soft_cross_entropy(student_logits, teacher_logits, w, temperature)


def label_loss(logits, labels, w, is_regression):
  """Supervised loss on gold labels (teacher fine-tuning only): CE, or MSE for regression."""
  if is_regression:
    return _weighted_mean((logits[:, 0].astype(jnp.float32) - labels)**2, w)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return _weighted_mean(-jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), -1)[:, 0], w)


def attention_mse(student_scores, teacher_scores, mask, w):
  """MSE of pre-softmax scores [B, N, S, S]; padded query/key positions set to 0 in both."""
  valid = (mask[:, None, :, None] * mask[:, None, None, :]).astype(jnp.float32)
  d = (student_scores.astype(jnp.float32) - teacher_scores.astype(jnp.float32)) * valid
  per_example = jnp.mean(d**2, axis=(1, 2, 3))
  return _weighted_mean(per_example, w)


def attention_kl(student_scores, teacher_scores, mask, w):
  """KL(softmax(teacher) || softmax(student)) over the real keys of pre-softmax scores
  [B, N, S, S], averaged over heads and real query positions."""
  # The model's own key mask (a finite minimum, not -inf: no NaN in the masked gradient).
  key_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
  t = jax.nn.log_softmax(teacher_scores.astype(jnp.float32) + key_bias, axis=-1)
  s = jax.nn.log_softmax(student_scores.astype(jnp.float32) + key_bias, axis=-1)
  real_key = mask[:, None, None, :] > 0
  kl = jnp.sum(jnp.where(real_key, jnp.exp(t) * (t - s), 0.0), axis=-1)  # [B, N, S]
  queries = mask[:, None, :].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(queries, axis=-1) * kl.shape[1], 1.0)[:, 0]  # heads x real queries
  return _weighted_mean(jnp.sum(kl * queries, axis=(1, 2)) / n, w)


ATTENTION_LOSSES = {'mse': attention_mse, 'kl': attention_kl}


def hidden_mse(student_hidden, teacher_hidden, w, projection=None):
  """MSE of hidden states [B, S, H]; `projection` maps a narrower student to the teacher width."""
  s = student_hidden.astype(jnp.float32)
  if projection is not None:
    s = s @ projection['kernel'] + projection['bias']
  d = s - teacher_hidden.astype(jnp.float32)
  return _weighted_mean(jnp.mean(d**2, axis=(1, 2)), w)
