"""run_summary reads a workdir's metrics.jsonl into per-stage evals, kept best and signals."""
import json
import os

import pytest

from bitbert_jax import logs
from bitbert_jax import run_summary
from bitbert_jax.errors import BitbertError


def _train_row(loss, flips=None, relerr=None):
  row = {'loss': loss, 'attn': loss / 2, 'hidden': loss / 4, 'pred': loss / 8}
  if flips is not None:
    row.update({f'signflip_stage/{p}': flips for p in run_summary.SIGNAL_PARTS})
    row.update({'signflip_recent/all': flips / 10, 'quant_relerr/all': relerr})
  return row


def _write_run(workdir):
  writer = logs.MetricsWriter(workdir, enabled=True)
  writer.write('kd_fp32', 10, _train_row(4.0))
  writer.write('kd_fp32', 20, {'dev/score': 0.70, 'validation/pearson': 0.69})
  for step, loss, flips in [(10, 3.0, 0.01), (20, 2.0, 0.02), (30, 1.0, 0.03)]:
    writer.write('kd_1bit', step, _train_row(loss, flips, relerr=0.6 + flips))
    writer.write('kd_1bit', step, {'dev/score': {10: 0.5, 20: 0.8, 30: 0.7}[step],
                                   'validation/pearson': 0.79, 'validation/spearman': 0.81})
  writer.close()
  return os.path.join(workdir, 'metrics.jsonl')


def test_summary_keeps_the_best_eval_and_the_last_signals(tmp_path):
  _write_run(str(tmp_path))
  s = run_summary.summarize(run_summary.read_metrics(str(tmp_path)))
  assert list(s) == ['kd_fp32', 'kd_1bit']
  one = s['kd_1bit']
  assert one['evals'] == [(10, 0.5), (20, 0.8), (30, 0.7)]
  assert one['best']['step'] == 20 and one['best']['score'] == 0.8
  assert one['best']['spearman'] == 0.81
  assert one['signals']['step'] == 30
  assert one['signals']['flipped_since_start']['ffn'] == pytest.approx(0.03)
  assert one['signals']['relerr'] == pytest.approx(0.63)
  assert one['losses']['attn'] == pytest.approx((1.5 + 1.0 + 0.5) / 3)
  assert s['kd_fp32']['signals'] is None  # an FP32 stage logs no sign flips
  text = run_summary.format_summary('w', s)
  assert 'kept: step 20, score 80.00' in text and 'relerr 0.630' in text


def test_a_torn_last_line_is_dropped_but_a_bad_middle_line_names_its_line(tmp_path):
  path = _write_run(str(tmp_path))
  with open(path, 'a') as f:
    f.write('{"stage": "kd_1bit", "ste')  # a kill mid-write
  assert run_summary.summarize(run_summary.read_metrics(str(tmp_path)))['kd_1bit']['best'][
      'score'] == 0.8
  with open(path) as f:
    lines = f.readlines()
  lines[2] = 'not json\n'
  with open(path, 'w') as f:
    f.writelines(lines)
  with pytest.raises(BitbertError, match=r'metrics\.jsonl, line 3: not JSON'):
    run_summary.read_metrics(str(tmp_path))
  lines[2] = json.dumps({'stage': 'kd_1bit'}) + '\n'
  with open(path, 'w') as f:
    f.writelines(lines)
  with pytest.raises(BitbertError, match=r'line 3: a row needs a "stage" name and an integer'):
    run_summary.read_metrics(str(tmp_path))


def test_command_line_errors_name_the_missing_file(tmp_path, capsys):
  assert run_summary.main([str(tmp_path / 'nope')]) == 2
  assert 'nope/metrics.jsonl: no such file' in capsys.readouterr().err
  _write_run(str(tmp_path))
  assert run_summary.main([str(tmp_path), '--json']) == 0
  out = json.loads(capsys.readouterr().out)
  assert out[str(tmp_path)]['kd_1bit']['best']['step'] == 20
