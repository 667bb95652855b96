"""eval_every (steps, across epoch boundaries) with keep_best: the stage returns the parameters
of its best evaluation, not the first or the last; the XTC ladder and augment pipelines."""
import jax
import pytest

from bitbert_jax import evaluate as evaluate_lib
from bitbert_jax import validate
from bitbert_jax.errors import BitbertError
from bitbert_jax.distill import stages
from bitbert_jax.distill import stage_config
from helpers import Batches, assert_trees_equal, load_config, tiny_train

SCORES = {4: 0.2, 8: 0.3, 12: 0.9, 16: 0.5, 20: 0.7, 24: 0.4}  # step -> dev score; best at 12


def _scored(batches, seen):
  def evaluate(model, params, *args):
    del model, args
    seen[batches.step] = jax.device_get(params)
    score = SCORES[batches.step]
    return {'validation': {'accuracy': score}, 'score': score}
  return evaluate


@pytest.mark.parametrize('keep_best', [True, False])
def test_best_of_several_evaluations_is_kept(tmp_path, monkeypatch, keep_best):
  batches, seen = Batches(), {}
  monkeypatch.setattr(evaluate_lib, 'evaluate', _scored(batches, seen))
  # 6 steps per epoch, 4 epochs, an evaluation every 4 steps: 6 of them, 4 inside epochs.
  state, evals = tiny_train(str(tmp_path), batches, epochs=4.0, eval_every=4,
                            keep_best=keep_best)
  assert sorted(seen) == sorted(SCORES)
  kept = 12 if keep_best else 24
  assert evals['score'] == SCORES[kept]
  assert_trees_equal(state.params, seen[kept])


def test_xtc_ladder_and_augment_pipelines_validate():
  c = load_config('xtc', 'preset=smoke,ladder=8-2-1,augment=True')
  assert c.pipeline == ('finetune,reduce,augment,quantize_8,kd_8,quantize_2,kd_2,quantize_1,'
                        'kd_1bit')
  assert [c.stages[n].bits for n in ('quantize_8', 'quantize_2', 'quantize_1')] == [
      '8-8-8', '2-2-8', '1-1-8']
  assert all(c.stages[n].data == 'augmented' for n in ('kd_8', 'kd_2', 'kd_1bit'))
  c.task.glue_dir = ''
  names = validate.validate_config(c)
  assert names[-1] == 'kd_1bit'
  c = load_config('xtc', 'ladder=8-2-1,ladder_epochs=2-4-12')
  assert [c.stages[n].epochs for n in ('kd_8', 'kd_2', 'kd_1bit')] == [2.0, 4.0, 12.0]
  default = load_config('xtc', '')
  assert default.pipeline == 'finetune,reduce,quantize,kd_1bit'
  assert default.stages.kd_1bit.data == 'task' and 'augment' not in default.stages


def test_xtc_epochs_come_from_the_preset_unless_given():
  one_bit = lambda arg: load_config('xtc', arg).stages.kd_1bit
  quick, paper = one_bit('preset=quick'), one_bit('')
  assert quick.epochs < paper.epochs  # epochs=0: the preset's
  assert load_config('xtc', 'preset=quick').train.batch_size > load_config(
      'xtc', 'preset=smoke').train.batch_size
  assert one_bit('preset=quick,epochs=4').epochs == 4.0  # a given epochs wins
  ladder = load_config('xtc', 'preset=quick,ladder=8-2-1')
  rungs = [ladder.stages[n].epochs for n in ('kd_8', 'kd_2', 'kd_1bit')]
  assert len(set(rungs)) == 1 and sum(rungs) == quick.epochs  # the total, split evenly
  short = load_config('xtc', 'preset=quick,ladder=8-2-1,epochs=3')  # 1-epoch rungs
  for name in ('kd_8', 'kd_2', 'kd_1bit'):
    rung = short.stages[name]
    warmup_epochs = rung.warmup * rung.epochs if rung.warmup < 1 else rung.warmup  # as train does
    assert warmup_epochs < 0.5 * rung.epochs, f'{name}: warmup would leave the lr no time to decay'


def test_xtc_polishes_a_reduced_student_in_fp32_first():
  """`layers` given: FP32 KD on the task data, faster than the teacher's fine-tuning, before
  quantizing."""
  pipeline_of = lambda arg: load_config('xtc', arg).pipeline.split(',')
  for arg in ('preset=quick,layers=3', 'layers=3', 'preset=smoke,layers=1,fp32_kd=true'):
    names = pipeline_of(arg)
    assert names[2] == 'kd_fp32' and names.index('kd_fp32') < names.index('quantize'), arg
  for arg in ('preset=quick', 'layers=3,fp32_kd=false', 'preset=smoke,layers=1'):
    assert 'kd_fp32' not in pipeline_of(arg), arg  # same depth; refused; smoke (tests) stays short
  c = load_config('xtc', 'preset=quick,layers=3')
  polish = c.stages.kd_fp32
  assert polish.lr > c.optim.lr and polish.losses == 'all' and polish.data == 'task'
  assert c.stages.kd_1bit.data == 'augmented'  # the polish trains on the originals only
  with pytest.raises(BitbertError, match="fp32_kd='maybe'; valid: auto, true, false"):
    load_config('xtc', 'fp32_kd=maybe')


def test_xtc_quantized_stages_distil_at_1e_3_with_kl_attention_at_every_depth():
  # Measured at 3 and 6 layers (docs/RESULTS.md); the FP32 polish of a reduced student at 5e-4.
  for arg in ('preset=quick', 'preset=quick,layers=3', '', 'preset=quick,ladder=8-2-1'):
    c = load_config('xtc', arg)
    quantized = [n for n in c.pipeline.split(',') if n.startswith('kd_') and n != 'kd_fp32']
    assert quantized and quantized[-1] == 'kd_1bit', arg
    for name in quantized:
      assert (c.stages[name].lr, c.stages[name].attn_loss) == (1e-3, 'kl'), (arg, name)
  assert load_config('xtc', 'preset=quick,layers=3').stages.kd_fp32.lr == 5e-4


def test_xtc_reduced_students_train_1_bit_on_augmented_data_at_the_same_step_budget():
  # Measured on STS-B 3L (docs/RESULTS.md, "Augmentation"): augmentation after the FP32 polish.
  c = load_config('xtc', 'preset=quick,layers=3')
  names = c.pipeline.split(',')
  assert names == ['finetune', 'reduce', 'kd_fp32', 'augment', 'quantize', 'kd_1bit']
  assert c.stages.kd_fp32.data == 'task' and c.stages.kd_1bit.data == 'augmented'
  plain = load_config('xtc', 'preset=quick,layers=3,augment=false')
  assert 'augment' not in plain.pipeline.split(',') and plain.stages.kd_1bit.data == 'task'
  one_bit, copies = c.stages.kd_1bit, c.stages.augment.copies
  task_passes = lambda stage, n: stage.epochs * (n + 1)
  assert task_passes(one_bit, copies) == pytest.approx(plain.stages.kd_1bit.epochs)
  warmup_passes = lambda stage, n: stage.warmup * task_passes(stage, n) if stage.warmup < 1 \
      else stage.warmup
  assert warmup_passes(one_bit, copies) == pytest.approx(warmup_passes(plain.stages.kd_1bit, 0))
  two = load_config('xtc', 'preset=quick,layers=3,copies=2').stages.kd_1bit
  assert task_passes(two, 2) == pytest.approx(plain.stages.kd_1bit.epochs)
  for arg in ('preset=quick', 'preset=smoke,layers=1'):  # full depth; smoke (tests) stays short
    assert 'augment' not in load_config('xtc', arg).pipeline.split(','), arg
  with pytest.raises(BitbertError, match="augment='maybe'; valid: auto, true, false"):
    load_config('xtc', 'layers=3,augment=maybe')
  with pytest.raises(BitbertError, match='copies=0: at least 1 augmented copy'):
    load_config('xtc', 'layers=3,copies=0')


def test_stages_on_augmented_data_evaluate_once_per_task_epoch():
  c = load_config('xtc', 'preset=quick,layers=3')
  per_epoch = lambda batch: 5749 // batch  # STS-B's training set
  eval_every = lambda name: stage_config.resolve(c, name, per_epoch)['eval_every'].value
  assert eval_every('kd_1bit') == 5749 // c.train.batch_size  # as a task-data stage
  assert eval_every('kd_fp32') == 0  # task data: every epoch, as before
  assert stage_config.resolve(c, 'kd_1bit')['eval_every'].value == 0  # data size unknown
  c.stages.kd_1bit.eval_every = 50
  assert eval_every('kd_1bit') == 50  # a given cadence wins


def test_multistage_quick_has_xtc_quicks_budget():
  quick, xtc = load_config('multistage', 'preset=quick'), load_config('xtc', 'preset=quick')
  assert quick.task.max_train_examples == xtc.task.max_train_examples == -1
  kd = ['fp32_stage1', 'fp32_stage2', 'ternary_stage1', 'ternary_stage2', 'binary_stage1',
        'binary_stage2']
  assert sum(quick.stages[n].epochs for n in kd) == xtc.stages.kd_1bit.epochs
  batch = lambda n: stage_config.resolve(quick, n)['batch_size'].value
  assert all(batch(n) == xtc.train.batch_size for n in kd)  # as the stage resolves it
  assert batch('general_kd') < xtc.train.batch_size  # a short general KD
  qlr = quick.stages.ternary_stage1.lr
  assert all(load_config('multistage', p).stages[n].lr == qlr
             for p in ('preset=quick', 'preset=paper') for n in kd[2:])
  # quick's one FP32 epoch each needs the quantized lr (3-layer STS-B: 24.7 -> 82.5); paper's 20
  # epochs keep TinyBERT's lower ones.
  assert quick.stages.fp32_stage1.lr == quick.stages.fp32_stage2.lr == qlr
  paper = load_config('multistage', 'preset=paper')
  assert max(paper.stages.fp32_stage1.lr, paper.stages.fp32_stage2.lr) < qlr
