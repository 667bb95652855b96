"""Activation quantization at the inputs of quantized linear layers.

`quantize_input(module, x, act)` is called by a layer (QDense, or a packed layer) on its input;
`module` owns any tracked or learned state, created in its scope. Modes (ActQuant.mode):

* 'dynamic': symmetric, one scale per token (per row of the last dim), from the token itself
  (XTC's reference). No state. A QDense on the integer grid (quant/grid.py: 2..8 bits, a
  quantized weight with row-aligned groups) takes the same quantization as codes and scales
  (`quantizers.activation_codes`) instead of calling `quantize_input`.
* 'static': symmetric with one per-layer range [min, max] tracked in the collection
  `quant_stats` (variable `act_range`) by an exponential moving average, momentum 0.95, as
  DeepSpeed's QuantAct: range <- 0.95 range + 0.05 [min(x), max(x)]; the first update after
  init (a range still [0, 0]) takes the batch's range as is. The clip value is max|range|.
  The range is updated only where the collection is mutable, i.e. in training or calibration:

      out, new_state = model.apply({'params': p, **state}, ids, mutable=['quant_stats'])
      state = new_state  # {'quant_stats': ...}; carry it to the next step and into the export

  In evaluation (`model.apply({'params': p, **state}, ids)`, nothing mutable) the stored range
  is used. A layer whose range was never updated (absent, or still [0, 0]) falls back to the
  current batch's max|x|, so an uncalibrated model still runs (like 'dynamic' per tensor).
  `init` leaves the range at [0, 0]: init batches are often dummies.
* 'lsq': learned step size (LSQ), a scalar param `act_step` initialised from the init batch to
  2 mean|x| / sqrt(Qp), used as max(|act_step|, 1e-5) so that it stays positive.
* 'elastic' (1 bit, BiT): learned scale `act_alpha` (scalar, initialised to 2 mean|x| signed,
  4 mean|x| unsigned, as BiT's AlphaInit with Qp = 1; used as max(|alpha|, 1e-5)) and offset
  `act_beta` (one per input feature, zeros, as BiT's LearnableBias). Signed inputs get
  alpha * sign(x - beta), non-negative ones alpha * round(clip((x - beta) / alpha, 0, 1)).

Signed or non-negative is a static flag of the calling layer (`nonnegative_input`), not a guess
from data: every QDense input in this BERT is signed (LayerNorm outputs, attention context, and
GELU outputs, which reach -0.17), so BERT uses the signed forms; a ReLU FFN could set it.
'lsq' uses the same flag (signed codes [-2^(b-1), 2^(b-1) - 1], else [0, 2^b - 1]).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from bitbert_jax.errors import BitbertError
from bitbert_jax.quant import quantizers

STATS = 'quant_stats'
EMA_MOMENTUM = 0.95
MIN_SCALE = 1e-5  # BiT's floor for learned scales


def _positive(v):
  return jnp.maximum(jnp.abs(v), MIN_SCALE)


def _mean_abs(x):
  return jnp.mean(jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)))


def _dynamic(module, x, bits, nonnegative):
  del module, nonnegative
  return quantizers.quantize_activation(x, bits)


def _static(module, x, bits, nonnegative):
  del nonnegative
  xs = jax.lax.stop_gradient(x).astype(jnp.float32)
  batch_range = jnp.stack([jnp.min(xs), jnp.max(xs)])
  if module.is_mutable_collection(STATS):
    var = module.variable(STATS, 'act_range', jnp.zeros, (2,), jnp.float32)
    if not module.is_initializing():
      fresh = var.value[0] == var.value[1]  # never updated (DeepSpeed's test)
      ema = EMA_MOMENTUM * var.value + (1.0 - EMA_MOMENTUM) * batch_range
      var.value = jnp.where(fresh, batch_range, ema)
    stored = var.value
  elif module.has_variable(STATS, 'act_range'):
    stored = module.get_variable(STATS, 'act_range')
  else:
    stored = jnp.zeros((2,), jnp.float32)
  clip = jnp.max(jnp.abs(stored))
  clip = jnp.where(stored[0] == stored[1], jnp.max(jnp.abs(batch_range)), clip)
  return quantizers.symmetric_clip(x, clip, bits)


def _lsq(module, x, bits, nonnegative):
  _, qp = quantizers.lsq_levels(bits, signed=not nonnegative)
  step = module.param('act_step', lambda _: 2.0 * _mean_abs(x) / jnp.sqrt(float(qp)))
  return quantizers.lsq(x, _positive(step), bits, signed=not nonnegative)


def _elastic(module, x, bits, nonnegative):
  del bits  # 1: ActQuant refuses 'elastic' at other widths
  axis = getattr(module, 'axes', (None,))[0]
  beta = module.param('act_beta', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               (axis,)),
                      (x.shape[-1],), jnp.float32)
  alpha = module.param('act_alpha', lambda _: (4.0 if nonnegative else 2.0) * _mean_abs(x))
  return quantizers.elastic_binary(x, _positive(alpha), beta, signed=not nonnegative)


_MODES = {'dynamic': _dynamic, 'static': _static, 'lsq': _lsq, 'elastic': _elastic}


def quantize_input(module, x, act, nonnegative=False):
  """Quantizes a layer input per `act` (ActQuant); `module` owns any learned or tracked state.

  nonnegative: the layer's inputs are >= 0 (selects the unsigned 'lsq' / 'elastic' forms).
  """
  if act is None or act.bits >= 32:
    return x
  if act.mode not in _MODES:
    raise BitbertError(f'activation mode {act.mode!r} unknown; valid: {", ".join(_MODES)}')
  return _MODES[act.mode](module, x, act.bits, nonnegative)
