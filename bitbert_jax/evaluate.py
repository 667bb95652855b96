"""Dev-set evaluation: logits of a split in its order, and the task's metrics from them.

One jitted, sharded eval step per model and mesh, cached across calls (a stage evaluates many
times).
"""
import functools

import jax
import numpy as np
from jax.experimental import multihost_utils

from bitbert_jax import preempt
from bitbert_jax import sharding
from bitbert_jax.data import batching
from bitbert_jax.data import metrics as metrics_lib
from bitbert_jax.model import BertModel


@functools.lru_cache(maxsize=16)
def _eval_step(config, policy, mesh, param_sh, state_sh):
  """The jitted eval step for one model and mesh, compiled once per batch shape, not per call."""
  model = BertModel(config, policy)

  def logits_fn(params, model_state, batch):
    return model.apply({'params': params, **model_state}, batch['input_ids'],
                       batch['attention_mask'], batch['token_type_ids']).logits

  batch_sh = {k: sharding.batch_sharding(mesh) for k in sharding.BATCH_KEYS}
  unflatten = lambda sh: jax.tree_util.tree_unflatten(sh[0], sh[1])
  return jax.jit(logits_fn, in_shardings=(unflatten(param_sh), unflatten(state_sh), batch_sh),
                 out_shardings=sharding.replicated(mesh))


def _hashable(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple(leaves)


def predict(model, params, model_state, encoded, batch_size, mesh):
  """Logits (or regression scores) [N, C] for every example of a split, in split order."""
  p_sh = sharding.param_shardings(mesh, model, params)
  ms_sh = jax.tree.map(lambda _: sharding.replicated(mesh), model_state)
  params, model_state = jax.device_put((params, model_state), (p_sh, ms_sh))
  step = _eval_step(model.config, model.policy, mesh, _hashable(p_sh), _hashable(ms_sh))
  out = np.zeros((len(encoded), model.config.num_labels), np.float32)
  for batch in batching.eval_batches(encoded, batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    preempt.check('evaluation')
    batch_in = sharding.device_batch(mesh, batch)
    batch_in.setdefault('labels', batch_in['weights'])  # eval batches need no labels
    logits = np.asarray(step(params, model_state, batch_in))  # replicated: every host has all
    index = multihost_utils.process_allgather(batch['index'], tiled=True) \
        if jax.process_count() > 1 else batch['index']
    real = index >= 0
    out[index[real]] = logits[real]
  return out


def evaluate(model, params, model_state, task, dev_sets, batch_size, mesh):
  """{split: metrics} plus 'score' = the task's main score on the first dev split."""
  results = {}
  for split, encoded in dev_sets.items():
    logits = predict(model, params, model_state, encoded, batch_size, mesh)
    results[split] = metrics_lib.compute_metrics(task, logits, encoded.labels)
  first = next(iter(results.values()))
  results['score'] = task.score(first)
  return results


def flat_metrics(evals):
  """{'split/metric': value} of `evaluate`'s results ('score' left out)."""
  return {f'{split}/{k}': v for split, m in evals.items() if isinstance(m, dict)
          for k, v in m.items()}
