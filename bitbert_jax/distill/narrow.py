"""Width reduction (DynaBERT): keep the most important attention heads and FFN neurons.

A pure map from a BERT's parameter tree to a narrower one: each layer keeps `heads` of its
attention heads (their query, key and value columns and their rows of the attention output) and
`intermediate` of its FFN neurons (their intermediate column and bias, their output row); the
hidden size, embeddings, LayerNorms, pooler and head are kept. The narrow model computes exactly
what the full model computes with the other heads' and neurons' contributions removed. Its heads
keep their size, so heads x head size is no longer hidden_size (`BertConfig.attention_head_size`).

Importance, per layer: `magnitude` (the norm of a head's Q, K, V columns and output rows; of a
neuron's intermediate column and output row) or `taylor` (`taylor_importance`: DynaBERT's
first-order sum over batches of |d loss / d mask| for a mask on each head's context and each
neuron's activation).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bitbert_jax.errors import BitbertError
from bitbert_jax.quant.layers import QDense

_QKV = ('query', 'key', 'value')


@dataclasses.dataclass(frozen=True)
class Kept:
  """What a narrow model kept of its source, per layer (ascending indices): `heads[i]` the
  source heads of layer i (the teacher head each student head is compared with), `neurons[i]`
  its FFN neurons."""
  heads: tuple[tuple[int, ...], ...]
  neurons: tuple[tuple[int, ...], ...]


def _layer(params, i):
  try:
    return params['encoder'][f'layer_{i}']
  except KeyError:
    raise BitbertError(f'narrow: params have no encoder/layer_{i}') from None


def _matrix(node, path):
  w = np.asarray(node['kernel'])
  if w.ndim != 2:
    raise BitbertError(f'narrow: {path}/kernel has shape {list(w.shape)}; narrow a float model '
                       '(2-D kernels), not a split one')
  return w.astype(np.float64)


def magnitude_importance(config, params):
  """(heads [L, N], neurons [L, I]) float64: per head the norm of its Q, K, V columns and
  attention-output rows; per neuron the norm of its intermediate column and output row."""
  n, d = config.num_attention_heads, config.head_dim
  heads, neurons = [], []
  for i in range(config.num_hidden_layers):
    layer, where = _layer(params, i), f'encoder/layer_{i}'
    att = layer['attention']
    sq = sum((_matrix(att[m], f'{where}/attention/{m}')**2).sum(0) for m in _QKV)  # [N d]
    sq = sq + (_matrix(att['output'], f'{where}/attention/output')**2).sum(1)
    heads.append(np.sqrt(sq.reshape(n, d).sum(1)))
    ffn = ((_matrix(layer['intermediate'], f'{where}/intermediate')**2).sum(0) +
           (_matrix(layer['output'], f'{where}/output')**2).sum(1))
    neurons.append(np.sqrt(ffn))
  return np.stack(heads), np.stack(neurons)


def _mask_hook(masks, config):
  """Interceptor: each layer's attention-output input (the heads' contexts) times its head
  mask repeated over the head size, its FFN-output input (the activations) times its neuron
  mask. A mask of ones leaves the forward pass unchanged."""
  targets = {}
  for i in range(config.num_hidden_layers):
    targets[f'encoder/layer_{i}/attention/output'] = lambda i=i: jnp.repeat(
        masks['heads'][i], config.head_dim)
    targets[f'encoder/layer_{i}/output'] = lambda i=i: masks['neurons'][i]

  def hook(next_fun, args, kwargs, context):
    path = '/'.join(context.module.scope.path)
    if context.method_name != '__call__' or not isinstance(context.module, QDense) or (
        path not in targets):
      return next_fun(*args, **kwargs)
    return next_fun(args[0] * targets[path]().astype(args[0].dtype), *args[1:], **kwargs)
  return hook


def taylor_importance(model, loss_fn, batches, *args):
  """(heads [L, N], neurons [L, I]) float64: DynaBERT's first-order importance, the sum over
  `batches` of |d loss / d mask| for a mask (of ones) on each head's context and each FFN
  neuron's activation, i.e. of |sum of gradient x value| over what the unit feeds forward (the
  absolute value per batch, as DynaBERT's code takes it, so that batches do not cancel).

  model: the BertModel whose units are scored; loss_fn(forward, batch, *args) -> scalar, where
  forward(params, batch) is `model`'s output with the masks applied (anything else loss_fn
  runs, e.g. a teacher, is not masked); batches: an iterable of batch dicts.
  """
  cfg = model.config
  masks = {'heads': jnp.ones((cfg.num_hidden_layers, cfg.num_attention_heads), jnp.float32),
           'neurons': jnp.ones((cfg.num_hidden_layers, cfg.intermediate_size), jnp.float32)}

  def masked_loss(masks, batch, *args):
    def forward(params, b):
      with nn.intercept_methods(_mask_hook(masks, cfg)):
        return model.apply({'params': params}, b['input_ids'], b['attention_mask'],
                           b['token_type_ids'])
    return loss_fn(forward, batch, *args)

  grad = jax.jit(jax.grad(masked_loss))
  total = None
  for batch in batches:
    g = {k: np.abs(np.asarray(v, np.float64)) for k, v in grad(masks, batch, *args).items()}
    total = g if total is None else {k: total[k] + g[k] for k in g}
  if total is None:
    raise BitbertError('taylor importance: no batches to measure it on')
  return total['heads'], total['neurons']


def most_important(head_scores, neuron_scores, heads, intermediate):
  """Kept: per layer the `heads` highest head scores and the `intermediate` highest neuron
  scores (ties to the lower index), in ascending order."""
  def top(scores, k, what):
    scores = np.asarray(scores)
    if not 1 <= k <= scores.shape[1]:
      raise BitbertError(f'narrow: keep {k} {what} per layer; valid: 1..{scores.shape[1]}')
    return tuple(tuple(sorted(int(j) for j in np.argsort(-row, kind='stable')[:k]))
                 for row in scores)
  return Kept(top(head_scores, heads, 'attention heads'),
              top(neuron_scores, intermediate, 'FFN neurons'))


def narrow_config(config, heads, intermediate):
  """`config` with `heads` heads of its head size and `intermediate` FFN neurons."""
  return config.replace(num_attention_heads=heads, attention_head_size=config.head_dim,
                        intermediate_size=intermediate)


def _check_kept(config, kept):
  layers = config.num_hidden_layers
  for name, got, size in (('heads', kept.heads, config.num_attention_heads),
                          ('neurons', kept.neurons, config.intermediate_size)):
    if len(got) != layers or len({len(k) for k in got}) != 1:
      raise BitbertError(f'narrow: kept {name} {list(got)}: need one equally long list per '
                         f'layer ({layers} layers)')
    for i, k in enumerate(got):
      if not k or list(k) != sorted(set(k)) or k[0] < 0 or k[-1] >= size:
        raise BitbertError(f'narrow: kept {name} of layer {i} {list(k)}: need ascending '
                           f'distinct indices in 0..{size - 1}')


def narrow(config, params, kept):
  """(narrow config, narrow params) keeping `kept` (a Kept) of the float model (config, params).

  Per layer: query/key/value kernel columns and bias entries of the kept heads, attention-output
  kernel rows of the kept heads; intermediate kernel columns and bias entries of the kept
  neurons, FFN-output kernel rows of the kept neurons. Everything else is the same array.
  """
  _check_kept(config, kept)
  d = config.head_dim
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  out = dict(flat)
  for i, (heads, neurons) in enumerate(zip(kept.heads, kept.neurons)):
    where = f'encoder/layer_{i}'
    cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in heads])
    neurons = np.asarray(neurons)
    take = [(f'attention/{m}/kernel', cols, 1) for m in _QKV]
    take += [(f'attention/{m}/bias', cols, 0) for m in _QKV]
    take += [('attention/output/kernel', cols, 0), ('intermediate/kernel', neurons, 1),
             ('intermediate/bias', neurons, 0), ('output/kernel', neurons, 0)]
    for path, index, axis in take:
      key = f'{where}/{path}'
      if key not in flat:
        raise BitbertError(f'narrow: params have no {key}')
      if np.ndim(flat[key]) != (1 if path.endswith('bias') else 2):
        raise BitbertError(f'narrow: {key} has shape {list(np.shape(flat[key]))}; narrow a '
                           'float model, not a split one')
      out[key] = np.take(np.asarray(flat[key]), index, axis=axis)
  cfg = narrow_config(config, len(kept.heads[0]), len(kept.neurons[0]))
  return cfg, traverse_util.unflatten_dict(out, sep='/')
