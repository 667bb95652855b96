"""Bad inputs, end to end: each gives one BitbertError naming the culprit and the valid choices,
and leaves no output (the workdir is not even created). Most run in-process through
`main.run`; a few through the CLI check exit status 2 and a one-line stderr."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bitbert_jax import data as data_lib
from bitbert_jax import pipeline, validate
from bitbert_jax.errors import BitbertError
from bitbert_jax.main import run
import sample_data  # pylint: disable=g-bad-import-order
from helpers import load_config  # pylint: disable=g-bad-import-order

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
WEIGHTS = 'model.safetensors'
QUERY = 'encoder.layer.0.attention.self.query.weight'


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)


def edit_weights(src, dst, change):
  """A copy of the HF checkpoint `src` with its tensors passed through `change`."""
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(src, WEIGHTS))
  save_file(change(tensors), os.path.join(dst, WEIGHTS), metadata={'format': 'pt'})
  return dst


def new_bert(out, tokenizer_dir, **kw):
  import jax  # pylint: disable=g-import-not-at-top
  from bitbert_jax import hf  # pylint: disable=g-import-not-at-top
  from bitbert_jax.model import BertConfig, init_params  # pylint: disable=g-import-not-at-top
  cfg = BertConfig(**{**dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=128), **kw})
  hf.save_hf_checkpoint(cfg, init_params(cfg, rng=jax.random.PRNGKey(2)), out,
                        tokenizer_dir=tokenizer_dir)
  return out


@pytest.fixture(scope='module')
def env(tmp_path_factory, tiny_pretrained):
  """Paths of good and bad inputs: a small generated GLUE, damaged copies of the tiny BERT."""
  d = tmp_path_factory.mktemp('inputs')
  e = {'tiny': tiny_pretrained, 'dir': str(d)}
  e['glue'] = sample_data.write_sample_glue(str(d / 'glue'), tasks=('mrpc',), train_size=40,
                                         dev_size=16)
  train_tsv = open(os.path.join(e['glue'], 'MRPC', 'train.tsv')).read().splitlines()
  header, rows = train_tsv[0], train_tsv[1:]

  def glue_with(name, train=None, dev=None):
    root = str(d / name)
    shutil.copytree(e['glue'], root)
    for split, text in (('train', train), ('dev', dev)):
      if text is not None:
        write(os.path.join(root, 'MRPC', f'{split}.tsv'), text)
    return root

  e['glue_short_row'] = glue_with('short_row', train='\n'.join(
      [header, rows[0], rows[1].rsplit('\t', 1)[0]] + rows[2:]) + '\n')
  e['glue_bad_label'] = glue_with('bad_label', train='\n'.join(
      [header, rows[0], 'maybe' + rows[1][1:]] + rows[2:]) + '\n')
  e['glue_empty_dev'] = glue_with('empty_dev', dev=header + '\n')
  e['glue_no_dev'] = glue_with('no_dev')
  os.remove(os.path.join(e['glue_no_dev'], 'MRPC', 'dev.tsv'))
  with open(d / 'corpus.bin', 'wb') as f:
    f.write(bytes(range(256)) * 64)
  e['corpus_bin'] = str(d / 'corpus.bin')

  def drop(t):
    return {k: v for k, v in t.items() if not k.endswith(QUERY)}

  def reshape(t):
    return {k: (v[:, :16] if k.endswith(QUERY) else v) for k, v in t.items()}

  def to_int(t):
    return {k: (v.astype(np.int32) if k.endswith(QUERY) else v) for k, v in t.items()}

  e['missing_tensor'] = edit_weights(tiny_pretrained, str(d / 'missing_tensor'), drop)
  e['wrong_shape'] = edit_weights(tiny_pretrained, str(d / 'wrong_shape'), reshape)
  e['wrong_dtype'] = edit_weights(tiny_pretrained, str(d / 'wrong_dtype'), to_int)
  e['corrupt'] = shutil.copytree(tiny_pretrained, str(d / 'corrupt'))
  weights = os.path.join(e['corrupt'], WEIGHTS)
  os.truncate(weights, os.path.getsize(weights) // 3)
  e['no_config'] = shutil.copytree(tiny_pretrained, str(d / 'no_config'))
  os.remove(os.path.join(e['no_config'], 'config.json'))
  # Fine-tuned-looking teachers of another size / another vocabulary.
  e['narrow_teacher'] = new_bert(str(d / 'narrow'), tiny_pretrained, hidden_size=16,
                                 num_attention_heads=2, intermediate_size=32, num_labels=2)
  e['small_vocab'] = new_bert(str(d / 'small_vocab'), tiny_pretrained, vocab_size=1000,
                              num_labels=2)
  return e


def xtc(e, **kw):
  c = load_config('xtc', f'preset=smoke,pretrained={e["tiny"]},layers=1')
  c.task.glue_dir = e['glue']
  c.export.packed = False
  for k, v in kw.items():
    c[k] = v
  return c


def multistage(e):
  c = load_config('multistage', f'preset=smoke,pretrained={e["tiny"]}')
  c.task.glue_dir = e['glue']
  c.corpus = ''  # the shipped WikiText-2 excerpt
  return c


def _overriding(base, fields):
  """A case: `base(e)` with dotted fields (a__b__c) set; a callable value is called with e."""
  def make(e):
    c = base(e)
    for path, value in fields.items():
      *parents, leaf = path.split('__')
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value(e) if callable(value) else value
    return c
  return make


def setting(**fields):
  """A case that sets dotted config fields on the XTC config."""
  return _overriding(xtc, fields)


def with_multistage(**fields):
  return _overriding(multistage, fields)


def with_env(**fields):
  """XTC with fields taken from the env fixture (paths of bad inputs)."""
  def make(e):
    c = xtc(e)
    for path, key in fields.items():
      *parents, leaf = path.split('__')
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = e[key] if key in e else key
    return c
  return make


def unknown_preset(e):
  del e
  return load_config('xtc', 'preset=fast')


def unknown_switch(e):
  del e  # a true/false argument refuses any other value
  return load_config('multistage', 'augment=maybe')


def custom_missing_train_file(e):
  c = xtc(e)
  c.task.train_file = os.path.join(e['dir'], 'mine', 'train.tsv')
  c.task.dev_file = os.path.join(e['dir'], 'mine', 'dev.tsv')
  c.task.text_columns = 'sentence'
  return c


def too_many_devices(e):
  import jax  # pylint: disable=g-import-not-at-top
  c = xtc(e)
  c.mesh.data = jax.device_count() + 1
  return c


CASES = [
    # Config fields.
    ('bits_out_of_range', setting(stages__quantize__bits='1-1-9'),
     r"config.stages.quantize.bits='1-1-9'.*activation \(A\) bits 9 not supported; valid: 1, 2"),
    ('bits_not_numbers', setting(stages__quantize__bits='3-x-8'),
     r"config.stages.quantize.bits='3-x-8'.*not of the form W-E-A.*named settings: 32-32-32"),
    ('layer_list_longer_than_teacher', setting(stages__reduce__layers=[0, 1, 2]),
     r'config.stages.reduce.layers=\[0, 1, 2\]: 3 layers but the teacher .* has only 2; '
     r'valid: indices 0..1'),
    ('layer_out_of_bounds', setting(stages__reduce__layers=[5]),
     r'config.stages.reduce.layers=\[5\]: layers \[5\] out of range.*valid: 0..1'),
    ('layers_not_increasing', setting(stages__reduce__layers=[1, 0]),
     r'config.stages.reduce.layers=\[1, 0\]: layers must be strictly increasing'),
    ('student_deeper_than_teacher', setting(stages__reduce__num_layers=3),
     r'config.stages.reduce.num_layers=3: the teacher .* has only 2 layers; valid: 1..2'),
    ('student_wider_than_teacher', with_multistage(stages__init_student__hidden_size=64),
     r'config.stages.general_kd: the student \(hidden_size 64\) is wider than its teacher '
     r'config.pretrained \(hidden_size 32\); valid: a student hidden_size <= 32'),
    ('unknown_student_init', with_multistage(stages__init_student__init='copy'),
     r"config.stages.init_student.init='copy': valid: random, pretrained"),
    ('pretrained_init_other_width', with_multistage(stages__init_student__init='pretrained',
                                                    stages__init_student__hidden_size=16),
     r'config.stages.init_student.hidden_size=16: init=pretrained copies config.pretrained\'s '
     r'layers, so the student keeps its hidden_size 32'),
    ('mesh_larger_than_devices', too_many_devices,
     r'config.mesh \(data=\d+, fsdp=1, tensor=1\) has \d+ devices but \d+ are available'),
    ('mesh_size_zero', setting(mesh__fsdp=0),
     r'config.mesh.fsdp=0: need a positive integer or -1'),
    ('negative_stage_lr', setting(stages__kd_1bit__lr=-1e-5),
     r'config.stages.kd_1bit.lr=-1e-05: need a number > 0 \(the learning rate\)'),
    ('negative_lr', setting(optim__lr=-0.001),
     r'config.optim.lr=-0.001: need a number > 0'),
    ('zero_epochs', setting(stages__kd_1bit__epochs=0.0),
     r'config.stages.kd_1bit.epochs=0.0: need a number > 0 \(or set '
     r'config.stages.kd_1bit.max_steps > 0\)'),
    ('negative_epochs', setting(stages__finetune__epochs=-2.0),
     r'config.stages.finetune.epochs=-2.0: need a number > 0'),
    ('unknown_stage_name', setting(pipeline='finetune,nosuch'),
     r"config.pipeline names stage 'nosuch'.*defined: finetune, kd_1bit"),
    ('unknown_stage_kind', setting(stages__reduce__kind='shrink'),
     r"config.stages.reduce.kind='shrink' is not a stage; valid: finetune"),
    ('empty_pipeline', setting(pipeline=' , '), r'config.pipeline is empty'),
    ('unknown_task', setting(task__name='mrpcc'),
     r"config.task.name: unknown task 'mrpcc'; valid tasks: cola, sst2, mrpc"),
    ('unknown_preset', unknown_preset, r"preset='fast'; valid: smoke, quick, paper"),
    ('unknown_switch', unknown_switch, r"config argument augment='maybe'; valid: true, false"),
    ('bad_dtype', setting(model__dtype='float64'),
     r"config.model.dtype='float64': valid: float32, bfloat16"),
    ('unknown_losses', setting(stages__kd_1bit__losses='stage3'),
     r"config.stages.kd_1bit.losses='stage3': valid: stage1, stage2, all"),
    ('unknown_act_mode', setting(quant__act_mode='fancy'),
     r"config.quant.act_mode='fancy': valid: '' .*dynamic, static, lsq, elastic"),
    ('keep_no_checkpoints', setting(train__keep_checkpoints=0),
     r'config.train.keep_checkpoints=0: need an integer >= 1'),
    ('bad_export_dtype', setting(export__float_dtype='int8'),
     r"config.export.float_dtype='int8': valid: float16, float32"),
    ('augmented_without_augment_stage', setting(stages__kd_1bit__data='augmented'),
     r"config.stages.kd_1bit.data='augmented' but no augment stage runs before it"),
    ('no_teacher_at_all', setting(pipeline='reduce,quantize,kd_1bit'),
     r'config.teacher is empty and config.pipeline has no finetune stage'),
    ('max_length_below_special_tokens', setting(task__max_length=4),
     r'config.task.max_length=4: need an integer >= 5 \(\[CLS\], \[SEP\] and a token per text'),
    ('negative_seed', setting(seed=-1), r'config.seed=-1: need an integer >= 0'),
    ('max_length_past_positions', setting(task__max_length=512),
     r'config.task.max_length=512: config.pretrained has only 128 positions; valid: <= 128'),
    # Data.
    ('missing_glue_dir', setting(task__glue_dir='/nonexistent/glue'),
     r"config.task.glue_dir='/nonexistent/glue': no such directory; valid: the GLUE root"),
    ('missing_glue_file', with_env(task__glue_dir='glue_no_dev'),
     r"MRPC/dev.tsv: missing file for split 'validation'; files in .*: \['train.tsv'\]"),
    ('wrong_column_count', with_env(task__glue_dir='glue_short_row'),
     r'MRPC/train.tsv:3: expected 5 tab/comma-separated columns'),
    ('unparsable_label', with_env(task__glue_dir='glue_bad_label'),
     r"MRPC/train.tsv:3: bad label 'maybe'; valid labels: one of \['not_equivalent', "
     r"'equivalent'\] or an index 0..1"),
    ('empty_split', with_env(task__glue_dir='glue_empty_dev'),
     r'MRPC/dev.tsv: empty split \(no data rows\)'),
    ('corpus_not_text', with_multistage(corpus=lambda e: e['corpus_bin']),
     r'config.corpus: .*corpus.bin is not text \(a NUL byte at offset 0\); valid: plain UTF-8'),
    ('corpus_missing', with_multistage(corpus='/nonexistent/wiki.txt'),
     r'config.corpus: /nonexistent/wiki.txt does not exist'),
    ('custom_train_file_missing', custom_missing_train_file,
     r"config.task.train_file='.*mine/train.tsv': no such file; folder .*mine does not exist"),
    # Checkpoints.
    ('teacher_missing_tensor', with_env(teacher='missing_tensor'),
     rf"config.teacher='.*missing_tensor': .*model.safetensors: tensor '(bert.)?{QUERY}' missing"),
    ('teacher_wrong_shape', with_env(teacher='wrong_shape'),
     rf"config.teacher=.*tensor '.*{QUERY}' has shape \[32, 16\]; expected \[32, 32\]"),
    ('teacher_wrong_dtype', with_env(teacher='wrong_dtype'),
     rf"config.teacher=.*tensor '.*{QUERY}' has dtype I32; expected a float type"),
    ('teacher_corrupt_safetensors', with_env(teacher='corrupt'),
     r'config.teacher=.*model.safetensors: cannot read the weights, the file may be truncated'),
    ('teacher_missing_config_json', with_env(teacher='no_config'),
     r"config.teacher='.*no_config': no config.json \(files there: .*model.safetensors"),
    ('teacher_without_head', with_env(teacher='tiny'),
     r"config.teacher='.*' has no classifier head, but task 'mrpc' needs 2 \(classification\)"),
    ('teacher_of_another_size', with_multistage(teacher=lambda e: e['narrow_teacher']),
     r'config.stages.fp32_stage1: the student \(hidden_size 32\) is wider than its teacher '
     r'config.teacher \(hidden_size 16\)'),
    ('no_student_to_distil_into', with_env(teacher='narrow_teacher', pipeline='finetune,kd_1bit'),
     r'config.stages.kd_1bit: no student to distil into; valid: an init_student or '
     r'reduce_layers stage before it'),
    ('teacher_vocab_smaller_than_tokenizer', with_env(teacher='small_vocab'),
     r'config.teacher: vocab_size 1000 but the tokenizer has 30522 tokens'),
    ('pretrained_missing', setting(pretrained='/nonexistent/bert'),
     r"config.pretrained='/nonexistent/bert': no such checkpoint directory"),
]


@pytest.mark.parametrize('make,needle', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(env, tmp_path, make, needle):
  workdir = str(tmp_path / 'run')
  with pytest.raises(BitbertError, match=needle) as e:
    run(make(env), workdir)
  assert '\n' not in str(e.value)
  assert not os.path.exists(workdir), os.listdir(workdir)
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_failed_run_leaves_an_existing_workdir_as_it_was(env, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  c = xtc(env)
  c.task.glue_dir = env['glue_bad_label']
  with pytest.raises(BitbertError, match='bad label'):
    run(c, str(workdir))
  assert os.listdir(workdir) == ['notes.txt']


def test_workdir_that_is_a_file_is_refused(env, tmp_path):
  path = tmp_path / 'run'
  path.write_text('not a directory')
  with pytest.raises(BitbertError, match=r'--workdir .*run: exists and is not a directory'):
    run(xtc(env), str(path))
  assert path.read_text() == 'not a directory'


@pytest.mark.parametrize('name', ['xtc', 'multistage'])
def test_the_base_configs_pass(env, tmp_path, name):
  """The cases fail because of what they change: unchanged, every input is accepted."""
  c = xtc(env) if name == 'xtc' else multistage(env)
  inputs = pipeline.prepare(c, str(tmp_path))
  assert inputs.names == validate.stage_names(c)


def cli(args, **env):
  return subprocess.run([sys.executable, '-m', 'bitbert_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False,
                        env={**os.environ, **env})


@pytest.mark.parametrize('args,env_vars,needle', [
    (['--config=configs/xtc.py:preset=fast'], {}, "preset='fast'; valid: smoke, quick, paper"),
    (['--config=configs/xtc.py:layers=3,copies=many'], {},
     "config argument 'copies=many': copies takes int values, e.g. copies=8"),
    (['--config=configs/xtc.py:preset=smoke,pretrained={tiny},layers=1',
      '--config.train.batch_size=7', '--config.task.glue_dir={glue}'],
     {'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_PLATFORMS': 'cpu'},
     'config.train.batch_size=7 is not divisible by the data-parallel mesh size 2 '
     r'\(config.mesh data x fsdp\); valid: a multiple of 2'),
], ids=['unknown_preset', 'not_a_number', 'batch_not_divisible_by_data_axes'])
def test_cli_bad_input_exits_2_with_one_line(env, tmp_path, args, env_vars, needle):
  import re  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  out = cli([a.format(**env) for a in args] + [f'--workdir={workdir}'], **env_vars)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count('\n') == 1 and out.stderr.startswith('error: '), out.stderr
  assert re.search(needle, out.stderr), out.stderr
  assert not os.path.exists(workdir)
