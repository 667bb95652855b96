"""ONNX Runtime against bitbert_jax.predict on a whole GLUE dev set (the exactness check).

Exports the student (a packed directory, or any checkpoint `export.load_student` reads) to a
packed and an ONNX directory in a temporary dir, predicts the task's dev split with both
(`bitbert_jax.predict.predict` under JAX, `bitbert_serve.predict` under ONNX Runtime), and
prints the largest logit difference, label agreement (classification) and the dev metric of each.

  python bench/onnx_dev_check.py --student=/work/runs/xtc_stsb_6L_lr5e-4/stages/03_kd_1bit/output \
      --task=stsb --glue_dir=/work/shared/data/glue
"""
import argparse
import os
import tempfile
import time

import numpy as np

import bitbert_serve
from bitbert_jax import export, onnx_export, predict
from bitbert_jax.packed import format as fmt

TASKS = {  # dev file, text columns, label column
    'mrpc': ('MRPC/dev.tsv', ['#1 String', '#2 String'], 'Quality'),
    'stsb': ('STS-B/dev.tsv', ['sentence1', 'sentence2'], 'score'),
    'rte': ('RTE/dev.tsv', ['sentence1', 'sentence2'], 'label'),
    'sst2': ('SST-2/dev.tsv', ['sentence'], 'label'),
}


def _metric(labels, gold, regression):
  if regression:
    return 'pearson', float(np.corrcoef(np.asarray(labels, float), np.asarray(gold, float))[0, 1])
  return 'accuracy', float(np.mean([str(p) == str(g) for p, g in zip(labels, gold)]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--student', required=True)
  parser.add_argument('--task', required=True, choices=sorted(TASKS))
  parser.add_argument('--glue_dir', default=os.environ.get('GLUE_DIR', ''))
  parser.add_argument('--precision', default='float32', choices=('float32', 'float64'),
                      help='of the ONNX graph and of predict alike')
  args = parser.parse_args()
  path, cols, label_col = TASKS[args.task]
  texts, gold = predict.read_texts(os.path.join(args.glue_dir, path), cols,
                                   label_column=label_col)
  with tempfile.TemporaryDirectory() as tmp:
    packed = args.student
    if not os.path.isfile(os.path.join(packed, fmt.MANIFEST)):
      s = export.load_student(args.student)
      packed = export.pack(s.config, s.params, s.policy, os.path.join(tmp, 'packed'),
                           tokenizer_dir=s.tokenizer_dir, model_state=s.model_state)
    onnx_dir = onnx_export.export_onnx(packed, os.path.join(tmp, 'onnx'), precision=args.precision)
    model = predict.load_packed(packed, precision=args.precision)
    if not model.config.is_regression:  # GLUE label columns hold indices for some tasks
      gold = [model.label_names[int(g)] if g.isdigit() else g for g in gold]
    t0 = time.time()
    jax_logits, jax_labels = predict.predict(model, texts)
    t1 = time.time()
    ort_logits, ort_labels = bitbert_serve.predict(bitbert_serve.load(onnx_dir), texts)
    t2 = time.time()
  regression = model.config.is_regression
  diff = np.abs(ort_logits - jax_logits)
  print(f'{args.task} dev: {len(texts)} examples; precision {args.precision}; policy {model.policy.name}'
        f'{" split" if model.policy.split else ""}; jax {t1 - t0:.0f}s, onnx {t2 - t1:.0f}s')
  print(f'max |logit diff| {diff.max():.3g}, mean {diff.mean():.3g}; '
        f'logit range [{jax_logits.min():.3g}, {jax_logits.max():.3g}]')
  if not regression:
    same = sum(a == b for a, b in zip(jax_labels, ort_labels))
    print(f'labels: {same}/{len(texts)} the same')
  for name, labels in (('jax predict', jax_labels), ('onnx runtime', ort_labels)):
    metric, value = _metric(labels, gold, regression)
    print(f'{name}: {metric} {value:.4f}')


if __name__ == '__main__':
  main()
