"""Training signals: sign flips and quantization error per layer group, exact on hand-made trees."""
import jax.numpy as jnp
import numpy as np

from bitbert_jax import signals
from bitbert_jax.quant import policy_from_name

POLICY = policy_from_name('1-1-8')


def _params(rng):
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  layer = {'attention': {'query': {'kernel': normal(8, 8), 'bias': normal(8)}},
           'intermediate': {'kernel': normal(8, 16)}, 'output': {'kernel': normal(16, 8)}}
  return {'embeddings': {'word_embeddings': {'embedding': normal(10, 8)},
                         'position_embeddings': {'embedding': normal(4, 8)}},
          'encoder': {'layer_0': layer}, 'classifier': {'kernel': normal(8, 2)}}


def test_groups_from_paths():
  assert signals.layer_group('encoder/layer_3/attention/output/kernel') == 'attention'
  assert signals.layer_group('encoder/layer_0/intermediate/kernel') == 'ffn'
  assert signals.layer_group('encoder/layer_0/output/kernel') == 'ffn'
  assert signals.layer_group('embeddings/word_embeddings/embedding') == 'embeddings'
  assert signals.layer_group('pooler/kernel') == 'other'


def test_only_quantized_weights_are_tracked():
  paths = signals.quantized_paths(POLICY, _params(np.random.default_rng(0)))
  assert paths == ('embeddings/word_embeddings/embedding', 'encoder/layer_0/attention/query/kernel',
                   'encoder/layer_0/intermediate/kernel', 'encoder/layer_0/output/kernel')


def test_flip_fractions_are_exact():
  params = _params(np.random.default_rng(0))
  tracker = signals.SignTracker(POLICY, params)
  tracker.reset(params)
  ffn = params['encoder']['layer_0']['intermediate']['kernel']
  # Flip 32 of the 128 intermediate weights; at the next log, 16 of the 64 query weights.
  flip = np.zeros(ffn.size, bool)
  flip[:32] = True
  params['encoder']['layer_0']['intermediate']['kernel'] = jnp.where(flip.reshape(ffn.shape),
                                                                      -ffn, ffn)
  m = tracker.log(params)
  # ffn = intermediate (128) + output (128) weights
  assert m['signflip_stage/ffn'] == 32 / 256 and m['signflip_recent/ffn'] == 32 / 256
  assert m['signflip_stage/attention'] == 0 and m['signflip_stage/embeddings'] == 0
  assert m['signflip_stage/all'] == np.float32(32) / np.float32(80 + 64 + 256)
  q = params['encoder']['layer_0']['attention']['query']['kernel']
  params['encoder']['layer_0']['attention']['query']['kernel'] = q.at[:2].multiply(-1)
  m = tracker.log(params)
  assert m['signflip_recent/ffn'] == 0 and m['signflip_stage/ffn'] == 32 / 256
  assert m['signflip_recent/attention'] == 16 / 64 and m['signflip_stage/attention'] == 16 / 64


def test_zero_counts_as_positive():
  params = _params(np.random.default_rng(1))
  emb = jnp.abs(params['embeddings']['word_embeddings']['embedding'])
  params['embeddings']['word_embeddings']['embedding'] = emb
  tracker = signals.SignTracker(POLICY, params)
  tracker.reset(params)
  params['embeddings']['word_embeddings']['embedding'] = emb.at[0].set(0.0)
  assert tracker.log(params)['signflip_stage/embeddings'] == 0


def test_relative_error_is_zero_for_binary_weights_and_exact_otherwise():
  params = _params(np.random.default_rng(2))
  binary = jnp.where(np.arange(128).reshape(8, 16) % 3 == 0, 0.5, -0.5)
  params['encoder']['layer_0']['intermediate']['kernel'] = binary
  params['encoder']['layer_0']['output']['kernel'] = binary.T
  tracker = signals.SignTracker(POLICY, params)
  tracker.reset(params)
  m = tracker.log(params)
  assert m['quant_relerr/ffn'] == 0.0
  q = np.asarray(params['encoder']['layer_0']['attention']['query']['kernel'], np.float64)
  expected = np.linalg.norm(np.abs(q).mean() * np.where(q >= 0, 1, -1) - q) / np.linalg.norm(q)
  np.testing.assert_allclose(m['quant_relerr/attention'], expected, rtol=1e-5)
  emb = np.asarray(params['embeddings']['word_embeddings']['embedding'], np.float64)  # per row
  q_emb = np.abs(emb).mean(1, keepdims=True) * np.where(emb >= 0, 1, -1)
  np.testing.assert_allclose(m['quant_relerr/embeddings'],
                             np.linalg.norm(q_emb - emb) / np.linalg.norm(emb), rtol=1e-5)


def test_nothing_quantized_no_signals():
  assert not signals.SignTracker(policy_from_name('32-32-32'), _params(np.random.default_rng(0)))


def test_relative_error_uses_the_centered_quantizer():
  policy = policy_from_name('1-1-8', binary_mode='centered')
  params = _params(np.random.default_rng(3))
  two_values = jnp.where(np.arange(128).reshape(8, 16) % 2 == 0, 0.75, -0.25)  # mean 0.25
  params['encoder']['layer_0']['intermediate']['kernel'] = two_values
  params['encoder']['layer_0']['output']['kernel'] = two_values.T
  tracker = signals.SignTracker(policy, params)
  tracker.reset(params)
  assert tracker.log(params)['quant_relerr/ffn'] < 1e-6  # bwn would leave an error here
  assert signals.SignTracker(POLICY, params).paths == tracker.paths
