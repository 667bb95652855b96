"""AdamW with linear warmup and decay and global-norm clipping (BERT's recipe).

Optionally two parameter groups, each with its own learning rate and warmup: the quantized
latent weights ('quant') and everything else ('float': LayerNorms, biases, head, float
embeddings, distillation-only parameters), via `optax.multi_transform`; `param_labels` tells
them apart by the quantization policy.
"""
import jax
import optax

from bitbert_jax.errors import BitbertError

GROUPS = ('quant', 'float')


def _decay_mask(params):
  # BERT convention: no weight decay on biases and LayerNorm parameters; none on learned
  # activation-quantizer scales either (decay would shrink the quantization range).
  def decays(path, _):
    names = [str(getattr(k, 'key', k)) for k in path]
    return not (names[-1] in ('bias', 'scale') or names[-1].startswith('act_') or
                any('LayerNorm' in n for n in names))
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(lr, total_steps, warmup_steps):
  warmup_steps = min(warmup_steps, total_steps)
  return optax.join_schedules([
      optax.linear_schedule(0.0, lr, max(warmup_steps, 1)),
      optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1)),
  ], [warmup_steps])


def _adamw(schedule, weight_decay):
  return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-6, weight_decay=weight_decay,
                     mask=_decay_mask)


def make_optimizer(lr, total_steps, warmup_steps, weight_decay=0.01, clip_norm=1.0,
                   field='optim', float_lr=None, float_warmup_steps=None, labels=None):
  """Returns (optax transform, {'lr': schedule, 'lr_float': schedule}).

  labels: None (one group), or a function of the params tree giving 'quant' or 'float' per leaf;
  then the 'float' leaves train with `float_lr` (None/0: lr) and `float_warmup_steps` (None:
  warmup_steps). Clipping stays global over both groups. Refuses nonsensical settings by field.
  """
  if not lr > 0:
    raise BitbertError(f'{field}.lr={lr}: the learning rate must be > 0')
  if float_lr is not None and float_lr < 0:
    raise BitbertError(f'{field}.float_lr={float_lr}: must be >= 0 (0: the same as lr)')
  if weight_decay < 0:
    raise BitbertError(f'{field}.weight_decay={weight_decay}: must be >= 0')
  if total_steps < 1:
    raise BitbertError(f'{field}: {total_steps} training steps; give epochs or steps > 0')
  schedule = learning_rate_schedule(lr, total_steps, warmup_steps)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
  if labels is None:
    parts.append(_adamw(schedule, weight_decay))
    return optax.chain(*parts), {'lr': schedule, 'lr_float': schedule}
  float_schedule = learning_rate_schedule(
      float_lr or lr, total_steps,
      warmup_steps if float_warmup_steps is None else float_warmup_steps)
  parts.append(optax.multi_transform(
      {'quant': _adamw(schedule, weight_decay), 'float': _adamw(float_schedule, weight_decay)},
      labels))
  return optax.chain(*parts), {'lr': schedule, 'lr_float': float_schedule}


def param_labels(policy):
  """labels(trainable) for `make_optimizer`: 'quant' where `policy` quantizes the leaf of
  the student's params (a (params, aux_params) tuple or a params dict), else 'float'."""

  def label(path, _):
    if isinstance(path[0], jax.tree_util.SequenceKey):
      if path[0].idx != 0:
        return 'float'  # aux_params: distillation-only, never quantized
      path = path[1:]
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    return 'quant' if policy.weight_quant(name) is not None else 'float'

  return lambda tree: jax.tree_util.tree_map_with_path(label, tree)


def needs_groups(policy, lr, warmup, float_lr, float_warmup):
  """Whether the stage needs two optimizer groups: a float setting differs and the policy
  quantizes something (in an FP32 stage everything trains at lr)."""
  differs = (float_lr and float_lr != lr) or (float_warmup is not None and float_warmup != warmup)
  return bool(differs) and any(q.bits < 32 for _, q in policy.rules)


def stage_optimizer(policy, lr, steps, warmup_steps, weight_decay, clip_norm, accum, field,
                    float_lr=None, float_warmup_steps=None, grouped=False):
  """`make_optimizer` for one stage: two groups by `param_labels(policy)` when `grouped`,
  updating once every `accum` micro-batches."""
  tx, schedule = make_optimizer(lr, steps, warmup_steps, weight_decay, clip_norm, field=field,
                                float_lr=float_lr, float_warmup_steps=float_warmup_steps,
                                labels=param_labels(policy) if grouped else None)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, schedule
