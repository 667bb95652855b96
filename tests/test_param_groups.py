"""Per-group learning rates (quantized latent weights vs the rest) and their sharded state."""
import jax
import jax.numpy as jnp
import numpy as np

from bitbert_jax import optim, sharding
from bitbert_jax.model import BertConfig, init_params
from bitbert_jax.quant import policy_from_name
from helpers import on_8_cpu_devices

TINY = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
POLICY = policy_from_name('1-1-8')


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_labels_follow_the_policy():
  params = init_params(TINY, POLICY)
  labels = _flat(optim.param_labels(POLICY)((params, {'hidden_proj': {'kernel': jnp.ones(2)}})))
  quant = sorted(k for k, v in labels.items() if v == 'quant')
  assert len(quant) == 6 + 1  # q, k, v, attention output, FFN in, FFN out; word embeddings
  assert all('kernel' in k or 'word_embeddings' in k for k in quant)
  for needle in ('LayerNorm', 'bias', 'classifier', 'pooler', 'position_embeddings',
                 'token_type_embeddings', 'hidden_proj'):
    assert all(labels[k] == 'float' for k in labels if needle in k), needle


def test_first_step_moves_each_group_by_its_own_lr():
  # Adam's first update is -lr * g / (|g| + eps) ~ -lr * sign(g): the step size is the group's lr.
  params = init_params(TINY, POLICY)
  tx, schedules = optim.make_optimizer(1e-2, 10, 0, weight_decay=0.0, clip_norm=0,
                                       float_lr=1e-3, labels=optim.param_labels(POLICY))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  labels = _flat(optim.param_labels(POLICY)(params))
  for k, u in _flat(updates).items():
    lr = 1e-2 if labels[k] == 'quant' else 1e-3
    np.testing.assert_allclose(np.asarray(u), -lr / (1 + 1e-6), rtol=1e-5, err_msg=k)
  np.testing.assert_allclose([float(schedules['lr'](0)), float(schedules['lr_float'](0))],
                             [1e-2, 1e-3], rtol=1e-6)


def test_float_warmup_is_its_own():
  tx, schedules = optim.make_optimizer(1.0, 10, 0, float_lr=2.0, float_warmup_steps=4,
                                       labels=lambda t: jax.tree.map(lambda _: 'float', t))
  assert float(schedules['lr'](0)) == 1.0
  np.testing.assert_allclose([float(schedules['lr_float'](i)) for i in (0, 2, 4)], [0, 1, 2])


def test_one_group_unless_asked():
  assert not optim.needs_groups(POLICY, 1e-4, 0.1, 0.0, None)
  assert not optim.needs_groups(POLICY, 1e-4, 0.1, 1e-4, 0.1)
  assert optim.needs_groups(POLICY, 1e-4, 0.1, 1e-3, None)
  assert optim.needs_groups(POLICY, 1e-4, 0.1, 0.0, 0.5)
  assert not optim.needs_groups(policy_from_name('32-32-32'), 1e-4, 0.1, 1e-3, None)  # FP32 stage


def test_sharded_state_of_grouped_optimizer_with_accumulation():
  # Two groups, two micro-batches per update, on 8 devices (2x2x2) against one device.
  runs = on_8_cpu_devices('grouped_accumulation', '1x1x1', '2x2x2')
  one, eight = runs['1x1x1'], runs['2x2x2']
  assert (one['devices'], eight['devices']) == (1, 8)
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=1e-5)
  for a, b in zip(eight['params'], one['params'], strict=True):
    for x, y in zip(a, b, strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  flat = [np.concatenate(p) for p in one['params']]  # before and after each micro-batch
  changed = [not np.allclose(flat[i + 1], flat[i]) for i in range(4)]
  assert changed == [False, True, False, True]  # an update every second micro-batch
  # Each sharded weight's accumulated gradient and Adam moments (in its group) are sharded alike.
  sharded = {k: v for k, v in eight['param_specs'].items() if 'fsdp' in v or 'tensor' in v}
  assert sharded["['encoder']['layer_0']['attention']['query']['kernel']"] == "P('fsdp', 'tensor')"
  for path, spec in sharded.items():
    quant = 'word_embeddings' in path or (path.startswith("['encoder']") and
                                          path.endswith("['kernel']"))
    state = {k: v for k, v in eight['opt_specs'].items() if k.endswith('[0]' + path)}
    assert len(state) == 3 and set(state.values()) == {spec}, (path, state)  # acc, mu, nu
    group = f"inner_states['{'quant' if quant else 'float'}']"
    assert sum(group in k for k in state) == 2, (path, state)


def test_group_fields_parse_from_the_command_line():
  # absl's parser refuses None-valued fields: the new ones are typed placeholders.
  import os
  import subprocess
  import sys
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
  code = ('import sys; from absl import flags; from ml_collections import config_flags; '
          'c = config_flags.DEFINE_config_file("config"); flags.FLAGS(sys.argv); s = '
          'c.value.stages.kd_1bit; o = c.value.optim; '
          'print(o.float_lr, o.float_warmup, s.float_lr, s.float_warmup, s.lr, s.batch_size)')
  out = subprocess.run(
      [sys.executable, '-c', code, '--config=configs/xtc.py:preset=smoke',
       '--config.optim.float_lr=1e-3', '--config.optim.float_warmup=0.2',
       '--config.stages.kd_1bit.float_lr=2e-3', '--config.stages.kd_1bit.float_warmup=1.0',
       '--config.stages.kd_1bit.lr=3e-4', '--config.stages.kd_1bit.batch_size=4'],
      cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
      check=True)
  assert out.stdout.split() == ['0.001', '0.2', '0.002', '1.0', '0.0003', '4']


def test_decay_mask_holds_in_both_groups():
  params = init_params(TINY, POLICY)
  tx, _ = optim.make_optimizer(0.1, 10, 0, weight_decay=0.5, clip_norm=1.0, float_lr=0.2,
                               labels=optim.param_labels(POLICY))
  zero = jax.tree.map(jnp.zeros_like, params)
  updates = _flat(tx.update(zero, tx.init(params), params)[0])
  decayed = {k for k, u in updates.items() if float(jnp.abs(u).sum()) > 0}
  assert "['encoder']['layer_0']['attention']['query']['kernel']" in decayed  # quant group
  assert "['classifier']['kernel']" in decayed  # float group
  assert not any('bias' in k or 'LayerNorm' in k for k in decayed)
