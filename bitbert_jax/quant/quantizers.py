"""Fake quantizers: pure functions with a straight-through gradient (`jax.custom_vjp`).

Every quantizer returns a tensor of quantized values with the input's shape and dtype. Scales,
thresholds and rounding are computed in float32 whatever the input dtype (a bfloat16 mean or count
of a few hundred elements is already off by a level), and the result is cast back once. Sums
(the means of binary and ternary) are pairwise sums in a fixed order (`_tree_sum`), so a scale
is the same bit for bit wherever it is computed: inside the jitted model or at export.

Groups: the flattened tensor is cut into `num_groups` equal consecutive rows, each with its own
scale; `num_groups = rows` of an output-major (PyTorch-layout) matrix is one scale per output row.
A `num_groups` that does not divide the tensor's size is a BitbertError.

sign(0) convention: `sign(0) = +1` (also for -0.0) everywhere: training, splitting and packing,
so that a binary weight is always one of two values and packs into exactly one bit. (DeepSpeed's
reference uses torch.sign, which gives 0.) An all-zero group has alpha = 0 and quantizes to zeros.

Rounding is round-half-to-even (jnp.round, like torch.round in the references).

Gradients (the straight-through estimator, STE):
  * binary, ternary: identity.
  * uniform (symmetric, asymmetric, symmetric_clip): identity where the clamp to the code range
    was not active, zero where it was, i.e. g * [lo <= round(x / s) <= hi]. Scales and zero points
    are treated as constants.
  * lsq, elastic_binary: see their docstrings (they also return gradients for their scales).

Idempotence (q(q(x)) == q(x)): binary and ternary are idempotent (up to float rounding of the
mean). The reference uniform forms are not: they divide by 2^b, so the positive extreme is clipped
by one step and the re-computed range (hence the scale) shrinks. The textbook symmetric form
(2^b - 1) is not either (its positive extreme is clipped by half a step and its negative extreme
grows by half a step). The textbook asymmetric form (`reference=False`) is: its extremes land on
the first and last codes, so the range, scale and zero point are reproduced.
"""
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from bitbert_jax.errors import BitbertError

UNIFORM_BITS = tuple(range(2, 17))  # symmetric; asymmetric also allows 1


def sign(x):
  """sign with sign(0) = +1: the convention shared with the packed format."""
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def _check_groups(shape, num_groups):
  size = math.prod(shape)
  if (isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral)
      or num_groups < 1 or size % num_groups):
    raise BitbertError(
        f'num_groups={num_groups!r} does not divide a tensor of shape {tuple(shape)} '
        f'(size {size}); use a positive divisor of {size}, e.g. 1 (one scale per tensor) '
        f'or {shape[0] if shape else 1} (one per row).')
  return int(num_groups)


def _check_bits(bits, valid, what):
  if isinstance(bits, bool) or bits not in valid:
    raise BitbertError(f'{what}: bits={bits!r} not supported; valid: '
                       f'{", ".join(map(str, valid))}')
  return int(bits)


def _grouped(x, num_groups):
  """x as float32 [num_groups, size // num_groups] (float64 stays float64: exact serving)."""
  return x.reshape(num_groups, -1).astype(jnp.promote_types(x.dtype, jnp.float32))


def _nonzero(v):
  # Divisor for a scale that may be 0 (an all-zero or constant group): the quotient is then 0.
  return jnp.where(v == 0, 1.0, v)


def _straight_through(value_and_mask, num_static):
  """custom_vjp of `value_and_mask(x, *static) -> (value, mask)`: gradient g, or g * mask.

  mask is None (identity) or a bool array of x's shape (True where the gradient passes).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(1, 1 + num_static)))
  def quantize(x, *static):
    return value_and_mask(x, *static)[0]

  def fwd(x, *static):
    return value_and_mask(x, *static)

  def bwd(*args):
    mask, g = args[-2:]
    return (g if mask is None else jnp.where(mask, g, jnp.zeros_like(g)),)

  quantize.defvjp(fwd, bwd)
  return quantize


def _tree_sum(g):
  """Row sums [G, 1] of g [G, n] float32, by pairwise halving.

  A fixed sequence of elementwise float32 additions, so the sums are the same bit for bit in
  every program that computes them. An XLA reduce is not: how it associates depends on its
  fusion and layout, and the jitted model and the export (which quantizes each weight on its
  own) would get scales an ulp apart, enough to make packed and fake-quantized logits differ.
  Halves while the width is even; an odd remainder (e.g. 9 of 384 x 384 = 2^14 x 9) is
  zero-padded to a power of 2 (adding 0 is exact) and halved on.
  """
  while g.shape[1] > 1:
    n = g.shape[1]
    if n % 2:
      g = jnp.pad(g, ((0, 0), (0, (1 << (n - 1).bit_length()) - n)))
      n = g.shape[1]
    g = g[:, :n // 2] + g[:, n // 2:]
  return g


def _mean(g):
  """Row means [G, 1]: the pairwise sum over a correctly rounded division by n. XLA rewrites a
  division by a constant into a multiplication by its (rounded) reciprocal; the barrier keeps
  n opaque, so that e.g. the mean of w/2 is exactly half the mean of w."""
  return _tree_sum(g) / jax.lax.optimization_barrier(jnp.float32(g.shape[1]))


def _binary_codes(x, num_groups):
  g = _grouped(x, num_groups)
  alpha = _mean(jnp.abs(g))
  return sign(g), alpha, None


def _centered_codes(x, num_groups):
  """BiT's centred binary codes: sign(x - mu), alpha = mean|x - mu|, mu = mean(x) per group."""
  g = _grouped(x, num_groups)
  d = g - _mean(g)
  return sign(d), _mean(jnp.abs(d)), None


def _ternary_codes(x, num_groups):
  g = _grouped(x, num_groups)
  absg = jnp.abs(g)
  delta = 0.7 * _mean(absg)
  keep = absg > delta
  count = _tree_sum(keep.astype(jnp.float32))  # exact: integers below 2^24
  alpha = _tree_sum(jnp.where(keep, absg, 0.0)) / jnp.maximum(count, 1.0)
  return jnp.where(keep, sign(g), 0.0), alpha, None


def _round_clip(g, scale, lo, hi):
  """(clip(round(g / scale), lo, hi), [no clamp]) in float32; scale 0 gives 0 codes."""
  codes = jnp.round(g / _nonzero(scale))
  return jnp.clip(codes, lo, hi), (codes >= lo) & (codes <= hi)


def _symmetric_codes(x, bits, num_groups, reference):
  g = _grouped(x, num_groups)
  levels = 2.0**bits if reference else 2.0**bits - 1
  scale = 2.0 * jnp.max(jnp.abs(g), axis=1, keepdims=True) / levels
  codes, mask = _round_clip(g, scale, -(2.0**(bits - 1)), 2.0**(bits - 1) - 1)
  return codes, scale, mask


def _as_value(codes_fn):
  """`codes_fn(x, ...) -> (codes [G, n], scale [G, 1], mask)` as `(value, mask)` in x's shape:
  value = codes * scale per group (float32, then x's dtype)."""

  def value_and_mask(x, *static):
    codes, scale, mask = codes_fn(x, *static)
    value = (codes * scale).reshape(x.shape).astype(x.dtype)
    return value, None if mask is None else mask.reshape(x.shape)

  return value_and_mask


_binary_value = _as_value(_binary_codes)


def _centered_value(x, num_groups):
  codes, alpha, _ = _centered_codes(x, num_groups)
  value = codes * alpha + _mean(_grouped(x, num_groups))
  return value.reshape(x.shape).astype(x.dtype), None
_ternary_value = _as_value(_ternary_codes)
_symmetric_value = _as_value(_symmetric_codes)


def _asymmetric_value(x, bits, num_groups, reference):
  g = _grouped(x, num_groups)
  gmin = jnp.min(g, axis=1, keepdims=True)
  levels = 2.0**bits if reference else 2.0**bits - 1
  scale = (jnp.max(g, axis=1, keepdims=True) - gmin) / levels
  zero = jnp.round(gmin / _nonzero(scale)) * scale
  codes, mask = _round_clip(g - zero, scale, 0.0, 2.0**bits - 1)
  # A constant group (scale 0) is exactly representable: keep it (and its gradient).
  q = jnp.where(scale == 0, g, codes * scale + zero)
  mask = mask | (scale == 0)
  return q.reshape(x.shape).astype(x.dtype), mask.reshape(x.shape)


def _symmetric_clip_value(x, clip, bits):
  scale = 2.0 * clip / 2.0**bits
  codes, mask = _round_clip(x.astype(jnp.float32), scale, -(2.0**(bits - 1)),
                            2.0**(bits - 1) - 1)
  return (codes * scale).astype(x.dtype), mask


# Jitted so that eager calls compile once per shape instead of dispatching op by op.
_binary = jax.jit(_straight_through(_binary_value, 1), static_argnums=(1,))
_centered = jax.jit(_straight_through(_centered_value, 1), static_argnums=(1,))
_ternary = jax.jit(_straight_through(_ternary_value, 1), static_argnums=(1,))
_symmetric = jax.jit(_straight_through(_symmetric_value, 3), static_argnums=(1, 2, 3))
_asymmetric = jax.jit(_straight_through(_asymmetric_value, 3), static_argnums=(1, 2, 3))


def binary(x, num_groups=1):
  """BWN: alpha * sign(x), alpha = mean|x| per group. Gradient: identity."""
  return _binary(x, _check_groups(x.shape, num_groups))


def centered_binary(x, num_groups=1):
  """BiT's mean-centred binarization: alpha * sign(x - mu) + mu, mu = mean(x), alpha =
  mean|x - mu| per group (sign(0) = +1). Gradient: identity."""
  return _centered(x, _check_groups(x.shape, num_groups))


def ternary(x, num_groups=1):
  """TWN: alpha * sign(x) * [|x| > delta], delta = 0.7 mean|x|, alpha = mean of |x| above delta.

  Only an all-zero group has every entry at or below its threshold (max|x| >= mean|x| > delta
  otherwise); it quantizes to zeros. Gradient: identity.
  """
  return _ternary(x, _check_groups(x.shape, num_groups))


def symmetric(x, bits, num_groups=1, reference=True):
  """Uniform symmetric: clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) * s per group.

  reference=True (XTC): s = 2 max|x| / 2^b. reference=False (textbook): s = 2 max|x| / (2^b - 1).
  Gradient: g where the clamp was not active, else 0.
  """
  bits = _check_bits(bits, UNIFORM_BITS, 'symmetric quantizer')
  return _symmetric(x, bits, _check_groups(x.shape, num_groups), bool(reference))


def asymmetric(x, bits, num_groups=1, reference=True):
  """Uniform asymmetric: clamp(round((x - z) / s), 0, 2^b - 1) * s + z, z = round(min / s) * s.

  reference=True (XTC): s = (max - min) / 2^b. reference=False (textbook): s = (max - min) /
  (2^b - 1). A constant group is returned unchanged. Gradient: g where the clamp was not active.
  """
  bits = _check_bits(bits, (1,) + UNIFORM_BITS, 'asymmetric quantizer')
  return _asymmetric(x, bits, _check_groups(x.shape, num_groups), bool(reference))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _symmetric_clip(x, clip, bits):
  return _symmetric_clip_value(x, clip, bits)[0]


def _symmetric_clip_fwd(x, clip, bits):
  value, mask = _symmetric_clip_value(x, clip, bits)
  return value, (mask, clip)


def _symmetric_clip_bwd(bits, res, g):
  del bits
  mask, clip = res
  return jnp.where(mask, g, jnp.zeros_like(g)), jnp.zeros_like(clip)


_symmetric_clip.defvjp(_symmetric_clip_fwd, _symmetric_clip_bwd)
_jit_symmetric_clip = jax.jit(_symmetric_clip, static_argnums=(2,))


def symmetric_clip(x, clip, bits):
  """Symmetric uniform with a given range (static activations): s = 2 clip / 2^b, one scale.

  clip: scalar >= 0 (e.g. an EMA of max|x|); values beyond it are clamped and get no gradient.
  No gradient flows to `clip` (it is a tracked statistic, not a parameter).
  """
  bits = _check_bits(bits, UNIFORM_BITS, 'symmetric_clip quantizer')
  return _jit_symmetric_clip(x, jnp.asarray(clip, jnp.float32), bits)


def lsq_levels(bits, signed=True):
  """(Qn, Qp): the code range of LSQ, [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
  bits = _check_bits(bits, UNIFORM_BITS if signed else (1,) + UNIFORM_BITS, 'lsq quantizer')
  return (-(2**(bits - 1)), 2**(bits - 1) - 1) if signed else (0, 2**bits - 1)


def _reduce_to(g, shape):
  """Sums a broadcast cotangent back to `shape` (a trailing-aligned broadcast)."""
  lead = g.ndim - len(shape)
  g = jnp.sum(g, axis=tuple(range(lead))) if lead else g
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
  return jnp.sum(g, axis=axes, keepdims=True) if axes else g


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq(x, step, qn, qp):
  v = x.astype(jnp.float32) / step
  return (jnp.clip(jnp.round(v), qn, qp) * step).astype(x.dtype)


def _lsq_fwd(x, step, qn, qp):
  return _lsq(x, step, qn, qp), (x, step)


def _lsq_bwd(qn, qp, res, g):
  x, step = res
  v = x.astype(jnp.float32) / step
  below, above = v < qn, v > qp
  inside = ~(below | above)
  g32 = g.astype(jnp.float32)
  dstep = jnp.where(below, float(qn), jnp.where(above, float(qp), jnp.round(v) - v))
  grad_scale = 1.0 / math.sqrt(x.size * qp)
  gstep = _reduce_to(g32 * dstep, step.shape) * grad_scale
  return jnp.where(inside, g, jnp.zeros_like(g)), gstep.astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)
_jit_lsq = jax.jit(_lsq, static_argnums=(2, 3))


def lsq(x, step, bits, signed=True):
  """LSQ (Esser et al., ICLR 2020): clip(round(x / s), Qn, Qp) * s with a learned step s > 0.

  step: positive, broadcastable to x (a scalar per layer here); the caller keeps it positive.
  Gradients, v = x / s: x: g where Qn <= v <= Qp, else 0. s: sum(g * d) / sqrt(x.size * Qp) with
  d = round(v) - v inside, Qn below, Qp above (LSQ's gradient and its gradient scaling).
  """
  qn, qp = lsq_levels(bits, signed)
  return _jit_lsq(x, jnp.asarray(step, jnp.float32), qn, qp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _elastic(x, alpha, beta, signed):
  v = (x.astype(jnp.float32) - beta) / alpha
  codes = sign(v) if signed else jnp.round(jnp.clip(v, 0.0, 1.0))
  return (alpha * codes).astype(x.dtype)


def _elastic_fwd(x, alpha, beta, signed):
  return _elastic(x, alpha, beta, signed), (x, alpha, beta)


def _elastic_bwd(signed, res, g):
  x, alpha, beta = res
  v = (x.astype(jnp.float32) - beta) / alpha
  lo = -1.0 if signed else 0.0
  inside = (v >= lo) & (v <= 1.0)
  g32 = g.astype(jnp.float32)
  gx = jnp.where(inside, g32, 0.0)
  if signed:
    dalpha = sign(v)  # exact: alpha * sign(x - beta) is linear in alpha
  else:
    dalpha = jnp.where(v > 1.0, 1.0, jnp.where(inside, jnp.round(v) - v, 0.0))
  galpha = _reduce_to(g32 * dalpha, alpha.shape) / math.sqrt(x.size)
  gbeta = -_reduce_to(gx, beta.shape)
  return gx.astype(g.dtype), galpha.astype(alpha.dtype), gbeta.astype(beta.dtype)


_elastic.defvjp(_elastic_fwd, _elastic_bwd)
_jit_elastic = jax.jit(_elastic, static_argnums=(3,))


def elastic_binary(x, alpha, beta, signed=True):
  """BiT elastic binarization (Liu et al., NeurIPS 2022) with learned scale alpha and offset beta.

  signed: alpha * sign(x - beta) (sign(0) = +1); unsigned (non-negative inputs):
  alpha * round(clip((x - beta) / alpha, 0, 1)). alpha > 0 (kept so by the caller), beta
  broadcastable to x (one per input feature). Gradients, as BiT's code, v = (x - beta) / alpha:
  x: g where v is inside the clip range ([-1, 1] signed, [0, 1] unsigned), else 0; beta: minus
  that, summed to beta's shape; alpha: sum(g * d) / sqrt(x.size) (LSQ scaling with Qp = 1), d =
  sign(v) signed (the exact derivative), and round(v) - v inside, 1 above, 0 below unsigned.
  """
  return _jit_elastic(x, jnp.asarray(alpha, jnp.float32), jnp.asarray(beta, jnp.float32),
                      bool(signed))


def quantize_weight(w, bits, num_groups=1, mode='bwn'):
  """Dispatch on bits: 1 -> binary (mode 'bwn', or 'centered': `centered_binary`), 2 -> ternary,
  3..8 -> symmetric (reference), 32 -> unchanged."""
  if bits >= 32:
    return w
  _check_bits(bits, (1, 2) + UNIFORM_BITS, 'quantize_weight')
  if bits == 1:
    return centered_binary(w, num_groups) if mode == 'centered' else binary(w, num_groups)
  if bits == 2:
    return ternary(w, num_groups)
  return symmetric(w, bits, num_groups)


def quantize_activation(x, bits):
  """Dynamic symmetric quantization (reference form), one scale per token (row of the last dim)."""
  if bits >= 32:
    return x
  return symmetric(x, bits, x.size // x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Integer codes and scales (the integer-grid layers; packing).
#
# `weight_codes` and `activation_codes` split a quantized tensor into integer-valued codes and
# float32 scales, value = codes * scale, bit for bit the value `quantize_weight` /
# `quantize_activation` return. Their gradient is the straight-through one *in value space*:
# the cotangent that arrives for the codes is taken to be d loss / d value and passes to the
# input as the value quantizer's would (identity for binary and ternary, masked where the
# uniform clamp was active); the scales get none (constants, as above). A consumer must
# therefore hand back, as the codes' cotangent, the cotangent of the value it computes from
# codes and scales: `from_codes` does, and so does the integer-grid dense
# (`bitbert_jax.quant.grid.dense`). Autodiff through an expression such as `codes * scale`
# would not (it multiplies by the scale once more).


def _codes_straight_through(codes_fn, num_static):
  """custom_vjp of `codes_fn(x, *static) -> (codes [G, n], scale [G, 1], mask)`.

  Returns (codes in x's shape and dtype, scale float32 [G]); cotangent of x: the codes'
  cotangent, times the mask where there is one.
  """

  def codes_and_scale(x, *static):
    codes, scale, mask = codes_fn(x, *static)
    # Codes are small integers (|code| <= 128): exact in any float dtype, bfloat16 included.
    codes = codes.reshape(x.shape).astype(x.dtype)
    return (codes, scale.reshape(-1)), None if mask is None else mask.reshape(x.shape)

  @functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(1, 1 + num_static)))
  def quantize(x, *static):
    return codes_and_scale(x, *static)[0]

  def fwd(x, *static):
    return codes_and_scale(x, *static)

  def bwd(*args):
    mask, (g_codes, _) = args[-2:]
    return (g_codes if mask is None else jnp.where(mask, g_codes, jnp.zeros_like(g_codes)),)

  quantize.defvjp(fwd, bwd)
  return quantize


_binary_codes_ste = jax.jit(_codes_straight_through(_binary_codes, 1), static_argnums=(1,))
_ternary_codes_ste = jax.jit(_codes_straight_through(_ternary_codes, 1), static_argnums=(1,))
_centered_codes_ste = jax.jit(_codes_straight_through(_centered_codes, 1), static_argnums=(1,))
_symmetric_codes_ste = jax.jit(_codes_straight_through(_symmetric_codes, 3),
                               static_argnums=(1, 2, 3))


def max_code(bits):
  """Largest |code| of a `bits`-bit weight or activation code: 1 for binary and ternary,
  2^(bits-1) for uniform symmetric codes (the most negative one)."""
  return 1 if bits <= 2 else 2**(bits - 1)


def weight_codes(w, bits, num_groups=1):
  """`quantize_weight` as (codes, scales): codes in w's shape and dtype, integer-valued
  (binary +-1, ternary {-1, 0, 1}, 3..8 bits in [-2^(b-1), 2^(b-1) - 1]); scales float32
  [num_groups] (alpha, or the uniform step). codes * scale per group == quantize_weight(w, ...)
  bit for bit. Gradient: straight-through in value space (see above). bits: 1..8.
  """
  _check_bits(bits, (1, 2) + tuple(b for b in UNIFORM_BITS if b <= 8), 'weight_codes')
  num_groups = _check_groups(w.shape, num_groups)
  if bits == 1:
    return _binary_codes_ste(w, num_groups)
  if bits == 2:
    return _ternary_codes_ste(w, num_groups)
  return _symmetric_codes_ste(w, bits, num_groups, True)


def centered_binary_codes(w, num_groups=1):
  """`centered_binary` as (codes, scales, offsets): codes +-1 in w's shape and dtype, scales
  (alpha) and offsets (mu) float32 [num_groups]; value = codes * alpha + mu per group.
  Gradient: straight-through to the codes (as `weight_codes`); none to scales or offsets."""
  num_groups = _check_groups(w.shape, num_groups)
  codes, scales = _centered_codes_ste(w, num_groups)
  offsets = jax.lax.stop_gradient(_jit_mean(w, num_groups).reshape(-1))
  return codes, scales, offsets


_jit_mean = jax.jit(lambda w, n: _mean(_grouped(w, n)), static_argnums=(1,))


def activation_codes(x, bits):
  """`quantize_activation` (dynamic, one scale per token) as (codes, scale).

  x: [..., K] -> (codes [..., K] in x's dtype, integer-valued in [-2^(b-1), 2^(b-1) - 1];
  scale float32 [..., 1]); (codes * scale).astype(x.dtype) == quantize_activation(x, bits) bit
  for bit. Gradient: straight-through in value space, zero where the clamp was active.
  """
  bits = _check_bits(bits, UNIFORM_BITS, 'activation_codes')
  codes, scale = _symmetric_codes_ste(x, bits, _check_groups(x.shape, x.size // x.shape[-1]),
                                      True)
  return codes, scale.reshape(x.shape[:-1] + (1,))


@jax.custom_vjp
def _from_codes(codes, scales):
  value = codes[0] * scales[0]
  for p in range(1, codes.shape[0]):
    value = value + codes[p] * scales[p]
  return value


def _from_codes_fwd(codes, scales):
  return _from_codes(codes, scales), scales


def _from_codes_bwd(scales, g):
  return jnp.broadcast_to(g, (scales.shape[0],) + g.shape), jnp.zeros_like(scales)


_from_codes.defvjp(_from_codes_fwd, _from_codes_bwd)


def from_codes(codes, scales):
  """The value of P planes of codes: sum_p codes[p] * scales[p] (planes added in order).

  codes: [P, ...] integer-valued float32; scales: float32 [P, ...] broadcastable to codes (one
  per element, row or group, already expanded). Equals the planes' `quantize_weight` values added
  in order, bit for bit. Gradient: each plane's codes get the value's cotangent (the
  straight-through convention of `weight_codes`); the scales none.
  """
  return _from_codes(jnp.asarray(codes, jnp.float32), jnp.asarray(scales, jnp.float32))
