"""Per-op time of an ONNX model in ONNX Runtime (its profiler), seq 128, random token ids.

  python bench/ort_profile.py --model=DIR/model.onnx --batch=32 --threads=2

Prints the mean wall time of --reps runs (after one untimed) and the ops that took longest.
"""
import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--reps', type=int, default=3)
  args = parser.parse_args()
  so = ort.SessionOptions()
  so.enable_profiling, so.intra_op_num_threads = True, args.threads
  so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), 'ort_profile')  # not into the cwd
  session = ort.InferenceSession(args.model, so, providers=['CPUExecutionProvider'])
  shape = (args.batch, args.seq)
  feed = {'input_ids': np.random.default_rng(0).integers(1000, 2000, shape).astype(np.int64),
          'attention_mask': np.ones(shape, np.int64), 'token_type_ids': np.zeros(shape, np.int64)}
  session.run(None, feed)
  t0 = time.perf_counter()
  for _ in range(args.reps):
    session.run(None, feed)
  print(f'batch {args.batch}: {(time.perf_counter() - t0) / args.reps * 1e3:.1f} ms per run')
  totals = collections.Counter()
  profile = session.end_profiling()
  with open(profile) as f:
    events = json.load(f)
  os.remove(profile)
  for event in events:
    if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time'):
      totals[event['args']['op_name']] += event['dur']
  for op, us in totals.most_common(8):
    print(f'  {op}: {us / (args.reps + 1) / 1e3:.1f} ms')


if __name__ == '__main__':
  main()
