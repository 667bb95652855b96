"""The trainer: its step learns, accumulates micro-batches as one bigger batch and leaves the
state alone on a non-finite loss; its loop turns epochs, max_steps and warmup into steps, ramps
the warm-in, and refuses settings it cannot run, naming the field."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax import optim, sharding, train
from bitbert_jax.distill.objective import Objective, make_loss_fn
from bitbert_jax.errors import BitbertError
from bitbert_jax.logs import MetricsWriter
from bitbert_jax.model import BertConfig, BertModel, init_params
from bitbert_jax.quant import policy_from_name
from bitbert_jax.train_state import new_state

# No dropout: a step is then a function of the batch alone, so runs can be compared exactly.
CFG = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, num_labels=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FIELD = 'config.stages.tiny'


def make_batch(n, seed, seq=8):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, 64, (n, seq)).astype(np.int32)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids),
              labels=rng.integers(0, 2, n).astype(np.int32), weights=np.ones(n, np.float32))


def half(batch, i, n):
  return {k: v[i * n:(i + 1) * n] for k, v in batch.items()}


def fresh_state(policy=None):
  policy = policy or policy_from_name('32-32-32')
  return new_state(CFG, init_params(CFG, policy, rng=jax.random.PRNGKey(0)), policy,
                   rng=jax.random.PRNGKey(1))


def jitted_step(state, lr=1e-3, accum=1, steps=100):
  """(state with its optimizer state, jitted label-loss step) at a constant learning rate."""
  tx, _ = optim.stage_optimizer(state.policy, lr, steps, 0, 0.0, 0.0, accum, FIELD)
  loss_fn = make_loss_fn(state.model, None, Objective(('label',)), False)
  state = state.replace(opt_state=tx.init((state.params, state.aux_params)))
  return state, jax.jit(train.make_train_step(loss_fn, tx))


def test_steps_on_a_fixed_batch_lower_its_loss():
  state, step = jitted_step(fresh_state(), lr=3e-3)
  batch = make_batch(8, seed=0)
  losses = []
  for _ in range(30):
    state, m = step(state, batch, None)
    losses.append(float(m['loss']))
  assert int(state.step) == 30
  assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_accumulation_equals_one_bigger_batch():
  """Two micro-batches of 4 with grad_accum_steps=2 make the update one batch of 8 makes; the
  parameters stay put between the micro-batches."""
  big, small = jitted_step(fresh_state()), jitted_step(fresh_state(), accum=2)
  (big_state, big_step), (small_state, small_step) = big, small
  for update in range(3):
    batch = make_batch(8, seed=update)
    big_state, _ = big_step(big_state, batch, None)
    before = small_state.params
    small_state, _ = small_step(small_state, half(batch, 0, 4), None)
    jax.tree.map(np.testing.assert_array_equal, small_state.params, before)
    small_state, _ = small_step(small_state, half(batch, 1, 4), None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 small_state.params, big_state.params)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), big_state.params,
                                       fresh_state().params))
  assert max(moved) > 1e-3  # the updates were real, not zero on both sides


def test_a_nonfinite_loss_leaves_the_state_but_the_step_and_rng_advance():
  state, step = jitted_step(fresh_state())
  batch = make_batch(8, seed=0)
  batch['weights'][3] = np.nan
  new, m = step(state, batch, None)
  assert float(m['nonfinite']) == 1.0 and not np.isfinite(float(m['loss']))
  for part in ('params', 'opt_state', 'model_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(new, part), getattr(state, part))
  assert int(new.step) == 1 and not np.array_equal(new.rng, state.rng)


class FixedBatches:
  """`steps` distinct batches of 8 per epoch, the same every epoch."""

  def __init__(self, steps):
    self.batches = [make_batch(8, seed=i) for i in range(steps)]

  def steps_per_epoch(self):
    return len(self.batches)

  def epoch(self, epoch, start=0):
    del epoch
    return iter(self.batches[start:])


def run(workdir, batches, state=None, objective=Objective(('label',)), **settings):
  kw = dict(lr=1e-3, epochs=1.0, batch_size=8, log_every=1, checkpoint_every_secs=0.0,
            report_memory=False, field=FIELD)
  kw.update(settings)
  writer = MetricsWriter(workdir, enabled=True)
  try:
    train.train(state or fresh_state(), name='tiny', objective=objective,
                settings=train.Settings(**kw), batches=batches,
                mesh=sharding.make_mesh({'data': -1}), workdir=workdir, writer=writer)
  finally:
    writer.close()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_epochs_round_up_to_steps_and_warmup_counts_epochs(tmp_path):
  """1.5 epochs of 4 batches: 6 steps; warmup=1 (>= 1: epochs) reaches the peak lr after
  4 steps, then decays linearly to 0 over the remaining 2."""
  rows = run(str(tmp_path), FixedBatches(4), epochs=1.5, warmup=1.0, lr=1e-3)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([r['lr'] for r in rows],
                             [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 5e-4], rtol=1e-6, atol=1e-9)


def test_max_steps_overrides_epochs_and_a_fractional_warmup_is_of_all_steps(tmp_path):
  rows = run(str(tmp_path), FixedBatches(4), epochs=5.0, max_steps=10, warmup=0.2)
  assert [r['step'] for r in rows] == list(range(1, 11))
  lrs = [r['lr'] for r in rows]
  assert lrs[2] == pytest.approx(1e-3) and lrs[1] == pytest.approx(5e-4)  # 2 warmup steps


def test_warmin_ramps_the_quantization_over_its_share_of_the_steps(tmp_path):
  rows = run(str(tmp_path), FixedBatches(4), state=fresh_state(policy_from_name('1-1-8')),
             epochs=2.0, warmin=0.5)
  # 8 steps, warmin over 4: lambda before step k (0-based) is k / 4, then 1.
  assert [r['quant_lambda'] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_warmin_is_ignored_in_a_float_stage(tmp_path):
  rows = run(str(tmp_path), FixedBatches(2), warmin=0.5)
  assert all('quant_lambda' not in r for r in rows)


@pytest.mark.parametrize('steps, settings, objective, needle', [
    (2, dict(grad_accum_steps=0), Objective(('label',)),
     rf'{FIELD}\.grad_accum_steps=0: must be >= 1'),
    (2, {}, Objective(('pred',)), rf"{FIELD}: losses \('pred',\) need a teacher"),
    (0, {}, Objective(('label',)), rf'{FIELD}: the training split has fewer examples than one'),
])
def test_settings_it_cannot_run_are_refused_naming_the_field(tmp_path, steps, settings,
                                                             objective, needle):
  with pytest.raises(BitbertError, match=needle):
    run(str(tmp_path), FixedBatches(steps), objective=objective, **settings)
  assert not os.path.exists(tmp_path / 'checkpoints')
