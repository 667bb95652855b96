"""The quantized BERT: a jaxpr walk proves which matmuls see quantized weights; layers; training."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jcore

from bitbert_jax.model import BertConfig, BertModel, init_params
from bitbert_jax.packed import layers as packed_layers
from bitbert_jax.packed.bits import pack_codes
from bitbert_jax.quant import ActQuant, QuantPolicy, WeightQuant, policy_from_name, quantizers
from bitbert_jax.quant import grid
from bitbert_jax.quant.activations import EMA_MOMENTUM, STATS
from bitbert_jax.quant.layers import QDense, quantized_kernel_planes

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
# `path` without passing through a quantizer, ('quant', path) through a value quantizer (a
# custom_vjp call defined in bitbert_jax.quant.quantizers with one output) applied to parameters
# only, ('codes', path) and ('scale', path) from the two outputs (integer codes, scales) of a
# codes quantizer (`weight_codes`), ('data', 'ids') from the token ids. A quantizer whose input
# derives from data is an activation quantizer: tags pass. Other calls (the integer-grid dense's
# custom_vjp, jit) are walked into, so a matmul inside them is seen with its operands.
#
# A quantized weight's matmul/gather operand must be {('quant', path)} (a value quantizer),
# {('codes', path), ('scale', path)} (dequantized from codes and scales) or, on the integer
# grid, {('codes', path)}: the integer codes themselves, the scales applied after the matmul.


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
      if any(kind == 'data' for kind, _ in union):
        outs = [union] * len(eqn.outvars)
      else:
        kinds = ('quant',) if len(eqn.outvars) == 1 else ('codes', 'scale')
        outs = [frozenset((k if kind == 'float' else kind, n) for kind, n in union)
                for k in kinds]
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


def _violations(policy, paths, uses, integer_grid=()):
  """What contradicts `policy` in the uses: a list of messages (empty when all is well).

  integer_grid: paths whose matmul must take the integer codes alone ({('codes', path)}).
  """
  bad = []
  for path in paths:
    quantized = policy.weight_quant(path) is not None
    weight_ops = [tags for prim, ins in uses for tags in ins
                  if any(n == path for _, n in tags) and not any(k == 'data' for k, _ in tags)]
    if path.endswith('kernel') or path.endswith('word_embeddings/embedding'):
      if path in integer_grid:
        want = [{('codes', path)}]
      elif quantized:
        want = [{('quant', path)}, {('codes', path), ('scale', path)}, {('codes', path)}]
      else:
        want = [{('float', path)}]
      if not weight_ops:
        bad.append(f'{path}: no matmul/gather takes it as a weight')
      bad += [f'{path}: weight operand {sorted(t)} not one of {want}' for t in weight_ops
              if set(t) not in want]
    wrong = {('float', path)} if quantized else {(k, path) for k in ('quant', 'codes', 'scale')}
    if any(wrong & tags for _, ins in uses for tags in ins):
      bad.append(f'{path}: some matmul/gather operand derives from {sorted(wrong)}')
  return bad


@pytest.mark.parametrize('policy', [
    policy_from_name('1-1-8'),
    policy_from_name('1-1-8', weight_groups='row', split=True),
    policy_from_name('2-2-8', weight_groups='row', act_mode='static', ffn_output_bits=32),
    policy_from_name('1-1-1'),
    policy_from_name('1-1-4', act_mode='lsq', split=True),
], ids=['1-1-8', '1-1-8-row-split', '2-2-8-row-static', '1-1-1-elastic', '1-1-4-lsq-split'])
def test_jaxpr_quantized_weights_feed_their_matmuls(policy):
  params = jax.eval_shape(lambda: init_params(TINY, policy))  # the walk needs shapes only
  paths, uses = _uses(BertModel(TINY, policy), params)
  # Dynamic 8-bit inputs: every quantized linear layer multiplies the weight's integer codes.
  grid = [p for p in paths if p.endswith('kernel') and policy.weight_quant(p) is not None
          and policy.act.mode == 'dynamic' and policy.act.bits == 8]
  assert not _violations(policy, paths, uses, grid)
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
  # And the integer-grid rule: static activations dequantize the weight (codes * scales) before
  # the matmul, which the grid rule must flag for every quantized linear layer.
  static = policy_from_name('1-1-8', act_mode='static')
  paths, uses = _uses(BertModel(TINY, static), jax.eval_shape(lambda: init_params(TINY, static)))
  kernels = [p for p in paths if p.endswith('kernel') and static.weight_quant(p) is not None]
  assert not _violations(static, paths, uses)
  assert len(_violations(static, paths, uses, kernels)) == len(kernels) == 12


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


def _float_formulation(policy, params, x, act_bits):
  """The fake-quantized QDense as dot(Q(x), Q(k0) [+ Q(k1)]) + bias: the reference whose
  straight-through gradients the integer-grid layer must reproduce."""
  k, groups = params['kernel'], policy.rules[0][1].num_groups
  q = lambda w: quantizers.quantize_weight(w.T, policy.rules[0][1].bits,
                                           w.shape[1] if groups == 'row' else groups).T
  kernel = q(k[0]) + q(k[1]) if policy.split else q(k)
  bias = params['bias'].sum(0) if policy.split else params['bias']
  return quantizers.quantize_activation(x, act_bits) @ kernel + bias


def _value_and_vjp(f, params, x):
  """f(params, x) and its vjp with a fixed random cotangent (jitted once)."""
  def run(p, v):
    y, pullback = jax.vjp(f, p, v)
    return y, pullback(jax.random.normal(jax.random.PRNGKey(3), y.shape))
  return jax.jit(run)(params, x)


@pytest.mark.parametrize('bits,groups,split,in_features', [
    (1, 1, False, 40), (2, 3, False, 40), (1, 'row', True, 40),
    (8, 'row', False, 2100),  # 8-bit codes: 2100 * 128 * 128 > 2^24, K in 3 exact chunks
])
def test_integer_grid_dense_values_and_straight_through_gradients(bits, groups, split,
                                                                  in_features):
  policy = QuantPolicy(act=ActQuant(8), rules=(('kernel', WeightQuant(bits, groups)),),
                       split=split)
  layer = QDense(6, policy)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, in_features))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x)['params'])
  params['bias'] = jax.random.normal(jax.random.PRNGKey(2), params['bias'].shape)
  assert len(grid.chunks(in_features, 8, bits)) == (3 if bits == 8 else 1)
  y, got = _value_and_vjp(lambda p, v: layer.apply({'params': p}, v), params, x)
  ref, want = _value_and_vjp(lambda p, v: _float_formulation(policy, p, v, 8), params, x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)  # the same function, rounded apart
  # Straight-through gradients (kernel, bias and input) as the float formulation's.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  # The packed layer (int8 codes, int32 sums per chunk) computes the same float32 output bit for
  # bit.
  planes = quantized_kernel_planes(policy, 'kernel', params['kernel'], 6)
  lead = slice(None) if split else 0
  packed_params = {
      'kernel_codes': pack_codes(np.asarray(planes.output_major_codes()), bits)[lead],
      'kernel_scale': planes.scales[lead],
      'bias': params['bias'].sum(0) if split else params['bias']}
  packed = QDense(6, dataclasses.replace(policy, packed=True))
  run = jax.jit(lambda v, x: packed_layers.apply(packed, v, x))
  np.testing.assert_array_equal(run({'params': packed_params}, x), y)


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
