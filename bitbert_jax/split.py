"""Ternary weight splitting (BinaryBERT, REFERENCE section 5): ternary model -> binary model.

A ternary weight w (quantized alpha * t, t in {-1, 0, 1}) becomes two latent halves w1 + w2 = w
with mean|w1| = mean|w2| = alpha / 2, so that BWN(w1) + BWN(w2) = alpha * t: where t = +-1
both halves share w's sign (alpha/2 + alpha/2), where t = 0 they have opposite signs (cancel).
The binary model `y = BWN(W1) x + BWN(W2) x + b1 + b2` then computes the ternary model's function.

Sets (per group): I = {t != 0}; J = {t = 0, w >= 0}; K = {t = 0, w < 0} (w = 0 goes to J, as
sign(0) = +1); S_X = sum over X of |w|; n = group size.

    b = (alpha * n - sum|w|) / (2 (|J| + |K|))      a = (S_I - S_J + S_K) / (2 S_I)
    w1 = a w on I;  w + b on J;  b on K              w2 = (1 - a) w on I;  -b on J;  w - b on K

Generalised form used when the formula's `a` leaves (0, 1) (possible only for lopsided groups,
e.g. a group of mostly small positive weights): every element of J u K picks which half carries
it (r = +1: w1 = w + s b, w2 = -s b; r = -1: w1 = -s b, w2 = w + s b; s = sign(w)), and
a = (S_I - sum_{J u K} r |w|) / (2 S_I). The reference picks r = +1 on J and -1 on K; the
fallback balances sum r |w| greedily so that |sum r |w|| <= max_{J u K} |w| < alpha <= S_I,
which puts `a` strictly inside (0, 1) and keeps every sign right.

Arithmetic is float64 (numpy); the halves are returned in the input's dtype. t and alpha are
the layer's own, from `layers.quantized_kernel_planes` (a weight within an ulp of the 0.7
mean|w| threshold falls on the side the layer's float32 mean decides).
In float32 the binary model rebuilds the ternary weights to within about 2 ulp(alpha), not bit
for bit: alpha1 = fl(mean|w1|) and alpha2 = fl(mean|w2|) round independently (tests/test_split.py
says why no split can do better in general).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bitbert_jax.errors import BitbertError
from bitbert_jax.quant import groups as groups_lib
from bitbert_jax.quant import quantizers
from bitbert_jax.quant.layers import quantized_embedding_planes, quantized_kernel_planes


_BLOCK = 1 << 16  # elements per float64 work block


def _ternary_groups(w, num_groups):
  """(t [G, n] in {-1, 0, 1}, alpha [G]) exactly as `quantizers.ternary` computes them."""
  t, alpha = quantizers.weight_codes(jnp.asarray(w, jnp.float32), 2, num_groups)
  return np.asarray(t, np.float64).reshape(num_groups, -1), np.asarray(alpha, np.float64)


def _balanced_carriers(absw):
  """r in {+1, -1} per element with |sum r |w|| <= max |w| (greedy, largest first)."""
  r = np.ones(absw.shape, np.float64)
  total = 0.0
  for i in np.argsort(-absw, kind='stable'):
    r[i] = -1.0 if total > 0 else 1.0
    total += r[i] * absw[i]
  return r


def _carriers(w, zero_t, s_i):
  """r [G, n]: +1 where w1 carries a t = 0 element, -1 where w2 does; and a [G] for the I part.

  The reference r = sign(w) (w1 carries J, w2 carries K); groups whose `a` would leave (0, 1)
  get the balanced r instead.
  """
  absw = np.abs(w)
  r = np.where(w >= 0, 1.0, -1.0)
  safe_s_i = np.where(s_i > 0, s_i, 1.0)
  a = np.where(s_i > 0, (s_i - np.where(zero_t, r * absw, 0).sum(1)) / (2 * safe_s_i), 0.5)
  for g in np.nonzero((s_i > 0) & ~((a > 0) & (a < 1)))[0]:
    r[g, zero_t[g]] = _balanced_carriers(absw[g, zero_t[g]])
    a[g] = (s_i[g] - (r[g] * absw[g])[zero_t[g]].sum()) / (2 * s_i[g])
  return r, a


def _split_block(w, t, alpha):
  """Splits groups: w [G, n] float64, t [G, n], alpha [G] -> (w1, w2) float64 [G, n]."""
  n = w.shape[1]
  absw = np.abs(w)
  s = np.where(w >= 0, 1.0, -1.0)
  zero_t = t == 0
  in_i = ~zero_t
  s_i = np.where(in_i, absw, 0.0).sum(1)
  num_zero = zero_t.sum(1)
  # No zeros in t: b is never used; an all-zero group has alpha = 0 = sum|w|, so b = 0.
  b = np.where(num_zero > 0, (alpha * n - absw.sum(1)) / (2 * np.maximum(num_zero, 1)), 0.0)
  r, a = _carriers(w, zero_t, s_i)
  a, sb = a[:, None], s * b[:, None]
  carry1 = r > 0
  w1 = np.where(in_i, a * w, np.where(carry1, w + sb, -sb))
  w2 = np.where(in_i, (1 - a) * w, np.where(carry1, -sb, w + sb))
  return w1, w2


def split_ternary(w, num_groups=1, codes=None, alpha=None):
  """Splits a latent ternary weight into two binary latent halves.

  Args:
    w: array of any shape; groups are `num_groups` equal consecutive chunks of the flattened
      tensor (rows of an output-major matrix when num_groups = rows), as in quantizers.
    num_groups: int dividing w.size; each group is split with its own ternary alpha.
    codes, alpha: w's ternary codes t (w's shape, in {-1, 0, 1}) and scales [num_groups], as the
      model's layer computes them (`layers.quantized_kernel_planes`); by default
      `quantizers.weight_codes(w, 2, num_groups)`. A weight within an ulp of the ternary
      threshold falls on the side the layer's float32 statistics decide, so pass the layer's.

  Returns:
    (w1, w2), each w's shape and float dtype, with w1 + w2 = w (up to the dtype's rounding),
    mean|w1| = mean|w2| = alpha / 2 per group, and binary(w1) + binary(w2) = ternary(w) up to
    the float32 rounding of the two means (see tests/test_split.py).
  """
  w = np.asarray(w)
  if w.size == 0:
    raise BitbertError(f'cannot split an empty tensor (shape {list(w.shape)})')
  dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
  if (codes is None) != (alpha is None):
    raise BitbertError('split_ternary: give both codes and alpha, or neither')
  if codes is None:
    t, alpha = _ternary_groups(w, num_groups)
  else:
    groups_lib.group_size(w.shape, num_groups)  # raises when num_groups does not divide w
    t = np.asarray(codes, np.float64).reshape(num_groups, -1)
    alpha = np.asarray(alpha, np.float64).reshape(num_groups)
    if t.size != w.size or not np.all(np.isin(t, (-1.0, 0.0, 1.0))):
      raise BitbertError(f'split_ternary: codes must be w\'s shape {list(w.shape)} with values '
                         f'in {{-1, 0, 1}}')
  flat = w.reshape(num_groups, -1)
  w1 = np.empty(flat.shape, dtype)
  w2 = np.empty(flat.shape, dtype)
  # Blocks of whole groups keep the float64 temporaries cache-sized (a 30k-row table is 94 MB).
  step = max(1, _BLOCK // flat.shape[1])
  for lo in range(0, num_groups, step):
    sl = slice(lo, lo + step)
    h1, h2 = _split_block(flat[sl].astype(np.float64), t[sl], alpha[sl])
    # + 0.0 turns -0.0 into +0.0 so that no half stores a negative zero.
    w1[sl], w2[sl] = h1 + 0.0, h2 + 0.0
  return w1.reshape(w.shape), w2.reshape(w.shape)


def _binary_rule(quant):
  if quant.bits == 2:
    return dataclasses.replace(quant, bits=1, split=True)  # two planes
  if quant.bits == 1:
    return dataclasses.replace(quant, split=False)  # already binary: one plane, as it is
  return quant


def binary_policy_for(policy):
  """The policy of the split binary model: 2-bit rules become split 1-bit ones, rules already
  1-bit keep one plane (split=False), split=True."""
  rules = tuple((p, _binary_rule(q)) for p, q in policy.rules)
  return dataclasses.replace(
      policy, rules=rules, split=True,
      weight_bits=1 if policy.weight_bits == 2 else policy.weight_bits,
      embed_bits=1 if policy.embed_bits == 2 else policy.embed_bits)


def _check_policy(policy):
  if policy.split:
    raise BitbertError('split_params: the policy is already split (split=True); split a '
                       'ternary (2-bit) model once')
  if policy.packed:
    raise BitbertError('split_params: the policy is a packed (inference) policy; split the '
                       'trained ternary parameters instead')
  if not any(q.bits == 2 for _, q in policy.rules):
    names = ', '.join(f'{p}: {q.bits} bits' for p, q in policy.rules) or 'none'
    raise BitbertError(f'split_params: policy {policy.name} has no 2-bit (ternary) rule to '
                       f'split (rules: {names}); splitting needs a ternary model, e.g. 2-2-8')


def _check_matrix(path, value):
  if np.ndim(value) != 2:
    raise BitbertError(f'split_params: {path} has shape {list(np.shape(value))}; a quantized '
                       f'weight must be a 2-D matrix ([in, out] kernel or [vocab, hidden] table) '
                       f'- are these params already split?')


def split_params(params, policy):
  """Maps ternary parameters onto the equivalent binary (split) model.

  Args:
    params: the parameter tree of BertModel(config, policy) (nested dicts of arrays).
    policy: the ternary QuantPolicy (at least one 2-bit rule, split=False).

  Returns:
    (binary_params, binary_policy). For every parameter under a 2-bit rule: a kernel [in, out]
    is split per group of its output-major [out, in] matrix ('row' groups are output rows) with
    the ternary codes and alphas its layer computes (`layers.quantized_kernel_planes`) and
    stacked to [2, in, out]; its layer's bias [out] becomes [b/2, b/2] ([2, out]); a word
    embedding table [V, H] is split per its rule (one group per row) into [2, V, H]. Parameters
    under a 1-bit rule are already binary: they stay one plane (their rule split=False in the
    binary policy), as does everything else, copied unchanged. binary_policy = policy with
    2-bit rules turned split 1-bit ones, 1-bit rules marked split=False, and split=True.
  """
  _check_policy(policy)
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  out, matched = dict(flat), []
  for path, value in flat.items():
    quant = policy.weight_quant(path)
    if quant is None or quant.bits != 2:
      continue  # float, wider, or already binary (one plane, nothing to split)
    module, _, leaf = path.rpartition('/')
    if leaf not in ('kernel', 'embedding'):
      raise BitbertError(f'split_params: rule for {path} quantizes a {leaf!r}; only kernels '
                         f'and embedding tables can be split')
    _check_matrix(path, value)
    w = np.asarray(value, np.float32)
    # The layer's own ternary codes and alphas (layers.quantized_*_planes decides the layout
    # the quantizer sees), split in the output-major layout whose chunks are the groups.
    if leaf == 'kernel':
      planes = quantized_kernel_planes(policy, path, w, w.shape[1])
    else:
      planes = quantized_embedding_planes(policy, path, w)
    t = np.asarray(planes.output_major_codes()[0])
    view = w.T if planes.transposed else w
    halves = split_ternary(view, planes.groups, codes=t, alpha=planes.scales[0])
    halves = [h.T for h in halves] if planes.transposed else halves
    out[path] = jnp.asarray(np.stack(halves))
    bias_path = f'{module}/bias'
    if leaf == 'kernel' and bias_path in flat:
      bias = np.asarray(flat[bias_path], np.float32)
      if bias.shape != (w.shape[1],):
        raise BitbertError(f'split_params: {bias_path} has shape {list(bias.shape)}; expected '
                           f'[{w.shape[1]}] for kernel {path} {list(w.shape)}')
      out[bias_path] = jnp.asarray(np.stack([bias / 2, bias / 2]))
    matched.append(path)
  if not matched:
    rules = ', '.join(p for p, q in policy.rules if q.bits == 2)
    raise BitbertError(f'split_params: no parameter matches the 2-bit rule(s) {rules}; '
                       f'parameters: {", ".join(sorted(flat)[:8])}, ...')
  return traverse_util.unflatten_dict(out, sep='/'), binary_policy_for(policy)
