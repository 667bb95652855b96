"""Bit packing: round trips, the documented bit order, odd sizes, jnp unpacking inside jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax.errors import BitbertError
from bitbert_jax.quant import packing
from bitbert_jax.quant import quantizers

SIZES = (1, 3, 7, 8, 9, 13, 64, 383)


def _random_codes(rng, bits, shape):
  lo, hi = packing.code_range(bits)
  codes = rng.integers(lo, hi + 1, size=shape)
  return np.where(codes > 0, 1, -1) if bits == 1 else codes


@pytest.mark.parametrize('bits', packing.SUPPORTED_BITS)
def test_round_trip_numpy_and_jit(bits):
  rng = np.random.default_rng(bits)
  lo, hi = packing.code_range(bits)
  cases = [_random_codes(rng, bits, (3, n)) for n in SIZES]
  cases += [np.full((2, 11), lo if bits > 1 else -1), np.full((2, 11), hi)]  # extreme codes
  packed = [packing.pack_codes(c, bits) for c in cases]
  for c, p in zip(cases, packed):
    assert p.dtype == np.uint8 and p.shape == (c.shape[0], -(-c.shape[1] * bits // 8))
    np.testing.assert_array_equal(packing.unpack_codes(p, bits, c.shape[1]), c)
  # One jit over all sizes: the jnp unpacker runs traced, as inside the model.
  sizes = [c.shape[1] for c in cases]
  unpack = jax.jit(lambda ps: [packing.jnp_unpack_codes(p, bits, n) for p, n in zip(ps, sizes)])
  for c, out in zip(cases, unpack(packed)):
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(out), c)


def test_bit_order_is_lsb_first():
  # Sign bits: element i is bit i % 8 of byte i // 8; +1 -> 1.
  signs = np.array([1, -1, -1, -1, -1, -1, -1, -1, 1, 1])
  np.testing.assert_array_equal(packing.pack_signs(signs), [0b00000001, 0b00000011])
  # Ternary: 2-bit two's complement, 4 per byte, element 0 in the low bits.
  t = np.array([1, -1, 0, 1])
  assert packing.pack_ternary(t)[0] == 0b01_00_11_01
  # 3-bit codes straddle bytes: 3 = 011, -1 = 111, 2 = 010 -> stream 110 111 010 (LSB first).
  packed = packing.pack_codes(np.array([3, -1, 2]), 3)
  stream = sum(int(f) << (3 * i) for i, f in enumerate((3, 7, 2)))
  np.testing.assert_array_equal(packed, [stream & 0xFF, stream >> 8])
  # 8-bit codes are plain int8 bytes.
  np.testing.assert_array_equal(packing.pack_codes(np.array([-128, -1, 0, 127]), 8),
                                np.array([-128, -1, 0, 127], np.int8).view(np.uint8))


def test_sign_of_zero_packs_as_plus_one():
  packed = packing.pack_signs(np.array([0.0, -0.0, -1e-30, 1e-30]))
  np.testing.assert_array_equal(packing.unpack_signs(packed, 4), [1, 1, -1, 1])


def test_bad_codes_raise():
  with pytest.raises(BitbertError, match='1-bit codes'):
    packing.pack_codes(np.array([1, 0, -1]), 1)
  with pytest.raises(BitbertError, match=r'\[-4, 3\]'):
    packing.pack_codes(np.array([4]), 3)
  with pytest.raises(BitbertError, match='valid bits'):
    packing.pack_codes(np.array([1]), 9)
  with pytest.raises(BitbertError, match='need 2'):
    packing.unpack_codes(np.zeros((1, 3), np.uint8), 1, 9)


@pytest.mark.parametrize('bits', packing.SUPPORTED_BITS)
@pytest.mark.parametrize('groups', (1, 12, 60))
def test_codes_and_scales_reproduce_quantizer_bitwise(bits, groups):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 10)).astype(np.float32)
  w[0, :4] = 0.0
  q = np.asarray(quantizers.quantize_weight(jnp.asarray(w), bits, groups))
  codes, scales = packing.codes_and_scales(q, bits, groups, latent=w)
  assert scales.dtype == np.float32 and scales.shape == (groups,)
  np.testing.assert_array_equal(packing.dequantize(codes, scales, groups), q)
  packed = packing.pack_codes(codes, bits)
  np.testing.assert_array_equal(packing.unpack_codes(packed, bits, 10), codes)


def test_all_zero_groups():
  w = np.zeros((4, 8), np.float32)
  for bits in (1, 2, 4):
    q = np.asarray(quantizers.quantize_weight(jnp.asarray(w), bits, 4))
    codes, scales = packing.codes_and_scales(q, bits, 4, latent=w)
    np.testing.assert_array_equal(scales, 0.0)
    np.testing.assert_array_equal(packing.dequantize(codes, scales, 4), 0.0)
    if bits == 1:
      np.testing.assert_array_equal(codes, 1)  # sign(0) = +1


def test_group_scale_expansion():
  scale = jnp.arange(1.0, 5.0)  # 4 groups over a [4, 6] matrix: one per row
  np.testing.assert_array_equal(packing.row_scales(scale, 4, 4, 6), [1, 2, 3, 4])
  np.testing.assert_array_equal(packing.row_scales(jnp.array([1.0, 2.0]), 2, 4, 6),
                                [1, 1, 2, 2])
  assert packing.row_scales(jnp.arange(8.0), 8, 4, 6) is None  # 3 elements per group
  per = np.asarray(packing.element_scales(jnp.arange(8.0), 8, 4, 6))
  np.testing.assert_array_equal(per.reshape(-1), np.repeat(np.arange(8.0), 3))
  with pytest.raises(BitbertError, match='divide'):
    packing.element_scales(jnp.arange(5.0), 5, 4, 6)
