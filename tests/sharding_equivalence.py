"""Worker for the multi-device tests: run in a fresh process with 8 forced CPU devices.

`sharding_equivalence.py MESH...`: three steps of 1-bit XTC KD (teacher forward + quantized
student) on each mesh (e.g. 2x2x2); prints JSON with the losses and a parameter checksum per mesh
so the test can compare them with one device.
`sharding_equivalence.py grouped_accumulation MESH...`: four micro-steps (two updates) of a
two-group optimizer with gradient accumulation; prints each mesh's losses, parameters (before and
after each micro-step) and the shardings of its parameters and optimizer state.
`sharding_equivalence.py batch_sizes MESH...`: which batch sizes 1..16 each mesh accepts.
"""
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bitbert_jax import optim, sharding, train
from bitbert_jax.errors import BitbertError
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.distill import layer_map
from bitbert_jax.model import BertConfig, BertModel, init_params
from bitbert_jax.optim import make_optimizer
from bitbert_jax.quant import policy_from_name
from bitbert_jax.train_state import new_state, with_policy


def _mesh(mesh_sizes):
  devices = jax.devices()[:int(np.prod(mesh_sizes))]
  return sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, mesh_sizes))),
                            devices)


def run(mesh_sizes):
  jax.config.update('jax_default_matmul_precision', 'highest')
  mesh = _mesh(mesh_sizes)
  devices = list(mesh.devices.flat)
  t_cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  t_params = init_params(t_cfg, rng=jax.random.PRNGKey(0))
  layers = [1, 3]
  s_params = jax.tree.map(jnp.copy, dict(t_params))  # own buffers: the state is donated
  s_params['encoder'] = {f'layer_{i}': s_params['encoder'][f'layer_{l}'] for i, l in enumerate(layers)}
  s_cfg = t_cfg.replace(num_hidden_layers=2)
  state = with_policy(new_state(s_cfg, s_params, rng=jax.random.PRNGKey(1)), policy_from_name('1-1-8'))
  teacher = objective_lib.Teacher(t_cfg, t_params)
  tx, _ = make_optimizer(1e-3, 10, 2)
  objective = objective_lib.Objective(('pred', 'attn', 'hidden'), layer_map.from_layers(layers, 4))
  loss_fn = objective_lib.make_loss_fn(state.model, BertModel(t_cfg), objective, False)
  state = state.replace(opt_state=jax.eval_shape(tx.init, (state.params, state.aux_params)))
  shardings = sharding.state_shardings(mesh, state, tx)
  state = state.replace(opt_state=tx.init((state.params, state.aux_params)))
  state = jax.device_put(state, shardings)
  t_params = jax.device_put(t_params, sharding.param_shardings(mesh, BertModel(t_cfg), t_params))
  batch_sh = {k: sharding.batch_sharding(mesh) for k in sharding.BATCH_KEYS}
  step = jax.jit(train.make_train_step(loss_fn, tx),
                 in_shardings=(shardings, batch_sh, jax.tree.map(lambda x: x.sharding, t_params)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    ids = rng.integers(1, 128, size=(8, 16)).astype(np.int32)
    mask = np.ones((8, 16), np.int32)
    mask[::2, 12:] = 0
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                 labels=np.zeros(8, np.int32), weights=np.ones(8, np.float32))
    state, m = step(state, sharding.device_batch(mesh, batch), t_params)
    losses.append(float(m['loss']))
  kernel = state.params['encoder']['layer_0']['attention']['query']['kernel']
  leaves = jax.tree.leaves(jax.device_get(state.params))
  return {'losses': losses, 'param_sum': float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves)),
          'params': [np.asarray(x).ravel()[:64].tolist() for x in leaves],
          'query_sharding': str(kernel.sharding.spec), 'devices': len(devices)}


def _specs(tree):
  return {jax.tree_util.keystr(k): str(v.sharding.spec)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(v, 'sharding')}


def grouped_accumulation(mesh_sizes):
  """Two optimizer groups (1-bit latent weights at 1e-2, the rest at 1e-3), accumulating two
  micro-batches per update, on a sharded train state."""
  jax.config.update('jax_default_matmul_precision', 'highest')
  mesh = _mesh(mesh_sizes)
  cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=32, num_labels=2,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  policy = policy_from_name('1-1-8')
  tx, _ = make_optimizer(1e-2, 10, 0, float_lr=1e-3, labels=optim.param_labels(policy))
  tx = optax.MultiSteps(tx, every_k_schedule=2)
  state = new_state(cfg, init_params(cfg, policy, rng=jax.random.PRNGKey(0)), policy,
                    rng=jax.random.PRNGKey(1))
  state = state.replace(opt_state=jax.eval_shape(tx.init, (state.params, state.aux_params)))
  shardings = sharding.state_shardings(mesh, state, tx)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)((state.params, state.aux_params))
  state = jax.device_put(state.replace(opt_state=opt_state), shardings)
  loss_fn = objective_lib.make_loss_fn(state.model, None, objective_lib.Objective(('label',)), False)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in sharding.BATCH_KEYS}
  step = jax.jit(train.make_train_step(loss_fn, tx), in_shardings=(shardings, batch_sh, None),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  rng = np.random.default_rng(0)
  first_values = lambda s: [np.asarray(x).ravel()[:32].tolist() for x in jax.tree.leaves(s.params)]
  losses, params = [], [first_values(state)]
  for _ in range(4):
    ids = rng.integers(1, 64, size=(8, 12)).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids),
                 labels=rng.integers(0, 2, 8).astype(np.int32), weights=np.ones(8, np.float32))
    state, m = step(state, sharding.device_batch(mesh, batch), None)
    losses.append(float(m['loss']))
    params.append(first_values(state))
  return {'losses': losses, 'params': params, 'param_specs': _specs(state.params),
          'opt_specs': _specs(state.opt_state), 'devices': len(mesh.devices.flat)}


def batch_sizes(mesh_sizes):
  mesh = _mesh(mesh_sizes)
  accepted, error = [], None
  for n in range(1, 17):
    try:
      sharding.check_batch_size(n, mesh)
      accepted.append(n)
    except BitbertError as e:
      error = str(e)
  return {'accepted': accepted, 'error': error}


if __name__ == '__main__':
  work, args = run, sys.argv[1:]
  if args[0] in ('grouped_accumulation', 'batch_sizes'):
    work, args = globals()[args[0]], args[1:]
  meshes = [tuple(int(v) for v in m.split('x')) for m in args]
  print(json.dumps({'x'.join(map(str, m)): work(m) for m in meshes}))
