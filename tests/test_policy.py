"""Policy: W-E-A names, refusals, rule matching on every BERT parameter path, JSON round trip."""
import json

import jax
import pytest

from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig, init_params
from bitbert_jax.quant import ActQuant, QuantPolicy, WeightQuant, policy_from_name
from bitbert_jax.quant import policy as policy_lib

TINY = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=16, max_position_embeddings=16, num_labels=3)


@pytest.fixture(scope='module')
def param_paths():
  params = jax.eval_shape(lambda: init_params(TINY))  # paths only
  return ['/'.join(k.key for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _expected_quantized(num_layers):
  paths = {'embeddings/word_embeddings/embedding'}
  for i in range(num_layers):
    for name in ('attention/query', 'attention/key', 'attention/value', 'attention/output',
                 'intermediate', 'output'):
      paths.add(f'encoder/layer_{i}/{name}/kernel')
  return paths


@pytest.mark.parametrize('name,bits', [
    ('32-32-32', (32, 32, 32)), ('8-8-8', (8, 8, 8)), ('2-2-8', (2, 2, 8)), ('1-1-8', (1, 1, 8)),
    ('1-1-4', (1, 1, 4)), ('1-1-2', (1, 1, 2)), ('1-1-1', (1, 1, 1)), ('4-8-6', (4, 8, 6)),
    ('1-32-8', (1, 32, 8)), ('32-1-32', (32, 1, 32))])
def test_names_parse(name, bits):
  policy = policy_from_name(name)
  assert (policy.weight_bits, policy.embed_bits, policy.act.bits) == bits
  assert policy.name == name
  assert policy.act.mode == ('elastic' if bits[2] == 1 else 'dynamic')


def test_all_named_settings_parse():
  for name in policy_lib.NAMED:
    assert policy_from_name(name).name == name


@pytest.mark.parametrize('name,match', [
    ('1-1', 'W-E-A'), ('a-b-c', 'W-E-A'), ('1-1-8-8', 'W-E-A'), ('', 'W-E-A'),
    ('9-1-8', r'weight \(W\) bits 9.*valid: 1, 2'), ('1-16-8', r'embedding \(E\) bits 16'),
    ('1-1-0', r'activation \(A\) bits 0'), ('1-1-16', r'activation \(A\) bits 16')])
def test_bad_names_refused_with_choices(name, match):
  with pytest.raises(BitbertError, match=match) as err:
    policy_from_name(name)
  assert '1-1-8' in str(err.value)  # names the valid settings


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='1-1-8', act_mode='bogus'), 'act_mode.*valid: dynamic, static, lsq, elastic'),
    (dict(name='1-1-1', act_mode='dynamic'), '1-bit activations need act_mode "elastic"'),
    (dict(name='1-1-8', act_mode='elastic'), 'elastic.*dynamic, static, lsq'),
    (dict(name='1-1-8', weight_groups='col'), 'weight_groups.*"row"'),
    (dict(name='1-1-8', weight_groups=0), 'weight_groups'),
    (dict(name='1-1-8', ffn_output_bits=9), 'ffn_output_bits 9.*valid'),
])
def test_bad_options_refused(kwargs, match):
  name = kwargs.pop('name')
  with pytest.raises(BitbertError, match=match):
    policy_from_name(name, **kwargs)


def test_rules_cover_exactly_the_reference_weights(param_paths):
  policy = policy_from_name('1-1-8')
  quantized = {p for p in param_paths if policy.weight_quant(p) is not None}
  assert quantized == _expected_quantized(TINY.num_hidden_layers)
  floats = set(param_paths) - quantized
  # Everything else stays float: pooler, classifier, LayerNorms, biases, position/type tables.
  for required in ('pooler/kernel', 'pooler/bias', 'classifier/kernel', 'classifier/bias',
                   'embeddings/position_embeddings/embedding',
                   'embeddings/token_type_embeddings/embedding', 'embeddings/LayerNorm/scale',
                   'encoder/layer_0/attention/LayerNorm/bias',
                   'encoder/layer_1/output_LayerNorm/scale', 'encoder/layer_0/attention/query/bias',
                   'encoder/layer_1/output/bias'):
    assert required in floats
  assert all(p.endswith(('bias', 'scale', 'embedding', 'kernel')) for p in floats)
  for p in quantized:
    quant = policy.weight_quant(p)
    assert quant.bits == 1
    assert quant.num_groups == ('row' if 'embeddings' in p else 1)


def test_input_quant_at_the_inputs_of_named_linear_layers(param_paths):
  policy = policy_from_name('1-1-8')
  kernels = [p for p in param_paths if p.endswith('kernel')]
  with_act = {p for p in kernels if policy.input_quant(p) is not None}
  assert with_act == _expected_quantized(TINY.num_hidden_layers) - {
      'embeddings/word_embeddings/embedding'}
  assert policy.input_quant('encoder/layer_0/intermediate/kernel') == ActQuant(8, 'dynamic')
  # '32-32-8': weights float, inputs of the same layers still quantized.
  policy = policy_from_name('32-32-8')
  assert all(policy.weight_quant(p) is None for p in param_paths)
  assert {p for p in kernels if policy.input_quant(p) is not None} == with_act
  assert policy.enabled
  assert policy_from_name('1-1-32').input_quant('encoder/layer_0/output/kernel') is None


def test_float_setting_is_the_default_policy():
  assert policy_from_name('32-32-32') == QuantPolicy()
  assert not QuantPolicy().enabled
  assert policy_from_name('1-1-8').enabled


def test_ffn_output_bits_and_groups():
  policy = policy_from_name('1-1-8', weight_groups='row', ffn_output_bits=2)
  assert policy.weight_quant('encoder/layer_3/output/kernel') == WeightQuant(2, 'row')
  assert policy.weight_quant('encoder/layer_3/attention/output/kernel') == WeightQuant(1, 'row')
  assert policy.weight_quant('encoder/layer_3/intermediate/kernel') == WeightQuant(1, 'row')
  assert policy.weight_quant('embeddings/word_embeddings/embedding') == WeightQuant(1, 'row')
  # 32 keeps the FFN output weight float; its input is still quantized.
  policy = policy_from_name('1-1-8', weight_groups=4, ffn_output_bits=32)
  assert policy.weight_quant('encoder/layer_0/output/kernel') is None
  assert policy.input_quant('encoder/layer_0/output/kernel') is not None
  assert policy.weight_quant('encoder/layer_0/attention/query/kernel') == WeightQuant(1, 4)
  assert policy_from_name('1-1-8', weight_groups='4').weight_quant(
      'encoder/layer_0/intermediate/kernel').num_groups == 4


def test_split_marks_only_one_bit_weights():
  policy = policy_from_name('1-1-8', ffn_output_bits=2, split=True)
  assert policy.is_split('encoder/layer_0/attention/query/kernel')
  assert policy.is_split('embeddings/word_embeddings/embedding')
  assert not policy.is_split('encoder/layer_0/output/kernel')  # 2 bits
  assert not policy.is_split('pooler/kernel')
  assert not policy_from_name('1-1-8').is_split('encoder/layer_0/attention/query/kernel')


def test_a_one_plane_rule_stays_one_plane_in_a_split_policy():
  emb, query = 'embeddings/word_embeddings/embedding', 'encoder/layer_0/attention/query/kernel'
  one = WeightQuant(1, 'row', split=False)
  policy = QuantPolicy(rules=((policy_lib.WORD_EMBEDDINGS, one),
                              (policy_lib.LINEAR_KERNELS, WeightQuant(1))), split=True)
  assert policy.is_split(query) and not policy.is_split(emb)
  # Written only where false: a policy without one-plane rules has the JSON it always had.
  rules = dict(policy.to_dict()['rules'])
  assert rules[policy_lib.WORD_EMBEDDINGS]['split'] is False
  assert 'split' not in rules[policy_lib.LINEAR_KERNELS]
  legacy = json.loads(json.dumps(policy_from_name('1-1-8', split=True).to_dict()))
  assert all('split' not in q for _, q in legacy['rules'])
  assert QuantPolicy.from_dict(legacy).is_split(emb)  # a file without the field: split, as ever
  with pytest.raises(BitbertError, match='2-bit weight is never split'):
    WeightQuant(2, split=False)
  with pytest.raises(BitbertError, match='split 0'):
    WeightQuant(1, split=0)


def test_first_matching_rule_wins():
  policy = QuantPolicy(rules=((r'.*/query/kernel', WeightQuant(32)), (r'.*kernel', WeightQuant(2))))
  assert policy.weight_quant('encoder/layer_0/attention/query/kernel') is None
  assert policy.weight_quant('encoder/layer_0/attention/key/kernel') == WeightQuant(2)
  assert policy.weight_quant('encoder/layer_0/attention/key/kernel_x') is None  # full match


@pytest.mark.parametrize('policy', [
    QuantPolicy(),
    policy_from_name('1-1-8'),
    policy_from_name('2-2-8', weight_groups='row', ffn_output_bits=4, act_mode='static'),
    policy_from_name('1-1-4', weight_groups=2, act_mode='lsq', split=True),
    policy_from_name('1-1-1'),
    QuantPolicy(weight_bits=1, embed_bits=1, split=True,
                rules=((policy_lib.WORD_EMBEDDINGS, WeightQuant(1, 'row', split=False)),
                       (policy_lib.LINEAR_KERNELS, WeightQuant(1)))),
])
def test_json_round_trip_and_hash(policy):
  restored = QuantPolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
  assert restored == policy
  assert hash(restored) == hash(policy)
  assert {policy: 1}[restored] == 1


def test_from_dict_refuses_unknown_fields():
  d = policy_from_name('1-1-8').to_dict()
  d['bits'] = 3
  with pytest.raises(BitbertError, match='unknown field.*bits.*valid'):
    QuantPolicy.from_dict(d)


def test_invalid_components_refused():
  with pytest.raises(BitbertError, match='weight bits 9'):
    WeightQuant(9)
  with pytest.raises(BitbertError, match='num_groups'):
    WeightQuant(1, 'col')
  with pytest.raises(BitbertError, match='act_mode'):
    ActQuant(8, 'minmax')
  with pytest.raises(BitbertError, match='not a valid regex'):
    QuantPolicy(rules=(('(', WeightQuant(1)),))
  # Rules given as a list are stored as a tuple: the policy stays hashable.
  hash(QuantPolicy(rules=[('kernel', WeightQuant(1))]))
