"""Device mesh, logical-axis rules and the shardings derived from abstract shapes: of a
model's parameters, of a whole train state and of a batch.

Parameters carry logical axis names (set in the model's layers); this one table maps them to
mesh axes. Changing the parallelism is changing the table or the mesh sizes, not the model.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitbert_jax.errors import BitbertError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch is split over both data-parallel axes
BATCH_KEYS = ('input_ids', 'attention_mask', 'token_type_ids', 'labels', 'weights')

# Logical name -> mesh axis (or None: replicated). t5x/maxtext style.
LOGICAL_RULES = (
    ('batch', BATCH_AXES),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
)


def mesh_shape(mesh_config, num_devices):
  """Resolves sizes (-1 = the rest) to a tuple matching MESH_AXES; refuses what does not fit."""
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  named = ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise BitbertError(f'config.mesh ({named}): sizes must be positive, with at most one -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise BitbertError(f'config.mesh ({named}) does not fit {num_devices} devices: '
                         f'{num_devices} is not a multiple of {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise BitbertError(f'config.mesh ({named}) has {math.prod(sizes)} devices but '
                       f'{num_devices} are available; sizes must multiply to {num_devices} '
                       f'(use -1 for "the rest")')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh):
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size, mesh, field='batch_size'):
  n = data_parallel_size(mesh)
  if batch_size % n:
    raise BitbertError(f'{field}={batch_size} is not divisible by the data-parallel mesh size '
                       f'{n} (data x fsdp = {dict(mesh.shape)}); use a multiple of {n}')


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_shardings(mesh, abstract_boxed):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays.

  Unboxed leaves (no logical names) are replicated. A mesh axis that does not divide the
  dimension it would shard is dropped for that dimension, so odd sizes still run.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shapes = nn.meta.unbox(abstract_boxed)

  def resolve(spec, shape):
    spec = nn.logical_to_mesh_axes(tuple(spec), LOGICAL_RULES) if spec else P()
    dims = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape.shape) - len(spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = math.prod(mesh.shape[a] for a in names)
      dims.append(axes if names and shape.shape[i] % size == 0 else None)
    return NamedSharding(mesh, P(*dims))

  return jax.tree.map(resolve, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def param_shardings(mesh, model, params):
  """Shardings for `params` of `model` from its logical axis names (via jax.eval_shape)."""
  abstract = jax.eval_shape(lambda r: model.init(r, **_tiny_input())['params'],
                            jax.random.PRNGKey(0))
  shardings = logical_shardings(mesh, abstract)
  return _match(params, shardings, replicated(mesh))


def _tiny_input():
  ids = jnp.zeros((1, 8), jnp.int32)
  return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=ids)


def _match(tree, shardings, default):
  """`shardings` laid onto `tree`'s structure; leaves it lacks (e.g. learned scales) replicate."""
  flat = {jax.tree_util.keystr(k): s for k, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  return jax.tree_util.tree_map_with_path(lambda k, _: flat.get(jax.tree_util.keystr(k), default),
                                          tree)


def state_shardings(mesh, state, tx=None):
  """A TrainState of shardings: params by their logical axes, the rest replicated."""
  rep = replicated(mesh)
  p_sh = param_shardings(mesh, state.model, state.params)
  aux_sh = jax.tree.map(lambda _: rep, state.aux_params)
  opt_sh = jax.tree.map(lambda _: rep, state.opt_state)
  if tx is not None and state.opt_state != ():
    # A multi_transform group's state holds MaskedNode where the other group's params are.
    masked = lambda v: isinstance(v, optax.MaskedNode)
    opt_sh = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, state.opt_state,
                                   (p_sh, aux_sh), transform_non_params=lambda _: rep,
                                   is_leaf=masked)
  return state.replace(step=rep, params=p_sh, aux_params=aux_sh, opt_state=opt_sh,
                       model_state=jax.tree.map(lambda _: rep, state.model_state), rng=rep)


def device_batch(mesh, batch):
  """A host-local numpy batch -> global arrays sharded over the data-parallel axes."""
  bs = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(bs, np.asarray(batch[k]))
          for k in BATCH_KEYS if k in batch}
