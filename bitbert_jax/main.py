"""Command line: `python -m bitbert_jax.main --config=xtc:task=mrpc --workdir=DIR`.

`--config` names a config shipped with the package (xtc, multistage, finetune: the files of the
repository's configs/) or a config file (`--config=configs/xtc.py:task=mrpc`, an edited copy).

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
`--dry_run` prints the resolved pipeline (and why each rule-chosen value) and writes nothing.
"""
import contextlib
import json
import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from bitbert_jax import distributed
from bitbert_jax import fs
from bitbert_jax.errors import BitbertError

EX_USAGE, EX_TEMPFAIL = distributed.EX_USAGE, 75

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config name or file and its argument, e.g. xtc:task=rte or '
    'configs/xtc.py:task=rte', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the resolved pipeline (a line per stage, '
                             'and the rule behind each chosen value), then exit; writes nothing.')
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
  found it. Re-running on a workdir resumes it; SIGTERM raises preempt.Preempted after a
  checkpoint.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from bitbert_jax import paths, pipeline, preempt, validate  # pylint: disable=g-import-not-at-top
  from bitbert_jax import progress  # pylint: disable=g-import-not-at-top
  from bitbert_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = paths.absolute(workdir)  # Orbax refuses relative paths; config.json records these
  paths.absolute_config(config)
  # Checks files too (a GLUE copy, a checkpoint), which one host may lack: all fail or none.
  distributed.agreed(lambda: validate.validate_config(config, jax.device_count()),
                     'checking the config')
  with preempt.preemptible(), contextlib.ExitStack() as stack:
    # The claim (process 0 alone) and the inputs (read by every process) fail on all or none.
    claim = distributed.agreed(lambda: stack.enter_context(
        workdir_lib.Claim(workdir, jax.process_index() == 0)), 'claiming the workdir')
    inputs = distributed.agreed(lambda: pipeline.prepare(config, workdir), 'reading the inputs')
    if preempt.preempt_requested():
      raise preempt.Preempted(inputs.names[0], 0)
    claim.commit()
    primary, tokenizer_dir = jax.process_index() == 0, None
    if primary:  # the one writer of the workdir's files
      pipeline.write_config(config, workdir)
      tokenizer_dir = pipeline.save_tokenizer(workdir, inputs.tokenizer_dir)
    results, state = pipeline.execute(config, workdir, inputs)
    # Process 0 exports; the others wait (not time out in shutdown) and stop too if it fails.
    distributed.agreed(lambda: _export(config, workdir, state, tokenizer_dir, results)
                       if primary else None, 'the export')
    if primary:
      logging.getLogger('bitbert_jax').info('%s', progress.summary(results, workdir))
  return results


def _export(config, workdir, state, tokenizer_dir, results):
  if config.export.packed and state.policy.enabled:
    from bitbert_jax import fs  # pylint: disable=g-import-not-at-top
    from bitbert_jax.packed import format as packed_format  # pylint: disable=g-import-not-at-top
    from bitbert_jax.packed import write  # pylint: disable=g-import-not-at-top
    # A bucket's copy is packed locally, then uploaded with its manifest last.
    with fs.published(fs.join(workdir, 'packed'), packed_format.MANIFEST) as out:
      write.pack(state.model_config, state.params, state.policy, out,
                 tokenizer_dir=tokenizer_dir, float_dtype=config.export.float_dtype,
                 model_state=state.model_state, overwrite=True)
      results['packed'] = write.size_report(out)
    from bitbert_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir_lib.write_json(fs.join(workdir, 'results.json'), results)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  for noisy in ('absl', 'orbax', 'jax', 'httpx', 'datasets', 'gcsfs', 'fsspec'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from bitbert_jax import preempt  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    config.get('pipeline')  # a config file that failed to load reports it on first use
  except OSError as e:
    _fail(f'--config: {e}')
  try:
    if _DRY_RUN.value:
      from bitbert_jax import pipeline  # pylint: disable=g-import-not-at-top
      print(pipeline.dry_run(config, _WORKDIR.value))
      return
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _INIT_TIMEOUT.value, _HEARTBEAT.value)  # before any array or handler
    with preempt.preemptible():  # from here on SIGTERM means: checkpoint, then exit 75
      results = run(config, _WORKDIR.value)
  except preempt.Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(EX_TEMPFAIL)
  except BitbertError as e:
    _fail(e)
  except OSError as e:  # a write the pre-save checks could not foresee (logs, exports)
    if not fs.is_disk_full(e):
      raise
    where = e.filename2 or e.filename or _WORKDIR.value  # a copy's filename is its source
    _fail(fs.disk_full(where, 'a write', removed=False))
  print(json.dumps(results.get('final'), indent=2, default=float))


def _fail(message):
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)  # one line
  sys.exit(EX_USAGE)


def config_dir():
  """The shipped configs: bitbert_jax/configs in an installed wheel, configs/ in a checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  for folder in (os.path.join(here, 'configs'), os.path.join(os.path.dirname(here), 'configs')):
    if os.path.isfile(os.path.join(folder, 'xtc.py')):
      return folder
  raise BitbertError(f'no configs shipped with the package next to {here}; reinstall it')


def config_names():
  return sorted(f[:-3] for f in os.listdir(config_dir())
                if f.endswith('.py') and not f.startswith('_'))


def config_file(spec):
  """'xtc:task=rte' -> '<shipped configs>/xtc.py:task=rte'; a file path is kept as it is."""
  name, sep, arg = spec.partition(':')
  if name.endswith('.py') or os.sep in name or '/' in name or os.path.isfile(name):
    return spec
  if name not in config_names():
    raise BitbertError(f'--config={spec}: no config named {name!r}; valid names: '
                       f'{", ".join(config_names())}, or a config file such as configs/xtc.py')
  return os.path.join(config_dir(), name + '.py') + sep + arg


def _with_config_file(argv):
  """argv with --config's name (either flag form) resolved to the shipped file."""
  out, argv = [], list(argv)
  while argv:
    a = argv.pop(0)
    flag, eq, value = a.partition('=')
    if flag in ('--config', '-config') and eq:
      a = f'{flag}={config_file(value)}'
    elif flag in ('--config', '-config') and argv:
      out.append(a)
      a = config_file(argv.pop(0))
    out.append(a)
  return out


def parse_flags(argv):
  """absl's parsing, but a bad --config (name, file argument or override) is one line and
  status 2."""
  try:
    return flags.FLAGS(_with_config_file(argv))
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
