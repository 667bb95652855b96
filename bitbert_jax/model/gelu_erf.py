"""GELU with erf written in +, -, *, / and exp: the float64 GELU of packed inference.

ONNX Runtime (CPU) has no float64 Erf, so the float64 serving path (`predict --precision=float64`
and the float64 ONNX graph of `bitbert_jax.packed.onnx_graph`) computes erf with Abramowitz & Stegun 7.1.26
(|error| <= 1.5e-7, the size of float32 erf's own rounding): both run these ops in this order,
so the two agree to float64 rounding.

  erf(|z|) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2),   t = 1 / (1 + p |z|)
"""
import jax.numpy as jnp
import numpy as np

P = 0.3275911
A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # a1 .. a5
SQRT_HALF = float(np.sqrt(0.5))


def erf(z):
  a = jnp.abs(z)
  t = 1.0 / (1.0 + P * a)
  poly = A[4]
  for c in reversed(A[:4]):
    poly = poly * t + c
  e = 1.0 - poly * t * jnp.exp(-(a * a))
  return jnp.sign(z) * e


def gelu(x):
  """x (1 + erf(x / sqrt 2)) / 2, in x's dtype."""
  return x * (erf(x * SQRT_HALF) + 1.0) * 0.5
