"""Scale groups: a weight's `num_groups` equal consecutive chunks of its output-major matrix.

A rule's groups are an int or 'row' (one per output row); `quantizers` computes one scale per
group, and the layers expand the group scales to rows or to elements with these functions.
"""
import math

import jax.numpy as jnp

from bitbert_jax.errors import BitbertError


def group_size(shape, num_groups):
  """Elements per group of a tensor of `shape` cut into `num_groups` consecutive chunks."""
  size = math.prod(shape)
  if num_groups < 1 or size % num_groups:
    raise BitbertError(f'num_groups={num_groups} does not divide a tensor of shape '
                       f'{tuple(shape)} (size {size}); use a divisor of {size}')
  return size // num_groups


def resolve_groups(num_groups, rows):
  """A rule's num_groups ('row' or an int) as an int for a matrix with `rows` rows."""
  return rows if num_groups == 'row' else int(num_groups)


def row_scales(scale, num_groups, rows, cols):
  """[..., G] group scales -> [..., rows] one per row, or None when a group splits a row.

  Groups align with rows when each group is a whole number of rows (G divides rows).
  """
  size = group_size((rows, cols), num_groups)
  if size % cols:
    return None
  # Broadcast + reshape, not jnp.repeat: repeat's index constants get folded slowly by XLA.
  per = jnp.broadcast_to(scale[..., None], scale.shape + (size // cols,))
  return per.reshape(*scale.shape[:-1], rows)


def element_scales(scale, num_groups, rows, cols):
  """[..., G] group scales -> [..., rows, cols] the scale of every element (any grouping)."""
  size = group_size((rows, cols), num_groups)
  per = jnp.broadcast_to(scale[..., None], scale.shape + (size,))
  return per.reshape(*scale.shape[:-1], rows, cols)
