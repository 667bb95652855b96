"""Bit packing of quantized weights: numpy packers for export, jnp unpackers for inside jit.

Code layout (format version 1, shared by `bitbert_jax.export` and the packed layers):

* A quantized weight is packed as a 2-D matrix of rows: output rows for a linear kernel
  (output-major, the PyTorch [out, in] layout), token rows for an embedding table. Each row of
  `n` codes of `bits` bits becomes `row_bytes(n, bits) = ceil(n * bits / 8)` bytes, so rows can
  be gathered (embeddings) or unpacked (kernels) independently; a row's last byte is padded with
  zero bits.
* Bit order inside a row: code `i` occupies stream bits `[i * bits, (i + 1) * bits)`, least
  significant bit first; stream bit `k` is bit `k % 8` (LSB = bit 0) of byte `k // 8`
  (numpy's `bitorder='little'`). A code may straddle two bytes when 8 % bits != 0.
* Code meaning:
    1 bit (binary):   bit 1 -> +1, bit 0 -> -1 (sign(0) = +1, so a zero weight stores bit 1).
    2 bits (ternary): two's complement: 0b00 -> 0, 0b01 -> +1, 0b11 -> -1 (0b10 never written).
    3..8 bits (uniform symmetric): two's complement integer in [-2^(b-1), 2^(b-1) - 1];
      8-bit codes are therefore plain int8 bytes.
* Scales: float32, one per group; groups are `num_groups` equal consecutive chunks of the
  flattened (row-major) output-major matrix, as in `bitbert_jax.quant.quantizers`.
  The dequantized value is `code * scale[group]`.
"""
import math

import jax.numpy as jnp
import numpy as np

from bitbert_jax.errors import BitbertError
from bitbert_jax.packed.format import row_bytes, unpack_steps  # the one layout description

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits):
  if bits not in SUPPORTED_BITS:
    raise BitbertError(f'cannot pack {bits}-bit codes; valid bits: '
                       f'{", ".join(map(str, SUPPORTED_BITS))}')


def code_range(bits):
  """(lowest, highest) signed code value of a `bits`-bit code."""
  if bits == 1:
    return -1, 1
  return -(2**(bits - 1)), 2**(bits - 1) - 1


# ---------------------------------------------------------------------------------------------
# Signed code values <-> unsigned bit fields.


def to_fields(values, bits):
  """Signed codes (int array) -> unsigned `bits`-bit fields (uint8), per the code meaning above."""
  values = np.asarray(values)
  lo, hi = code_range(bits)
  if values.size and (values.min() < lo or values.max() > hi):
    raise BitbertError(f'{bits}-bit codes must lie in [{lo}, {hi}]; got '
                       f'[{values.min()}, {values.max()}]')
  if bits == 1:
    if values.size and np.any(values == 0):
      raise BitbertError('1-bit codes must be -1 or +1; got a 0 (binary weights use sign(0)=+1)')
    return (values > 0).astype(np.uint8)
  return (values.astype(np.int16) & (2**bits - 1)).astype(np.uint8)


def from_fields(fields, bits):
  """Unsigned `bits`-bit fields -> signed codes (int8); numpy twin of `jnp_from_fields`."""
  fields = np.asarray(fields).astype(np.int16)
  if bits == 1:
    return (2 * fields - 1).astype(np.int8)
  half = 2**(bits - 1)
  return ((fields ^ half) - half).astype(np.int8)  # sign-extend the b-bit two's complement


def jnp_from_fields(fields, bits):
  """jnp: unsigned fields (any int dtype) -> signed int8 codes. Usable inside jit."""
  fields = fields.astype(jnp.int32)
  if bits == 1:
    return (2 * fields - 1).astype(jnp.int8)
  half = 2**(bits - 1)
  return ((fields ^ half) - half).astype(jnp.int8)


# ---------------------------------------------------------------------------------------------
# Packing rows of fields into bytes.


def pack_fields(fields, bits):
  """Packs unsigned fields [..., n] (each < 2^bits) into bytes [..., row_bytes(n, bits)] uint8."""
  _check_bits(bits)
  fields = np.asarray(fields, np.uint8)
  *lead, n = fields.shape
  if fields.size and fields.max() >= 2**bits:
    raise BitbertError(f'a field value {fields.max()} does not fit in {bits} bits')
  # [..., n, bits] bit matrix, LSB first, then packed 8 stream bits per byte, LSB first.
  bit_matrix = (fields[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
  stream = bit_matrix.reshape(*lead, n * bits)
  packed = np.packbits(stream, axis=-1, bitorder='little')
  return packed.reshape(*lead, row_bytes(n, bits))


def unpack_fields(packed, bits, n):
  """Inverse of `pack_fields`: bytes [..., row_bytes] -> unsigned fields [..., n] uint8."""
  _check_bits(bits)
  packed = np.asarray(packed, np.uint8)
  *lead, nbytes = packed.shape
  if nbytes != row_bytes(n, bits):
    raise BitbertError(f'packed rows have {nbytes} bytes; {n} codes of {bits} bits need '
                       f'{row_bytes(n, bits)}')
  stream = np.unpackbits(packed, axis=-1, count=n * bits, bitorder='little')
  bit_matrix = stream.reshape(*lead, n, bits).astype(np.uint8)
  return (bit_matrix << np.arange(bits, dtype=np.uint8)).sum(-1).astype(np.uint8)


def jnp_unpack_fields(packed, bits, n):
  """jnp twin of `unpack_fields`, for use inside jit: [..., row_bytes] uint8 -> [..., n] uint8.

  When 8 % bits == 0 each byte holds 8 // bits whole codes: one shift-and-mask; otherwise the
  bytes are expanded to a bit stream and regrouped (codes straddle bytes).
  """
  _check_bits(bits)
  *lead, nbytes = packed.shape
  if nbytes != row_bytes(n, bits):
    raise BitbertError(f'packed rows have {nbytes} bytes; {n} codes of {bits} bits need '
                       f'{row_bytes(n, bits)}')
  packed = packed.astype(jnp.uint8)
  mask = jnp.uint8(2**bits - 1)
  shifts, _ = unpack_steps(bits)
  if shifts is not None:
    fields = (packed[..., None] >> jnp.asarray(shifts, jnp.uint8)) & mask  # [..., nbytes, per]
    return fields.reshape(*lead, nbytes * len(shifts))[..., :n]
  stream = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # [..., nbytes, 8]
  stream = stream.reshape(*lead, nbytes * 8)[..., :n * bits].reshape(*lead, n, bits)
  weights = (1 << jnp.arange(bits)).astype(jnp.uint8)
  return (stream * weights).sum(-1, dtype=jnp.uint8)


# ---------------------------------------------------------------------------------------------
# Convenience: signed codes <-> packed bytes.


def pack_codes(codes, bits):
  """Signed codes [..., n] (values per the code meaning) -> packed bytes [..., row_bytes]."""
  return pack_fields(to_fields(codes, bits), bits)


def unpack_codes(packed, bits, n):
  """Packed bytes [..., row_bytes] -> signed int8 codes [..., n]."""
  return from_fields(unpack_fields(packed, bits, n), bits)


def jnp_unpack_codes(packed, bits, n):
  """jnp: packed bytes [..., row_bytes] -> signed int8 codes [..., n]; usable inside jit."""
  return jnp_from_fields(jnp_unpack_fields(packed, bits, n), bits)


def pack_signs(x):
  """1 bit per value (bit 1 = x >= 0, i.e. +1 with sign(0) = +1) along the last axis."""
  return pack_fields((np.asarray(x) >= 0).astype(np.uint8), 1)


def unpack_signs(packed, n):
  """+-1 int8 [..., n] from `pack_signs` bytes."""
  return unpack_codes(packed, 1, n)


def pack_ternary(t):
  """Ternary values {-1, 0, +1} [..., n] -> 2-bit codes, 4 per byte."""
  return pack_codes(np.asarray(t).astype(np.int8), 2)


def unpack_ternary(packed, n):
  """int8 {-1, 0, +1} [..., n] from `pack_ternary` bytes."""
  return unpack_codes(packed, 2, n)


# ---------------------------------------------------------------------------------------------
# Groups.


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


# ---------------------------------------------------------------------------------------------
# Quantized values -> (codes, scales), exactly invertible.


def codes_and_scales(q, bits, num_groups, latent=None):
  """Splits fake-quantized values into integer codes and per-group float32 scales.

  q: [rows, cols] float32 output of `quantizers.quantize_weight(latent, bits, num_groups)`.
  latent: the weights q came from; needed for 3..8 bits, whose scale 2 max|latent| / 2^bits
    cannot be read back from q (the positive extreme is clipped by one step).
  Returns (codes int8 [rows, cols], scales float32 [num_groups]) with
    codes * scales[group] == q exactly (bit for bit), checked.
  """
  _check_bits(bits)
  q = np.asarray(q, np.float32)
  rows, cols = q.shape
  size = group_size(q.shape, num_groups)
  g = q.reshape(num_groups, size)
  if bits <= 2:
    scales = np.abs(g).max(axis=1)  # |alpha * t| = alpha wherever t != 0
    # q >= 0 gives +1 for a zero-alpha (all-zero) group, matching sign(0) = +1.
    codes = np.where(g >= 0, 1, -1) if bits == 1 else np.sign(g)
  else:
    if latent is None:
      raise BitbertError(f'{bits}-bit codes need the latent weights to recover the scale')
    src = np.asarray(latent, np.float32).reshape(num_groups, size)
    # Same float32 arithmetic as quantizers.symmetric: 2 * max|x| / 2^bits (exact powers of 2).
    scales = np.float32(2.0) * np.abs(src).max(axis=1) / np.float32(2.0**bits)
    safe = np.where(scales == 0, np.float32(1), scales)[:, None]
    lo, hi = code_range(bits)
    codes = np.clip(np.round(g / safe), lo, hi)
  codes, scales = codes.astype(np.int8), scales.astype(np.float32)
  check = codes.astype(np.float32) * scales[:, None]
  if not np.array_equal(check, g):
    raise BitbertError(f'{bits}-bit values are not code * scale per group (max error '
                       f'{np.abs(check - g).max():.3g}); were they made by quantize_weight with '
                       f'num_groups={num_groups}?')
  return codes.reshape(rows, cols), scales


def dequantize(codes, scales, num_groups):
  """numpy: int codes [rows, cols] and scales [G] -> float32 values [rows, cols]."""
  codes = np.asarray(codes)
  size = group_size(codes.shape, num_groups)
  g = codes.reshape(num_groups, size).astype(np.float32) * np.asarray(scales, np.float32)[:, None]
  return g.reshape(codes.shape)
