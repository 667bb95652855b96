"""Quantization-aware linen layers: they ask the policy about their own parameter path.

Latent weights stay float; the forward pass uses their quantized codes and scales
(`quantized_kernel_planes`, `quantized_embedding_planes`): on the integer grid (`grid`) the
codes themselves, otherwise the fake-quantized values codes * scale. Parameters carry logical
axis names (t5x style) so that one rules table decides the sharding.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitbert_jax.errors import BitbertError
from bitbert_jax.quant import activations
from bitbert_jax.quant import grid
from bitbert_jax.quant import groups as groups_lib
from bitbert_jax.quant.policy import QuantPolicy
from bitbert_jax.quant.quantizers import activation_codes
from bitbert_jax.quant.quantizers import centered_binary_codes
from bitbert_jax.quant.quantizers import from_codes
from bitbert_jax.quant.quantizers import quantize_weight
from bitbert_jax.quant.quantizers import weight_codes

default_init = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


def _groups(quant, rows):
  return rows if quant.num_groups == 'row' else quant.num_groups


def param_path(module, name):
  """'encoder/layer_0/attention/query/kernel': the path the policy rules match."""
  return '/'.join(module.scope.path + (name,))


def quantized_value(policy, path, latent, rows):
  """A weight's fake-quantized value per policy (or the latent as is), planes summed.

  latent: output-major weight (rows first), with a leading axis of 2 when split. Equal bit for
  bit to `quantized_embedding_planes(...).value()` for such a matrix; the layers use the planes.
  """
  quant = policy.weight_quant(path)
  if quant is None:
    return latent
  groups = _groups(quant, rows)
  if policy.is_split(path):
    return quantize_weight(latent[0], quant.bits, groups, quant.mode) + quantize_weight(
        latent[1], quant.bits, groups, quant.mode)
  return quantize_weight(latent, quant.bits, groups, quant.mode)


@dataclasses.dataclass(frozen=True)
class QuantizedPlanes:
  """A quantized weight as integer codes and group scales: value = sum_p codes[p] * scale.

  codes: float32 [P, a, b], integer-valued, in the latent's layout (a kernel [in, out], a table
    [V, H]); P = 2 planes after weight splitting, else 1.
  scales: float32 [P, G], G = `groups` consecutive chunks of the output-major matrix
    (output rows first: the kernel transposed, the table as is), as in `quantizers`.
  transposed: the plane is the output-major matrix transposed (kernels).
  """
  codes: jax.Array
  scales: jax.Array
  bits: int
  groups: int
  transposed: bool
  offsets: jax.Array | None = None  # [P, G] group means of centred binarization, else None

  @property
  def rows(self):
    return self.codes.shape[-1] if self.transposed else self.codes.shape[-2]

  @property
  def cols(self):
    return self.codes.shape[-2] if self.transposed else self.codes.shape[-1]

  def row_scales(self):
    """float32 [P, rows], one scale per output row, or None when a group splits a row."""
    return groups_lib.row_scales(self.scales, self.groups, self.rows, self.cols)

  def element_scales(self):
    """The scales broadcastable to `codes` ([P, 1, 1], a row axis, or one per element)."""
    return self._per_element(self.scales)

  def _per_element(self, per_group):
    """[P, G] per-group values broadcastable to `codes`."""
    if self.groups == 1:
      return per_group[:, :, None]
    per_row = groups_lib.row_scales(per_group, self.groups, self.rows, self.cols)
    if per_row is not None:
      return per_row[:, None, :] if self.transposed else per_row[:, :, None]
    per = groups_lib.element_scales(per_group, self.groups, self.rows, self.cols)
    return jnp.swapaxes(per, -1, -2) if self.transposed else per

  def plane_values(self):
    """float32 [P, a, b]: each plane's quantized value (codes * scale [+ offset])."""
    value = self.codes * self.element_scales()
    return value if self.offsets is None else value + self._per_element(self.offsets)

  def output_major_codes(self):
    """codes as [P, rows, cols] (the packed layout)."""
    return jnp.swapaxes(self.codes, -1, -2) if self.transposed else self.codes

  def value(self):
    """The quantized weight in the latent's layout: planes added in order, bit for bit
    `quantized_value`'s. Straight-through gradient to the codes (`quantizers.from_codes`)."""
    value = from_codes(self.codes, self.element_scales())
    if self.offsets is None:
      return value
    return value + jax.lax.stop_gradient(jnp.sum(self._per_element(self.offsets), axis=0))


def _planes(policy, path, latent, rows, transposed):
  quant = policy.weight_quant(path)
  if quant is None:
    return None
  groups = _groups(quant, rows)
  planes = latent if policy.is_split(path) else latent[None]
  # One scale per tensor does not depend on the layout: quantize as stored (no transposes).
  # Otherwise quantize output-major so that groups are consecutive output rows. The float32
  # statistics (pairwise sums) round in the element order of the layout quantized, so a weight
  # within an ulp of a ternary threshold lands on the side this layout decides: everything that
  # needs the layer's quantized weight (splitting, packing) calls this function.
  flip = transposed and groups != 1
  codes, scales, offsets = [], [], []
  for plane in planes:
    if quant.mode == 'centered':
      c, s, o = centered_binary_codes(plane.T if flip else plane, groups)
      offsets.append(o)
    else:
      c, s = weight_codes(plane.T if flip else plane, quant.bits, groups)
    codes.append(c.T if flip else c)
    scales.append(s)
  return QuantizedPlanes(jnp.stack(codes), jnp.stack(scales), quant.bits, groups, transposed,
                         jnp.stack(offsets) if offsets else None)


def quantized_kernel_planes(policy, path, kernel, features):
  """The quantized planes QDense computes with: QuantizedPlanes, or None for a float weight.

  kernel: the latent [in, features] (split: [2, in, features]) float32. Codes come back in the
  kernel layout [P, in, features]; groups are output rows (rows = features). This is the one
  place that decides the layout the quantizer sees; `split` and `export` call it.
  """
  if kernel.shape[-1] != features:
    raise BitbertError(f'{path}: kernel shape {list(kernel.shape)} has no {features} outputs')
  return _planes(policy, path, jnp.asarray(kernel, jnp.float32), features, True)


def quantized_embedding_planes(policy, path, table):
  """QuantizedPlanes of an embedding table [V, H] (split: [2, V, H]), or None; rows = V."""
  return _planes(policy, path, jnp.asarray(table, jnp.float32), table.shape[-2], False)


def _unpacked(path):
  # Packed codes are read by bitbert_jax.packed.layers, which runs these layers' calls itself.
  return BitbertError(f'{path}: the policy holds packed weights (packed=True); run the model '
                      'under bitbert_jax.packed.layers.packed_mode()')


class QDense(nn.Module):
  """Dense layer y = x W + b with policy-driven weight and input-activation quantization.

  kernel: [in, features] (or [2, in, features] after weight splitting, bias likewise); with a
  split kernel y = x (Q(k0) + Q(k1)) + b0 + b1. The input is quantized per `policy.input_quant`
  (see `activations`), which may add `quant_stats` variables or `act_*` params to this scope.

  With dynamic 2..8-bit activations and a 1..8-bit weight whose groups are whole output rows,
  the layer computes on the integer grid (`grid`): integer codes multiply in an exact float32
  matmul, then one rescale, bit for bit what the packed layer computes with int8 codes and int32
  accumulation. Otherwise it multiplies the fake-quantized values. Gradients are the
  straight-through ones of x_q W_q either way.
  """
  features: int
  policy: QuantPolicy = QuantPolicy()
  axes: tuple[str | None, str | None] = ('embed', 'mlp')
  dtype: Any = jnp.float32
  use_bias: bool = True
  kernel_init: Any = default_init
  nonnegative_input: bool = False  # inputs >= 0 (e.g. after ReLU): unsigned lsq/elastic forms

  @nn.compact
  def __call__(self, x, quant_mix=None):
    """quant_mix: None (quantized as the policy says), or a traced scalar lambda in [0, 1] of the
    quantization warm-in: weights and inputs lambda * Q(.) + (1 - lambda) * (.)."""
    path = param_path(self, 'kernel')
    if self.policy.packed and self.policy.weight_quant(path) is not None:
      raise _unpacked(path)
    split = self.policy.is_split(path)
    lead, lead_axes = ((2,), (None,)) if split else ((), ())
    kernel_init = nn.with_logical_partitioning(self.kernel_init, lead_axes + self.axes)
    kernel = self.param('kernel', kernel_init, lead + (x.shape[-1], self.features), jnp.float32)
    act = self.policy.input_quant(path)
    planes = quantized_kernel_planes(self.policy, path, kernel, self.features)
    row_scales = None if planes is None or planes.offsets is not None else planes.row_scales()
    on_grid = planes is not None and grid.applies(planes.bits, act, row_scales)

    def quantized(x):
      if on_grid:
        x_codes, x_scale = activation_codes(x, act.bits)
        return grid.dense(x_codes, x_scale, planes.codes, row_scales, act.bits, planes.bits,
                          self.dtype).astype(self.dtype)
      w = kernel if planes is None else planes.value()
      x = activations.quantize_input(self, x, act, self.nonnegative_input)
      return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))

    if quant_mix is None or (planes is None and act is None):
      y = quantized(x)
    else:
      y = self._warm_in(x, kernel, planes, act, quant_mix, quantized, on_grid, split)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            lead_axes + self.axes[1:]),
                        lead + (self.features,), jnp.float32)
      if split:
        bias = bias.sum(0)
      y = y + bias.astype(self.dtype)
    return y

  def _warm_in(self, x, kernel, planes, act, mix, quantized, on_grid, split):
    # Exact at both ends: lambda = 0 is the float layer, lambda = 1 the quantized one (on the
    # integer grid too, via cond); the latent weights get the straight-through gradient.
    latent = kernel.sum(0) if split else kernel
    w = latent if planes is None else mix * planes.value() + (1 - mix) * latent
    xq = activations.quantize_input(self, x, act, self.nonnegative_input)
    mixed = lambda x: jnp.dot((mix * xq + (1 - mix) * x).astype(self.dtype),
                              w.astype(self.dtype))
    if not on_grid:
      return mixed(x)
    return jax.lax.cond(mix >= 1, quantized, mixed, x)


class QEmbed(nn.Module):
  """Token embedding with one quantization scale per row (token) when the policy says so."""
  num_embeddings: int
  features: int
  policy: QuantPolicy = QuantPolicy()
  axes: tuple[str | None, str | None] = ('vocab', 'embed')
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, quant_mix=None):
    path = param_path(self, 'embedding')
    if self.policy.packed and self.policy.weight_quant(path) is not None:
      raise _unpacked(path)
    lead, lead_axes = ((2,), (None,)) if self.policy.is_split(path) else ((), ())
    table_init = nn.with_logical_partitioning(default_init, lead_axes + self.axes)
    table = self.param('embedding', table_init, lead + (self.num_embeddings, self.features),
                       jnp.float32)
    planes = quantized_embedding_planes(self.policy, path, table)
    if planes is not None:
      latent = table.sum(0) if self.policy.is_split(path) else table
      table = planes.value()
      if quant_mix is not None:  # warm-in, as QDense
        table = quant_mix * table + (1 - quant_mix) * latent
    return jnp.take(table, ids, axis=0).astype(self.dtype)
