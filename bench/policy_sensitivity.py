"""Dev scores of one model's weights under several quantization policies, with no training.

How fragile a checkpoint is to quantization: post-training quantization of a fine-tuned teacher
(a Hugging Face directory), or a trained student (a stage output, `runs/X/stages/NN_name`)
re-evaluated under other policies (`asis` = the policy it was trained with). A script, not a
test; GLUE_DIR names the GLUE TSVs:

  python bench/policy_sensitivity.py --task=mrpc --checkpoint=runs/teacher_mrpc/stages/00_finetune/hf \
      --policies=32-32-32,8-32-32,8-32-32:row,4-32-32:row,1-1-8
  python bench/policy_sensitivity.py --task=mrpc --checkpoint=runs/xtc_mrpc/stages/03_kd_1bit \
      --tokenizer=runs/teacher_mrpc/stages/00_finetune/hf --policies=asis,1-1-32,32-32-32

A policy is W-E-A[:weight_groups[:ffn_output_bits]], e.g. 8-32-32:row or 1-1-8:1:8.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout

import ml_collections  # pylint: disable=g-import-not-at-top

from bitbert_jax import evaluate as evaluate_lib
from bitbert_jax import hf, pipeline, sharding
from bitbert_jax.data import glue, tokenize, tasks
from bitbert_jax.model import BertModel
from bitbert_jax.quant import policy_from_name
from bitbert_jax.train_state import new_state, with_policy


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--task', required=True)
  p.add_argument('--checkpoint', required=True, help='HF directory, or a stage directory')
  p.add_argument('--tokenizer', default=None, help='default: the checkpoint (HF directories)')
  p.add_argument('--policies', default='32-32-32,8-8-8,2-2-8,1-1-8')
  p.add_argument('--max_length', type=int, default=128)
  p.add_argument('--batch', type=int, default=32)
  return p.parse_args()


def load_state(checkpoint):
  if os.path.isfile(os.path.join(checkpoint, 'config.json')):
    config, params = hf.load_hf_checkpoint(checkpoint)
    return new_state(config, params)
  loaded = pipeline.load_stage_output(checkpoint)
  if loaded is None:
    sys.exit(f'{checkpoint}: neither a Hugging Face directory (config.json) nor a completed stage')
  return loaded[0]


def under(state, spec):
  if spec == 'asis':
    return state
  name, groups, ffn = (spec.split(':') + ['', ''])[:3]
  return with_policy(state, policy_from_name(name, weight_groups=groups or 1,
                                             ffn_output_bits=int(ffn) if ffn else None))


def main():
  args = parse_args()
  task = tasks.get_task(args.task)
  state = load_state(args.checkpoint)
  tokenizer = tokenize.load_tokenizer(args.tokenizer or args.checkpoint)
  split = glue.split_names(task)[1]
  dev = {split: tokenize.encode(glue.load_split(task, split, os.environ.get('GLUE_DIR')),
                                tokenizer, task, args.max_length)}
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  print(f'| policy | {split} |\n|---|---|')
  for spec in args.policies.split(','):
    s = under(state, spec)
    r = evaluate_lib.evaluate(BertModel(s.model_config, s.policy), s.params, s.model_state, task,
                              dev, args.batch, mesh)
    print(f'| {spec} | ' + ' / '.join(f'{k} {100 * v:.2f}' for k, v in r[split].items()) + ' |',
          flush=True)


if __name__ == '__main__':
  main()
