"""Bit packing: round trips, the documented bit order, odd sizes, jnp unpacking inside jit, and
the group scales the packed layers expand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax.errors import BitbertError
from bitbert_jax.packed import bits as packed_bits
from bitbert_jax.packed import write
from bitbert_jax.quant import groups
from bitbert_jax.quant import policy_from_name

SIZES = (1, 3, 7, 8, 9, 13, 64, 383)


def _random_codes(rng, bits, shape):
  lo, hi = packed_bits.code_range(bits)
  codes = rng.integers(lo, hi + 1, size=shape)
  return np.where(codes > 0, 1, -1) if bits == 1 else codes


@pytest.mark.parametrize('bits', packed_bits.SUPPORTED_BITS)
def test_round_trip_numpy_and_jit(bits):
  rng = np.random.default_rng(bits)
  lo, hi = packed_bits.code_range(bits)
  cases = [_random_codes(rng, bits, (3, n)) for n in SIZES]
  cases += [np.full((2, 11), lo if bits > 1 else -1), np.full((2, 11), hi)]  # extreme codes
  packed = [packed_bits.pack_codes(c, bits) for c in cases]
  for c, p in zip(cases, packed):
    assert p.dtype == np.uint8 and p.shape == (c.shape[0], -(-c.shape[1] * bits // 8))
    np.testing.assert_array_equal(packed_bits.unpack_codes(p, bits, c.shape[1]), c)
  # One jit over all sizes: the jnp unpacker runs traced, as inside the model.
  sizes = [c.shape[1] for c in cases]
  unpack = jax.jit(lambda ps: [packed_bits.jnp_unpack_codes(p, bits, n) for p, n in zip(ps, sizes)])
  for c, out in zip(cases, unpack(packed)):
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(out), c)


def test_bit_order_is_lsb_first():
  # Sign bits: element i is bit i % 8 of byte i // 8; +1 -> 1.
  signs = np.array([1, -1, -1, -1, -1, -1, -1, -1, 1, 1])
  np.testing.assert_array_equal(packed_bits.pack_codes(signs, 1), [0b00000001, 0b00000011])
  # Ternary: 2-bit two's complement, 4 per byte, element 0 in the low bits.
  t = np.array([1, -1, 0, 1])
  assert packed_bits.pack_codes(t, 2)[0] == 0b01_00_11_01
  # 3-bit codes straddle bytes: 3 = 011, -1 = 111, 2 = 010 -> stream 110 111 010 (LSB first).
  packed = packed_bits.pack_codes(np.array([3, -1, 2]), 3)
  stream = sum(int(f) << (3 * i) for i, f in enumerate((3, 7, 2)))
  np.testing.assert_array_equal(packed, [stream & 0xFF, stream >> 8])
  # 8-bit codes are plain int8 bytes.
  np.testing.assert_array_equal(packed_bits.pack_codes(np.array([-128, -1, 0, 127]), 8),
                                np.array([-128, -1, 0, 127], np.int8).view(np.uint8))


def test_sign_of_zero_packs_as_plus_one():
  """A binary kernel's zeros (+0.0 and -0.0) export as +1: bit 1."""
  policy = policy_from_name('1-1-8')
  kernel = np.array([[0.0, -0.0, -1e-30, 1e-30, -2.0, 3.0, 0.0, -0.0]], np.float32).T  # [in, 1]
  codes, _ = write.encode_weight(policy, 'encoder/layer_0/attention/query/kernel', kernel)
  np.testing.assert_array_equal(packed_bits.unpack_codes(codes, 1, 8), [[1, 1, -1, 1, -1, 1, 1, 1]])


def test_bad_codes_raise():
  with pytest.raises(BitbertError, match='1-bit codes'):
    packed_bits.pack_codes(np.array([1, 0, -1]), 1)
  with pytest.raises(BitbertError, match=r'\[-4, 3\]'):
    packed_bits.pack_codes(np.array([4]), 3)
  with pytest.raises(BitbertError, match='valid bits'):
    packed_bits.pack_codes(np.array([1]), 9)
  with pytest.raises(BitbertError, match='need 2'):
    packed_bits.unpack_codes(np.zeros((1, 3), np.uint8), 1, 9)


def test_group_scale_expansion():
  scale = jnp.arange(1.0, 5.0)  # 4 groups over a [4, 6] matrix: one per row
  np.testing.assert_array_equal(groups.row_scales(scale, 4, 4, 6), [1, 2, 3, 4])
  np.testing.assert_array_equal(groups.row_scales(jnp.array([1.0, 2.0]), 2, 4, 6),
                                [1, 1, 2, 2])
  assert groups.row_scales(jnp.arange(8.0), 8, 4, 6) is None  # 3 elements per group
  per = np.asarray(groups.element_scales(jnp.arange(8.0), 8, 4, 6))
  np.testing.assert_array_equal(per.reshape(-1), np.repeat(np.arange(8.0), 3))
  with pytest.raises(BitbertError, match='divide'):
    groups.element_scales(jnp.arange(5.0), 5, 4, 6)
