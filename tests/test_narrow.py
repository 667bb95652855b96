"""Narrow models: the head size field, the width-reducing map and its importance scores."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitbert_jax import hf
from bitbert_jax.distill import narrow as narrow_lib
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig, BertModel
from bitbert_jax.model.shapes import expected_shapes, random_params

TINY = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=32, num_labels=2)
KEPT = narrow_lib.Kept(heads=((0, 2), (1, 3)), neurons=(tuple(range(0, 48, 2)),
                                                        tuple(range(24, 48))))


def _batch():
  ids = jax.random.randint(jax.random.PRNGKey(5), (3, 12), 0, TINY.vocab_size)
  return ids, jnp.ones_like(ids).at[1, 8:].set(0)


def _forward(config, params):
  return BertModel(config).apply({'params': params}, *_batch())


def _masked(config, params, kept):
  """The full model with the removed heads' and neurons' contributions zeroed: their rows of
  the attention-output and FFN-output kernels."""
  d = config.head_dim
  params = jax.tree.map(np.array, params)
  for i, (heads, neurons) in enumerate(zip(kept.heads, kept.neurons)):
    layer = params['encoder'][f'layer_{i}']
    for h in set(range(config.num_attention_heads)) - set(heads):
      layer['attention']['output']['kernel'][h * d:(h + 1) * d] = 0
    gone = sorted(set(range(config.intermediate_size)) - set(neurons))
    layer['output']['kernel'][gone] = 0
  return params


def test_head_size_defaults_to_hidden_over_heads_and_is_written_only_when_it_differs():
  assert TINY.head_dim == 8 and TINY.attention_width == 32
  assert 'attention_head_size' not in TINY.to_dict()
  assert TINY.replace(attention_head_size=8) == TINY  # the default, spelled one way
  narrow = TINY.replace(num_attention_heads=2, attention_head_size=8, intermediate_size=24)
  assert narrow.head_dim == 8 and narrow.attention_width == 16
  assert narrow.to_dict()['attention_head_size'] == 8
  assert BertConfig.from_dict(narrow.to_dict()) == narrow
  assert BertConfig.from_dict(TINY.to_dict()) == TINY
  shapes = expected_shapes(narrow)
  assert shapes['encoder/layer_0/attention/query/kernel'] == (32, 16)
  assert shapes['encoder/layer_0/attention/query/bias'] == (16,)
  assert shapes['encoder/layer_0/attention/output/kernel'] == (16, 32)
  assert shapes['encoder/layer_0/intermediate/kernel'] == (32, 24)
  with pytest.raises(BitbertError, match='attention_head_size -1'):
    TINY.replace(attention_head_size=-1)


def test_a_narrow_model_is_refused_in_hugging_face_format_and_nothing_is_written(tmp_path):
  narrow = TINY.replace(num_attention_heads=2, attention_head_size=8)
  with pytest.raises(BitbertError, match=r"2 attention heads of size 8 \(16 features, "
                                         r"hidden_size 32\): Hugging Face's BertModel"):
    hf.save_hf_checkpoint(narrow, random_params(narrow), tmp_path / 'hf')
  assert list(tmp_path.iterdir()) == []


def test_keeping_everything_is_the_identity():
  params = random_params(TINY, seed=1, stddev=0.2)
  everything = narrow_lib.Kept(heads=((0, 1, 2, 3),) * 2, neurons=(tuple(range(48)),) * 2)
  config, narrowed = narrow_lib.narrow(TINY, params, everything)
  assert config == TINY and 'attention_head_size' not in config.to_dict()
  jax.tree.map(np.testing.assert_array_equal, narrowed, params)


def test_the_narrow_model_is_the_full_model_with_the_rest_masked_out():
  params = random_params(TINY, seed=1, stddev=0.2)
  config, narrowed = narrow_lib.narrow(TINY, params, KEPT)
  assert (config.num_attention_heads, config.head_dim, config.intermediate_size) == (2, 8, 24)
  got, want = _forward(config, narrowed), _forward(TINY, _masked(TINY, params, KEPT))
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)
  for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Each kept head computes the scores of the head it was kept from.
  for i, heads in enumerate(KEPT.heads):
    np.testing.assert_allclose(got.attention_scores[i], want.attention_scores[i][:, heads],
                               rtol=1e-5, atol=1e-6)
  # Masking anything else changes the function: the test can fail.
  other = narrow_lib.Kept(heads=((0, 1), (1, 3)), neurons=KEPT.neurons)
  assert np.abs(_forward(*narrow_lib.narrow(TINY, params, other)).logits - got.logits).max() > 1e-4


def test_magnitude_keeps_the_heads_and_neurons_of_largest_norm():
  params = jax.tree.map(np.array, random_params(TINY, seed=2, stddev=0.2))
  layer = params['encoder']['layer_1']
  layer['attention']['value']['kernel'][:, 16:24] *= 10  # head 2: its value columns
  layer['attention']['output']['kernel'][24:32] *= 10  # head 3: its output rows
  layer['intermediate']['kernel'][:, 7] *= 10
  layer['output']['kernel'][40] *= 10
  heads, neurons = narrow_lib.magnitude_importance(TINY, params)
  assert heads.shape == (2, 4) and neurons.shape == (2, 48)
  att = layer['attention']
  want = np.sqrt(sum((att[m]['kernel'][:, 8:16].astype(np.float64)**2).sum()
                     for m in ('query', 'key', 'value')) +
                 (att['output']['kernel'][8:16].astype(np.float64)**2).sum())
  assert heads[1, 1] == pytest.approx(want, rel=1e-12)
  kept = narrow_lib.most_important(heads, neurons, 2, 2)
  assert kept.heads[1] == (2, 3) and kept.neurons[1] == (7, 40)
  assert kept.heads[0] == tuple(sorted(np.argsort(-heads[0])[:2]))


def test_ties_go_to_the_lower_index_and_bad_counts_are_refused():
  kept = narrow_lib.most_important(np.ones((1, 4)), np.ones((1, 6)), 2, 3)
  assert kept == narrow_lib.Kept(heads=((0, 1),), neurons=((0, 1, 2),))
  with pytest.raises(BitbertError, match=r'keep 5 attention heads per layer; valid: 1\.\.4'):
    narrow_lib.most_important(np.ones((1, 4)), np.ones((1, 6)), 5, 3)


def test_bad_kept_lists_and_split_params_are_refused():
  params = random_params(TINY, seed=1)
  with pytest.raises(BitbertError, match=r'kept heads of layer 1 \[3, 1\]: need ascending'):
    narrow_lib.narrow(TINY, params, narrow_lib.Kept(((0, 1), (3, 1)), KEPT.neurons))
  with pytest.raises(BitbertError, match='need one equally long list per layer'):
    narrow_lib.narrow(TINY, params, narrow_lib.Kept(((0, 1), (2,)), KEPT.neurons))
  from bitbert_jax.quant import policy_from_name  # pylint: disable=g-import-not-at-top
  from bitbert_jax.split import split_params  # pylint: disable=g-import-not-at-top
  split, _ = split_params(params, policy_from_name('2-2-8'))
  with pytest.raises(BitbertError, match='not a split one'):
    narrow_lib.narrow(TINY, split, KEPT)


def _batches():
  ids, mask = _batch()
  return [dict(input_ids=ids[lo:lo + 2], attention_mask=mask[lo:lo + 2],
               token_type_ids=jnp.zeros_like(ids[lo:lo + 2])) for lo in (0, 1)]


def _loss(forward, batch, params):
  out = forward(params, batch)
  return jnp.sum(out.logits**2) + sum(jnp.mean(h**2) for h in out.hidden_states[1:])


def _plain_loss(params, batch):
  forward = lambda p, b: BertModel(TINY).apply({'params': p}, b['input_ids'],
                                               b['attention_mask'], b['token_type_ids'])
  return _loss(forward, batch, params)


def _scaled(params, i, module, rows, m):
  """params with rows `rows` of layer i's `module` kernel times m: a mask on what they read."""
  params = jax.tree.map(jnp.asarray, params)
  node = params['encoder'][f'layer_{i}']
  for part in module.split('/'):
    node = node[part]
  node['kernel'] = node['kernel'].at[rows].multiply(m)
  return params


def test_taylor_importance_sums_the_gradient_of_a_head_and_a_neuron_mask_per_batch():
  params = random_params(TINY, seed=3, stddev=0.2)
  params['encoder']['layer_0']['attention']['output']['kernel'][16:24] = 0  # head 2 is silent
  heads, neurons = narrow_lib.taylor_importance(BertModel(TINY), _loss, _batches(), params)
  assert heads.shape == (2, 4) and neurons.shape == (2, 48)
  for i, module, rows, got in ((0, 'attention/output', slice(8, 16), heads[0, 1]),
                               (1, 'attention/output', slice(24, 32), heads[1, 3]),
                               (1, 'output', 5, neurons[1, 5])):
    want = sum(abs(float(jax.grad(lambda m, b=b: _plain_loss(
        _scaled(params, i, module, rows, m), b))(1.0))) for b in _batches())
    assert want > 1e-4 and got == pytest.approx(want, rel=1e-4)
  assert heads[0, 2] == 0 and 2 not in narrow_lib.most_important(heads, neurons, 3, 8).heads[0]
