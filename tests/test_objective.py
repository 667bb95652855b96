"""The objective: loss weights scale the terms, KL attention and temperature reach the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax.distill import layer_map, losses
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.model import BertConfig, BertModel, init_params

CFG = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, num_labels=3,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(4, 64, (3, 8)), jnp.int32)
  mask = jnp.asarray(np.arange(8)[None] < np.array([[8], [6], [5]]), jnp.int32)
  return dict(input_ids=ids, attention_mask=mask, token_type_ids=jnp.zeros_like(ids),
              weights=jnp.ones(3), labels=jnp.zeros(3, jnp.int32))


def _loss(**objective):
  student, teacher = init_params(CFG, rng=jax.random.PRNGKey(1)), init_params(CFG)
  obj = objective_lib.Objective(('pred', 'attn', 'hidden'), layer_map.uniform(2, 2), **objective)
  fn = objective_lib.make_loss_fn(BertModel(CFG), BertModel(CFG), obj, False)
  loss, (terms, _) = fn(student, {}, {}, _batch(), teacher, jax.random.PRNGKey(0))
  return float(loss), {k: float(v) for k, v in terms.items()}


def test_weights_scale_the_terms_and_per_layer_parts_sum_to_them():
  loss, terms = _loss()
  assert loss == pytest.approx(terms['pred'] + terms['attn'] + terms['hidden'], rel=1e-6)
  assert terms['attn/0'] + terms['attn/1'] == pytest.approx(terms['attn'], rel=1e-6)
  assert sum(terms[f'hidden/{i}'] for i in range(3)) == pytest.approx(terms['hidden'], rel=1e-6)
  weighted, same = _loss(weights=(('pred', 2.0), ('attn', 0.5), ('hidden', 0.0)))
  assert same == terms  # logged unweighted
  assert weighted == pytest.approx(2 * terms['pred'] + 0.5 * terms['attn'], rel=1e-6)


def test_kl_attention_and_temperature_reach_the_loss():
  _, mse = _loss()
  _, kl = _loss(attn_loss='kl', temperature=2.0)
  b = _batch()
  s = BertModel(CFG).apply({'params': init_params(CFG, rng=jax.random.PRNGKey(1))},
                           b['input_ids'], b['attention_mask'])
  t = BertModel(CFG).apply({'params': init_params(CFG)}, b['input_ids'], b['attention_mask'])
  expect = sum(float(losses.attention_kl(s.attention_scores[i], t.attention_scores[i],
                                         b['attention_mask'], b['weights'])) for i in range(2))
  assert kl['attn'] == pytest.approx(expect, rel=1e-5) and kl['attn'] != mse['attn']
  assert kl['pred'] == pytest.approx(float(losses.soft_cross_entropy(
      s.logits, t.logits, b['weights'], 2.0)), rel=1e-5)
  assert kl['hidden'] == mse['hidden']


def test_stage_fields_build_the_objective():
  """A task_kd stage's losses, weights, attn_loss and temperature fields make the loss it trains."""
  import types  # pylint: disable=g-import-not-at-top
  from bitbert_jax import config_lib  # pylint: disable=g-import-not-at-top
  from bitbert_jax.data import get_task  # pylint: disable=g-import-not-at-top
  from bitbert_jax.distill import stage_config, stages  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bitbert_jax.train_state import new_state  # pylint: disable=g-import-not-at-top
  from helpers import tiny_split  # pylint: disable=g-import-not-at-top
  student, teacher = init_params(CFG, rng=jax.random.PRNGKey(1)), init_params(CFG)

  def stage_loss(**fields):
    """The loss (and its terms) of the objective the stage hands to the trainer."""
    handed = {}

    def trainer(state, **kw):
      handed.update(kw)
      return state, None
    config = config_lib.base_config({})
    config.stages = ml_collections.ConfigDict({'kd': config_lib.stage('task_kd', **fields)})
    ctx = stages.StageContext(
        config=ml_collections.FrozenConfigDict(config), mesh=None, writer=None, train=trainer,
        name='kd', stage=ml_collections.FrozenConfigDict(stage_config.section(config.stages.kd)),
        task=get_task('mnli'), teacher=objective_lib.Teacher(CFG, teacher),
        data=types.SimpleNamespace(train=tiny_split(), dev=None, augmented=None))
    stages.task_kd(new_state(CFG, student, rng=jax.random.PRNGKey(2)), ctx)
    fn = objective_lib.make_loss_fn(BertModel(CFG), BertModel(CFG), handed['objective'], False)
    loss, (terms, _) = fn(student, {}, {}, _batch(), teacher, jax.random.PRNGKey(0))
    return float(loss), {k: float(v) for k, v in terms.items() if '/' not in k}

  b = _batch()
  s = BertModel(CFG).apply({'params': student}, b['input_ids'], b['attention_mask'])
  t = BertModel(CFG).apply({'params': teacher}, b['input_ids'], b['attention_mask'])
  soft = lambda temperature: float(losses.soft_cross_entropy(s.logits, t.logits, b['weights'],
                                                             temperature))
  kl = sum(float(losses.attention_kl(s.attention_scores[i], t.attention_scores[i],
                                     b['attention_mask'], b['weights'])) for i in range(2))
  loss, terms = stage_loss(pred_weight=2.0, attn_weight=0.5, hidden_weight=0.0, attn_loss='kl',
                           temperature=2.0)
  assert set(terms) == {'pred', 'attn', 'hidden'} and terms['hidden'] > 0
  assert terms['pred'] == pytest.approx(soft(2.0), rel=1e-5)
  assert terms['attn'] == pytest.approx(kl, rel=1e-5)
  assert loss == pytest.approx(2.0 * soft(2.0) + 0.5 * kl, rel=1e-5)
  loss, terms = stage_loss(losses='stage2', pred_weight=3.0)
  assert set(terms) == {'pred'} and loss == pytest.approx(3.0 * soft(1.0), rel=1e-5)
  loss, terms = stage_loss(losses='stage1')  # the defaults: every weight 1, MSE attention
  assert set(terms) == {'attn', 'hidden'} and terms['attn'] != pytest.approx(kl, rel=1e-3)
  assert loss == pytest.approx(terms['attn'] + terms['hidden'], rel=1e-6)


def test_a_narrow_student_head_is_compared_with_the_teacher_head_of_the_head_map():
  """A student of 1 head per layer against CFG's 2: layer 0 learns teacher head 1, layer 1
  head 0."""
  narrow = CFG.replace(num_attention_heads=1, attention_head_size=8, intermediate_size=16)
  student, teacher = init_params(narrow, rng=jax.random.PRNGKey(1)), init_params(CFG)
  b = _batch()
  s = BertModel(narrow).apply({'params': student}, b['input_ids'], b['attention_mask'])
  t = BertModel(CFG).apply({'params': teacher}, b['input_ids'], b['attention_mask'])
  head_map = ((1,), (0,))
  for name, loss in losses.ATTENTION_LOSSES.items():
    obj = objective_lib.Objective(('attn',), layer_map.uniform(2, 2), attn_loss=name,
                                  head_map=head_map)
    fn = objective_lib.make_loss_fn(BertModel(narrow), BertModel(CFG), obj, False)
    _, (terms, _) = fn(student, {}, {}, b, teacher, jax.random.PRNGKey(0))
    for i, (h,) in enumerate(head_map):
      want = loss(s.attention_scores[i], t.attention_scores[i][:, [h]], b['attention_mask'],
                  b['weights'])
      other = loss(s.attention_scores[i], t.attention_scores[i][:, [1 - h]],
                   b['attention_mask'], b['weights'])
      assert float(terms[f'attn/{i}']) == pytest.approx(float(want), rel=1e-6), name
      assert float(want) != pytest.approx(float(other), rel=1e-3)  # the map decides
