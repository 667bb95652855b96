"""`--dry_run`: the resolved pipeline, a line per stage, and the rule behind each chosen value.

The config is checked as a run checks it; the task data is read (not trained on) to count the
steps, where it can be; nothing is written.
"""
import dataclasses
import math

from bitbert_jax import config_lib
from bitbert_jax import fs
from bitbert_jax import validate
from bitbert_jax.distill import stage_config

COLUMNS = ('stage', 'kind', 'data', 'epochs', 'steps', 'batch', 'lr', 'bits')


@dataclasses.dataclass
class Row:
  """One stage: its column values (str) and `notes`, other fields a rule chose; `why`: column
  -> reason, for the values a rule chose."""
  cells: dict
  why: dict
  notes: list  # (field=value, reason)


def plan(config, examples=None):
  """[Row] of the pipeline; `examples`: the task's training examples (None: steps unknown)."""
  from bitbert_jax.distill import stages as stages_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  frozen = ml_collections.FrozenConfigDict(config)
  ctx = stages_lib.StageContext(config=frozen, mesh=None, writer=None, train=None)
  bits, copies, rows = stage_config.FP32, 0, []
  for name in validate.stage_names(config):
    s = stage_config.section(config.stages[name])
    kind = stage_config.KINDS[s.kind]
    why = lambda field, n=name: config_lib.why(config, f'stages.{n}.{field}')
    cells = dict.fromkeys(COLUMNS, '-')
    cells.update(stage=name, kind=s.kind)
    marks, notes = {}, []
    skipped = stages_lib.STAGES[s.kind].skip(dataclasses.replace(ctx, name=name))
    if skipped:
      cells['data'] = f'skipped: {skipped}'
      rows.append(Row(cells, marks, notes))
      continue
    bits = kind.bits(s, bits)
    if kind.augments:
      copies = s.copies
      cells['data'] = f'task x{copies + 1}'
    cells['bits'], marks['bits'] = bits, why('bits')
    shown = {'epochs', 'lr', 'batch_size', 'bits', 'data'}
    if kind.trains:
      rows_in = None if examples is None else examples * (copies + 1 if s.data == 'augmented'
                                                          else 1)
      per_epoch = None if examples is None else (lambda b: examples // b)
      v = stage_config.resolve(config, name, per_epoch)
      batch = v['batch_size'].value
      cells.update(data='corpus' if kind.uses_corpus else s.data,
                   epochs=f'{s.epochs:g}' if s.max_steps <= 0 else '-',
                   batch=str(batch), lr=f'{v["lr"].value:g}')
      marks.update(epochs=why('epochs'), lr=_why(config, v['lr']),
                   batch=_why(config, v['batch_size']))
      spe = s.steps_per_epoch if kind.uses_corpus else (
          None if rows_in is None else rows_in // batch)
      if s.max_steps > 0:
        cells['steps'] = str(s.max_steps)
      elif spe is not None:
        cells['steps'] = str(max(1, math.ceil(s.epochs * spe))) if spe else '<1 batch'
      notes += [(f'{k}={_text(v[k].value)}', v[k].why) for k in ('eval_every', 'keep_best')
                if v[k].why]
    for field, note in sorted((config.get('rules', {}).get('stages', {}).get(name) or {}).items()):
      if field not in shown and why(field):
        notes.append((f'{field}={_text(s[field])}', note[1]))
    rows.append(Row(cells, {k: w for k, w in marks.items() if w}, notes))
  return rows


def _text(value):
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def _why(config, value):
  """The reason a rule chose a resolved Value: its own, or the one recorded for its field."""
  if value.why:
    return value.why
  return config_lib.why(config, value.field[len('config.'):]) if value.field else ''


def describe(config, examples, source, workdir=None):
  """The dry run's text: the pipeline, a line per stage, then the reasons. `examples`: the task's
  training examples (None: unknown, `source` says why)."""
  rows = plan(config, examples)
  reasons = []

  def mark(text, reason):
    if not reason:
      return text
    if reason not in reasons:
      reasons.append(reason)
    return f'{text}*{reasons.index(reason) + 1}'

  pipeline = mark(config.pipeline, config_lib.why(config, 'pipeline'))
  data = (f'{examples} training examples from {source}' if examples is not None
          else f'steps unknown: the task data was not read ({source})')
  lines = [f'pipeline {pipeline}', f'task {config.task.name}: {data}']
  table = [list(COLUMNS)]
  for i, r in enumerate(rows):
    cells = [mark(r.cells[c], r.why.get(c)) for c in COLUMNS]
    cells[0] = f'{i:02d}_{cells[0]}'
    done = workdir and fs.is_published(fs.join(workdir, 'stages', cells[0], 'output'),
                                       'stage.json')
    extra = [mark(text, reason) for text, reason in r.notes] + (['(complete)'] if done else [])
    table.append(cells + [' '.join(extra)])
  widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
  for row in table:
    lines.append('  '.join(c.ljust(w) for c, w in zip(row, widths)) + '  ' + ''.join(row[8:]))
  lines += [f'*{i + 1} {reason}' for i, reason in enumerate(reasons)]
  lines.append('dry run: nothing was written' + (f' (--workdir {workdir})' if workdir else ''))
  return '\n'.join(l.rstrip() for l in lines)
