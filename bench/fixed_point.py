"""Are two runs the same run? Compares what a user measures in two workdirs, bit for bit.

  python bench/fixed_point.py BEFORE_WORKDIR AFTER_WORKDIR

Checks, each exactly (floats compared as written, no tolerance):
  results.json    every number except wall times ('seconds') and the paths of outputs;
  metrics.jsonl   every logged value of every stage and step (losses, grad norms, lrs, signals, dev);
  packed/         every tensor of weights.safetensors (name, dtype, shape, bytes), the safetensors
                  metadata, and config/policy/manifest JSON (the manifest's sha256 and size fields
                  name the file bytes, so they are reported separately, as 'same bytes').
Exit status 0 when all agree, 1 otherwise (each difference named).
"""
import json
import os
import sys

from safetensors import safe_open

SKIP_KEYS = {'seconds', 'packed', 'onnx', 'paths', 'elapsed'}  # wall times and output locations


def _leaves(obj, prefix=''):
  if isinstance(obj, dict):
    for k in sorted(obj):
      if k not in SKIP_KEYS:
        yield from _leaves(obj[k], f'{prefix}/{k}')
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _leaves(v, f'{prefix}[{i}]')
  else:
    yield prefix, obj


def _diff_json(name, a, b):
  la, lb = dict(_leaves(a)), dict(_leaves(b))
  out = [f'{name}{k}: {la.get(k, "<absent>")!r} != {lb.get(k, "<absent>")!r}'
         for k in sorted(set(la) | set(lb)) if la.get(k, '<absent>') != lb.get(k, '<absent>')]
  return out, len(la)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _tensors(path):
  with safe_open(path, 'np') as f:
    return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def compare(before, after):
  """Returns (differences, counts) for two workdirs."""
  diffs, counts = [], {}
  d, counts['results.json numbers'] = _diff_json(
      'results.json', _read_json(os.path.join(before, 'results.json')),
      _read_json(os.path.join(after, 'results.json')))
  diffs += d
  d, counts['metrics.jsonl values'] = _diff_json(
      'metrics.jsonl', _metrics(os.path.join(before, 'metrics.jsonl')),
      _metrics(os.path.join(after, 'metrics.jsonl')))
  diffs += d
  pa, pb = os.path.join(before, 'packed'), os.path.join(after, 'packed')
  if os.path.isdir(pa) or os.path.isdir(pb):
    (ma, ta), (mb, tb) = _tensors(os.path.join(pa, 'weights.safetensors')), _tensors(
        os.path.join(pb, 'weights.safetensors'))
    if ma != mb:
      diffs.append(f'packed metadata: {ma} != {mb}')
    for k in sorted(set(ta) | set(tb)):
      x, y = ta.get(k), tb.get(k)
      if x is None or y is None or x.dtype != y.dtype or x.shape != y.shape or (
          x.tobytes() != y.tobytes()):
        diffs.append(f'packed tensor {k} differs')
    counts['packed tensors'] = len(ta)
    for name in ('config.json', 'policy.json', 'manifest.json'):
      a, b = _read_json(os.path.join(pa, name)), _read_json(os.path.join(pb, name))
      if name == 'manifest.json':  # hashes of file bytes: reported, not part of "same numbers"
        counts['packed: same weights bytes'] = (a.get('weights_sha256') == b.get('weights_sha256'))
        for m in (a, b):
          m.pop('weights_sha256', None)
      d, counts[f'packed {name} fields'] = _diff_json(f'packed/{name}', a, b)
      diffs += d
  return diffs, counts


def main(argv):
  if len(argv) != 3:
    sys.exit(__doc__)
  diffs, counts = compare(argv[1], argv[2])
  for k, v in counts.items():
    print(f'{k}: {v}')
  for d in diffs:
    print('DIFFERS', d)
  print('equal' if not diffs else f'{len(diffs)} differences')
  return 1 if diffs else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
