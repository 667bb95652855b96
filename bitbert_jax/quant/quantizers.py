"""Fake quantizers: pure functions with a straight-through gradient (`jax.custom_vjp`).

Every quantizer returns a float tensor of quantized values with the input's shape and dtype.
Groups: the flattened tensor is cut into `num_groups` equal consecutive rows, each with its own
scale; `num_groups = rows` of an output-major (PyTorch-layout) matrix is one scale per output row.

sign(0) convention: `sign(0) = +1` everywhere (training, splitting, packing), so that a binary
weight is always one of two values and packs into exactly one bit.
"""
import functools

import jax
import jax.numpy as jnp

from bitbert_jax.errors import BitbertError


def sign(x):
  """sign with sign(0) = +1: the convention shared with the packed format."""
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def _grouped(x, num_groups):
  if num_groups < 1 or x.size % num_groups:
    raise BitbertError(
        f'num_groups={num_groups} does not divide a tensor of shape {x.shape} '
        f'(size {x.size}); use a divisor of {x.size}.')
  return x.reshape(num_groups, -1)


def _safe_div(a, b):
  return a / jnp.where(b == 0, 1.0, b)


def _binary_fwd_impl(x, num_groups):
  g = _grouped(x, num_groups)
  alpha = jnp.mean(jnp.abs(g), axis=1, keepdims=True)
  return (alpha * sign(g)).reshape(x.shape)


def _ternary_fwd_impl(x, num_groups):
  g = _grouped(x, num_groups)
  absg = jnp.abs(g)
  delta = 0.7 * jnp.mean(absg, axis=1, keepdims=True)
  mask = (absg > delta).astype(x.dtype)
  alpha = _safe_div(jnp.sum(absg * mask, axis=1, keepdims=True),
                    jnp.sum(mask, axis=1, keepdims=True))
  return (alpha * sign(g) * mask).reshape(x.shape)


def _symmetric_impl(x, bits, num_groups):
  g = _grouped(x, num_groups)
  scale = 2.0 * jnp.max(jnp.abs(g), axis=1, keepdims=True) / 2.0**bits
  lo, hi = -(2.0**(bits - 1)), 2.0**(bits - 1) - 1
  q = jnp.clip(jnp.round(_safe_div(g, scale)), lo, hi) * scale
  return q.reshape(x.shape)


def _asymmetric_impl(x, bits, num_groups):
  g = _grouped(x, num_groups)
  gmin = jnp.min(g, axis=1, keepdims=True)
  gmax = jnp.max(g, axis=1, keepdims=True)
  scale = (gmax - gmin) / 2.0**bits
  zero = jnp.round(_safe_div(gmin, scale)) * scale
  q = jnp.clip(jnp.round(_safe_div(g - zero, scale)), 0, 2.0**bits - 1) * scale + zero
  return q.reshape(x.shape)


def _straight_through(impl):
  """Wraps `impl(x, *static)` with an identity gradient with respect to x."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(1, 3)))
  def quantize(x, a=None, b=None):
    return impl(x, *[v for v in (a, b) if v is not None])

  def fwd(x, a, b):
    return quantize(x, a, b), None

  def bwd(a, b, _, g):
    del a, b
    return (g,)

  quantize.defvjp(fwd, bwd)
  return quantize


_binary = _straight_through(_binary_fwd_impl)
_ternary = _straight_through(_ternary_fwd_impl)
_symmetric = _straight_through(_symmetric_impl)
_asymmetric = _straight_through(_asymmetric_impl)


def binary(x, num_groups=1):
  """BWN: alpha * sign(x), alpha = mean|x| per group."""
  return _binary(x, num_groups)


def ternary(x, num_groups=1):
  """TWN: alpha * sign(x) * [|x| > 0.7 mean|x|], alpha = mean of |x| above the threshold."""
  return _ternary(x, num_groups)


def symmetric(x, bits, num_groups=1):
  """Uniform symmetric, scale 2 max|x| / 2^bits (the XTC reference's form)."""
  return _symmetric(x, bits, num_groups)


def asymmetric(x, bits, num_groups=1):
  """Uniform asymmetric, scale (max - min) / 2^bits (the XTC reference's form)."""
  return _asymmetric(x, bits, num_groups)


def quantize_weight(w, bits, num_groups=1):
  """Dispatch on bits: 1 -> binary, 2 -> ternary, >= 3 -> symmetric, 32 -> unchanged."""
  if bits >= 32:
    return w
  if bits == 1:
    return binary(w, num_groups)
  if bits == 2:
    return ternary(w, num_groups)
  return symmetric(w, bits, num_groups)


def quantize_activation(x, bits):
  """Dynamic symmetric quantization, one scale per token (per row of the last dimension)."""
  if bits >= 32:
    return x
  rows = x.size // x.shape[-1]
  return symmetric(x, bits, rows)
