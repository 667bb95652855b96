"""The train state that every stage maps to a new one: a pytree Orbax can save whole."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitbert_jax.model import BertConfig, BertModel
from bitbert_jax.quant.policy import QuantPolicy


@flax.struct.dataclass
class TrainState:
  """params: the student BERT; aux_params: distillation-only parameters (e.g. `hidden_proj`,
  dropped after distillation); model_state: non-trainable collections (e.g. `quant_stats`);
  opt_state: the current stage's optimizer state (each stage starts a fresh optimizer)."""
  step: jax.Array
  params: Any
  aux_params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array
  model_config: BertConfig = flax.struct.field(pytree_node=False)
  policy: QuantPolicy = flax.struct.field(pytree_node=False)

  @property
  def model(self):
    return BertModel(self.model_config, self.policy)


def new_state(model_config, params, policy=QuantPolicy(), rng=None, model_state=None):
  """A state with no optimizer yet (stages create their own)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, aux_params={},
                    model_state=model_state or {}, opt_state=(), rng=rng,
                    model_config=model_config, policy=policy)


def sample_input(seq_len=8):
  ids = jnp.zeros((2, seq_len), jnp.int32)
  return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=jnp.zeros_like(ids))


def init_variables(model, rng, batch=None):
  """All variables of a model (boxes removed); `batch` feeds data-dependent initialisers."""
  batch = sample_input() if batch is None else batch
  variables = model.init({'params': rng, 'dropout': rng}, batch['input_ids'],
                         batch['attention_mask'], batch['token_type_ids'])
  return nn.meta.unbox(variables)


def adapt_params(old, fresh):
  """Keeps every old leaf whose path and shape exist in `fresh`; new leaves come from `fresh`.

  Used when the policy changes (e.g. learned activation scales appear) or a head is attached.
  """
  flat_old = flax.traverse_util.flatten_dict(old) if old else {}
  flat_new = flax.traverse_util.flatten_dict(fresh)
  out = {k: flat_old[k] if k in flat_old and np.shape(flat_old[k]) == np.shape(v) else v
         for k, v in flat_new.items()}
  return flax.traverse_util.unflatten_dict(out)


def with_policy(state, policy, batch=None):
  """The state under a new quantization policy: same latent weights, new quantizer state."""
  model = BertModel(state.model_config, policy)
  rng, init_rng = jax.random.split(state.rng)
  fresh = init_variables(model, init_rng, batch)
  params = adapt_params(state.params, fresh.pop('params'))
  model_state = adapt_params(state.model_state, fresh)
  return state.replace(params=params, model_state=model_state, policy=policy, rng=rng)
