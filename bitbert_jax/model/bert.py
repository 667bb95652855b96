"""A pure-functional Flax linen BERT with policy-driven quantization and distillation outputs.

Parameter paths mirror Hugging Face's names (see `bitbert_jax.hf`):
  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding,
  embeddings/LayerNorm, encoder/layer_{i}/attention/{query,key,value,output,LayerNorm},
  encoder/layer_{i}/{intermediate,output,output_LayerNorm}, pooler, classifier.
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bitbert_jax.model import gelu_erf
from bitbert_jax.model.config import BertConfig
from bitbert_jax.quant.layers import QDense, QEmbed, default_init
from bitbert_jax.quant.policy import QuantPolicy


@flax.struct.dataclass
class BertOutput:
  """Shapes: B batch, S sequence, H hidden, N heads, L layers, C labels.

  hidden_states: L+1 arrays [B, S, H], the embedding output first.
  attention_scores: L arrays [B, N, S, S], q.k / sqrt(d) before the mask and the softmax.
  logits: [B, C] when the config has a head, else None.
  """
  last_hidden_state: jax.Array
  pooled_output: jax.Array
  hidden_states: tuple[jax.Array, ...]
  attention_scores: tuple[jax.Array, ...]
  logits: jax.Array | None = None


def float_dtype(config):
  """Dtype of LayerNorm, attention softmax and logits: float32, or float64 for exact serving."""
  return jnp.float64 if config.dtype == 'float64' else jnp.float32


def _activation(name, dtype):
  if name == 'relu':
    return nn.relu
  if name == 'gelu' and jnp.dtype(dtype) == jnp.float64:  # ONNX Runtime has no float64 Erf
    return gelu_erf.gelu
  return lambda x: nn.gelu(x, approximate=name != 'gelu')  # 'gelu' is the exact erf form


def _layer_norm(config, name):
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=float_dtype(config), name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))


class BertEmbeddings(nn.Module):
  config: BertConfig
  policy: QuantPolicy

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic, quant_mix=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    words = QEmbed(cfg.vocab_size, cfg.hidden_size, self.policy, dtype=jnp.float32,
                   name='word_embeddings')(input_ids, quant_mix).astype(float_dtype(cfg))
    init = nn.with_logical_partitioning(default_init, (None, 'embed'))
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                   name='position_embeddings')(positions)
    types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                     name='token_type_embeddings')(token_type_ids)
    x = _layer_norm(cfg, 'LayerNorm')(words + pos + types)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return x.astype(dtype)


class BertAttention(nn.Module):
  config: BertConfig
  policy: QuantPolicy

  @nn.compact
  def __call__(self, x, mask, deterministic, quant_mix=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    b, s, _ = x.shape
    # heads x head size features (hidden_size unless the model is narrow); output maps back.
    dense = lambda name, n, axes: QDense(n, self.policy, axes, dtype, name=name)
    split_heads = lambda t: t.reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
    q = split_heads(dense('query', cfg.attention_width, ('embed', 'heads'))(x, quant_mix))
    k = split_heads(dense('key', cfg.attention_width, ('embed', 'heads'))(x, quant_mix))
    v = split_heads(dense('value', cfg.attention_width, ('embed', 'heads'))(x, quant_mix))
    f = float_dtype(cfg)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(f) / jnp.sqrt(f(cfg.head_dim))
    # Padding keys get the most negative float32, as Hugging Face does, so probabilities match.
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(f)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(dtype), v).reshape(b, s, -1)
    out = dense('output', cfg.hidden_size, ('heads', 'embed'))(context, quant_mix)
    out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
    out = _layer_norm(cfg, 'LayerNorm')(out + x)
    return out.astype(dtype), scores


class BertLayer(nn.Module):
  config: BertConfig
  policy: QuantPolicy

  @nn.compact
  def __call__(self, x, mask, deterministic, quant_mix=None):
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    x, scores = BertAttention(cfg, self.policy, name='attention')(x, mask, deterministic,
                                                                  quant_mix)
    h = QDense(cfg.intermediate_size, self.policy, ('embed', 'mlp'), dtype,
               name='intermediate')(x, quant_mix)
    h = _activation(cfg.hidden_act, dtype)(h)
    h = QDense(cfg.hidden_size, self.policy, ('mlp', 'embed'), dtype, name='output')(h, quant_mix)
    h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    return _layer_norm(cfg, 'output_LayerNorm')(h + x).astype(dtype), scores


class BertEncoder(nn.Module):
  config: BertConfig
  policy: QuantPolicy

  @nn.compact
  def __call__(self, x, mask, deterministic, quant_mix=None):
    cfg = self.config
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if cfg.remat else BertLayer
    hidden_states, attention_scores = [x], []
    for i in range(cfg.num_hidden_layers):
      x, scores = layer_cls(cfg, self.policy, name=f'layer_{i}')(x, mask, deterministic,
                                                                 quant_mix)
      hidden_states.append(x)
      attention_scores.append(scores)
    return tuple(hidden_states), tuple(attention_scores)


class BertModel(nn.Module):
  """BERT encoder, pooler and (when config.num_labels > 0) a classification/regression head.

  __call__(input_ids [B,S] int, attention_mask [B,S] (1 = token, 0 = padding),
           token_type_ids [B,S] or None, deterministic, quant_mix) -> BertOutput
  quant_mix: None (quantized as the policy says; evaluation), or the warm-in lambda, a traced
  scalar: quantized weights and activations are lambda * Q(.) + (1 - lambda) * (.).
  """
  config: BertConfig
  policy: QuantPolicy = QuantPolicy()

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True,
               quant_mix=None):
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(cfg, self.policy, name='embeddings')(input_ids, token_type_ids,
                                                           deterministic, quant_mix)
    hidden_states, attention_scores = BertEncoder(cfg, self.policy, name='encoder')(
        x, attention_mask, deterministic, quant_mix)
    x = hidden_states[-1]
    pooled = QDense(cfg.hidden_size, self.policy, ('embed', None), jnp.dtype(cfg.dtype),
                    name='pooler')(x[:, 0], quant_mix)
    pooled = jnp.tanh(pooled)
    logits = None
    if cfg.num_labels:
      rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
      h = nn.Dropout(rate)(pooled, deterministic=deterministic)
      f = float_dtype(cfg)
      logits = QDense(cfg.num_labels, self.policy, ('embed', None), f,
                      name='classifier')(h, quant_mix).astype(f)
    return BertOutput(last_hidden_state=x, pooled_output=pooled, hidden_states=hidden_states,
                      attention_scores=attention_scores, logits=logits)


def init_params(config, policy=QuantPolicy(), rng=None, seq_len=8):
  """Random parameters (plain arrays, logical-axis boxes removed) for a config and policy."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  ids = jnp.zeros((1, seq_len), jnp.int32)
  variables = BertModel(config, policy).init(rng, ids)
  return nn.meta.unbox(variables['params'])
