"""Command line: `python -m bitbert_jax.main --config=configs/xtc.py:task=mrpc --workdir=DIR`.

Flags only; the pipeline runner does the work. Bad input exits with status 2 and one message.
"""
import json
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from bitbert_jax.errors import BitbertError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/xtc.py:task=rte',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir):
  """Runs a config in a workdir (locked against a second run); returns results.json's dict."""
  import jax  # pylint: disable=g-import-not-at-top
  from bitbert_jax import pipeline, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()  # a pod launch: every host runs this same command
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.Lock(workdir):
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
    results, state, tokenizer_dir = pipeline.run(config, workdir)
    if jax.process_index() == 0:
      _export(config, workdir, state, tokenizer_dir, results)
  return results


def _export(config, workdir, state, tokenizer_dir, results):
  if config.export.packed and state.policy.enabled:
    from bitbert_jax import export  # pylint: disable=g-import-not-at-top
    out = os.path.join(workdir, 'packed')
    export.pack(state.model_config, state.params, state.policy, out, tokenizer_dir=tokenizer_dir,
                float_dtype=config.export.float_dtype, model_state=state.model_state)
    results['packed'] = export.size_report(out)
    from bitbert_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  for noisy in ('absl', 'orbax', 'jax', 'httpx', 'datasets'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    results = run(_CONFIG.value, _WORKDIR.value)
  except BitbertError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(results.get('final'), indent=2, default=float))


if __name__ == '__main__':
  app.run(main)
