"""End to end through the CLI's own `run`: the XTC pipeline on a tiny teacher and real MRPC."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from bitbert_jax import config_lib, pipeline, train, validate
from bitbert_jax.data import get_task
from bitbert_jax.errors import BitbertError
from bitbert_jax.main import run
from bitbert_jax.quant import policy_from_name
from helpers import ROOT, assert_dev_metrics_are_the_packed_models, load_config


@pytest.fixture(scope='module')
def xtc_run(tmp_path_factory, tiny_pretrained, glue):
  config = load_config('xtc', f'preset=smoke,pretrained={tiny_pretrained},layers=1')
  config.task.glue_dir = glue
  workdir = str(tmp_path_factory.mktemp('xtc'))
  return config, workdir, run(config, workdir)


def test_xtc_writes_results_for_every_stage(xtc_run):
  _, workdir, results = xtc_run
  assert list(results['stages']) == ['finetune', 'reduce', 'quantize', 'kd_1bit']
  assert results['stages']['kd_1bit']['policy'] == '1-1-8'
  dev = results['final']['dev']['validation']
  assert {'accuracy', 'f1'} <= set(dev)
  assert results['final']['model_config']['num_hidden_layers'] == 1
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['task'] == 'mrpc'
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert {r['stage'] for r in rows} >= {'finetune', 'kd_1bit'}
  kd = [r for r in rows if r['stage'] == 'kd_1bit' and 'loss' in r]
  assert all(k in kd[0] for k in ('pred', 'attn', 'hidden', 'grad_norm', 'lr'))
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_final_dev_metrics_are_the_packed_models(xtc_run, tmp_path):
  config, workdir, results = xtc_run
  assert_dev_metrics_are_the_packed_models(
      workdir, results, get_task('mrpc'), os.path.join(config.task.glue_dir, 'MRPC', 'dev.tsv'),
      ['#1 String', '#2 String'], 'Quality', str(tmp_path))


def test_the_runs_tokenizer_is_saved_and_exported(xtc_run, tiny_pretrained):
  _, workdir, _ = xtc_run
  saved = os.path.join(workdir, 'tokenizer', 'vocab.txt')
  with open(saved, 'rb') as f, open(os.path.join(tiny_pretrained, 'vocab.txt'), 'rb') as g:
    assert f.read() == g.read()
  with open(saved, 'rb') as f, open(os.path.join(workdir, 'packed', 'vocab.txt'), 'rb') as g:
    assert f.read() == g.read()


def test_teacher_is_exported_for_transformers(xtc_run):
  """transformers' own PyTorch BERT reads the fine-tuned teacher and computes its logits."""
  torch = pytest.importorskip('torch')
  import transformers  # pylint: disable=g-import-not-at-top
  _, workdir, _ = xtc_run
  out = os.path.join(workdir, 'stages', '00_finetune', 'hf')
  model, info = transformers.BertForSequenceClassification.from_pretrained(
      out, attn_implementation='eager', output_loading_info=True)
  assert not any(info.values()), info  # every weight read, none missing, none left over
  assert [model.config.id2label[i] for i in range(2)] == ['not_equivalent', 'equivalent']
  tok = transformers.AutoTokenizer.from_pretrained(out)
  batch = tok(['The cat sleeps on the mat.', 'Stocks fell sharply today.'],
              ['A cat is sleeping.', 'The market rose.'], padding=True, return_tensors='np')
  with torch.no_grad():
    theirs = model.eval()(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
  state, _ = pipeline.load_stage_output(os.path.join(workdir, 'stages', '00_finetune'))
  ours = state.model.apply(
      {'params': state.params}, batch['input_ids'], batch['attention_mask'],
      batch['token_type_ids']).logits
  np.testing.assert_allclose(theirs, np.asarray(ours), rtol=0, atol=1e-4)
  assert not np.allclose(theirs[0], theirs[1])  # the two inputs give two answers


def test_student_is_reduced_teacher_then_quantized(xtc_run):
  _, workdir, _ = xtc_run
  teacher, _ = pipeline.load_stage_output(os.path.join(workdir, 'stages', '00_finetune'))
  reduced, info = pipeline.load_stage_output(os.path.join(workdir, 'stages', '01_reduce'))
  assert info['student_layers'] == [1]
  np.testing.assert_array_equal(reduced.params['encoder']['layer_0']['output']['kernel'],
                                teacher.params['encoder']['layer_1']['output']['kernel'])
  final, _ = pipeline.load_stage_output(os.path.join(workdir, 'stages', '03_kd_1bit'))
  assert final.policy.name == '1-1-8'
  assert not np.array_equal(final.params['encoder']['layer_0']['output']['kernel'],
                            reduced.params['encoder']['layer_0']['output']['kernel'])


def test_rerun_skips_completed_stages(xtc_run, monkeypatch):
  config, workdir, first = xtc_run
  called = []
  monkeypatch.setattr('bitbert_jax.train.train', lambda *a, **k: called.append(1))
  again = run(config, workdir)
  assert not called
  assert again['final']['dev'] == first['final']['dev']


def test_unknown_stage_and_kind_are_refused():
  c = load_config('xtc', 'preset=smoke')
  c.pipeline = 'finetune,nosuch'
  with pytest.raises(BitbertError, match="'nosuch'.*defined: finetune"):
    validate.stage_names(c)
  c = load_config('xtc', 'preset=smoke')
  c.stages.reduce.kind = 'shrink'
  with pytest.raises(BitbertError, match="kind='shrink'.*valid: finetune"):
    validate.stage_names(c)


@pytest.mark.parametrize('arg,needle', [('preset=fast', 'valid: smoke, quick, paper'),
                                        ('nosuch=1', 'key=value with key in'),
                                        ('task', 'key=value')])
def test_config_arguments_are_checked(arg, needle):
  with pytest.raises(BitbertError, match=needle):
    load_config('xtc', arg)


@pytest.mark.parametrize('value,groups', [('row', 'row'), ('64', 64), ('1', 1)])
def test_weight_groups_override_reaches_the_policy(value, groups):
  """The documented values of config.quant.weight_groups parse from the real command line."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['main', f'--config={os.path.join(ROOT, "configs", "xtc.py")}:preset=smoke',
          f'--config.quant.weight_groups={value}']
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, sys_argv=argv)
  fv(argv)
  q = fv.config.quant
  policy = policy_from_name(fv.config.stages.quantize.bits, weight_groups=q.weight_groups)
  assert policy.weight_quant('encoder/layer_0/attention/query/kernel').num_groups == groups


def test_every_config_builds_and_names_known_stages():
  for name in ('finetune', 'xtc', 'multistage'):
    for preset in config_lib.PRESETS:
      c = load_config(name, f'preset={preset}')
      assert validate.stage_names(c)


def test_init_student_pretrained_copies_layers(tmp_path, tiny_pretrained, glue):
  config = load_config('multistage', f'preset=smoke,pretrained={tiny_pretrained},init=pretrained')
  config.task.glue_dir = glue
  config.pipeline = 'init_student'
  results = run(config, str(tmp_path))
  assert results['stages']['init_student']['kind'] == 'init_student'
  student, info = pipeline.load_stage_output(str(tmp_path / 'stages' / '00_init_student'))
  assert info['student_layers'] == [1]  # 2 -> 1 layers: the XTC default keeps the last
  from bitbert_jax import hf  # pylint: disable=g-import-not-at-top
  _, source = hf.load_hf_checkpoint(tiny_pretrained, num_labels=0)
  assert student.model_config.num_hidden_layers == 1
  assert student.model_config.num_labels == 0 and 'classifier' not in student.params
  for got, want in ((student.params['encoder']['layer_0'], source['encoder']['layer_1']),
                    (student.params['embeddings'], source['embeddings'])):
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_multistage_random_init_trains_through_general_kd(tmp_path, tiny_pretrained, glue):
  """init=random changes only the student's start (the stages after general KD are the
  pretrained run's, tested above)."""
  config = load_config('multistage', f'preset=smoke,pretrained={tiny_pretrained},init=random')
  config.task.glue_dir = glue
  config.pipeline = 'init_student,general_kd'
  results = run(config, str(tmp_path))
  assert list(results['stages']) == config.pipeline.split(',')
  student, info = pipeline.load_stage_output(str(tmp_path / 'stages' / '00_init_student'))
  assert info['student_layers'] is None  # nothing copied from the pre-trained model
  from bitbert_jax import hf  # pylint: disable=g-import-not-at-top
  _, source = hf.load_hf_checkpoint(tiny_pretrained, num_labels=0)
  start = student.params['encoder']['layer_0']['attention']['query']['kernel']
  assert not np.allclose(start, source['encoder']['layer_1']['attention']['query']['kernel'])
  general, _ = pipeline.load_stage_output(str(tmp_path / 'stages' / '01_general_kd'))
  assert general.model_config.num_hidden_layers == 1
  moved = general.params['encoder']['layer_0']['attention']['query']['kernel']
  assert np.abs(np.asarray(moved) - np.asarray(start)).max() > 0  # general KD trained it


def test_multistage_runs_the_whole_left_pipeline(tmp_path, tiny_pretrained, glue):
  config = load_config('multistage', f'preset=smoke,pretrained={tiny_pretrained},init=pretrained')
  config.task.glue_dir = glue
  config.export.packed = False
  results = run(config, str(tmp_path))
  policies = {n: r['policy'] for n, r in results['stages'].items()}
  assert list(policies) == config.pipeline.split(',')
  assert policies['fp32_stage2'] == '32-32-32'
  assert policies['ternary_stage2'] == '2-2-8' and policies['binary_stage2'] == '1-1-8'
  assert results['data'] == glue
  stages = sorted(os.listdir(tmp_path / 'stages'))
  general, _ = pipeline.load_stage_output(str(tmp_path / 'stages' / stages[2]))
  assert general.model_config.num_hidden_layers == 1  # half the 2-layer teacher
  final, _ = pipeline.load_stage_output(str(tmp_path / 'stages' / stages[-1]))
  assert final.policy.split and final.policy.name == '1-1-8'
  kernel = final.params['encoder']['layer_0']['attention']['query']['kernel']
  assert kernel.shape == (2, 32, 32)  # two binary planes per split weight
  assert 'hidden_proj' not in final.params


def test_multistage_half_width_packs_a_split_student_of_narrow_matrices(
    tmp_path, tiny_pretrained, glue, monkeypatch, caplog):
  """width=0.5, with a stub trainer: the student keeps 2 of the 4 heads and 32 of the 64 FFN
  neurons, hidden kept; every stage with an attention loss gets the head map, the split student
  packs narrow matrices (two planes) and its word embeddings, 1-bit in the ternary stage, as one
  plane, and a resumed run reads the head map back from stage.json."""
  calls = []

  def stub(state, **kw):
    calls.append((kw['name'], kw['objective']))
    return state.replace(params=jax.tree.map(lambda x: x + 1, state.params)), None

  monkeypatch.setattr(train, 'train', stub)
  config = load_config('multistage', f'preset=smoke,pretrained={tiny_pretrained},init=pretrained,'
                       'width=0.5')
  config.task.glue_dir = glue
  with caplog.at_level('INFO', logger='bitbert_jax'):
    results = run(config, str(tmp_path))
  final = results['final']['model_config']
  assert (final['num_attention_heads'], final['attention_head_size'], final['intermediate_size'],
          final['hidden_size']) == (2, 8, 32, 32)
  stages = sorted(os.listdir(tmp_path / 'stages'))
  _, info = pipeline.load_stage_output(str(tmp_path / 'stages' / stages[1]))
  (heads,) = info['student_heads']
  assert len(heads) == 2 and set(heads) <= {0, 1, 2, 3}
  maps = {name: objective.head_map for name, objective in calls}
  stage1 = ('general_kd', 'fp32_stage1', 'ternary_stage1', 'binary_stage1')
  assert maps == {**{n: (tuple(heads),) for n in stage1},
                  **{n: None for n in ('finetune', 'fp32_stage2', 'ternary_stage2',
                                       'binary_stage2')}}
  assert ('attention loss: each of the 2 student heads against one teacher head, as init_student '
          f'recorded them (per layer: [{list(heads)}])') in caplog.text
  last, _ = pipeline.load_stage_output(str(tmp_path / 'stages' / stages[-1]))
  layer = last.params['encoder']['layer_0']
  assert layer['attention']['query']['kernel'].shape == (2, 32, 16)
  assert layer['attention']['output']['kernel'].shape == (2, 16, 32)
  policies = {n: r['policy'] for n, r in results['stages'].items()}
  assert policies['ternary_stage2'] == '2-1-8' and policies['binary_stage2'] == '1-1-8'
  assert last.params['embeddings']['word_embeddings']['embedding'].ndim == 2  # one plane
  with open(tmp_path / 'packed' / 'config.json') as f:
    assert json.load(f)['attention_head_size'] == 8
  with open(tmp_path / 'packed' / 'manifest.json') as f:
    planes = {n: r['planes'] for n, r in json.load(f)['tensors'].items() if 'planes' in r}
  assert planes.pop('embeddings/word_embeddings/embedding_codes') == 1
  assert planes.pop('embeddings/word_embeddings/embedding_scale') == 1
  assert set(planes.values()) == {2}  # every encoder matrix and its scales
  for name in stages[-2:]:  # binary_stage1 (attention loss) and binary_stage2 run again
    shutil.rmtree(tmp_path / 'stages' / name)
  calls.clear()
  run(config, str(tmp_path))
  assert [(n, o.head_map) for n, o in calls] == [('binary_stage1', (tuple(heads),)),
                                                 ('binary_stage2', None)]


def test_kd_logs_signals_both_lrs_and_per_layer_terms(xtc_run):
  _, workdir, _ = xtc_run
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  kd = [r for r in rows if r['stage'] == 'kd_1bit' and 'loss' in r]
  for r in kd:
    for g in ('embeddings', 'attention', 'ffn', 'all'):
      for k in ('signflip_stage', 'signflip_recent', 'quant_relerr'):
        assert 0.0 <= r[f'{k}/{g}'] <= (1.0 if k != 'quant_relerr' else 2.0), (k, g)
    assert r['lr_float'] == r['lr']  # one group by default
    assert r['attn/0'] == pytest.approx(r['attn'], rel=1e-6)  # 1 student layer
    assert r['hidden/0'] + r['hidden/1'] == pytest.approx(r['hidden'], rel=1e-6)
    assert r['loss'] == pytest.approx(r['pred'] + r['attn'] + r['hidden'], rel=1e-5)
  assert kd[0]['signflip_stage/all'] == kd[0]['signflip_recent/all']
  assert kd[-1]['signflip_stage/all'] >= kd[-1]['signflip_recent/all']
  fin = [r for r in rows if r['stage'] == 'finetune' and 'loss' in r]
  assert fin and not any(k.startswith('signflip') for k in fin[0])  # FP32: nothing to track


def test_runner_hands_each_stages_record_to_the_next(tmp_path, tiny_pretrained, glue,
                                                     monkeypatch):
  """With a stub trainer: reduce copies finetune's teacher, augment's data is what the 1-bit
  stage trains on, the copied layer maps its attention; a re-run reads the records back."""
  calls = []

  def stub(state, **kw):
    calls.append(kw)
    return state.replace(params=jax.tree.map(lambda x: x + 1, state.params)), None

  monkeypatch.setattr(train, 'train', stub)
  config = load_config('xtc', f'preset=smoke,pretrained={tiny_pretrained},layers=1,'
                       'augment=true,copies=2')
  config.task.glue_dir = glue
  config.export.packed = False
  results = run(config, str(tmp_path))
  assert list(results['stages']) == ['finetune', 'reduce', 'augment', 'quantize', 'kd_1bit']
  finetune, kd = calls
  assert finetune['objective'].losses == ('label',) and finetune['teacher'] is None
  assert len(kd['batches'].encoded) == 3 * config.task.max_train_examples  # 2 copies + original
  assert kd['objective'].layer_map.attention == (1,)
  teacher, _ = pipeline.load_stage_output(str(tmp_path / 'stages' / '00_finetune'))
  reduced, _ = pipeline.load_stage_output(str(tmp_path / 'stages' / '01_reduce'))
  jax.tree.map(np.testing.assert_array_equal, kd['teacher'].params, teacher.params)
  jax.tree.map(np.testing.assert_array_equal, reduced.params['encoder']['layer_0'],
               teacher.params['encoder']['layer_1'])
  shutil.rmtree(tmp_path / 'stages' / '04_kd_1bit')
  calls.clear()
  run(config, str(tmp_path))  # the stages before it complete: their records come from disk
  (again,) = calls
  assert len(again['batches'].encoded) == len(kd['batches'].encoded)
  assert again['objective'] == kd['objective']
  jax.tree.map(np.testing.assert_array_equal, again['teacher'].params, teacher.params)
