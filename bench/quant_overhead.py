"""Overhead of quantization-aware training: one jitted train step at a W-E-A policy vs 32-32-32.

A step is forward + backward + an optax AdamW update, cross-entropy on the classifier logits,
on a randomly initialised BERT (MiniLM shapes by default). Prints the median step time of each
policy and their ratio. A script, not a test:

  nice python bench/quant_overhead.py           # 1-1-8 vs 32-32-32, MiniLM, batch 32 x 128
  nice python bench/quant_overhead.py --policy=2-2-8 --steps=3 --batch=8
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--policy', default='1-1-8', help='W-E-A setting compared with 32-32-32')
  p.add_argument('--act_mode', default=None, help='dynamic | static | lsq | elastic')
  p.add_argument('--weight_groups', default='1', help='int, or "row"')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--steps', type=int, default=5, help='timed steps per policy (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--vocab', type=int, default=30522)
  p.add_argument('--hidden', type=int, default=384)
  p.add_argument('--layers', type=int, default=6)
  p.add_argument('--heads', type=int, default=12)
  p.add_argument('--ffn', type=int, default=1536)
  p.add_argument('--labels', type=int, default=2)
  p.add_argument('--dtype', default='float32', help='compute dtype: float32 | bfloat16')
  p.add_argument('--dropout', action='store_true', help='train with dropout (default: off)')
  p.add_argument('--platform', default='cpu', help='JAX platform; the target is CPU')
  return p.parse_args()


def build_step(args, policy):
  """(run, compile seconds): run() does one train step under `policy` and waits for it."""
  import jax
  import jax.numpy as jnp
  import optax

  from bitbert_jax.model import BertConfig, BertModel, init_params

  cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                   num_attention_heads=args.heads, intermediate_size=args.ffn,
                   num_labels=args.labels, max_position_embeddings=max(512, args.seq),
                   dtype=args.dtype)
  model = BertModel(cfg, policy)
  tx = optax.adamw(5e-5, weight_decay=0.01)
  ids = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq), 0, args.vocab)
  labels = jax.random.randint(jax.random.PRNGKey(2), (args.batch,), 0, args.labels)
  mask = jnp.ones_like(ids)

  def loss_fn(p, dropout_rng):
    out = model.apply({'params': p}, ids, mask, deterministic=not args.dropout,
                      rngs={'dropout': dropout_rng})
    return optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean()

  def step(p, opt, r):
    r, dropout_rng = jax.random.split(r)
    loss, grads = jax.value_and_grad(loss_fn)(p, dropout_rng)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, r, loss

  rng = jax.random.PRNGKey(0)
  params = jax.jit(lambda r: init_params(cfg, policy, rng=r))(rng)
  state = [params, jax.jit(tx.init)(params), rng]
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state).compile()
  compile_s = time.perf_counter() - t0

  def run():
    out = compiled(*state)
    state[:] = out[:3]  # the donated buffers are gone: carry the new ones
    jax.block_until_ready(out)

  return run, compile_s


def timed(run):
  t0 = time.perf_counter()
  run()
  return time.perf_counter() - t0


def main():
  args = parse_args()
  os.environ.setdefault('JAX_PLATFORMS', args.platform)
  from bitbert_jax.quant import QuantPolicy, policy_from_name

  groups = args.weight_groups if args.weight_groups == 'row' else int(args.weight_groups)
  quantized = policy_from_name(args.policy, weight_groups=groups, act_mode=args.act_mode)
  shapes = (f'vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, '
            f'FFN {args.ffn}, {args.labels} labels; batch {args.batch} x seq {args.seq}, '
            f'{args.dtype}, dropout {"on" if args.dropout else "off"}')
  print(f'train step (fwd + bwd + AdamW), {shapes}; median of {args.steps} after '
        f'{args.warmup} warmup steps')
  run_base, base_compile = build_step(args, QuantPolicy())
  run_quant, quant_compile = build_step(args, quantized)
  for _ in range(args.warmup):
    run_base()
    run_quant()
  # Interleaved, so that load from other processes hits both policies alike.
  pairs = [(timed(run_base), timed(run_quant)) for _ in range(args.steps)]
  base = statistics.median(b for b, _ in pairs)
  quant = statistics.median(q for _, q in pairs)
  print(f'  32-32-32: {base * 1e3:9.1f} ms/step  (compile {base_compile:.1f} s)')
  print(f'  {args.policy:>8}: {quant * 1e3:9.1f} ms/step  (compile {quant_compile:.1f} s, '
        f'act {quantized.act.mode})')
  print(f'  ratio {args.policy} / 32-32-32: {quant / base:.3f}x of medians, '
        f'{statistics.median(q / b for b, q in pairs):.3f}x median of step pairs '
        f'(target < 1.3x)')


if __name__ == '__main__':
  main()
