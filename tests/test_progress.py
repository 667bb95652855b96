"""Run-level progress: stage announcements, the estimate of the run's remaining time (its maths
on a fake clock, when it is marked '~'), resumed runs, and the closing summary's text."""
import importlib.util
import logging
import os
import types

import pytest

from bitbert_jax import pipeline, progress
from bitbert_jax.progress import Planned, RunProgress, StageProgress

ROOT = os.path.join(os.path.dirname(__file__), '..')


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


PLAN = {'teacher': Planned('finetune', 10, 4), 'bits': Planned('quantize'),
        'kd': Planned('task_kd', 20, 8), 'kd2': Planned('task_kd', 5, 8)}


def make_run(names=('teacher', 'bits', 'kd'), plan=None):
  clock = Clock()
  return RunProgress(list(names), (plan or PLAN).__getitem__, clock=clock), clock


def step_through(run, clock, index, seconds, steps):
  """Stage `index` runs `steps` steps over `seconds` and ends."""
  name = run.names[index]
  run.stage_start(index)
  with progress.running(run):
    stage = StageProgress(name, run.plan[name].steps, 0, run.plan[name].batch_size, clock=clock)
  clock.now += seconds
  line = stage.line(steps, {})
  run.stage_end(index, seconds)
  return line


def test_nothing_measured_means_no_estimate():
  run, _ = make_run()
  assert run.remaining() == (None, True)
  assert run.run_text() == 'run 0m00s elapsed, ? left'


def test_an_unrun_kind_borrows_the_measured_rate_and_is_marked():
  run, clock = make_run()
  with progress.running(run):
    run.stage_start(0)
    stage = StageProgress('teacher', 10, 0, 4, clock=clock)
    clock.now += 20.0
    # 5 steps of 4 in 20 s: 1 s per example. Left: 5 x 4 here, quantize unmeasured (0), and
    # task_kd's 20 x 8 at the teacher's rate.
    assert run.remaining(5) == (pytest.approx(20.0 + 160.0), True)
    assert stage.line(5, {'loss': 0.5}).endswith(
        '| 0.25 steps/s 1.0 ex/s | ETA 0m20s | run 0m20s elapsed, ~3m00s left')


def test_once_each_remaining_kind_has_run_the_estimate_is_plain():
  run, clock = make_run(('teacher', 'bits', 'kd', 'kd2'))
  step_through(run, clock, 0, 40.0, 10)  # finetune: 1 s per example
  run.stage_start(1)
  clock.now += 5.0
  run.stage_end(1, 5.0)
  assert run.remaining() == (pytest.approx(160.0 + 40.0), True)  # task_kd not yet run
  run.stage_start(2)
  with progress.running(run):
    stage = StageProgress('kd', 20, 0, 8, clock=clock)
  clock.now += 8.0  # 2 steps of 8: 0.5 s per example
  # 18 steps of 8 left here, then kd2's 5 x 8 at this stage's rate: nothing borrowed.
  assert run.remaining(2) == (pytest.approx((18 * 8 + 40) * 0.5), False)
  assert stage.line(2, {}).endswith('run 0m53s elapsed, 1m32s left')


def test_finished_stages_of_a_kind_set_its_rate_and_non_training_stages_their_time():
  plan = dict(PLAN, bits2=Planned('quantize'))
  run, clock = make_run(('kd', 'bits', 'kd2', 'bits2'), plan)
  step_through(run, clock, 0, 320.0, 20)  # task_kd: 320 s / 160 examples = 2 s per example
  run.stage_start(1)
  run.stage_end(1, 7.0)
  assert run.remaining() == (pytest.approx(5 * 8 * 2.0 + 7.0), False)


def test_a_stage_the_runner_has_not_planned_makes_the_estimate_unknown(caplog):
  def planner(name):
    if name == 'kd':
      raise ValueError('no data yet')
    return PLAN[name]
  with caplog.at_level(logging.WARNING, logger='bitbert_jax'):
    run = RunProgress(['teacher', 'kd'], planner, clock=Clock())
  assert '[kd] no step count for the run estimate: no data yet' in caplog.text
  step_through(run, Clock(), 0, 40.0, 10)
  assert run.remaining() == (None, True)


def test_the_plan_is_asked_again_at_each_stage_start():
  plan = dict(PLAN)
  run, clock = make_run(('teacher', 'kd'), plan)
  step_through(run, clock, 0, 40.0, 10)
  plan['kd'] = Planned('task_kd', 100, 8)  # e.g. augmented data now exists
  assert '[stage 2/2 kd] task_kd: 100 steps of batch 8 |' in run.stage_start(1)


def test_a_resumed_run_names_its_complete_stages_and_times_only_the_steps_it_ran():
  run, clock = make_run()
  run.stage_end(0, 40.0, loaded=True)  # the teacher, from an earlier process: 1 s per example
  run.stage_end(1, 3.0, loaded=True)
  line = run.stage_start(2)
  assert line == ('[stage 3/3 kd] task_kd: 20 steps of batch 8 | resuming: 2 stages complete '
                  '(teacher, bits) | run 0m00s elapsed, ~2m40s left')
  with progress.running(run):
    StageProgress('kd', 20, 15, 8, clock=clock)  # its checkpoint was at step 15
  clock.now += 10.0
  run.stage_end(2, 10.0)
  assert run._spent['kd'].examples == 5 * 8  # pylint: disable=protected-access


def test_stage_lines_carry_the_run_only_inside_a_run():
  run, clock = make_run()
  alone = StageProgress('teacher', 10, 0, 4, clock=clock)
  with progress.running(run):
    inside = StageProgress('teacher', 10, 0, 4, clock=clock)
  clock.now += 4.0
  assert ' | run ' not in alone.line(1, {})
  assert ' | run 0m04s elapsed, ' in inside.line(1, {})
  assert progress.active() is None


def test_skipped_stages_count_for_nothing():
  run, clock = make_run(('teacher', 'kd'))
  run.stage_end(0, 0.0, skipped=True)
  step_through(run, clock, 1, 16.0, 2)
  assert run.remaining() == (0.0, False)


RESULTS = {'stages': {
    'finetune': {'kind': 'finetune', 'dev': {'score': 0.8}, 'seconds': 75.0, 'policy': '32-32-32'},
    'quantize': {'kind': 'quantize', 'dev': None, 'seconds': 4.2, 'policy': '1-1-8'},
    'kd_1bit': {'kind': 'task_kd', 'dev': {'score': 0.7}, 'seconds': 3725.0, 'policy': '1-1-8'}},
    'final': {'policy': '1-1-8', 'dev': {'score': 0.7}}}


def write(path, n):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'x' * n)


def test_summary_tells_scores_times_the_share_of_the_teacher_and_the_outputs(tmp_path):
  write(str(tmp_path / 'packed' / 'weights.safetensors'), 3 * 2**20)
  write(str(tmp_path / 'packed' / 'vocab.txt'), 2**19)
  write(str(tmp_path / 'onnx' / 'model.onnx'), 2**20 + 2**19)
  write(str(tmp_path / 'onnx' / 'manifest.json'), 2**10)
  assert progress.summary(RESULTS, str(tmp_path)).splitlines() == [
      f'run summary ({tmp_path})',
      '  stage     kind      bits      dev score      time',
      '  finetune  finetune  32-32-32     0.8000     1m15s',
      '  quantize  quantize  1-1-8             -     0m04s',
      '  kd_1bit   task_kd   1-1-8        0.7000  1h02m05s',
      '  time of all stages 1h03m24s',
      "final student (1-1-8): dev score 0.7000 = 87.5% of the teacher's 0.8000 (stage finetune)",
      f'packed: {tmp_path}/packed (3.5 MiB)',
      f'onnx: {tmp_path}/onnx/model.onnx (1.5 MiB; directory 1.5 MiB)']


def test_summary_without_a_teacher_score_or_exports_says_so(tmp_path):
  results = {'stages': {k: v for k, v in RESULTS['stages'].items() if k != 'finetune'},
             'final': RESULTS['final']}
  lines = progress.summary(results, str(tmp_path)).splitlines()
  assert lines[-2:] == [
      'final student (1-1-8): dev score 0.7000 (the teacher was not evaluated in this run)',
      'packed: none written (a float student, or config.export.packed=False)']
  write(str(tmp_path / 'packed' / 'weights.safetensors'), 2**10)
  assert progress.summary(results, str(tmp_path)).splitlines()[-1] == (
      f'onnx: not exported; python -m bitbert_jax.export --format=onnx '
      f'--checkpoint={tmp_path}/packed --out={tmp_path}/onnx')


def test_the_runner_plans_the_steps_the_trainer_runs():
  spec = importlib.util.spec_from_file_location('xtc_config', os.path.join(ROOT, 'configs',
                                                                           'xtc.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('task=mrpc,preset=smoke')
  names = [n for n in config.pipeline.split(',') if n]
  data = types.SimpleNamespace(train=list(range(64)), augmented=None, dev={})
  inputs = types.SimpleNamespace(names=names, data=data, teacher=None)
  planned = pipeline.planned(config, len(inputs.data.train))
  plan = {n: planned(n) for n in names}
  assert plan == {'finetune': Planned('finetune', 8, 8), 'reduce': Planned('reduce_layers'),
                  'quantize': Planned('quantize'), 'kd_1bit': Planned('task_kd', 8, 8)}
