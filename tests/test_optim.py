"""The optimizer: schedule shape, decay mask, refusals."""
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax import optim
from bitbert_jax.errors import BitbertError


def test_warmup_then_linear_decay():
  s = optim.learning_rate_schedule(1.0, 10, 2)
  np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 6, 10)], [0, 0.5, 1.0, 0.5, 0.0])


def test_decay_mask_spares_biases_layernorm_and_act_scales():
  params = {'layer': {'kernel': jnp.ones(2), 'bias': jnp.ones(2), 'act_step': jnp.ones(())},
            'LayerNorm': {'scale': jnp.ones(2), 'bias': jnp.ones(2)}}
  mask = optim._decay_mask(params)
  assert mask['layer'] == {'kernel': True, 'bias': False, 'act_step': False}
  assert mask['LayerNorm'] == {'scale': False, 'bias': False}


def test_weight_decay_applies_only_where_masked():
  tx, _ = optim.make_optimizer(0.1, 10, 0, weight_decay=0.5, clip_norm=0)
  params = {'kernel': jnp.ones(3), 'bias': jnp.ones(3)}
  zero = {'kernel': jnp.zeros(3), 'bias': jnp.zeros(3)}
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates['kernel']).sum()) > 0
  assert float(jnp.abs(updates['bias']).sum()) == 0


@pytest.mark.parametrize('kw,needle', [(dict(lr=-1e-5), 'optim.lr=-1e-05'),
                                       (dict(lr=0.0), 'must be > 0'),
                                       (dict(weight_decay=-0.1), 'weight_decay'),
                                       (dict(total_steps=0), 'training steps')])
def test_refusals(kw, needle):
  args = dict(lr=1e-4, total_steps=10, warmup_steps=1) | kw
  with pytest.raises(BitbertError, match=needle):
    optim.make_optimizer(**args)
