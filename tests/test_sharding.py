"""Sharded train steps: mesh validation, and equal results on 8 forced CPU devices."""
import ml_collections
import numpy as np
import pytest

from bitbert_jax import sharding
from bitbert_jax.errors import BitbertError
from helpers import on_8_cpu_devices

MESHES = ('1x1x1', '8x1x1', '2x4x1', '2x2x2', '1x1x8')


def test_mesh_resolves_minus_one_and_refuses_misfits():
  cfg = lambda **kw: ml_collections.ConfigDict(kw)
  assert sharding.mesh_shape(cfg(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  with pytest.raises(BitbertError, match='does not fit 8 devices'):
    sharding.mesh_shape(cfg(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(BitbertError, match='multiply to 8'):
    sharding.mesh_shape(cfg(data=2, fsdp=2, tensor=1), 8)
  with pytest.raises(BitbertError, match='at most one -1'):
    sharding.mesh_shape(cfg(data=-1, fsdp=-1, tensor=1), 8)


def test_batch_size_must_divide_data_axes():
  # Batches split over data x fsdp; the tensor axis holds the whole batch.
  got = on_8_cpu_devices('batch_sizes', '2x2x2', '8x1x1', '1x1x8')
  assert got['2x2x2']['accepted'] == [4, 8, 12, 16]
  assert got['8x1x1']['accepted'] == [8, 16]
  assert got['1x1x8']['accepted'] == list(range(1, 17))
  assert got['2x2x2']['error'].startswith(
      'batch_size=15 is not divisible by the data-parallel mesh size 4')


@pytest.fixture(scope='module')
def runs():
  return on_8_cpu_devices(*MESHES)


@pytest.mark.parametrize('mesh', MESHES[1:])
def test_three_xtc_steps_match_single_device(runs, mesh):
  ref, got = runs['1x1x1'], runs[mesh]
  assert got['devices'] == 8
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=2e-5, atol=1e-6)
  for a, b in zip(got['params'], ref['params']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got['param_sum'], ref['param_sum'], rtol=1e-5)
  assert ref['losses'][0] != ref['losses'][2]  # the steps really trained


def test_parameters_are_really_sharded(runs):
  assert runs['1x1x8']['query_sharding'].endswith("('fsdp', 'tensor')")
