"""The PyTorch route for the steps `throughput.py` times: what users write today.

transformers' BertForSequenceClassification, with the XTC 1-1-8 fake quantization added the usual
way: a `torch.nn.utils.parametrize` weight parametrization (BWN with a straight-through estimator,
`w + (q - w).detach()`) on Q, K, V, attention output, FFN in/out and the word embeddings, and a
forward pre-hook that quantizes those linear layers' inputs to 8 bits (symmetric, one scale per
token). The same layers and forms as `policy_from_name('1-1-8')` in bitbert_jax.

Attention loss: HF returns post-softmax attentions, but the JAX loss is on pre-softmax scores. So
the KD models use 'kd_eager', HF's eager attention registered under a new name
(`AttentionInterface`) that returns q.k / sqrt(d) before the mask and the softmax as its
"attentions": the same tensors, the same work, as eager attention.
"""
import contextlib
import math
import time

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from transformers.masking_utils import AttentionMaskInterface, eager_mask

KD_ATTENTION = 'kd_eager'
ACT_BITS = 8
# HF module names of the linear layers the 1-1-8 policy quantizes (LINEAR_KERNELS in policy.py).
QUANTIZED_LINEARS = ('attention.self.query', 'attention.self.key', 'attention.self.value',
                     'attention.output.dense', 'intermediate.dense', 'output.dense')


def _kd_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
  """HF's eager_attention_forward, returning the pre-softmax scores instead of probabilities."""
  del kwargs
  scaling = query.size(-1)**-0.5 if scaling is None else scaling
  scores = torch.matmul(query, key.transpose(2, 3)) * scaling
  biased = scores if attention_mask is None else scores + attention_mask
  probs = F.dropout(F.softmax(biased, dim=-1), p=dropout, training=module.training)
  return torch.matmul(probs, value).transpose(1, 2).contiguous(), scores


transformers.AttentionInterface.register(KD_ATTENTION, _kd_eager_attention)
AttentionMaskInterface.register(KD_ATTENTION, eager_mask)  # same additive mask as eager


def _sign(x):
  # sign(0) = +1, the convention of bitbert_jax.quant.quantizers.sign.
  return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class BinaryWeight(nn.Module):
  """BWN, alpha * sign(w) with alpha = mean|w| per tensor or per row, straight-through gradient."""

  def __init__(self, per_row):
    super().__init__()
    self.per_row = per_row

  def forward(self, w):
    alpha = w.abs().mean(dim=-1, keepdim=True) if self.per_row else w.abs().mean()
    return w + (alpha * _sign(w) - w).detach()


def quantize_input(module, args):
  """Forward pre-hook: symmetric per-token 8-bit input, XTC's scale 2 max|x| / 2^b, STE."""
  del module
  x = args[0]
  x32 = x.float()  # scales in float32 whatever the compute dtype, as the JAX quantizers
  scale = 2.0 * x32.abs().amax(dim=-1, keepdim=True) / 2.0**ACT_BITS
  levels = 2.0**(ACT_BITS - 1)
  q = torch.clamp(torch.round(x32 / torch.where(scale == 0, 1.0, scale)), -levels, levels - 1)
  q = (q * scale).to(x.dtype)
  return (x + (q - x).detach(),) + tuple(args[1:])


def add_quantization(model):
  """Adds 1-1-8 fake quantization to a BertForSequenceClassification in place."""
  for layer in model.bert.encoder.layer:
    for name in QUANTIZED_LINEARS:
      linear = layer.get_submodule(name)
      parametrize.register_parametrization(linear, 'weight', BinaryWeight(per_row=False))
      linear.register_forward_pre_hook(quantize_input)
  # One scale per token row, like the JAX policy's WeightQuant(1, 'row') on word embeddings.
  parametrize.register_parametrization(model.bert.embeddings.word_embeddings, 'weight',
                                       BinaryWeight(per_row=True))
  return model


def make_model(shape, *, vocab, labels, dropout, attention, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(
      vocab_size=vocab, hidden_size=shape['hidden'], num_hidden_layers=shape['layers'],
      num_attention_heads=shape['heads'], intermediate_size=shape['ffn'], hidden_act='gelu',
      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
      max_position_embeddings=512, num_labels=labels)
  return transformers.BertForSequenceClassification._from_config(cfg,
                                                                 attn_implementation=attention)


def make_optimizer(model, lr, adamw='default', total_steps=1000, warmup=100):
  """AdamW as bitbert_jax.optim: no decay on biases and LayerNorm, linear warmup and decay.

  adamw: 'default' (what torch picks: a per-parameter loop on CPU), 'foreach' or 'fused'.
  """
  named = list(model.named_parameters())
  no_decay = lambda n: n.endswith('bias') or 'LayerNorm' in n
  groups = [{'params': [p for n, p in named if not no_decay(n)], 'weight_decay': 0.01},
            {'params': [p for n, p in named if no_decay(n)], 'weight_decay': 0.0}]
  impl = {} if adamw == 'default' else {adamw: True}
  opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, **impl)
  ramp = lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / (total_steps - warmup)))
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, ramp)


def _autocast(dtype):
  if dtype == 'bfloat16':
    return torch.autocast('cpu', dtype=torch.bfloat16)
  return contextlib.nullcontext()


def soft_cross_entropy(student_logits, teacher_logits):
  t = F.softmax(teacher_logits.float(), dim=-1)
  return -(t * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def attention_mse(student, teacher, mask):
  # Padded query/key positions zeroed in both, as bitbert_jax.distill.losses.attention_mse.
  valid = (mask[:, None, :, None] * mask[:, None, None, :]).float()
  return (((student.float() - teacher.float()) * valid)**2).mean()


def kd_loss(student_out, teacher_out, mask):
  """pred + attn + hidden, same-depth identity layer map, weight 1 each."""
  pred = soft_cross_entropy(student_out.logits, teacher_out.logits)
  attn = sum(attention_mse(s, t, mask)
             for s, t in zip(student_out.attentions, teacher_out.attentions))
  hidden = sum(F.mse_loss(s.float(), t.float())
               for s, t in zip(student_out.hidden_states, teacher_out.hidden_states))
  return pred + attn + hidden


def build_step(kind, shape, batch, *, vocab, labels, dropout, dtype, lr, adamw='default'):
  """A zero-argument function running one training step ('ft' or 'kd') on a fixed batch."""
  inputs = {k: torch.as_tensor(batch[k]).long()
            for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  gold = torch.as_tensor(batch['labels']).long()
  kw = dict(vocab=vocab, labels=labels, dropout=dropout)
  if kind == 'ft':
    student = make_model(shape, attention='eager', **kw).train()
    teacher = None
  else:
    teacher = make_model(shape, attention=KD_ATTENTION, **kw).eval()
    # XTC: the student starts as a copy of the teacher, then gets its quantizers.
    student = make_model(shape, attention=KD_ATTENTION, **kw)
    student.load_state_dict(teacher.state_dict())
    student = add_quantization(student).train()
  opt, sched = make_optimizer(student, lr, adamw)

  def loss_fn():
    if teacher is None:
      return student(**inputs, labels=gold).loss
    with torch.no_grad():
      t = teacher(**inputs, output_attentions=True, output_hidden_states=True)
    s = student(**inputs, output_attentions=True, output_hidden_states=True)
    return kd_loss(s, t, inputs['attention_mask'])

  def step():
    with _autocast(dtype):
      loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())

  return step


def matmul_peak(n, dtype, reps):
  """Best FLOP/s of an n x n x n matmul in torch."""
  tdtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
  a, b = torch.randn(n, n).to(tdtype), torch.randn(n, n).to(tdtype)
  torch.mm(a, b)  # warmup: thread pool and kernel selection
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best
