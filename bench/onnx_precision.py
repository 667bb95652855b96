"""ONNX Runtime against `predict` at one float precision, on the test students (MiniLM real
weights + a seeded head, packed) and the first N MRPC dev pairs.

  PYTHONPATH=. python bench/onnx_precision.py --variant=1-1-8 --precision=float64 --n=64

variant: 1-1-8 | 2-2-8 | split (split binary of 2-2-8). A benchmark, not a test.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position

from bitbert_jax import export, onnx_export, predict  # pylint: disable=wrong-import-position
from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=wrong-import-position
from bitbert_jax.quant import policy_from_name  # pylint: disable=wrong-import-position
from bitbert_jax.split import split_params  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='1-1-8', choices=('1-1-8', '2-2-8', 'split'))
  parser.add_argument('--precision', default='float64', choices=('float64', 'float32'))
  parser.add_argument('--n', type=int, default=64)
  parser.add_argument('--glue_dir', default=os.environ.get('GLUE_DIR', ''))
  args = parser.parse_args()
  minilm = conftest.minilm_dir()
  config, params = load_hf_checkpoint(minilm, num_labels=2, label_names=('a', 'b'))
  policy = policy_from_name('2-2-8' if args.variant == 'split' else args.variant)
  if args.variant == 'split':
    params, policy = split_params(params, policy)
  texts = predict.read_texts(os.path.join(args.glue_dir, 'MRPC', 'dev.tsv'),
                             ['#1 String', '#2 String'])[:args.n]
  with tempfile.TemporaryDirectory() as root:
    packed = export.pack(config, params, policy, os.path.join(root, 'packed'),
                         tokenizer_dir=minilm)
    onnx_dir = onnx_export.export_onnx(packed, os.path.join(root, 'onnx'),
                                       precision=args.precision)
    model = predict.load_packed(packed, precision=args.precision)
    t0 = time.time()
    logits, _ = predict.predict(model, texts)
    t1 = time.time()
    batch = predict.encode_texts(model.tokenizer, texts, 128)
    session = ort.InferenceSession(os.path.join(onnx_dir, 'model.onnx'),
                                   providers=['CPUExecutionProvider'])
    got = np.concatenate([session.run(None, {k: np.asarray(v[i:i + 32], np.int64)
                                             for k, v in batch.items()})[0]
                          for i in range(0, len(texts), 32)])
    t2 = time.time()
  d = np.abs(got - logits)
  print(f'{args.variant} {args.precision} n={len(texts)}: max |diff| {d.max():.3g}, mean '
        f'{d.mean():.3g}; labels {(got.argmax(-1) == logits.argmax(-1)).sum()}/{len(texts)}; '
        f'jax {t1 - t0:.1f}s, ort {t2 - t1:.1f}s')


if __name__ == '__main__':
  main()
