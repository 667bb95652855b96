"""Training throughput (tokens/s) and model-FLOPs utilisation, JAX vs the PyTorch route.

Two steps, each on a randomly initialised BERT with a 2-label head, every token real (no padding):
  ft: FP32 fine-tuning, label cross-entropy, forward + backward + AdamW (make_loss_fn /
      make_train_step with Objective(('label',))).
  kd: 1-bit XTC KD: full-precision teacher forward + 1-1-8 quantized student forward/backward +
      AdamW, losses pred + attn + hidden, teacher and student of the same depth (identity map).
on BERT-base (12L, 768, 12 heads, FFN 3072) and MiniLM (6L, 384, 12 heads, FFN 1536) shapes.
The teacher computes in --dtype, as the pipeline's teacher does (config.model.dtype). The same
steps in PyTorch (transformers + hand-written fake quantization) are in `torch_route.py`.

Model FLOPs per step (counted analytically; quantizers, norms, softmax and losses excluded):
  P     = L (4 H^2 + 2 H F)              matmul weights per token (Q, K, V, O, FFN in, FFN out)
  P_cls = H^2 + H C                      pooler + classifier, once per sequence ([CLS] only)
  fwd   = 2 P T + 2 P_cls B + L (2 * 2 S H) T
          (2 flops per multiply-add; 2 S H per token per layer each for q.k^T and probs.v)
  ft    = 3 fwd                          (backward = 2 x forward)
  kd    = 3 fwd + fwd                    (student forward + backward, teacher forward)
with T = B S tokens, L layers, H hidden, F FFN, C labels, S sequence length, B batch. Word,
position and token-type embeddings are gathers, not matmuls, and count 0. XLA's own count
(`compiled.cost_analysis()['flops']`, which includes elementwise work) is printed next to it.

MFU = (model FLOPs / step time) / peak, where the peak is measured in the same run: the best of
--peak_reps n x n x n matmuls (n = --peak_size) in the same dtype, under jax.jit on the same
backend and, when the torch route runs, with torch.mm too; both MFU columns divide by the larger
of the two (what the hardware can do, whichever library reaches it), and both are printed.
Timing: compilation and --warmup steps excluded, median of --steps_timed steps, each waited for
(`jax.block_until_ready`; torch on CPU is synchronous).

A script, not a test. Quick check, then the full measurement on a quiet machine:

  nice python bench/throughput.py --models=minilm --steps=kd --batch=4 --steps_timed=2 \
      --peak_size=1024
  python bench/throughput.py --dtype=float32,bfloat16
"""
import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from bitbert_jax import sharding, train
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.distill import layer_map
from bitbert_jax.model import BertConfig, BertModel, init_params
from bitbert_jax.optim import make_optimizer
from bitbert_jax.quant import policy_from_name
from bitbert_jax.train_state import new_state, with_policy

SHAPES = {
    'minilm': dict(layers=6, hidden=384, heads=12, ffn=1536, batch=32),
    'base': dict(layers=12, hidden=768, heads=12, ffn=3072, batch=16),
}
STEPS = ('ft', 'kd')
STEP_NAMES = {'ft': 'fine-tune', 'kd': '1-1-8 XTC KD'}
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'neon', 'sve')  # bf16 speed needs them
ROUTES = ('jax', 'torch')
DTYPES = ('float32', 'bfloat16')


def _cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _csv(valid):
  def parse(text):
    items = tuple(t for t in text.split(',') if t)
    bad = [t for t in items if t not in valid]
    if bad or not items:
      raise argparse.ArgumentTypeError(f'{text!r}: valid items are {", ".join(valid)}')
    return items
  return parse


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', type=_csv(tuple(SHAPES)), default=tuple(SHAPES),
                 help='comma list of: minilm, base')
  p.add_argument('--steps', type=_csv(STEPS), default=STEPS, help='comma list of: ft, kd')
  p.add_argument('--routes', type=_csv(ROUTES), default=ROUTES, help='comma list of: jax, torch')
  p.add_argument('--dtype', type=_csv(DTYPES), default=('float32',),
                 help='compute dtype(s), comma list of: float32, bfloat16')
  p.add_argument('--batch', type=int, default=None,
                 help='sequences per step (default: 32 MiniLM, 16 BERT-base)')
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--vocab', type=int, default=30522)
  p.add_argument('--labels', type=int, default=2)
  p.add_argument('--dropout', type=float, default=0.1, help='hidden and attention dropout')
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--steps_timed', type=int, default=10, help='timed steps (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--peak_size', type=int, default=4096, help='n of the n x n x n peak matmul')
  p.add_argument('--peak_reps', type=int, default=5, help='peak = best of this many matmuls')
  p.add_argument('--threads', type=int, default=_cores(), help='torch.set_num_threads')
  p.add_argument('--torch_adamw', default='default', choices=('default', 'foreach', 'fused'),
                 help="torch AdamW implementation; 'default' is what a plain AdamW(...) picks")
  p.add_argument('--platform', default='cpu', help='JAX platform; the target is CPU')
  return p.parse_args()


def model_flops(shape, batch, seq, labels, kind):
  """Model FLOPs of one step; the formula is in the module docstring."""
  h, f, n_layers = shape['hidden'], shape['ffn'], shape['layers']
  tokens = batch * seq
  per_token = n_layers * (4 * h * h + 2 * h * f)
  per_sequence = h * h + h * labels
  fwd = 2 * per_token * tokens + 2 * per_sequence * batch + n_layers * 2 * 2 * seq * h * tokens
  return 3 * fwd + (fwd if kind == 'kd' else 0)


def fake_batch(batch, seq, vocab, labels, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids),
              labels=rng.integers(0, labels, size=batch).astype(np.int32),
              weights=np.ones(batch, np.float32))


def _median_seconds(run, n):
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _xla_flops(compiled):
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # not every backend implements it
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per module
  return (cost or {}).get('flops')


def jax_matmul_peak(n, dtype, reps):
  """Best FLOP/s of an n x n x n matmul under jit on the default backend."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.dot)  # default precision, as the model's matmuls
  jax.block_until_ready(matmul(a, b))
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def bert_config(shape, args, dtype):
  return BertConfig(vocab_size=args.vocab, hidden_size=shape['hidden'],
                    num_hidden_layers=shape['layers'], num_attention_heads=shape['heads'],
                    intermediate_size=shape['ffn'], max_position_embeddings=max(512, args.seq),
                    num_labels=args.labels, hidden_dropout_prob=args.dropout,
                    attention_probs_dropout_prob=args.dropout, dtype=dtype)


def _student_and_teacher(cfg, kind):
  """(state without optimizer, objective, teacher model, teacher params) for a step kind."""
  params = init_params(cfg, rng=jax.random.PRNGKey(0))
  if kind == 'ft':
    state = new_state(cfg, params, rng=jax.random.PRNGKey(1))
    return state, objective_lib.Objective(('label',)), None, None
  # XTC: the student starts as a copy of the teacher (own buffers: the state is donated).
  state = with_policy(new_state(cfg, jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(1)),
                      policy_from_name('1-1-8'))
  n = cfg.num_hidden_layers
  objective = objective_lib.Objective(('pred', 'attn', 'hidden'),
                                      layer_map.from_layers(list(range(n)), n))
  return state, objective, BertModel(cfg), params


def build_jax_step(cfg, kind, batch, lr):
  """(run, compile seconds, XLA flops): the sharded jitted step of tests/sharding_equivalence."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1}))
  sharding.check_batch_size(len(batch['input_ids']), mesh, '--batch')
  state, objective, teacher_model, t_params = _student_and_teacher(cfg, kind)
  tx, _ = make_optimizer(lr, 1000, 100)
  loss_fn = objective_lib.make_loss_fn(state.model, teacher_model, objective, False)
  state = state.replace(opt_state=jax.eval_shape(tx.init, (state.params, state.aux_params)))
  shardings = sharding.state_shardings(mesh, state, tx)
  state = state.replace(opt_state=tx.init((state.params, state.aux_params)))
  state = jax.device_put(state, shardings)
  t_sh = None
  if t_params is not None:
    t_params = jax.device_put(t_params, sharding.param_shardings(mesh, teacher_model, t_params))
    t_sh = jax.tree.map(lambda x: x.sharding, t_params)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in sharding.BATCH_KEYS}
  step = jax.jit(train.make_train_step(loss_fn, tx), in_shardings=(shardings, batch_sh, t_sh),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  batch = sharding.device_batch(mesh, batch)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, t_params).compile()
  compile_s = time.perf_counter() - t0
  carry = [state]

  def run():
    carry[0], metrics = compiled(carry[0], batch, t_params)  # the old state was donated
    return float(jax.block_until_ready(metrics)['loss'])

  return run, compile_s, _xla_flops(compiled)


def measure_jax(shape, kind, dtype, batch, args):
  run, compile_s, xla_flops = build_jax_step(bert_config(shape, args, dtype), kind, batch, args.lr)
  losses = [run() for _ in range(args.warmup)]
  seconds = _median_seconds(lambda: losses.append(run()), args.steps_timed)
  return dict(seconds=seconds, compile_s=compile_s, xla_flops=xla_flops, loss=losses[-1])


def measure_torch(torch_route, shape, kind, dtype, batch, args):
  step = torch_route.build_step(kind, shape, batch, vocab=args.vocab, labels=args.labels,
                                dropout=args.dropout, dtype=dtype, lr=args.lr,
                                adamw=args.torch_adamw)
  losses = [step() for _ in range(args.warmup)]
  seconds = _median_seconds(lambda: losses.append(step()), args.steps_timed)
  return dict(seconds=seconds, loss=losses[-1])


def cpu_model():
  """'model name (family f, model m; isa flags)' from /proc/cpuinfo, else what platform knows."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or platform.machine()
  # VMs often hide the model name (e.g. plain 'AMD EPYC'); family/model still tell generations.
  flags = ' '.join(f for f in fields.get('flags', fields.get('Features', '')).split()
                   if f in ISA_FLAGS)
  name = fields.get('model name', platform.machine())
  return (f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}; "
          f'{flags or "no listed SIMD flags"})')


def header(args, peaks):
  dev = jax.devices()[0]
  lines = [f'# Training throughput, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}',
           '',
           f'- hardware: {cpu_model()}, {_cores()} cores usable ({os.cpu_count()} online)',
           f'- jax {jax.__version__}: backend {jax.default_backend()}, {jax.device_count()} x '
           f'{dev.device_kind}',
           f'- seq {args.seq}, vocab {args.vocab}, {args.labels} labels, dropout {args.dropout}; '
           f'median of {args.steps_timed} steps after compile + {args.warmup} warmup']
  if 'torch' in args.routes:
    import torch  # pylint: disable=g-import-not-at-top
    lines.append(f'- torch {torch.__version__}: {args.threads} threads, AdamW {args.torch_adamw}')
  for dtype, (jax_peak, torch_peak) in peaks.items():
    torch_part = f', torch {torch_peak / 1e9:.1f}' if torch_peak else ''
    lines.append(f'- measured matmul peak {dtype} ({args.peak_size}^3, best of '
                 f'{args.peak_reps}): jax {jax_peak / 1e9:.1f} GFLOP/s{torch_part}')
  return '\n'.join(lines)


COLUMNS = ('model', 'step', 'dtype', 'batch', 'tokens/s', 'MFU', 'torch tokens/s', 'torch MFU',
           'jax/torch', 'peak GFLOP/s', 'model GFLOP/step', 'XLA GFLOP/step', 'compile s')


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def table_row(model, kind, dtype, batch, seq, flops, peaks, jax_m, torch_m):
  """One markdown row; peaks: (jax, torch or None) FLOP/s, the larger divides both MFUs."""
  peak = max(p for p in peaks if p)
  tokens_per_s = lambda m: m and batch * seq / m['seconds']
  mfu = lambda m: m and flops / m['seconds'] / peak
  jtps, ttps = tokens_per_s(jax_m), tokens_per_s(torch_m)
  xla_flops = jax_m and jax_m['xla_flops']
  cells = (model, STEP_NAMES[kind], dtype, str(batch),
           _fmt(jtps, ',.0f'), _fmt(mfu(jax_m), '.1%'),
           _fmt(ttps, ',.0f'), _fmt(mfu(torch_m), '.1%'),
           _fmt(jtps and ttps and jtps / ttps, '.2f'), _fmt(peak / 1e9, '.1f'),
           _fmt(flops / 1e9, '.1f'), _fmt(xla_flops and xla_flops / 1e9, '.1f'),
           _fmt(jax_m and jax_m['compile_s'], '.1f'))
  return '| ' + ' | '.join(cells) + ' |'


def measure_peaks(args, torch_route):
  """{dtype: (jax FLOP/s, torch FLOP/s or None)} of the n x n x n matmul."""
  peaks = {}
  for dtype in args.dtype:
    jax_peak = jax_matmul_peak(args.peak_size, dtype, args.peak_reps)
    torch_peak = torch_route and torch_route.matmul_peak(args.peak_size, dtype, args.peak_reps)
    peaks[dtype] = (jax_peak, torch_peak)
  return peaks


def measure(args, torch_route, model, kind, dtype, batch):
  """(jax, torch) measurements of one table row; None for a route not asked for."""
  shape = SHAPES[model]
  # One route after the other, never interleaved: their thread pools would contend.
  jax_m = measure_jax(shape, kind, dtype, batch, args) if 'jax' in args.routes else None
  torch_m = measure_torch(torch_route, shape, kind, dtype, batch, args) if torch_route else None
  tokens = batch['input_ids'].size
  done = ', '.join(f'{name} {tokens / m["seconds"]:,.0f} tokens/s (loss {m["loss"]:.4g})'
                   for name, m in (('jax', jax_m), ('torch', torch_m)) if m)
  print(f'[{model} {kind} {dtype} batch {len(batch["input_ids"])}] {done}', file=sys.stderr,
        flush=True)  # progress: a full run takes a while
  return jax_m, torch_m


def main():
  args = parse_args()
  jax.config.update('jax_platforms', args.platform)
  torch_route = None
  if 'torch' in args.routes:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_route  # pylint: disable=g-import-not-at-top  (bench/, the script's folder)
    torch.set_num_threads(args.threads)
  peaks = measure_peaks(args, torch_route)
  rows = []
  for model in args.models:
    batch_size = args.batch or SHAPES[model]['batch']
    batch = fake_batch(batch_size, args.seq, args.vocab, args.labels)
    for kind in args.steps:
      flops = model_flops(SHAPES[model], batch_size, args.seq, args.labels, kind)
      for dtype in args.dtype:
        jax_m, torch_m = measure(args, torch_route, model, kind, dtype, batch)
        rows.append(table_row(model, kind, dtype, batch_size, args.seq, flops, peaks[dtype],
                              jax_m, torch_m))
  print(header(args, peaks))
  print()
  print('| ' + ' | '.join(COLUMNS) + ' |')
  print('|' + '|'.join('---' for _ in COLUMNS) + '|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
