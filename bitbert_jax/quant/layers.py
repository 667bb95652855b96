"""Quantization-aware linen layers: they ask the policy about their own parameter path.

Latent weights stay float; the forward pass uses their fake-quantized values. Parameters carry
logical axis names (t5x style) so that one rules table decides the sharding.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bitbert_jax.quant import activations
from bitbert_jax.quant import packed_layers
from bitbert_jax.quant.policy import QuantPolicy
from bitbert_jax.quant.quantizers import quantize_weight

default_init = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


def _groups(quant, rows):
  return rows if quant.num_groups == 'row' else quant.num_groups


def param_path(module, name):
  """'encoder/layer_0/attention/query/kernel': the path the policy rules match."""
  return '/'.join(module.scope.path + (name,))


def quantized_value(policy, path, latent, rows):
  """The value the forward pass uses for a weight: fake-quantized per policy, or as is.

  latent: output-major weight (rows first), with a leading axis of 2 when split.
  """
  quant = policy.weight_quant(path)
  if quant is None:
    return latent
  groups = _groups(quant, rows)
  if policy.is_split(path):
    return quantize_weight(latent[0], quant.bits, groups) + quantize_weight(
        latent[1], quant.bits, groups)
  return quantize_weight(latent, quant.bits, groups)


class QDense(nn.Module):
  """Dense layer y = x W + b with policy-driven weight and input-activation quantization.

  kernel: [in, features] (or [2, in, features] after weight splitting, bias likewise); with a
  split kernel y = x (Q(k0) + Q(k1)) + b0 + b1. The input is quantized per `policy.input_quant`
  (see `activations`), which may add `quant_stats` variables or `act_*` params to this scope.
  """
  features: int
  policy: QuantPolicy = QuantPolicy()
  axes: tuple[str | None, str | None] = ('embed', 'mlp')
  dtype: Any = jnp.float32
  use_bias: bool = True
  kernel_init: Any = default_init
  nonnegative_input: bool = False  # inputs >= 0 (e.g. after ReLU): unsigned lsq/elastic forms

  @nn.compact
  def __call__(self, x):
    path = param_path(self, 'kernel')
    if self.policy.packed and self.policy.weight_quant(path) is not None:
      return packed_layers.packed_dense(self, x)
    split = self.policy.is_split(path)
    lead, lead_axes = ((2,), (None,)) if split else ((), ())
    kernel_init = nn.with_logical_partitioning(self.kernel_init, lead_axes + self.axes)
    kernel = self.param('kernel', kernel_init, lead + (x.shape[-1], self.features), jnp.float32)
    quant = self.policy.weight_quant(path)
    if quant is not None and _groups(quant, self.features) == 1:
      # One scale per tensor does not depend on the layout: skip the two transposes.
      kernel = quantized_value(self.policy, path, kernel, self.features)
    elif quant is not None:
      # Quantize output-major (PyTorch layout) so that groups are consecutive output rows.
      kernel_t = jnp.swapaxes(kernel, -1, -2)
      kernel = jnp.swapaxes(quantized_value(self.policy, path, kernel_t, self.features), -1, -2)
    x = activations.quantize_input(self, x, self.policy.input_quant(path), self.nonnegative_input)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            lead_axes + self.axes[1:]),
                        lead + (self.features,), jnp.float32)
      if split:
        bias = bias.sum(0)
      y = y + bias.astype(self.dtype)
    return y


class QEmbed(nn.Module):
  """Token embedding with one quantization scale per row (token) when the policy says so."""
  num_embeddings: int
  features: int
  policy: QuantPolicy = QuantPolicy()
  axes: tuple[str | None, str | None] = ('vocab', 'embed')
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids):
    path = param_path(self, 'embedding')
    if self.policy.packed and self.policy.weight_quant(path) is not None:
      return packed_layers.packed_embed(self, ids)
    lead, lead_axes = ((2,), (None,)) if self.policy.is_split(path) else ((), ())
    table_init = nn.with_logical_partitioning(default_init, lead_axes + self.axes)
    table = self.param('embedding', table_init, lead + (self.num_embeddings, self.features),
                       jnp.float32)
    table = quantized_value(self.policy, path, table, self.num_embeddings)
    return jnp.take(table, ids, axis=0).astype(self.dtype)
