"""Training signals of the quantized latent weights, per layer group, computed at log steps.

  signflip_stage/<group>   fraction of latent weights whose sign differs from the stage's start
  signflip_recent/<group>  the same since the previous log step
  quant_relerr/<group>     ||Q(w) - w|| / ||w||, Q the policy's own quantizer (what the forward
                           uses: `quant.layers.quantized_*_planes`)

Groups come from parameter paths: 'embeddings' (embeddings/...), 'attention'
(encoder/layer_i/attention/...), 'ffn' (encoder/layer_i/{intermediate,output}/...), 'other'
(anything else a policy quantizes), and 'all'. Signs are kept packed, 1 bit per weight
(sign(0) = +1 as everywhere), so a reference costs 1/32 of the latent weights' memory.
"""
import flax
import jax
import jax.numpy as jnp

from bitbert_jax.quant import layers

GROUPS = ('embeddings', 'attention', 'ffn', 'other', 'all')


def layer_group(path):
  """'encoder/layer_0/attention/query/kernel' -> 'attention' (see the module docstring)."""
  parts = path.split('/')
  if parts[0] == 'embeddings':
    return 'embeddings'
  if parts[0] == 'encoder' and len(parts) > 2:
    return {'attention': 'attention', 'intermediate': 'ffn', 'output': 'ffn'}.get(parts[2],
                                                                                  'other')
  return 'other'


def quantized_paths(policy, params):
  """Sorted 'a/b/c' paths of the leaves `policy` quantizes."""
  flat = flax.traverse_util.flatten_dict(dict(params), sep='/')
  return tuple(sorted(p for p in flat if policy.weight_quant(p) is not None))


def _leaf(params, path):
  for k in path.split('/'):
    params = params[k]
  return params


def packed_signs(params, paths):
  """A tuple, one uint8 [ceil(n / 8)] per path: bit = latent >= 0, n the leaf's size."""
  return tuple(jnp.packbits(jnp.ravel(_leaf(params, p)) >= 0) for p in paths)


def _planes(policy, path, latent):
  """(quantized planes, latent planes) [P, ...], as the layer quantizes them."""
  if path.endswith('/kernel'):
    planes = layers.quantized_kernel_planes(policy, path, latent, latent.shape[-1])
  else:
    planes = layers.quantized_embedding_planes(policy, path, latent)
  return planes.plane_values(), latent if policy.is_split(path) else latent[None]


def _flips(a, b):
  return jnp.sum(jax.lax.population_count(jnp.bitwise_xor(a, b)).astype(jnp.int32))


def signals(policy, paths, params, ref_stage, ref_recent):
  """(metrics {name: float32 scalar}, current packed signs); refs as `packed_signs(_, paths)`.

  Pure and jittable (policy and paths static).
  """
  current = packed_signs(params, paths)
  sums = {g: dict(n=0, stage=jnp.int32(0), recent=jnp.int32(0), err=jnp.float32(0),
                  norm=jnp.float32(0)) for g in GROUPS}
  for i, p in enumerate(paths):
    latent = jnp.asarray(_leaf(params, p), jnp.float32)
    q, w = _planes(policy, p, latent)
    part = dict(n=latent.size, stage=_flips(current[i], ref_stage[i]),
                recent=_flips(current[i], ref_recent[i]), err=jnp.sum((q - w)**2),
                norm=jnp.sum(w**2))
    for g in (layer_group(p), 'all'):
      sums[g] = {k: sums[g][k] + v for k, v in part.items()}
  out = {}
  for g, s in sums.items():
    if not s['n']:
      continue
    out[f'signflip_stage/{g}'] = s['stage'].astype(jnp.float32) / s['n']
    out[f'signflip_recent/{g}'] = s['recent'].astype(jnp.float32) / s['n']
    out[f'quant_relerr/{g}'] = jnp.sqrt(s['err'] / jnp.maximum(s['norm'], 1e-30))
  return out, current


class SignTracker:
  """The two sign references of a stage and the jitted `signals`; `refs` is checkpointed."""

  def __init__(self, policy, params, sharding=None):
    self.paths = quantized_paths(policy, params)
    self._signs = jax.jit(lambda p: packed_signs(p, self.paths), out_shardings=sharding)
    self._signals = jax.jit(lambda p, a, b: signals(policy, self.paths, p, a, b),
                            out_shardings=sharding)
    self.refs = None

  def abstract(self, params):
    """The shapes of `refs` (an Orbax restore target)."""
    signs = jax.eval_shape(self._signs, params)
    return {'stage': signs, 'recent': signs}

  def __bool__(self):
    return bool(self.paths)  # nothing quantized: no signals

  def reset(self, params):
    """The stage's start: both references are the current signs."""
    signs = self._signs(params)
    self.refs = {'stage': signs, 'recent': signs}

  def log(self, params):
    """The signals now; the recent reference moves to now."""
    metrics, signs = self._signals(params, self.refs['stage'], self.refs['recent'])
    self.refs = {'stage': self.refs['stage'], 'recent': signs}
    return {k: float(v) for k, v in metrics.items()}
