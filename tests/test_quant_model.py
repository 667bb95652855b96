"""The quantized BERT: a jaxpr walk proves which matmuls see quantized weights; layers; training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jcore

from bitbert_jax.model import BertConfig, BertModel, init_params
from bitbert_jax.quant import ActQuant, QuantPolicy, WeightQuant, policy_from_name, quantizers
from bitbert_jax.quant.activations import EMA_MOMENTUM, STATS
from bitbert_jax.quant.layers import QDense

TINY = BertConfig(vocab_size=48, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
ONE_LAYER = TINY.replace(num_hidden_layers=1)  # numeric tests: a smaller program to compile
IDS = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 5) % 48


def _init(cfg, policy=QuantPolicy(), seed=0):
  # Jitted: one compile instead of op-by-op dispatch keeps the suite fast.
  return jax.jit(lambda rng: init_params(cfg, policy, rng=rng))(jax.random.PRNGKey(seed))


def _apply(cfg, policy, params, ids=IDS):
  return jax.jit(lambda p, i: BertModel(cfg, policy).apply({'params': p}, i))(params, ids)


# --- provenance walk over the jaxpr ---------------------------------------------------------
# Each jaxpr variable carries tags (kind, name): ('float', path) derives from the parameter at
# `path` without passing through a quantizer, ('quant', path) through a quantizer (a custom_vjp
# call defined in bitbert_jax.quant.quantizers) applied to parameters only, ('data', 'ids') from
# the token ids. A quantizer whose input derives from data is an activation quantizer: tags pass.


def _is_quantizer(eqn):
  if eqn.primitive.name != 'custom_vjp_call':
    return False
  return getattr(getattr(eqn.params['bwd'], 'f', None), '__module__', '') == quantizers.__name__


def _sub_jaxpr(eqn):
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(key)
    if sub is not None:
      return getattr(sub, 'jaxpr', sub)
  return None


def _walk(jaxpr, in_tags, uses):
  env = dict(zip(jaxpr.invars, in_tags))
  read = lambda v: frozenset() if isinstance(v, jcore.Literal) else env.get(v, frozenset())
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    union = frozenset().union(*ins)
    if eqn.primitive.name in ('dot_general', 'gather'):
      uses.append((eqn.primitive.name, ins))
    sub = _sub_jaxpr(eqn)
    if _is_quantizer(eqn):
      if not any(kind == 'data' for kind, _ in union):
        union = frozenset(('quant' if kind == 'float' else kind, n) for kind, n in union)
      outs = [union] * len(eqn.outvars)
    elif sub is not None and len(sub.invars) == len(ins):
      outs = _walk(sub, ins, uses)
    else:
      outs = [union] * len(eqn.outvars)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _uses(model, params):
  """(primitive, [operand tags]) of every dot_general and gather of model.apply."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = ['/'.join(k.key for k in p) for p, _ in flat]
  closed = jax.make_jaxpr(lambda p, ids: model.apply({'params': p}, ids).logits)(params, IDS)
  in_tags = [frozenset({('float', p)}) for p in paths] + [frozenset({('data', 'ids')})]
  uses = []
  _walk(closed.jaxpr, in_tags, uses)
  return paths, uses


def _violations(policy, paths, uses):
  """What contradicts `policy` in the uses: a list of messages (empty when all is well)."""
  bad = []
  for path in paths:
    quantized = policy.weight_quant(path) is not None
    weight_ops = [tags for prim, ins in uses for tags in ins
                  if any(n == path for _, n in tags) and not any(k == 'data' for k, _ in tags)]
    if path.endswith('kernel') or path.endswith('word_embeddings/embedding'):
      want = {('quant' if quantized else 'float', path)}
      if not weight_ops:
        bad.append(f'{path}: no matmul/gather takes it as a weight')
      bad += [f'{path}: weight operand {sorted(t)} != {sorted(want)}' for t in weight_ops
              if set(t) != want]
    wrong = ('float' if quantized else 'quant', path)
    if any(wrong in tags for _, ins in uses for tags in ins):
      bad.append(f'{path}: some matmul/gather operand derives from {wrong}')
  return bad


@pytest.mark.parametrize('policy', [
    policy_from_name('1-1-8'),
    policy_from_name('2-2-8', weight_groups='row', act_mode='static', ffn_output_bits=32),
    policy_from_name('1-1-1'),
    policy_from_name('1-1-4', act_mode='lsq', split=True),
], ids=['1-1-8', '2-2-8-row-static', '1-1-1-elastic', '1-1-4-lsq-split'])
def test_jaxpr_quantized_weights_feed_their_matmuls(policy):
  params = jax.eval_shape(lambda: init_params(TINY, policy))  # the walk needs shapes only
  paths, uses = _uses(BertModel(TINY, policy), params)
  assert not _violations(policy, paths, uses)
  quantized = [p for p in paths if policy.weight_quant(p) is not None]
  assert 'pooler/kernel' in paths and 'classifier/kernel' in paths
  assert len(quantized) == 1 + 6 * TINY.num_hidden_layers - (2 if policy.name == '2-2-8' else 0)


def test_jaxpr_walk_detects_float_weights():
  # The checker itself: a float model read against the 1-1-8 policy must be flagged per weight.
  params = jax.eval_shape(lambda: init_params(TINY))
  paths, uses = _uses(BertModel(TINY), params)
  bad = _violations(policy_from_name('1-1-8'), paths, uses)
  assert any('attention/query/kernel' in b for b in bad)
  assert any('word_embeddings' in b for b in bad)
  assert not _violations(QuantPolicy(), paths, uses)


# --- model outputs --------------------------------------------------------------------------


def test_float_policy_matches_no_policy_and_one_bit_differs():
  params = _init(ONE_LAYER)
  plain = _apply(ONE_LAYER, QuantPolicy(), params)
  named = _apply(ONE_LAYER, policy_from_name('32-32-32'), params)
  jax.tree.map(np.testing.assert_array_equal, plain, named)
  binary = _apply(ONE_LAYER, policy_from_name('1-1-8'), params)
  assert not np.allclose(binary.logits, plain.logits, atol=1e-6)


def test_one_bit_model_trains():
  policy = policy_from_name('1-1-8')
  model = BertModel(ONE_LAYER, policy)
  params = _init(ONE_LAYER, policy, seed=1)
  ids = jax.random.randint(jax.random.PRNGKey(2), (16, 8), 1, ONE_LAYER.vocab_size)
  labels = (ids[:, 1] % 2).astype(jnp.int32)  # a toy task: the parity of the second token
  tx = optax.adamw(3e-3)

  def loss_fn(p):
    logits = model.apply({'params': p}, ids).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(p, opt):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss, grads

  opt = tx.init(params)
  losses = []
  for i in range(30):
    params, opt, loss, grads = step(params, opt)
    losses.append(float(loss))
    if i == 0:  # the STE lets gradients reach the latent 1-bit weights
      for g in (grads['encoder']['layer_0']['attention']['query']['kernel'],
                grads['embeddings']['word_embeddings']['embedding']):
        assert np.isfinite(g).all() and np.abs(g).max() > 0
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


def test_bfloat16_quantized_model_runs():
  cfg = ONE_LAYER.replace(dtype='bfloat16')
  policy = policy_from_name('1-1-8')
  out = _apply(cfg, policy, _init(cfg, policy))
  assert out.last_hidden_state.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out.logits)).all()


# --- layers ---------------------------------------------------------------------------------


def _binary_per_column(k):
  """Binary of an [in, out] kernel with one scale per output column (output-major rows)."""
  return quantizers.binary(k.T, k.shape[1]).T


@pytest.mark.parametrize('groups', [1, 'row'])
def test_split_dense_sums_two_binarized_halves(groups):
  policy = QuantPolicy(rules=(('kernel', WeightQuant(1, groups)),), split=True)
  layer = QDense(3, policy)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x)['params'])
  assert params['kernel'].shape == (2, 5, 3) and params['bias'].shape == (2, 3)
  params['bias'] = jnp.array([[0.1, 0.2, 0.3], [1.0, -2.0, 0.5]])
  k = params['kernel']
  q = (lambda w: quantizers.binary(w)) if groups == 1 else _binary_per_column
  expected = x @ (q(k[0]) + q(k[1])) + params['bias'][0] + params['bias'][1]
  np.testing.assert_allclose(layer.apply({'params': params}, x), expected, rtol=1e-5, atol=1e-6)


def test_split_model_param_shapes():
  policy = policy_from_name('1-1-8', split=True)
  params = jax.eval_shape(lambda: init_params(TINY, policy))
  assert params['encoder']['layer_0']['attention']['query']['kernel'].shape == (2, 16, 16)
  assert params['encoder']['layer_0']['attention']['query']['bias'].shape == (2, 16)
  assert params['embeddings']['word_embeddings']['embedding'].shape == (2, 48, 16)
  assert params['pooler']['kernel'].shape == (16, 16)


def test_row_groups_quantize_output_rows():
  policy = QuantPolicy(rules=(('kernel', WeightQuant(1, 'row')),))
  layer = QDense(3, policy, use_bias=False)
  x = jnp.eye(5)
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x)['params'])
  np.testing.assert_allclose(layer.apply({'params': params}, x),
                             _binary_per_column(params['kernel']), rtol=1e-6)


def _act_layer(mode, bits=8, nonnegative=False):
  policy = QuantPolicy(act=ActQuant(bits, mode), rules=(('kernel', WeightQuant(32)),))
  return QDense(4, policy, use_bias=False, nonnegative_input=nonnegative)


def test_static_ranges_follow_an_ema_only_when_mutable():
  layer = _act_layer('static')
  x1 = jnp.array([[-2.0, 1.0, 0.5], [0.0, 3.0, -1.0]])
  x2 = jnp.array([[-1.0, 0.5, 0.0], [4.0, 1.0, -6.0]])
  variables = layer.init(jax.random.PRNGKey(0), x1)
  np.testing.assert_array_equal(variables[STATS]['act_range'], [0, 0])  # init: not calibrated
  _, state = layer.apply(variables, x1, mutable=[STATS])
  np.testing.assert_array_equal(state[STATS]['act_range'], [-2, 3])  # first update: as is
  variables = {**variables, **state}
  _, state = layer.apply(variables, x2, mutable=[STATS])
  ema = EMA_MOMENTUM * np.array([-2, 3]) + (1 - EMA_MOMENTUM) * np.array([-6, 4])
  np.testing.assert_allclose(state[STATS]['act_range'], ema, rtol=1e-6)
  # Not mutable: the stored range [-2, 3] quantizes (clip 3, 8 bits); nothing changes.
  eye = jnp.eye(3, 4)
  params = {'kernel': eye}
  out = layer.apply({'params': params, STATS: {'act_range': jnp.array([-2.0, 3.0])}}, x2)
  np.testing.assert_allclose(out[:, :3], quantizers.symmetric_clip(x2, 3.0, 8), rtol=1e-6)
  assert out[1, 0] == 3.0 * 127 / 128 and out[1, 2] == -3.0  # 4 and -6 are clamped
  # Never calibrated and not mutable: the batch's own max|x| is the clip value.
  out = layer.apply({'params': params}, x2)
  np.testing.assert_allclose(out[:, :3], quantizers.symmetric_clip(x2, 6.0, 8), rtol=1e-6)


def test_lsq_step_init_and_gradient():
  layer = _act_layer('lsq', bits=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x)['params'])
  np.testing.assert_allclose(params['act_step'], 2 * np.abs(x).mean() / np.sqrt(7), rtol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2))(params)
  assert grads['act_step'] != 0 and np.isfinite(grads['act_step'])
  # A negative step acts as its absolute value (kept positive).
  neg = {**params, 'act_step': -params['act_step']}
  np.testing.assert_array_equal(layer.apply({'params': neg}, x), layer.apply({'params': params}, x))


@pytest.mark.parametrize('nonnegative', [False, True])
def test_elastic_init_values_and_gradients(nonnegative):
  layer = _act_layer('elastic', bits=1, nonnegative=nonnegative)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
  x = jnp.abs(x) if nonnegative else x
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x)['params'])
  alpha = (4.0 if nonnegative else 2.0) * np.abs(x).mean()
  np.testing.assert_allclose(params['act_alpha'], alpha, rtol=1e-6)
  np.testing.assert_array_equal(params['act_beta'], np.zeros(6))
  params['act_beta'] = jnp.full((6,), 0.1)
  xq = quantizers.elastic_binary(x, alpha, params['act_beta'], signed=not nonnegative)
  np.testing.assert_allclose(layer.apply({'params': params}, x), xq @ params['kernel'], rtol=1e-5,
                             atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2))(params)
  assert grads['act_alpha'] != 0 and np.abs(grads['act_beta']).max() > 0
