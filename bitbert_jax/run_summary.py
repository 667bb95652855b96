"""What a run did, per stage, from its workdir's metrics.jsonl: every dev eval, the kept best,
the training signals at the stage's end (signs flipped, quantization error) and the last losses.

  python -m bitbert_jax.run_summary runs/xtc_stsb [runs/other ...] [--json]

This is how docs/RESULTS.md's sweep rows were read.
"""
import argparse
import json
import math
import os
import sys

from bitbert_jax.errors import BitbertError

SIGNAL_PARTS = ('all', 'attention', 'ffn', 'embeddings')
LOSS_TERMS = ('attn', 'hidden', 'pred')
LAST_LOGS = 5  # loss terms are averaged over this many final logs: one log is noisy


def read_metrics(workdir):
  """The rows of workdir/metrics.jsonl; a torn last line (a kill mid-write) is dropped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise BitbertError(f'{path}: no such file (is {workdir!r} a bitbert_jax workdir?)')
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        break
      raise BitbertError(f'{path}, line {number}: not JSON ({e.msg})') from None
    if not isinstance(row, dict) or not isinstance(row.get('stage'), str) or not isinstance(
        row.get('step'), int):
      raise BitbertError(f'{path}, line {number}: a row needs a "stage" name and an integer '
                         '"step"')
    rows.append(row)
  return rows


def summarize(rows):
  """{stage: {evals, best, signals, losses}} in the order the stages first logged."""
  stages = {}
  for row in rows:
    stages.setdefault(row['stage'], []).append(row)
  out = {}
  for name, stage_rows in stages.items():
    evals = [r for r in stage_rows if 'dev/score' in r]
    train = [r for r in stage_rows if 'loss' in r]
    best = max(evals, key=lambda r: r['dev/score']) if evals else None
    flips = [r for r in train if 'signflip_stage/all' in r]
    end = flips[-1] if flips else None
    last = train[-LAST_LOGS:]
    out[name] = {
        'evals': [(r['step'], r['dev/score']) for r in evals],
        'best': None if best is None else {
            'step': best['step'], 'score': best['dev/score'],
            **{k.split('/', 1)[1]: v for k, v in best.items() if k.startswith('validation/')}},
        'signals': None if end is None else {
            'step': end['step'],
            'flipped_since_start': {p: end.get(f'signflip_stage/{p}') for p in SIGNAL_PARTS},
            'flipped_recently': end.get('signflip_recent/all'),
            'relerr': end.get('quant_relerr/all')},
        'losses': {t: sum(r[t] for r in last) / len(last)
                   for t in LOSS_TERMS if last and all(t in r for r in last)},
    }
  return out


def _pct(x, digits=2):
  return '-' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{100 * x:.{digits}f}'


def format_summary(workdir, summary):
  lines = [f'== {workdir}']
  for name, s in summary.items():
    if s['evals']:
      lines.append(f'  {name}: dev per eval ' + ', '.join(
          f'{_pct(v)} (step {step})' for step, v in s['evals']))
      b = s['best']
      extra = ', '.join(f'{k} {_pct(v)}' for k, v in b.items() if k not in ('step', 'score'))
      lines.append(f'    kept: step {b["step"]}, score {_pct(b["score"])}'
                   + (f' ({extra})' if extra else ''))
    else:
      lines.append(f'  {name}: no dev evals')
    g = s['signals']
    if g is not None:
      flipped = ' / '.join(_pct(g['flipped_since_start'][p]) for p in SIGNAL_PARTS)
      relerr = '-' if g['relerr'] is None else f'{g["relerr"]:.3f}'
      lines.append(f'    end (step {g["step"]}): % signs flipped in the stage '
                   f'({" / ".join(SIGNAL_PARTS)}) {flipped}; in the last logs '
                   f'{_pct(g["flipped_recently"], 3)}; relerr {relerr}')
    if s['losses']:
      lines.append(f'    last {LAST_LOGS} logs, mean: ' + ', '.join(
          f'{t} {v:.3f}' for t, v in s['losses'].items()))
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='run workdirs (each holds metrics.jsonl)')
  parser.add_argument('--json', action='store_true', help='print JSON instead of text')
  args = parser.parse_args(argv)
  try:
    summaries = {w: summarize(read_metrics(w)) for w in args.workdirs}
  except BitbertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(summaries, indent=1))
  else:
    print('\n'.join(format_summary(w, s) for w, s in summaries.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
