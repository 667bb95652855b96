"""Every stage kind as a train-state transform, run with a stub trainer: what it returns, what it
asks the trainer for, and what it hands on in its record; the context is never written."""
import dataclasses

import datasets
import jax
import ml_collections
import numpy as np
import pytest

from bitbert_jax import config_lib, train
from bitbert_jax.data import get_task, load_tokenizer
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.distill import stage_config, stages
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertConfig, init_params
from bitbert_jax.pipeline import TaskData
from bitbert_jax.train_state import new_state
from helpers import tiny_split  # pylint: disable=g-bad-import-order

PRETRAINED = BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
TEXTS = ['The committee praised the careful report.', 'Markets rallied strongly today.',
         'A brown dog chased the quick cat.', 'Rain fell over the quiet harbour.']
DEV = {'validation': {'accuracy': 0.75}, 'score': 0.75}


class StubTrainer:
  """Stands in for train.train: records each call and moves every parameter by +1."""

  def __init__(self):
    self.calls = []

  def __call__(self, state, **kw):
    self.calls.append(kw)
    return state.replace(params=jax.tree.map(lambda x: x + 1, state.params)), DEV


@pytest.fixture(scope='module')
def shared(minilm, tmp_path_factory):
  tok = load_tokenizer(minilm)
  task = get_task('mrpc')
  raw = datasets.Dataset.from_dict({'sentence1': TEXTS, 'sentence2': TEXTS[::-1],
                                    'label': [1, 0, 1, 0]})
  # Token ids below the tiny vocabulary for the model; the texts for augmentation.
  data = TaskData(tok, tiny_split(len(TEXTS)), {'validation': tiny_split(len(TEXTS), seed=1)},
                  raw_train=raw)
  glove = tmp_path_factory.mktemp('glove') / 'glove.txt'
  glove.write_text('praised 1 0\nlauded 0.9 0.1\nmarkets 0 1\nstocks 0.1 0.9\n')
  pretrained = objective_lib.Teacher(PRETRAINED, init_params(PRETRAINED, rng=jax.random.PRNGKey(1)))
  head = PRETRAINED.replace(num_labels=2, label_names=('not_equivalent', 'equivalent'))
  teacher = objective_lib.Teacher(head, init_params(head, rng=jax.random.PRNGKey(2)))
  return dict(task=task, data=data, glove=str(glove), pretrained=pretrained, teacher=teacher,
              minilm=minilm)


def context(shared, tmp_path, kind, **fields):
  """(ctx, trainer) for one stage `s` of `kind` with `fields`, in a run config of its own."""
  c = config_lib.base_config({})
  c.stages.s = config_lib.stage(kind, **fields)
  c.pipeline = 's'
  trainer = StubTrainer()
  section = ml_collections.FrozenConfigDict(stage_config.section(c.stages.s))
  ctx = stages.StageContext(
      config=ml_collections.FrozenConfigDict(c), mesh=None, writer=None, train=trainer, name='s',
      stage=section, workdir=str(tmp_path / 's'), task=shared['task'], data=shared['data'],
      teacher=shared['teacher'], pretrained=shared['pretrained'], tokenizer_dir=shared['minilm'],
      corpus=lambda *a: iter(()))
  return ctx, trainer


def run(kind, state, ctx):
  """What the runner does: the state the kind starts from, then the stage."""
  stage = stages.STAGES[kind]
  return stage.run(stage.start(state, ctx), ctx)


def test_every_kind_has_a_run_side_and_a_config_side():
  assert set(stages.STAGES) == set(stage_config.KINDS) == set(KIND_TESTS)
  assert stage_config.TRAINING_KINDS == ('finetune', 'general_kd', 'task_kd')


def test_context_is_read_only(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'task_kd')
  with pytest.raises(dataclasses.FrozenInstanceError):
    ctx.student_layers = (1,)
  with pytest.raises(AttributeError):
    ctx.stage.keep_best = False
  with pytest.raises(AttributeError):
    ctx.config.stages.s.lr = 1.0


def test_finetune_makes_the_teacher_from_the_pretrained_state(shared, tmp_path):
  ctx, trainer = context(shared, tmp_path, 'finetune', epochs=2.0)
  state, record = run('finetune', None, ctx)
  (call,) = trainer.calls
  assert call['objective'].losses == ('label',) and call['teacher'] is None
  assert call['settings'].epochs == 2.0 and call['settings'].lr == 5e-5  # config.optim.lr
  assert state.model_config.num_labels == 2  # a head for the task
  want = np.asarray(shared['pretrained'].params['encoder']['layer_0']['output']['kernel']) + 1
  np.testing.assert_array_equal(state.params['encoder']['layer_0']['output']['kernel'], want)
  assert record.dev == DEV
  np.testing.assert_array_equal(record.teacher.params['encoder']['layer_0']['output']['kernel'],
                                want)
  from bitbert_jax import hf  # pylint: disable=g-import-not-at-top
  cfg, params = hf.load_hf_checkpoint(str(tmp_path / 's' / 'hf'))
  assert cfg.num_labels == 2
  np.testing.assert_allclose(params['encoder']['layer_0']['output']['kernel'], want)


def test_finetune_is_skipped_when_a_teacher_is_given(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'finetune')
  assert stages.STAGES['finetune'].skip(ctx) is None
  c = ml_collections.ConfigDict(ctx.config.as_configdict())
  c.teacher = 'some/dir'
  given = dataclasses.replace(ctx, config=ml_collections.FrozenConfigDict(c))
  assert stages.STAGES['finetune'].skip(given) == 'config.teacher is set'


def _marked(config):
  """A state of `config` whose every parameter is its layer's index (or -1 outside layers)."""
  params = init_params(config, rng=jax.random.PRNGKey(3))
  marked = {k: jax.tree.map(lambda x: np.full_like(x, -1.0), v) for k, v in params.items()}
  marked['encoder'] = {name: jax.tree.map(lambda x, i=int(name.split('_')[1]): np.full_like(x, i),
                                          layer)
                       for name, layer in params['encoder'].items()}
  return new_state(config, marked)


def test_init_student_random_is_half_as_deep_and_headless(shared, tmp_path):
  ctx, trainer = context(shared, tmp_path, 'init_student')
  ctx = dataclasses.replace(ctx, mesh=_mesh())
  state, record = run('init_student', None, ctx)
  assert state.model_config.num_hidden_layers == 1 and state.model_config.num_labels == 0
  assert record.student_layers is None and not trainer.calls


def test_init_student_pretrained_copies_the_state_it_receives(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'init_student', init='pretrained')
  state, record = stages.init_student(_marked(PRETRAINED), ctx)
  assert record.student_layers == (1,)  # 2 -> 1 layers: the XTC default keeps the last
  kernel = state.params['encoder']['layer_0']['attention']['query']['kernel']
  assert np.all(np.asarray(kernel) == 1)  # layer 1 of the given state, not of ctx.pretrained
  assert state.model_config.num_labels == 0 and 'classifier' not in state.params


def test_init_student_narrows_a_copy_to_its_most_important_heads_and_neurons(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'init_student', init='pretrained', width=0.5)
  source = init_params(PRETRAINED, rng=jax.random.PRNGKey(3))
  source['encoder']['layer_1']['attention']['output']['kernel'] *= np.repeat([1.0, 9.0], 4)[:, None]
  state, record = stages.init_student(new_state(PRETRAINED, source), ctx)
  cfg = state.model_config
  assert (cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == (1, 4, 8)
  assert record.student_layers == (1,) and record.student_heads == ((1,),)  # the larger head
  np.testing.assert_array_equal(state.params['encoder']['layer_0']['attention']['query']['kernel'],
                                source['encoder']['layer_1']['attention']['query']['kernel'][:, 4:])
  # Random: a narrow student whose head h learns from the teacher's head h.
  ctx, _ = context(shared, tmp_path, 'init_student', width=0.5)
  state, record = run('init_student', None, dataclasses.replace(ctx, mesh=_mesh()))
  assert state.model_config.num_attention_heads == 1 and record.student_heads == ((0,),)
  assert state.model_config.intermediate_size == 16  # 0.5 x 4 x hidden_size 8


def test_init_student_taylor_keeps_the_heads_the_distillation_loss_needs_most(shared, tmp_path):
  """importance=taylor: the head whose mask moves the Stage-I loss against the teacher most."""
  ctx, _ = context(shared, tmp_path, 'init_student', init='pretrained', width=0.5,
                   importance='taylor', importance_batches=2)
  source = init_params(PRETRAINED, rng=jax.random.PRNGKey(3))
  silent = jax.tree.map(np.array, source)  # head 1 of layer 1 (the copied one) reads nothing
  silent['encoder']['layer_1']['attention']['output']['kernel'][4:] = 0
  _, record = stages.init_student(new_state(PRETRAINED, silent), ctx)
  assert record.student_heads == ((0,),)
  silent = jax.tree.map(np.array, source)
  silent['encoder']['layer_1']['attention']['output']['kernel'][:4] = 0
  state, record = stages.init_student(new_state(PRETRAINED, silent), ctx)
  assert record.student_heads == ((1,),) and state.model_config.num_attention_heads == 1
  with pytest.raises(BitbertError, match='importance=taylor measures the Stage-I loss against '
                                         'the fine-tuned teacher'):
    stages.init_student(new_state(PRETRAINED, source), dataclasses.replace(ctx, teacher=None))


def test_kd_compares_each_narrow_head_with_the_teacher_head_it_was_kept_from(shared, tmp_path,
                                                                             caplog):
  narrow = shared['teacher'].config.replace(num_hidden_layers=1, num_attention_heads=1,
                                            attention_head_size=4)
  student = new_state(narrow, init_params(narrow))
  for kind in ('task_kd', 'general_kd'):
    ctx, trainer = context(shared, tmp_path, kind, steps_per_epoch=1, batch_size=2)
    with pytest.raises(BitbertError, match='no record of which teacher heads it was kept from'):
      run(kind, student, ctx)
    with caplog.at_level('INFO'):
      run(kind, student, dataclasses.replace(ctx, student_heads=((1,),)))
    assert trainer.calls[-1]['objective'].head_map == ((1,),)
    assert 'attention loss: each of the 1 student heads against one teacher head, as ' \
           'init_student recorded them (per layer: [[1]])' in caplog.text
  ctx, trainer = context(shared, tmp_path, 'task_kd', losses='stage2')  # no attention loss
  run('task_kd', student, ctx)
  assert trainer.calls[-1]['objective'].head_map is None


def test_reduce_layers_copies_the_teachers_layers_and_head(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'reduce_layers', layers=[0])
  teacher = _marked(shared['teacher'].config)
  state, record = stages.reduce_layers(teacher, ctx)
  assert record.student_layers == (0,)
  assert np.all(np.asarray(state.params['encoder']['layer_0']['output']['kernel']) == 0)
  assert state.model_config.num_labels == 2 and 'classifier' in state.params
  # Run as the runner runs it, it starts from ctx.teacher: the XTC default of full depth.
  ctx, _ = context(shared, tmp_path, 'reduce_layers')
  state, record = run('reduce_layers', None, ctx)
  assert record.student_layers == (0, 1) and state.model_config.num_hidden_layers == 2


def test_general_kd_distils_from_the_pretrained_model_over_the_corpus(shared, tmp_path):
  ctx, trainer = context(shared, tmp_path, 'general_kd', steps_per_epoch=7, batch_size=4)
  student = new_state(PRETRAINED.replace(num_hidden_layers=1),
                      init_params(PRETRAINED.replace(num_hidden_layers=1)))
  state, record = run('general_kd', student, ctx)
  (call,) = trainer.calls
  assert call['teacher'] is shared['pretrained']
  assert call['objective'].losses == ('attn', 'hidden')
  assert call['batches'].steps_per_epoch() == 7 and call['settings'].batch_size == 4
  assert state.aux_params == {} and record.dev == DEV


def _student(shared):
  return new_state(shared['teacher'].config.replace(num_hidden_layers=1),
                   init_params(shared['teacher'].config.replace(num_hidden_layers=1)))


def test_task_kd_follows_the_student_layers_in_its_context(shared, tmp_path):
  ctx, trainer = context(shared, tmp_path, 'task_kd', losses='stage1', attn_loss='kl')
  ctx = dataclasses.replace(ctx, student_layers=(1,))
  state, record = run('task_kd', _student(shared), ctx)
  (call,) = trainer.calls
  objective = call['objective']
  assert objective.losses == ('attn', 'hidden') and objective.attn_loss == 'kl'
  assert objective.layer_map.attention == (1,)  # the copied teacher layer
  assert call['teacher'] is shared['teacher']
  assert call['settings'].keep_best is False  # stage1: intermediate losses, no best-on-dev
  assert len(call['batches'].encoded) == len(TEXTS)
  assert record.dev == DEV and state.aux_params == {}
  assert record.student_layers is None  # not its to change


def test_task_kd_on_augmented_data_reads_the_context(shared, tmp_path):
  ctx, trainer = context(shared, tmp_path, 'task_kd', data='augmented', batch_size=2)
  with pytest.raises(BitbertError, match='no augment stage ran before'):
    run('task_kd', _student(shared), ctx)
  more = shared['data'].train
  run('task_kd', _student(shared), dataclasses.replace(ctx, augmented=more))
  assert trainer.calls[-1]['batches'].encoded is more
  settings = trainer.calls[-1]['settings']
  assert settings.keep_best is True
  assert settings.eval_every == len(TEXTS) // 2  # once per pass over the task data


def test_task_kd_needs_a_teacher(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'task_kd')
  with pytest.raises(BitbertError, match="stage 's' needs a fine-tuned teacher"):
    run('task_kd', _student(shared), dataclasses.replace(ctx, teacher=None))


def test_quantize_switches_the_policy_and_keeps_the_weights(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'quantize', bits='2-2-8')
  before = _student(shared)
  state, record = run('quantize', before, ctx)
  assert state.policy.name == '2-2-8' and record == stages.StageRecord()
  np.testing.assert_array_equal(state.params['encoder']['layer_0']['output']['kernel'],
                                before.params['encoder']['layer_0']['output']['kernel'])


def test_split_turns_ternary_into_binary(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'quantize', bits='2-2-8')
  ternary, _ = run('quantize', _student(shared), ctx)
  ctx, _ = context(shared, tmp_path, 'split')
  state, _ = run('split', ternary, ctx)
  assert state.policy.split and state.policy.name == '1-1-8'
  assert state.params['encoder']['layer_0']['output']['kernel'].shape[0] == 2  # two planes


def test_augment_returns_the_data_and_passes_the_state_through(shared, tmp_path):
  ctx, trainer = context(shared, tmp_path, 'augment', copies=2, glove=shared['glove'])
  before = _student(shared)
  state, record = run('augment', before, ctx)
  assert state is before and not trainer.calls
  assert len(record.augmented) == len(TEXTS) * 3
  assert stages.fold(ctx, record).augmented is record.augmented


def test_fold_hands_on_the_record_and_keeps_the_rest(shared, tmp_path):
  ctx, _ = context(shared, tmp_path, 'task_kd')
  ctx = dataclasses.replace(ctx, student_layers=(0,))
  same = stages.fold(ctx, stages.StageRecord(dev=DEV))
  assert same == ctx  # dev is reported, not handed on
  teacher = objective_lib.Teacher(PRETRAINED, {})
  new = stages.fold(ctx, stages.StageRecord(student_layers=(1,), teacher=teacher))
  assert new.student_layers == (1,) and new.teacher is teacher
  assert new.pretrained is ctx.pretrained and ctx.student_layers == (0,)


def _mesh():
  from bitbert_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})


KIND_TESTS = {
    'finetune': test_finetune_makes_the_teacher_from_the_pretrained_state,
    'init_student': test_init_student_pretrained_copies_the_state_it_receives,
    'reduce_layers': test_reduce_layers_copies_the_teachers_layers_and_head,
    'general_kd': test_general_kd_distils_from_the_pretrained_model_over_the_corpus,
    'task_kd': test_task_kd_follows_the_student_layers_in_its_context,
    'quantize': test_quantize_switches_the_policy_and_keeps_the_weights,
    'split': test_split_turns_ternary_into_binary,
    'augment': test_augment_returns_the_data_and_passes_the_state_through,
}
