"""Command line: `python -m bitbert_jax.main --config=configs/xtc.py:task=mrpc --workdir=DIR`.

Flags only; the pipeline runner does the work. Exit status:
  0   done: results.json (and the exports) written.
  2   bad input (a config field, data file, checkpoint, a workdir in use): one line on stderr
      naming the culprit and the valid choices. Inputs are checked before anything is
      written, so such a run leaves the workdir as it found it. Also a NaN/inf loss or
      gradient norm (stage and step named; the newest checkpoint predates it; see
      config.train.skip_nonfinite).
  75  (EX_TEMPFAIL) preempted: SIGTERM wrote a checkpoint; re-run the same command to resume.
A run killed any other way (SIGKILL, power loss) also resumes when the same command is re-run,
from the newest checkpoint, and ends bitwise equal (on CPU) to an uninterrupted run.
"""
import json
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from bitbert_jax import distributed
from bitbert_jax.errors import BitbertError

EX_USAGE, EX_TEMPFAIL = 2, 75

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/xtc.py:task=rte',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.mark_flags_as_required(['config', 'workdir'])
# Multi-host (jax.distributed.initialize's names): the same command on every host, its own id.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0; unset: '
                                   'one process, or what a TPU pod / SLURM / MPI launch sets')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0..num_processes-1.')
_INIT_TIMEOUT = flags.DEFINE_integer('initialization_timeout', distributed.INITIALIZATION_TIMEOUT,
                                     'Seconds for all processes to join.')
_HEARTBEAT = flags.DEFINE_integer('heartbeat_timeout_seconds', distributed.HEARTBEAT_TIMEOUT,
                                  'A process silent this long stops all the others.')


def run(config, workdir):
  """Runs a config in a workdir (locked against a second run); returns results.json's dict.

  Relative paths (the workdir, and every path in the config) are taken from the current
  directory, once, here; config.json records them absolute.

  The config is validated before anything is written, and data and checkpoints are loaded and
  checked before config.json is: a run that fails there (BitbertError) leaves the workdir as it
  found it. Re-running on a workdir resumes it; SIGTERM raises train.Preempted after a
  checkpoint.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from bitbert_jax import paths, pipeline, train, validate  # pylint: disable=g-import-not-at-top
  from bitbert_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = paths.absolute(workdir)  # Orbax refuses relative paths; config.json records these
  paths.absolute_config(config)
  validate.validate_config(config, jax.device_count())
  with train.preemptible(), workdir_lib.Claim(workdir, jax.process_index() == 0) as claim:
    inputs = pipeline.prepare(config, workdir)
    if train.preempt_requested():
      raise train.Preempted(inputs.names[0], 0)
    claim.commit()
    if jax.process_index() == 0:
      pipeline.write_config(config, workdir)
    results, state, tokenizer_dir = pipeline.execute(config, workdir, inputs)
    if jax.process_index() == 0:
      _export(config, workdir, state, tokenizer_dir, results)
  return results


def _export(config, workdir, state, tokenizer_dir, results):
  if config.export.packed and state.policy.enabled:
    from bitbert_jax import export  # pylint: disable=g-import-not-at-top
    out = os.path.join(workdir, 'packed')
    export.pack(state.model_config, state.params, state.policy, out, tokenizer_dir=tokenizer_dir,
                float_dtype=config.export.float_dtype, model_state=state.model_state,
                overwrite=True)
    results['packed'] = export.size_report(out)
    from bitbert_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  for noisy in ('absl', 'orbax', 'jax', 'httpx', 'datasets'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from bitbert_jax import train  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    config.get('pipeline')  # a config file that failed to load reports it on first use
  except OSError as e:
    _fail(f'--config: {e}')
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _INIT_TIMEOUT.value, _HEARTBEAT.value)  # before any array or handler
    with train.preemptible():  # from here on SIGTERM means: checkpoint, then exit 75
      results = run(config, _WORKDIR.value)
  except train.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(EX_TEMPFAIL)
  except BitbertError as e:
    _fail(e)
  print(json.dumps(results.get('final'), indent=2, default=float))


def _fail(message):
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)  # one line
  sys.exit(EX_USAGE)


def parse_flags(argv):
  """absl's parsing, but a bad --config (file argument or override) is one line and status 2."""
  try:
    return flags.FLAGS(argv)
  except BitbertError as e:  # raised by a config file's get_config
    _fail(e)
  except flags.Error as e:
    _fail(e)
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    text = e
    while isinstance(text, BaseException):  # AttributeError(KeyError("'key'\nDid you mean..."))
      text = text.args[0] if text.args else ''
    key, _, hint = str(text).strip('\'"').partition('\n')
    key = key.strip('\'"')
    culprit = [a for a in argv if a.startswith('--config.') and f'.{key}' in a.split('=')[0]]
    _fail(f'{culprit[0] if culprit else "--config"}: the config has no field {key!r}'
          f'{"; " + hint if hint else ""}; list the fields with --helpfull')
  except Exception as e:  # pylint: disable=broad-except
    _fail(f'bad command line ({type(e).__name__}: {e})')


if __name__ == '__main__':
  app.run(distributed.exits_together(main), flags_parser=parse_flags)
