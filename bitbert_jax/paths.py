"""Paths a user gives, made absolute once where they enter (Orbax, and a resumed run from another
current directory, need absolute paths); hub ids, 'minilm' and '' stay as they are."""
import os


def absolute(path):
  """`path` relative to the current directory made absolute, '~' expanded; '' and URIs
  (gs://bucket/prefix, any scheme://) stay as they are."""
  if not path or '://' in os.fspath(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def looks_local(path):
  """A checkpoint name that is a local directory rather than a hub id such as 'org/name'."""
  return (os.path.exists(path) or os.path.isabs(path) or path.startswith(('.', '~'))
          or path.count('/') > 1)


def _checkpoint(name):
  return absolute(name) if name and name != 'minilm' and looks_local(name) else name


def _corpus(spec):
  parts = [s for s in spec.split(',') if s]
  return ','.join(s if s.startswith('hub:') else absolute(s) for s in parts)


def absolute_config(config):
  """Rewrites, in place, every path field of a run's config to an absolute path; returns it."""
  for field in ('pretrained', 'teacher', 'tokenizer'):
    if field in config:
      config[field] = _checkpoint(config[field])
  if 'corpus' in config:
    config.corpus = _corpus(config.corpus)
  t = config.task
  t.glue_dir = absolute(t.glue_dir)
  t.train_file, t.dev_file = absolute(t.train_file), absolute(t.dev_file)
  for stage in config.stages.values():
    if stage.get('glove'):
      stage.glove = absolute(stage.glove)
  return config
