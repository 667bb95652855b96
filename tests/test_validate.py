"""Config checks: each stage's kind checks its own section (defaults filled in), bad values are
refused naming the field, and the loaded models' fit is followed stage by stage."""
import dataclasses

import ml_collections
import pytest

from bitbert_jax import config_lib, validate
from bitbert_jax.distill import stage_config
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig
from helpers import ROOT, load_config  # pylint: disable=g-bad-import-order

BASE = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32)


def xtc(arg='preset=smoke'):
  c = load_config('xtc', arg)
  c.task.glue_dir = ROOT  # the checks look for the folder, never read it
  return c


def multistage(arg='preset=smoke'):
  c = load_config('multistage', arg)
  c.task.glue_dir = ROOT
  return c


def test_each_stage_kind_checks_its_own_section(monkeypatch):
  seen = []
  for kind, spec in stage_config.KINDS.items():
    monkeypatch.setitem(stage_config.KINDS, kind, dataclasses.replace(
        spec, check=lambda config, name, before, dp: seen.append((name, before, dp))))
  c = xtc('preset=smoke,ladder=2-1')
  validate.validate_config(c, 1)
  assert [n for n, _, _ in seen] == c.pipeline.split(',')
  assert seen[-1] == ('kd_1bit', ['finetune', 'reduce_layers', 'quantize', 'task_kd',
                                  'quantize'], 1)  # the kinds before it, the data-parallel size


CASES = [  # (config, field path, bad value, the message)
    (xtc, 'stages.kd_1bit.losses', 'stage3', r"config.stages.kd_1bit.losses='stage3': valid: "
     'stage1, stage2, all'),
    (xtc, 'stages.kd_1bit.temperature', 0.0, r'config.stages.kd_1bit.temperature=0.0: need a '
     r'number > 0'),
    (xtc, 'stages.kd_1bit.attn_weight', -1.0, r'config.stages.kd_1bit.attn_weight=-1.0'),
    (xtc, 'stages.kd_1bit.attn_loss', 'l1', r"config.stages.kd_1bit.attn_loss='l1': valid: mse, "
     'kl'),
    (xtc, 'stages.kd_1bit.layers', [2, 1], r'config.stages.kd_1bit.layers=\[2, 1\]: layers must '
     'be strictly increasing'),
    (xtc, 'stages.kd_1bit.warmin', 1.5, r'config.stages.kd_1bit.warmin=1.5: need a fraction'),
    (xtc, 'stages.kd_1bit.keep_best', 1, r'config.stages.kd_1bit.keep_best=1: need True or False'),
    (xtc, 'stages.kd_1bit.max_steps', 2.5, r'config.stages.kd_1bit.max_steps=2.5: need an '
     'integer'),
    (xtc, 'stages.finetune.batch_size', 0, r'config.stages.finetune.batch_size=0: need an '
     'integer >= 1'),
    (xtc, 'stages.finetune.data', 'mine', r"config.stages.finetune.data='mine': valid: task, "
     'augmented'),
    (xtc, 'stages.reduce.num_layers', -1, r'config.stages.reduce.num_layers=-1: need an integer'),
    (xtc, 'stages.quantize.bits', '1-1-9', r"config.stages.quantize.bits='1-1-9'"),
    (multistage, 'stages.init_student.init', 'copy', r"config.stages.init_student.init='copy': "
     'valid: random, pretrained'),
    (multistage, 'stages.init_student.hidden_size', -8, r'config.stages.init_student.hidden_size'),
    (multistage, 'stages.init_student.width', 1.5, r'config.stages.init_student.width=1.5: need '
     r'a fraction in \(0, 1\]'),
    (multistage, 'stages.init_student.heads', -1, r'config.stages.init_student.heads=-1'),
    (multistage, 'stages.init_student.importance', 'random', r"config.stages.init_student."
     r"importance='random': valid: magnitude, taylor"),
    (multistage, 'stages.general_kd.steps_per_epoch', 0, r'config.stages.general_kd.'
     'steps_per_epoch=0: need an integer >= 1'),
    (multistage, 'stages.general_kd.wrap_corpus', 'yes', r'config.stages.general_kd.wrap_corpus'),
    (lambda: multistage('preset=smoke,augment=true'), 'stages.augment.probability', 1.5,
     r'config.stages.augment.probability=1.5: need a number in \[0, 1\]'),
    (lambda: multistage('preset=smoke,augment=true'), 'stages.augment.copies', -1,
     r'config.stages.augment.copies=-1'),
]


@pytest.mark.parametrize('make,path,value,needle', CASES, ids=[c[1] for c in CASES])
def test_bad_section_value_is_named(make, path, value, needle):
  c = make()
  validate.validate_config(c, 1)  # good as built
  *parents, leaf = path.split('.')
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(BitbertError, match=needle):
    validate.validate_config(c, 1)


def test_a_section_given_only_its_kind_takes_the_kinds_defaults():
  c = xtc()
  c.stages.kd_1bit = ml_collections.ConfigDict(dict(kind='task_kd'), type_safe=False)
  validate.validate_config(c, 1)
  full = stage_config.section(c.stages.kd_1bit)
  built = config_lib.stage('task_kd')
  assert full.to_dict() == built.to_dict()
  assert (full.losses, full.temperature, full.attn_loss) == ('all', 1.0, 'mse')


def test_inherited_fields_resolve_to_the_stage_else_the_run_naming_the_field():
  c = xtc()
  c.stages.kd_1bit.lr = None
  c.optim.lr = 2e-5
  v = stage_config.resolve(c, 'kd_1bit')
  assert (v['lr'].value, v['lr'].field) == (2e-5, 'config.optim.lr')
  assert (v['warmin'].value, v['warmin'].field) == (0.0, 'config.quant.warmin')
  c.stages.kd_1bit.lr = 3e-4
  assert stage_config.resolve(c, 'kd_1bit')['lr'] == stage_config.Value(
      3e-4, 'config.stages.kd_1bit.lr')
  assert set(stage_config.INHERITED) <= set(stage_config.resolve(c, 'kd_1bit'))
  c.optim.lr = None  # a run-wide value that a stage inherits is checked under its own name
  c.stages.finetune.lr = None
  with pytest.raises(BitbertError, match=r'config.optim.lr=None: need a number > 0'):
    validate.validate_config(c, 1)


def test_batch_must_divide_the_data_parallel_size():
  c = xtc()
  c.stages.kd_1bit.batch_size = 6
  with pytest.raises(BitbertError, match=r'config.stages.kd_1bit.batch_size=6 is not divisible '
                     r'by the data-parallel mesh size 4'):
    stage_config.KINDS['task_kd'].check(c, 'kd_1bit', ['finetune'], 4)


def test_training_kinds_are_the_ones_that_train():
  assert stage_config.TRAINING_KINDS == tuple(k for k, v in stage_config.KINDS.items()
                                              if v.trains)
  c = xtc()
  for name in c.pipeline.split(','):
    has_epochs = 'epochs' in c.stages[name]
    assert has_epochs == (c.stages[name].kind in stage_config.TRAINING_KINDS), name


def _models(pretrained=BASE, teacher=None):
  teacher = teacher or BASE.replace(num_labels=2)
  return stage_config.Models(pretrained, teacher, 'config.teacher', student=pretrained)


def _fit(kind, models, **fields):
  s = stage_config.section(config_lib.stage(kind, **fields))
  return stage_config.KINDS[kind].fit(s, 'config.stages.x', models)


def test_init_student_fit_follows_the_stages_own_student():
  m = _fit('init_student', _models())
  assert m.student.num_hidden_layers == 2 and m.student_layers is None  # half of 4
  built = stage_config.student_config(stage_config.section(config_lib.stage('init_student')),
                                      'config.stages.x', BASE)
  assert built.num_hidden_layers == m.student.num_hidden_layers  # one rule for both
  m = _fit('init_student', _models(), init='pretrained', num_layers=2)
  assert m.student_layers == [1, 3]  # the XTC default for 4 -> 2
  with pytest.raises(BitbertError, match=r'config.stages.x.hidden_size=30: not a multiple of '
                     r"the teacher's 4 attention heads"):
    _fit('init_student', _models(), hidden_size=30)


def test_init_student_fit_narrows_to_its_width():
  m = _fit('init_student', _models(), init='pretrained', width=0.5)
  assert (m.student.num_attention_heads, m.student.head_dim, m.student.intermediate_size,
          m.student.hidden_size) == (2, 8, 32, 32)
  _fit('task_kd', m)  # 2 student heads learn from 2 of the teacher's 4
  m = _fit('init_student', _models(), width=0.5)  # random: width x 4 x hidden_size neurons
  assert (m.student.num_attention_heads, m.student.intermediate_size) == (2, 64)
  m = _fit('init_student', _models(), init='pretrained', heads=1, intermediate_size=16)
  assert (m.student.num_attention_heads, m.student.intermediate_size) == (1, 16)
  with pytest.raises(BitbertError, match=r'config.stages.x.importance=taylor: the teacher \(32 '
                     r'wide, 2 heads\) and the copied student \(32 wide, 4 heads\) do not compare'):
    _fit('init_student', _models(teacher=BASE.replace(num_labels=2, num_attention_heads=2,
                                                      attention_head_size=8)),
         init='pretrained', width=0.5, importance='taylor')
  with pytest.raises(BitbertError, match=r"config.stages.x.heads=5: more attention heads than "
                     r"the teacher's 4; valid: 1..4"):
    _fit('init_student', _models(), heads=5)
  with pytest.raises(BitbertError, match=r'config.stages.x.intermediate_size=65: init=pretrained '
                     r"copies config.pretrained's layers, so the student keeps at most its 64"):
    _fit('init_student', _models(), init='pretrained', intermediate_size=65)
  with pytest.raises(BitbertError, match=r'the student has 4 attention heads but its teacher '
                     r'config.teacher has 2'):
    _fit('task_kd', _fit('init_student', _models(teacher=BASE.replace(
        num_labels=2, num_attention_heads=2, attention_head_size=8)), init='pretrained'))


def test_reduce_layers_fit_names_the_teacher():
  m = _fit('reduce_layers', _models(), num_layers=3)
  assert m.student.num_hidden_layers == 3 and m.student_layers == [0, 1, 2]
  with pytest.raises(BitbertError, match=r'config.stages.x.layers=\[4\]: layers \[4\] out of '
                     r'range for the teacher \(config.teacher, 4 layers\)'):
    _fit('reduce_layers', _models(), layers=[4])


def test_distillation_fits_its_student_to_its_teacher():
  reduced = _fit('reduce_layers', _models(), layers=[1, 3])
  _fit('task_kd', reduced)  # the copied layers map the student onto its teacher
  with pytest.raises(BitbertError, match=r'config.stages.x.layers=\[0, 1, 2\]: 3 layers for a '
                     r'student of 2'):
    _fit('task_kd', reduced, layers=[0, 1, 2])
  three = _fit('init_student', _models(), num_layers=3)
  with pytest.raises(BitbertError, match=r'a 3-layer student cannot map uniformly onto its '
                     r'4-layer teacher config.pretrained'):
    _fit('general_kd', three)
  with pytest.raises(BitbertError, match='config.stages.x: no student to distil into'):
    _fit('task_kd', _models(pretrained=None))
