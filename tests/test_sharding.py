"""Sharded train steps: mesh validation, and equal results on 8 forced CPU devices."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from bitbert_jax import sharding
from bitbert_jax.errors import BitbertError

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
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  sharding.check_batch_size(8 * mesh.shape['data'], mesh)
  if mesh.shape['data'] > 1:
    with pytest.raises(BitbertError, match='not divisible'):
      sharding.check_batch_size(mesh.shape['data'] + 1, mesh)


@pytest.fixture(scope='module')
def runs():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The checkout itself on the path: the worker imports this tree, however it was installed.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get('PYTHONPATH')))))
  worker = os.path.join(os.path.dirname(__file__), 'sharding_equivalence.py')
  out = subprocess.run([sys.executable, worker, *MESHES], capture_output=True, text=True,
                       env=env, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


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
