"""The integer-grid dense layer: the arithmetic the fake-quantized and the packed QDense share.

With dynamic per-token symmetric activations of 2..8 bits and a weight of 1..8 bits whose groups
are whole output rows (num_groups 1, 'row', or any G dividing the output rows), a QDense computes

    acc_p = x_codes . w_codes[p]                  (sums of integer products: exact)
    y     = acc_0 * (s_x * alpha_0) [+ acc_1 * (s_x * alpha_1)]

x_codes [..., K] and s_x [..., 1]: `quantizers.activation_codes`; w_codes[p] the weight codes of
plane p (P = 2 after weight splitting) and alpha_p [N] its scale per output row. The
fake-quantized layer (`layers.QDense`) computes acc_p with a float32 matmul of integer-valued
float32 codes (`dense`), the packed layer (`bitbert_jax.packed.layers`) with an int8 x int8
matmul accumulated in int32; both then finish with `finish`, the same float32 expression. The
two are therefore equal bit for bit, whereas `dot(x_codes * s_x, w_codes * alpha)` in float32
rounds differently from the int32 accumulation, and the discontinuous activation quantizer of
the next layer turns such ulps into flipped codes.

Exactness bound: a float32 sum of integers is exact while every partial sum has magnitude
<= 2^24. A dot over K inputs has |partial sums| <= K * max|x_code| * max|w_code|
(`quantizers.max_code`: 128 for 8-bit activations; 1 for binary/ternary weights, 2^(b-1) for
b-bit ones). K is therefore cut into chunks of at most 2^24 // (max|x_code| max|w_code|)
inputs (`chunks`): one chunk for every BERT layer at 1-2 bit weights (131072 inputs at A8),
chunks of 1024 for 8-bit weights at A8 (an FFN output layer, K = 1536 or 3072, has 2 or 3).
Each chunk's sum is exact in both paths; the chunk sums are converted to float32 and added in
order (`add_chunks`), the same float32 additions in both paths.

Equal programs, equal roundings: XLA on CPU contracts a multiply followed by an add (the bias,
the second plane's term) into a fused multiply-add, so both layers must present the same
expression in the same order: `finish(...)`, then `+ bias`. The scales themselves must be the
same bit for bit wherever they are computed, which is why the quantizers' sums have a fixed
order (`quantizers._tree_sum`).

Gradients (`dense`): the straight-through ones of the float formulation
y = dot(Q(x), Q(w_0) + Q(w_1)): the cotangents of Q(x) and of the summed kernel are computed
from the dequantized values exactly as autodiff of that dot does, and handed back as the codes'
cotangents (the value-space convention of `quantizers.weight_codes`); scales get none.
"""
import functools

import jax
import jax.numpy as jnp

from bitbert_jax.quant import quantizers

EXACT_SUM = 2**24  # float32 represents every integer of magnitude <= 2^24


def integer_path(act):
  """Whether the layer input becomes per-token integer codes (dynamic symmetric, 2..8 bits)."""
  return act is not None and act.mode == 'dynamic' and 2 <= act.bits <= 8


def applies(weight_bits, act, row_scales):
  """Whether a quantized QDense computes on the integer grid: 1..8-bit weight, dynamic 2..8-bit
  activations, and group scales that are whole output rows (row_scales is not None)."""
  return weight_bits <= 8 and integer_path(act) and row_scales is not None


def chunks(k, act_bits, weight_bits):
  """Static (lo, hi) slices of the K inputs, each short enough that its dot is exact in float32."""
  per = EXACT_SUM // (quantizers.max_code(act_bits) * quantizers.max_code(weight_bits))
  return tuple((lo, min(k, lo + per)) for lo in range(0, k, per))


def add_chunks(parts):
  """Sum of the float32 chunk sums, added left to right (the order both paths use)."""
  return functools.reduce(lambda a, b: a + b, parts)


def finish(accs, x_scale, row_scales):
  """y = sum_p accs[p] * (x_scale * row_scales[p]), planes added in order; float32.

  accs: P float32 [..., N] exact integer sums; x_scale [..., 1]; row_scales [P, N].
  """
  y = None
  for p, acc in enumerate(accs):
    term = acc * (x_scale * row_scales[p])
    y = term if y is None else y + term
  return y


def _float_accs(x_codes, w_codes, k_chunks, dtype):
  """P float32 [..., N]: x_codes . w_codes[p] with float matmuls, chunk by chunk."""
  xc = x_codes.astype(dtype)
  accs = []
  for p in range(w_codes.shape[0]):
    wc = w_codes[p].astype(dtype)
    parts = [jnp.dot(xc[..., lo:hi] if len(k_chunks) > 1 else xc,
                     wc[lo:hi] if len(k_chunks) > 1 else wc,
                     preferred_element_type=jnp.float32) for lo, hi in k_chunks]
    accs.append(add_chunks(parts))
  return accs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dense(x_codes, x_scale, w_codes, row_scales, k_chunks, dtype):
  return finish(_float_accs(x_codes, w_codes, k_chunks, dtype), x_scale, row_scales)


def _dense_fwd(x_codes, x_scale, w_codes, row_scales, k_chunks, dtype):
  y = _dense(x_codes, x_scale, w_codes, row_scales, k_chunks, dtype)
  return y, (x_codes, x_scale, w_codes, row_scales)


def _dense_bwd(k_chunks, dtype, res, g):
  del k_chunks
  x_codes, x_scale, w_codes, row_scales = res
  # The dequantized operands, bit for bit the fake quantizers' values, and the cotangents that
  # autodiff of the float formulation dot(Q(x), Q(w_0) + Q(w_1)) computes from them.
  xq = (x_codes.astype(jnp.float32) * x_scale).astype(x_codes.dtype)
  kernel = quantizers.from_codes(w_codes, row_scales[:, None, :])
  _, pullback = jax.vjp(lambda a, b: jnp.dot(a.astype(dtype), b.astype(dtype)), xq, kernel)
  gx, gk = pullback(g.astype(dtype))
  gw = jnp.broadcast_to(gk.astype(w_codes.dtype), w_codes.shape)
  return gx.astype(x_codes.dtype), jnp.zeros_like(x_scale), gw, jnp.zeros_like(row_scales)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x_codes, x_scale, w_codes, row_scales, act_bits, weight_bits, dtype=jnp.float32):
  """The fake-quantized layer on the integer grid: float32 [..., N] (see the module docstring).

  x_codes [..., K], x_scale [..., 1]: `quantizers.activation_codes`; w_codes [P, K, N]
  integer-valued float32 (kernel layout); row_scales float32 [P, N]. dtype: the matmul's
  operand dtype (codes are exact in bfloat16 too); it accumulates in float32.
  """
  k_chunks = chunks(x_codes.shape[-1], act_bits, weight_bits)
  return _dense(x_codes, x_scale, w_codes, row_scales, k_chunks, jnp.dtype(dtype))
