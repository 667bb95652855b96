"""Layer bodies for inference from packed weights (the format of `bitbert_jax.export`).

`QDense` / `QEmbed` call these when `policy.packed` is set and their weight is quantized. The
module scope then holds packed variables instead of a float latent weight:

  QDense:  kernel_codes  uint8 [rows, row_bytes]     rows = features (output-major, PyTorch)
           kernel_scale  float32 [G]                  G = the rule's groups ('row' -> rows)
           bias          float [rows]                 float16 or float32 as stored
  QEmbed:  embedding_codes uint8 [V, row_bytes], embedding_scale float32 [G]

A split (binary after weight splitting) weight carries a leading plane axis of 2 on both codes
and scales; its bias is stored already summed ([rows]), since the layer only ever uses b0 + b1.
Codes are unpacked inside the jitted computation (`packing.jnp_unpack_codes`); nothing is
dequantized to float at load time.

Integer path: with dynamic symmetric activation quantization of 2..8 bits and weight groups
that are whole output rows (num_groups 1, 'row', or any G dividing rows), QDense multiplies
per-token int8 activation codes with the int8 weight codes in one
`lax.dot_general(..., preferred_element_type=int32)` (both planes of a split weight at once)
and rescales by activation scale x weight scale. Otherwise the codes are dequantized to float
and the layer runs like the fake-quantized one.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from bitbert_jax.quant import activations
from bitbert_jax.quant import packing

CODES_SUFFIX = '_codes'
SCALE_SUFFIX = '_scale'


def _path(module, name):
  # Same path as layers.param_path (not imported: layers imports this module).
  return '/'.join(module.scope.path + (name,))


def packed_shapes(bits, num_groups, rows, cols, planes):
  """(codes shape, scale shape) of a packed [rows, cols] matrix; planes 2 adds a leading 2."""
  lead = (2,) if planes == 2 else ()
  return lead + (rows, packing.row_bytes(cols, bits)), lead + (num_groups,)


def _packed_vars(module, name, quant, rows, cols):
  """Declares/reads `{name}_codes` and `{name}_scale`; returns them with a plane axis [P, ...]."""
  planes = 2 if module.policy.is_split(_path(module, name)) else 1
  groups = packing.resolve_groups(quant.num_groups, rows)
  packing.group_size((rows, cols), groups)  # raises a BitbertError when G does not divide
  codes_shape, scale_shape = packed_shapes(quant.bits, groups, rows, cols, planes)
  codes = module.param(name + CODES_SUFFIX, nn.initializers.zeros_init(), codes_shape, jnp.uint8)
  scale = module.param(name + SCALE_SUFFIX, nn.initializers.ones_init(), scale_shape,
                       jnp.float32)
  return codes.reshape((-1,) + codes.shape[-2:]), scale.reshape(-1, groups), groups


def integer_path(act):
  """Whether activations become per-token int8 codes (dynamic symmetric, 2..8 bits)."""
  return act is not None and act.mode == 'dynamic' and 2 <= act.bits <= 8


def token_codes(x, bits):
  """Per-token symmetric activation codes, bit-for-bit the rule of `quantize_activation`.

  x: [..., K] -> (codes int8 [..., K], scale [..., 1] in x.dtype); x_q = codes * scale.
  """
  scale = 2.0 * jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 2.0**bits
  safe = jnp.where(scale == 0, 1.0, scale).astype(x.dtype)
  lo, hi = -(2.0**(bits - 1)), 2.0**(bits - 1) - 1
  return jnp.clip(jnp.round(x / safe), lo, hi).astype(jnp.int8), scale


def int_matmul(x, w_codes, w_row_scale, act_bits):
  """y = Q(x) W on integers.

  x: [..., K] float; w_codes: int8 [P, N, K] (P planes, output-major); w_row_scale: [P, N].
  Returns float32 [..., N] = act_scale * sum_p w_row_scale[p] * (x_codes . w_codes[p]).
  """
  p, n, k = w_codes.shape
  xc, xs = token_codes(x, act_bits)
  acc = jax.lax.dot_general(xc, w_codes.reshape(p * n, k), (((xc.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)  # [..., P * N]
  acc = acc.reshape(acc.shape[:-1] + (p, n)).astype(jnp.float32)
  return (acc * w_row_scale).sum(-2) * xs.astype(jnp.float32)


def dequantized(codes, scale, bits, groups, rows, cols):
  """Float32 [rows, cols] = sum over planes of code * group scale (as the fake quantizer)."""
  w = packing.jnp_unpack_codes(codes, bits, cols).astype(jnp.float32)  # [P, rows, cols]
  return (w * packing.element_scales(scale, groups, rows, cols)).sum(0)


def packed_dense(module, x):
  """QDense body from packed codes. x: [..., in] -> [..., features] in module.dtype."""
  path = _path(module, 'kernel')
  quant = module.policy.weight_quant(path)
  act = module.policy.input_quant(path)
  rows, cols = module.features, x.shape[-1]
  codes, scale, groups = _packed_vars(module, 'kernel', quant, rows, cols)
  row_scale = packing.row_scales(scale, groups, rows, cols)
  if integer_path(act) and row_scale is not None:
    w = packing.jnp_unpack_codes(codes, quant.bits, cols)  # int8 [P, rows, cols]
    y = int_matmul(x, w, row_scale, act.bits).astype(module.dtype)
  else:
    kernel = dequantized(codes, scale, quant.bits, groups, rows, cols)
    x = activations.quantize_input(module, x, act, getattr(module, 'nonnegative_input', False))
    y = jnp.dot(x.astype(module.dtype), kernel.T.astype(module.dtype))
  if module.use_bias:
    bias = module.param('bias', nn.initializers.zeros_init(), (rows,), jnp.float32)
    y = y + bias.astype(module.dtype)
  return y


def packed_embed(module, ids):
  """QEmbed body: gathers packed rows by id, then unpacks only those. ids [...] -> [..., H]."""
  quant = module.policy.weight_quant(_path(module, 'embedding'))
  rows, cols = module.num_embeddings, module.features
  codes, scale, groups = _packed_vars(module, 'embedding', quant, rows, cols)
  picked = jnp.take(codes, ids, axis=1)  # [P, ..., row_bytes]
  values = packing.jnp_unpack_codes(picked, quant.bits, cols).astype(jnp.float32)
  size = rows * cols // groups
  if size % cols == 0:  # whole rows per group: one scale per gathered row
    s = jnp.take(scale, ids // (size // cols), axis=1)[..., None]
  else:
    s = jnp.take(scale, (ids[..., None] * cols + jnp.arange(cols)) // size, axis=1)
  return (values * s).sum(0).astype(module.dtype)
