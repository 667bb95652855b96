"""What a stage optimises: the teacher, which losses are summed and how they are weighted.

`make_loss_fn` assembles the objective's terms from the student's and the teacher's outputs;
the trainer only differentiates it.
"""
import dataclasses
from typing import Any

import jax
import numpy as np

from bitbert_jax.distill import losses


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A model the student learns from (or is built from): its BertConfig and parameters."""
  config: Any
  params: Any


@dataclasses.dataclass(frozen=True)
class Objective:
  """Which losses a stage sums: 'label' (gold labels, fine-tuning only), 'pred' (teacher
  logits), 'attn' (attention scores), 'hidden' (hidden states); each times its entry of
  `weights` ((name, weight) pairs; 1 if absent). attn_loss: 'mse' of the pre-softmax scores or
  'kl' of the probabilities (`losses.ATTENTION_LOSSES`). head_map: for a student with fewer
  heads than its teacher, per student layer the teacher head each of its heads is compared with
  (None: head h with head h)."""
  losses: tuple[str, ...]
  layer_map: Any = None
  temperature: float = 1.0
  weights: tuple[tuple[str, float], ...] = ()
  attn_loss: str = 'mse'
  head_map: tuple[tuple[int, ...], ...] | None = None

  def weight(self, term):
    return dict(self.weights).get(term, 1.0)

  @property
  def needs_teacher(self):
    return bool(set(self.losses) & {'pred', 'attn', 'hidden'})


def make_loss_fn(student, teacher_model, objective, is_regression):
  """loss_fn(params, aux, model_state, batch, teacher_params, rng, quant_mix=None) ->
  (loss, (terms, state)); quant_mix: the student's warm-in lambda (None: fully quantized)."""

  def loss_fn(params, aux_params, model_state, batch, teacher_params, rng, quant_mix=None):
    mutable = list(model_state) if model_state else False
    out = student.apply({'params': params, **model_state}, batch['input_ids'],
                        batch['attention_mask'], batch['token_type_ids'], deterministic=False,
                        rngs={'dropout': rng}, mutable=mutable, quant_mix=quant_mix)
    out, new_model_state = out if mutable else (out, model_state)
    w, mask = batch['weights'], batch['attention_mask']
    terms = {}
    if 'label' in objective.losses:
      terms['label'] = losses.label_loss(out.logits, batch['labels'], w, is_regression)
    if objective.needs_teacher:
      t = teacher_model.apply({'params': teacher_params}, batch['input_ids'], mask,
                              batch['token_type_ids'], deterministic=True)
      t = jax.lax.stop_gradient(t)
      lmap = objective.layer_map
      if 'pred' in objective.losses:
        terms['pred'] = losses.prediction_loss(out.logits, t.logits, w, is_regression,
                                               objective.temperature)
      if 'attn' in objective.losses:
        attention_loss = losses.ATTENTION_LOSSES[objective.attn_loss]
        terms.update(_per_layer('attn', [
            attention_loss(s, _teacher_heads(t.attention_scores[j], objective.head_map, i),
                           mask, w)
            for i, (s, j) in enumerate(zip(out.attention_scores, lmap.attention))]))
      if 'hidden' in objective.losses:
        proj = aux_params.get('hidden_proj') if aux_params else None
        terms.update(_per_layer('hidden', [losses.hidden_mse(s, t.hidden_states[j], w, proj)
                                           for s, j in zip(out.hidden_states, lmap.hidden)]))
    # Terms are logged unweighted; the loss weighs them (per-layer parts are not summed twice).
    loss = sum(objective.weight(k) * v for k, v in terms.items() if '/' not in k)
    return loss, (terms, new_model_state)

  return loss_fn


def _teacher_heads(scores, head_map, i):
  """The teacher's scores [B, N, S, S] of the heads student layer i is compared with."""
  return scores if head_map is None else scores[:, np.asarray(head_map[i])]


def _per_layer(name, values):
  """{name: sum, name/i: values[i]}: the summed term and each student layer's part."""
  return {name: sum(values), **{f'{name}/{i}': v for i, v in enumerate(values)}}
