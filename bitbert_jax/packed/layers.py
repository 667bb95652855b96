"""The JAX forward pass on packed weights: `QDense` / `QEmbed` bodies that read codes.

A model whose policy has `packed=True` runs under `packed_mode()` (or through `apply`): the
context swaps the body of every quantized `QDense` / `QEmbed` call for `packed_dense` /
`packed_embed`, so the model and quant code never import this package. The module scope then
holds packed variables instead of a float latent weight:

  QDense:  kernel_codes  uint8 [rows, row_bytes]     rows = features (output-major, PyTorch)
           kernel_scale  float32 [G]                  G = the rule's groups ('row' -> rows)
           bias          float [rows]                 float16 or float32 as stored
  QEmbed:  embedding_codes uint8 [V, row_bytes], embedding_scale float32 [G]

A split (binary after weight splitting) weight carries a leading plane axis of 2 on both codes
and scales (`policy.is_split`, per rule: a weight already 1-bit before splitting has one); its
bias is stored already summed ([rows]), since the layer only ever uses b0 + b1.
Codes are unpacked inside the jitted computation (`bits.jnp_unpack_codes`); nothing is
dequantized to float at load time.

Integer path (`grid`): with dynamic symmetric activation quantization of 2..8 bits and weight
groups that are whole output rows (num_groups 1, 'row', or any G dividing rows), QDense
multiplies per-token int8 activation codes with the int8 weight codes in
`lax.dot_general(..., preferred_element_type=int32)` (both planes of a split weight at once; K in
chunks that keep a float32 sum exact, one chunk unless the weight has 5+ bits), and rescales
with `grid.finish`, the expression the fake-quantized QDense uses on its exact float32 sums:
the two compute the same float32 result bit for bit. Otherwise the codes are dequantized to
float and the layer runs like the fake-quantized one.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from bitbert_jax.packed.bits import jnp_unpack_codes
from bitbert_jax.packed.format import CODES_SUFFIX, SCALE_SUFFIX, row_bytes
from bitbert_jax.quant import activations
from bitbert_jax.quant import grid
from bitbert_jax.quant import groups as groups_lib
from bitbert_jax.quant import quantizers
from bitbert_jax.quant.layers import QDense, QEmbed, param_path


def packed_shapes(bits, num_groups, rows, cols, planes):
  """(codes shape, scale shape) of a packed [rows, cols] matrix; planes 2 adds a leading 2."""
  lead = (2,) if planes == 2 else ()
  return lead + (rows, row_bytes(cols, bits)), lead + (num_groups,)


def _packed_vars(module, name, quant, rows, cols):
  """Declares/reads `{name}_codes` and `{name}_scale`; returns them with a plane axis [P, ...]."""
  planes = 2 if module.policy.is_split(param_path(module, name)) else 1
  groups = groups_lib.resolve_groups(quant.num_groups, rows)
  groups_lib.group_size((rows, cols), groups)  # raises a BitbertError when G does not divide
  codes_shape, scale_shape = packed_shapes(quant.bits, groups, rows, cols, planes)
  codes = module.param(name + CODES_SUFFIX, nn.initializers.zeros_init(), codes_shape, jnp.uint8)
  scale = module.param(name + SCALE_SUFFIX, nn.initializers.ones_init(), scale_shape,
                       jnp.float32)
  return codes.reshape((-1,) + codes.shape[-2:]), scale.reshape(-1, groups), groups


def token_codes(x, bits):
  """Per-token symmetric activation codes, bit-for-bit the rule of `quantize_activation`.

  x: [..., K] -> (codes int8 [..., K], scale float32 [..., 1]); x_q = codes * scale.
  """
  codes, scale = quantizers.activation_codes(x, bits)
  return codes.astype(jnp.int8), scale


def int_matmul(x, w_codes, w_row_scale, act_bits, weight_bits=8):
  """y = Q(x) W on integers, bit for bit the fake-quantized QDense (`grid`).

  x: [..., K] float; w_codes: int8 [P, N, K] (P planes, output-major); w_row_scale: [P, N].
  weight_bits: the codes' width (sets how K is chunked so that the float32 sums are exact).
  Returns float32 [..., N] = sum_p (x_codes . w_codes[p]) * (act_scale * w_row_scale[p]).
  """
  p, n, k = w_codes.shape
  xc, xs = token_codes(x, act_bits)
  parts = []
  for lo, hi in grid.chunks(k, act_bits, weight_bits):
    xk, wk = (xc, w_codes) if hi - lo == k else (xc[..., lo:hi], w_codes[..., lo:hi])
    # Both planes in one dot: [..., K] x [P * N, K] -> [..., P * N], int32 accumulation.
    acc = jax.lax.dot_general(xk, wk.reshape(p * n, hi - lo), (((xk.ndim - 1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    parts.append(acc.astype(jnp.float32).reshape(acc.shape[:-1] + (p, n)))
  acc = grid.add_chunks(parts)
  return grid.finish([acc[..., i, :] for i in range(p)], xs, w_row_scale)


def dequantized(codes, scale, bits, groups, rows, cols):
  """Float32 [rows, cols] = sum over planes of code * group scale (as the fake quantizer)."""
  w = jnp_unpack_codes(codes, bits, cols).astype(jnp.float32)  # [P, rows, cols]
  return (w * groups_lib.element_scales(scale, groups, rows, cols)).sum(0)


def packed_dense(module, x):
  """QDense body from packed codes. x: [..., in] -> [..., features] in module.dtype."""
  path = param_path(module, 'kernel')
  quant = module.policy.weight_quant(path)
  act = module.policy.input_quant(path)
  rows, cols = module.features, x.shape[-1]
  codes, scale, groups = _packed_vars(module, 'kernel', quant, rows, cols)
  row_scale = groups_lib.row_scales(scale, groups, rows, cols)
  if grid.applies(quant.bits, act, row_scale):
    w = jnp_unpack_codes(codes, quant.bits, cols)  # int8 [P, rows, cols]
    y = int_matmul(x, w, row_scale, act.bits, quant.bits).astype(module.dtype)
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
  quant = module.policy.weight_quant(param_path(module, 'embedding'))
  rows, cols = module.num_embeddings, module.features
  codes, scale, groups = _packed_vars(module, 'embedding', quant, rows, cols)
  picked = jnp.take(codes, ids, axis=1)  # [P, ..., row_bytes]
  values = jnp_unpack_codes(picked, quant.bits, cols).astype(jnp.float32)
  size = rows * cols // groups
  if size % cols == 0:  # whole rows per group: one scale per gathered row
    s = jnp.take(scale, ids // (size // cols), axis=1)[..., None]
  else:
    s = jnp.take(scale, (ids[..., None] * cols + jnp.arange(cols)) // size, axis=1)
  return (values * s).sum(0).astype(module.dtype)


def _packed_body(next_fun, args, kwargs, context):
  """Interceptor: a quantized QDense / QEmbed of a packed policy runs on its codes."""
  module = context.module
  if context.method_name == '__call__' and isinstance(module, (QDense, QEmbed)):
    name = 'kernel' if isinstance(module, QDense) else 'embedding'
    if module.policy.packed and module.policy.weight_quant(param_path(module, name)) is not None:
      body = packed_dense if isinstance(module, QDense) else packed_embed
      return body(module, args[0])
  return next_fun(*args, **kwargs)


def packed_mode():
  """Context under which BertModel(config, packed policy) inits and applies on packed weights
  (trace time: wrap the function that jit traces)."""
  return nn.intercept_methods(_packed_body)


def apply(model, variables, *args, **kwargs):
  """model.apply under `packed_mode`."""
  with packed_mode():
    return model.apply(variables, *args, **kwargs)

