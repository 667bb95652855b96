"""CPU serving latency and weight bytes: our 1-bit ONNX model against the int8 anchors.

One process, CPU, sequence 128 (every token real), batch 1 and 32, median of --reps timed
forward passes after --warmup untimed ones, for:
  torch fp32          transformers BertForSequenceClassification of the FP32 teacher
  torch int8          torch.ao.quantization.quantize_dynamic(nn.Linear -> qint8) of it
  ort fp32            the teacher exported with torch.onnx.export, ONNX Runtime (all graph opts)
  ort int8            onnxruntime.quantization.quantize_dynamic(QInt8 weights) of that file
  jax packed          bitbert_jax.packed.model.PackedModel.logits of the student's packed directory,
                      float ops in float64 and float32 (predict's default)
  ours onnx           the student's model.onnx (bitbert_jax.export --format=onnx), ONNX Runtime,
                      --precision=float64 (reproduces predict's float64) and float32 (default)
Weight bytes: the serialized weights each runtime loads (state_dict tensors for torch, the
.onnx file for ONNX Runtime, weights.safetensors for the packed directory).

  python bench/serving.py --teacher=/work/runs/teacher_stsb/stages/00_finetune/hf \
      --student=/work/runs/xtc_stsb_6L_lr5e-4/stages/03_kd_1bit/output --threads=2

A benchmark, not a test; prints a markdown table (and --json writes the numbers).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def _median_ms(fn, reps, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _batch(batch, seq, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, (batch, seq)).astype(np.int64)
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids),
          'token_type_ids': np.zeros_like(ids)}


def _torch_bytes(model):
  return sum(t.numel() * t.element_size() for t in model.state_dict().values()
             if hasattr(t, 'numel'))


def _torch_int8_bytes(model):
  """Bytes of the dynamically quantized model's packed int8 Linear weights + its float rest."""
  import torch  # pylint: disable=g-import-not-at-top
  total = 0
  for value in model.state_dict().values():
    if isinstance(value, torch.Tensor):
      total += value.numel() * value.element_size()
    elif isinstance(value, tuple):  # (packed weight, bias) of a quantized Linear
      for t in value:
        if isinstance(t, torch.Tensor):
          total += t.numel() * (1 if t.is_quantized else t.element_size())
  return total


def torch_anchors(teacher, threads):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  fp32 = transformers.BertForSequenceClassification.from_pretrained(teacher).eval()
  int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)

  def runner(model):
    def make(batch):
      feed = {k: torch.from_numpy(v) for k, v in batch.items()}
      def run():
        with torch.inference_mode():
          model(**feed)
      return run
    return make

  return [('torch fp32', runner(fp32), _torch_bytes(fp32)),
          ('torch int8 (quantize_dynamic)', runner(int8), _torch_int8_bytes(int8))], fp32


def _ort_runner(path, threads):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  names = [i.name for i in session.get_inputs()]

  def make(batch):
    feed = {k: batch[k] for k in names}
    return lambda: session.run(None, feed)
  return make


def ort_anchors(fp32_torch, workdir, threads, seq):
  import torch  # pylint: disable=g-import-not-at-top
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'teacher_fp32.onnx')
  example = _batch(1, seq, 30000)
  args = tuple(torch.from_numpy(example[k]) for k in ('input_ids', 'attention_mask',
                                                       'token_type_ids'))
  axes = {k: {0: 'batch', 1: 'sequence'} for k in ('input_ids', 'attention_mask',
                                                    'token_type_ids')}
  torch.onnx.export(fp32_torch, args, path, input_names=list(axes), output_names=['logits'],
                    dynamic_axes={**axes, 'logits': {0: 'batch'}}, opset_version=17,
                    dynamo=False)
  int8_path = os.path.join(workdir, 'teacher_int8.onnx')
  quantize_dynamic(path, int8_path, weight_type=QuantType.QInt8)
  return [('ort fp32', _ort_runner(path, threads), os.path.getsize(path)),
          ('ort int8 (quantize_dynamic)', _ort_runner(int8_path, threads),
           os.path.getsize(int8_path))]


def ours(student, workdir, threads):
  """The student's packed directory (JAX) and ONNX model; student: packed dir or checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed import format as fmt  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed import onnx_export, write  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed.model import load_packed  # pylint: disable=g-import-not-at-top
  from bitbert_jax.packed.student import load_student  # pylint: disable=g-import-not-at-top
  packed = student
  if not os.path.isfile(os.path.join(student, fmt.MANIFEST)):
    s = load_student(student)
    packed = write.pack(s.config, s.params, s.policy, os.path.join(workdir, 'packed'),
                        tokenizer_dir=s.tokenizer_dir, model_state=s.model_state)
  weights = os.path.getsize(os.path.join(packed, fmt.WEIGHTS))
  rows = []
  for precision in ('float64', 'float32'):
    model = load_packed(packed, precision=precision)

    def jax_make(batch, model=model):
      b = {k: v.astype(np.int32) for k, v in batch.items()}
      return lambda: jax.block_until_ready(model.logits(b['input_ids'], b['attention_mask'],
                                                        b['token_type_ids']))

    rows.append((f'jax packed (bitbert_jax.predict, {precision})', jax_make, weights))
  for precision in ('float64', 'float32'):
    onnx_dir = onnx_export.export_onnx(packed, os.path.join(workdir, f'onnx_{precision}'),
                                       precision=precision)
    model_onnx = os.path.join(onnx_dir, 'model.onnx')
    rows.append((f'ours onnx (ONNX Runtime, {precision})', _ort_runner(model_onnx, threads),
                 os.path.getsize(model_onnx)))
  return rows, model.policy.name


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', required=True, help='FP32 teacher, Hugging Face directory')
  parser.add_argument('--student', required=True, help='packed dir or student checkpoint')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--batches', default='1,32')
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--reps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    rows, fp32 = torch_anchors(args.teacher, args.threads)
    rows += ort_anchors(fp32, workdir, args.threads, args.seq)
    ours_rows, policy = ours(args.student, workdir, args.threads)
    rows += ours_rows
    batches = [int(b) for b in args.batches.split(',')]
    results = []
    for name, make, nbytes in rows:
      ms = {b: _median_ms(make(_batch(b, args.seq, 30000)), args.reps, args.warmup)
            for b in batches}
      results.append({'runtime': name, 'weight_bytes': nbytes, 'median_ms': ms})
      print(f'{name}: {nbytes / 2**20:.2f} MiB, ' +
            ', '.join(f'batch {b}: {v:.1f} ms' for b, v in ms.items()), flush=True)
  int8 = [r for r in results if 'int8' in r['runtime']]
  ours_rows = [r for r in results if r['runtime'].startswith('ours')]
  print(f'\n{datetime.date.today()}, {platform.processor() or platform.machine()}, '
        f'{args.threads} threads, seq {args.seq}, median of {args.reps}; student policy {policy}')
  print('| runtime | weight MiB | ' + ' | '.join(f'batch {b} ms' for b in batches) + ' |')
  print('|---|---|' + '---|' * len(batches))
  for r in results:
    print(f'| {r["runtime"]} | {r["weight_bytes"] / 2**20:.2f} | ' +
          ' | '.join(f'{r["median_ms"][b]:.1f}' for b in batches) + ' |')
  smallest_int8 = min(r['weight_bytes'] for r in int8)
  print(f'\nours / smallest int8 bytes: {ours_rows[0]["weight_bytes"] / smallest_int8:.3f} '
        f'(goal <= 0.125)')
  for row in ours_rows:
    for b in batches:
      fastest = min(r['median_ms'][b] for r in int8)
      ms = row['median_ms'][b]
      print(f'batch {b}: {row["runtime"]} {ms:.1f} ms vs fastest int8 {fastest:.1f} ms '
            f'({"met" if ms <= fastest else "missed"})')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'date': str(datetime.date.today()), 'threads': args.threads, 'seq': args.seq,
                 'reps': args.reps, 'results': results}, f, indent=2)


if __name__ == '__main__':
  main()
