"""Bit packing of quantized weights: numpy packers for export, jnp unpackers for inside jit.

The layout and the code meaning are `format`'s (`BIT_ORDER`, `CODE_MEANING`, `row_bytes`,
`unpack_steps`): rows of `bits`-bit codes, LSB first, each row padded to whole bytes; 1 bit is a
sign (bit 1 -> +1, sign(0) = +1), 2..8 bits are two's complement (8-bit codes are int8 bytes).
"""
import jax.numpy as jnp
import numpy as np

from bitbert_jax.errors import BitbertError
from bitbert_jax.packed.format import row_bytes, unpack_steps
from bitbert_jax.quant import groups

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
  """Signed codes (int array) -> unsigned `bits`-bit fields (uint8), per the code meaning."""
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


# ---------------------------------------------------------------------------------------------
# Codes and scales -> values.


def dequantize(codes, scales, num_groups):
  """numpy: int codes [rows, cols] and scales [G] -> float32 values [rows, cols]."""
  codes = np.asarray(codes)
  size = groups.group_size(codes.shape, num_groups)
  g = codes.reshape(num_groups, size).astype(np.float32) * np.asarray(scales, np.float32)[:, None]
  return g.reshape(codes.shape)
