"""`--dry_run`: a line per stage (kind, data, epochs and steps, batch, lr, bits), each value a
rule chose marked with its reason, and nothing written."""
import os
import re
import subprocess
import sys

import pytest

from bitbert_jax import plan
from helpers import ROOT, load_config  # pylint: disable=g-bad-import-order

MRPC_TRAIN = 3668


def rows(arg, examples=MRPC_TRAIN, **fields):
  c = load_config('xtc', arg)
  for path, value in fields.items():
    *parents, leaf = path.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return {r.cells['stage']: r for r in plan.plan(c, examples)}


def test_each_stage_shows_its_own_lr_else_the_runs():
  c = load_config('xtc', 'preset=quick,layers=3')
  r = rows('preset=quick,layers=3')
  assert [float(r[n].cells['lr']) for n in ('finetune', 'kd_fp32', 'kd_1bit')] == [
      c.optim.lr, c.stages.kd_fp32.lr, c.stages.kd_1bit.lr]
  assert float(rows('preset=quick', stages__kd_1bit__lr=2e-4)['kd_1bit'].cells['lr']) == 2e-4


def test_epochs_zero_means_the_presets_and_is_marked():
  quick, paper = rows('preset=quick')['kd_1bit'], rows('')['kd_1bit']
  assert float(quick.cells['epochs']) < float(paper.cells['epochs'])
  assert "epochs=0: the preset's" in quick.why['epochs']
  given = rows('preset=quick,epochs=4')['kd_1bit']
  assert given.cells['epochs'] == '4' and 'epochs' not in given.why


def test_augmentation_divides_epochs_and_keeps_the_step_budget():
  plain = rows('preset=quick,layers=3,augment=false')['kd_1bit']
  augmented = rows('preset=quick,layers=3')
  one_bit = augmented['kd_1bit']
  assert augmented['augment'].cells['data'] == 'task x9'  # 8 copies and the original
  assert one_bit.cells['data'] == 'augmented' and 'copies + 1 = 9' in one_bit.why['epochs']
  assert float(one_bit.cells['epochs']) * 9 == pytest.approx(float(plain.cells['epochs']))
  assert abs(int(one_bit.cells['steps']) - int(plain.cells['steps'])) < 9  # the same budget
  assert any(n.startswith('eval_every=') for n, _ in one_bit.notes)  # once per task epoch


def test_steps_follow_the_data_batch_and_epochs():
  r = rows('preset=quick')
  batch = int(r['finetune'].cells['batch'])
  assert int(r['finetune'].cells['steps']) == 3 * (MRPC_TRAIN // batch)
  assert rows('preset=quick', examples=None)['finetune'].cells['steps'] == '-'  # data unread
  assert rows('preset=quick', stages__kd_1bit__max_steps=5)['kd_1bit'].cells['steps'] == '5'


def test_bits_follow_the_quantize_stages():
  r = rows('preset=quick,ladder=8-2-1')
  assert [r[n].cells['bits'] for n in ('reduce', 'kd_8', 'kd_2', 'kd_1bit')] == [
      '32-32-32', '8-8-8', '2-2-8', '1-1-8']
  ms = {x.cells['stage']: x for x in plan.plan(load_config('multistage', 'preset=quick'), 100)}
  assert ms['binary_stage2'].cells['bits'] == '1-1-8'  # split: two 1-bit planes per 2-bit weight
  assert ms['general_kd'].cells['steps'] == '100' and 'preset=quick' in ms['general_kd'].why[
      'batch']


def test_half_width_ternary_stage_has_one_bit_embeddings_and_says_why():
  ms = lambda arg: {x.cells['stage']: x for x in plan.plan(load_config('multistage', arg), 100)}
  half, full = ms('preset=quick,width=0.5,bits=1-1-4'), ms('preset=quick')
  assert [half[n].cells['bits'] for n in ('quantize_2bit', 'ternary_stage2', 'binary_stage2')] == [
      '2-1-4', '2-1-4', '1-1-4']
  assert half['quantize_2bit'].why['bits'] == (
      "width<1: 1-bit embeddings in the ternary stage keep one plane after splitting, so the "
      "file has the 1-bit student's size")
  assert full['quantize_2bit'].cells['bits'] == '2-2-8' and 'bits' not in full[
      'quantize_2bit'].why


def test_an_overridden_value_loses_its_rule():
  assert 'epochs' in rows('preset=quick,layers=3')['kd_1bit'].why
  assert 'epochs' not in rows('preset=quick,layers=3', stages__kd_1bit__epochs=4.0)['kd_1bit'].why


def test_auto_switches_mark_the_pipeline():
  c = load_config('xtc', 'preset=quick,layers=3')
  from bitbert_jax import config_lib  # pylint: disable=g-import-not-at-top
  assert 'fp32_kd=auto: on' in config_lib.why(c, 'pipeline')
  assert config_lib.why(load_config('xtc', 'preset=quick,fp32_kd=false,augment=false'),
                        'pipeline') == ''


def test_cli_dry_run_prints_the_pipeline_and_writes_nothing(tmp_path, glue):
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, '-m', 'bitbert_jax.main', '--config=configs/xtc.py:preset=quick,layers=3',
       f'--workdir={workdir}', '--dry_run', f'--config.task.glue_dir={glue}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr
  assert not os.path.exists(workdir)
  lines = out.stdout.splitlines()
  assert lines[0].startswith('pipeline finetune,reduce,kd_fp32,augment,quantize,kd_1bit*')
  assert f'{MRPC_TRAIN} training examples' in lines[1]
  assert lines[2].split() == ['stage', 'kind', 'data', 'epochs', 'steps', 'batch', 'lr', 'bits']
  stage_lines = [l for l in lines if re.match(r'\d\d_', l)]
  assert [l.split()[0] for l in stage_lines] == ['00_finetune', '01_reduce', '02_kd_fp32',
                                                 '03_augment', '04_quantize', '05_kd_1bit']
  kd = stage_lines[-1].split()
  assert kd[1:3] == ['task_kd', 'augmented'] and kd[7] == '1-1-8'
  mark = re.search(r'\*(\d+)$', kd[3]).group(1)  # the epochs, marked
  assert any(l.startswith(f"*{mark} epochs=0: the preset's 9") for l in lines)


def test_cli_dry_run_refuses_a_bad_config_as_a_run_does(tmp_path):
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, '-m', 'bitbert_jax.main', '--config=configs/xtc.py:preset=smoke',
       f'--workdir={workdir}', '--dry_run', '--config.stages.kd_1bit.losses=stage3'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 2 and "config.stages.kd_1bit.losses='stage3'" in out.stderr
  assert not os.path.exists(workdir)


def test_half_width_with_a_teacher_copies_its_layers_by_taylor_importance():
  from bitbert_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = load_config('multistage', 'preset=quick,width=0.5,teacher=/t')
  assert (c.pretrained, c.stages.init_student.importance) == ('/t', 'taylor')
  assert config_lib.why(c, 'pretrained').startswith('width<1 with a teacher')
  assert config_lib.why(c, 'stages.init_student.importance') == config_lib.why(c, 'pretrained')
  for other in ('preset=quick,width=0.5', 'preset=quick,teacher=/t',
                'preset=quick,width=0.5,teacher=/t,init=random',
                'preset=quick,width=0.5,teacher=/t,pretrained=/p'):
    c = load_config('multistage', other)
    assert c.stages.init_student.importance == 'magnitude', other
    assert config_lib.why(c, 'pretrained') == '', other
