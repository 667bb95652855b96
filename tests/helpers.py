"""Plain helpers shared by several test files (fixtures live in conftest.py)."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bitbert_jax import evaluate as evaluate_lib
from bitbert_jax import sharding, train
from bitbert_jax.data import batching
from bitbert_jax.distill import objective as objective_lib
from bitbert_jax.data import get_task
from bitbert_jax.data.tokenize import EncodedSplit, ragged
from bitbert_jax.logs import MetricsWriter
from bitbert_jax.model import BertConfig, init_params
from bitbert_jax.train_state import new_state

ROOT = os.path.join(os.path.dirname(__file__), '..')


def load_config(name, arg):
  """configs/NAME.py's get_config(arg), read from this checkout."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


# A tiny training setup: a 1-layer 16-wide BERT on random token ids.
TINY = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32, num_labels=2,
                  label_names=('not_equivalent', 'equivalent'))


class Crash(Exception):
  """Stands in for a kill between two steps."""


def tiny_split(n=48, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, 16, n).astype(np.int32)
  ids = [np.concatenate([[2], rng.integers(4, 64, l - 2), [3]]).astype(np.int32)
         for l in lengths]
  return EncodedSplit(ragged(ids), ragged([np.zeros(l, np.int32) for l in lengths]),
                      rng.integers(0, 2, n).astype(np.int32), lengths, 16)


class Batches(batching.TaskBatches):
  """TaskBatches that can crash before global step `crash_at` or poison given steps."""

  def __init__(self, crash_at=None, poison=None, poison_value=np.nan):
    super().__init__(tiny_split(), 8, seed=0)
    self.crash_at, self.poison, self.poison_value = crash_at, dict(poison or {}), poison_value
    self.step = 0  # global step of the batch last handed out (1-based)

  def epoch(self, epoch, start=0):
    for i, batch in enumerate(super().epoch(epoch, start)):
      self.step = epoch * self.steps_per_epoch() + start + i + 1
      if self.crash_at is not None and self.step == self.crash_at:
        raise Crash(f'killed before step {self.step}')
      if self.step in self.poison:
        batch = dict(batch, weights=np.full_like(batch['weights'], self.poison[self.step]))
      yield batch


def tiny_train(workdir, batches, **settings):
  """Runs `train.train` on TINY with a label loss; returns (state, evals)."""
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  kw = dict(lr=1e-3, epochs=2.0, batch_size=8, warmup=0.1, log_every=1,
            checkpoint_every_steps=1, checkpoint_every_secs=0.0, keep_checkpoints=2,
            report_memory=False, field='config.stages.tiny')
  kw.update(settings)
  state = new_state(TINY, init_params(TINY, rng=jax.random.PRNGKey(0)),
                    rng=jax.random.PRNGKey(1))
  writer = MetricsWriter(workdir, enabled=True)
  try:
    return train.train(state, name='tiny', objective=objective_lib.Objective(('label',)),
                       settings=train.Settings(**kw), batches=batches, mesh=mesh,
                       workdir=workdir, writer=writer, task=get_task('mrpc'),
                       dev_sets={'validation': tiny_split(16, seed=1)})
  finally:
    writer.close()


def fake_evaluate(batches):
  """Dev score = -step: the best is always the first evaluation."""
  def evaluate(*args):
    del args
    return {'validation': {'accuracy': -batches.step}, 'score': float(-batches.step)}
  return evaluate


def packed_dev_logits(workdir, dev_file, text_columns, label_column, tmp_dir, header=True):
  """(texts, gold label ids, logits) of WORKDIR/packed, run by `bitbert_jax.predict`'s CLI, on
  the dev rows the run evaluated (the file's first task.max_dev_examples, at task.max_length)."""
  from bitbert_jax import predict  # pylint: disable=g-import-not-at-top
  from bitbert_serve import textio  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'config.json')) as f:
    task = json.load(f)['task']
  n = task['max_dev_examples']
  with open(dev_file, 'rb') as f:
    lines = f.read().splitlines(keepends=True)[:n + int(header)]
  head = os.path.join(tmp_dir, 'dev_head.tsv')
  with open(head, 'wb') as f:
    f.writelines(lines)
  texts, gold = textio.read_texts(head, text_columns, header, label_column)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = predict.main([f'--model={os.path.join(workdir, "packed")}', f'--input={head}',
                       f'--max_length={task["max_length"]}', '--logits', '--text_columns',
                       *text_columns, *([] if header else ['--no_header'])])
  assert rc == 0
  logits = np.array([[float(v) for v in l.split('\t')[1:]] for l in out.getvalue().splitlines()])
  assert len(texts) == len(gold) == len(logits) == n
  return texts, np.array([int(g) for g in gold]), logits


def assert_dev_metrics_are_the_packed_models(workdir, results, task, dev_file, text_columns,
                                             label_column, tmp_dir, header=True, atol=1e-4):
  """results.json's final dev metrics are the final stage's on the dev file's rows, and the
  packed model (run by the predict CLI) computes that stage's logits, to `atol`."""
  import datasets  # pylint: disable=g-import-not-at-top
  from bitbert_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from bitbert_jax import pipeline  # pylint: disable=g-import-not-at-top
  texts, gold, logits = packed_dev_logits(workdir, dev_file, text_columns, label_column, tmp_dir,
                                          header)
  stages = os.path.join(workdir, 'stages')
  state, _ = pipeline.load_stage_output(os.path.join(stages, sorted(os.listdir(stages))[-1]))
  columns = zip(*texts) if len(text_columns) == 2 else [texts]
  rows = datasets.Dataset.from_dict({**dict(zip(task.text_fields, map(list, columns))),
                                     'label': gold.tolist()})
  with open(os.path.join(workdir, 'config.json')) as f:
    max_length = json.load(f)['task']['max_length']
  encoded = data_lib.encode(rows, data_lib.load_tokenizer(os.path.join(workdir, 'packed')), task,
                            max_length)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  ours = evaluate_lib.predict(state.model, state.params, state.model_state, encoded, 8, mesh)
  reported = results['final']['dev']['validation']
  computed = data_lib.compute_metrics(task, ours, gold)
  assert set(computed) == set(reported)
  for k, v in reported.items():
    assert computed[k] == pytest.approx(v, abs=1e-6), k
  np.testing.assert_allclose(logits, ours, rtol=0, atol=atol)


def on_8_cpu_devices(*args):
  """tests/sharding_equivalence.py ARGS in a fresh process with 8 forced CPU devices; its JSON."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The checkout itself on the path: the worker imports this tree, however it was installed.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get('PYTHONPATH')))))
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sharding_equivalence.py')
  out = subprocess.run([sys.executable, worker, *args], capture_output=True, text=True, env=env,
                       timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])
