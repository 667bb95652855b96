"""Console progress of a stage and of the whole run, and the run's closing summary.

A stage's step line carries steps/s, examples/s and the stage's ETA. While a run is active (the
runner's `running(RunProgress(...))`), stage starts are announced as `[stage i/n name]` and each
step line adds the run's elapsed time and an estimate of its remaining time: the remaining
stages' planned steps at the time per example measured for their kind (on earlier stages of
that kind, finished here or loaded from an earlier process). While a remaining stage is of a
kind that has not run yet, another kind's time stands in and the estimate is marked '~'.
"""
import contextlib
import dataclasses
import logging
import time

from bitbert_jax import fs

log = logging.getLogger('bitbert_jax')
_ACTIVE = []


@dataclasses.dataclass(frozen=True)
class Planned:
  """A stage as the estimate sees it: its kind, its training steps (0: it does not train; None:
  unknown) and its batch size."""
  kind: str
  steps: int | None = 0
  batch_size: int = 1


@dataclasses.dataclass(frozen=True)
class _Spent:
  kind: str
  seconds: float
  examples: int  # examples stepped through in those seconds; 0: a stage that does not train


class RunProgress:
  """The run's stages as they start and end; `planner(name) -> Planned` is asked again for the
  stages still to come at every stage start (e.g. once augmented data exists)."""

  def __init__(self, names, planner, clock=time.monotonic):
    self.names, self._planner, self._clock = list(names), planner, clock
    self._t0 = clock()
    self.plan, self._spent, self._loaded, self._skipped = {}, {}, [], set()
    self._current, self._stage_t0, self._loop = None, None, None
    self._replan()

  def _replan(self):
    for name in self.names:
      if name not in self._spent and name not in self._skipped:
        try:
          self.plan[name] = self._planner(name)
        except Exception as e:  # pylint: disable=broad-except
          log.warning('[%s] no step count for the run estimate: %s', name, e)  # never fatal
          self.plan[name] = Planned('?', None)

  def stage_start(self, index):
    """Announces stage `index` (0-based) as `[stage i/n name]`; returns the line."""
    self._replan()
    self._current, self._stage_t0, self._loop = index, self._clock(), None
    name, p = self.names[index], self.plan[self.names[index]]
    what = p.kind + (f': {p.steps} steps of batch {p.batch_size}' if p.steps else '')
    if self._loaded and not any(n in self._spent for n in self.names if n not in self._loaded):
      what += f' | resuming: {len(self._loaded)} stages complete ({", ".join(self._loaded)})'
    line = f'[stage {index + 1}/{len(self.names)} {name}] {what} | {self.run_text()}'
    log.info(line)
    return line

  def stage_end(self, index, seconds, loaded=False, skipped=False):
    """Stage `index` ran for `seconds` (or was loaded complete, or skipped)."""
    name = self.names[index]
    if skipped:
      self._skipped.add(name)
      return
    p = self.plan.get(name) or Planned('?', None)
    steps = p.steps or 0
    if self._loop is not None and self._loop[0] == name:
      steps = self._loop[1] - self._loop[2]  # a resumed stage stepped only from its checkpoint
    if loaded:
      self._loaded.append(name)
    self._spent[name] = _Spent(p.kind, float(seconds or 0.0), steps * p.batch_size)
    if self._current == index:
      self._current, self._loop = None, None

  def loop_start(self, name, total, start, batch_size):
    """The trainer's exact step count for the running stage, and the step it starts from."""
    kind = self.plan[name].kind if name in self.plan else '?'
    self.plan[name] = Planned(kind, total, batch_size)
    self._loop = (name, total, start, self._clock())

  def remaining(self, step=None):
    """(seconds left or None when unknown, whether it is only an estimate)."""
    per_example, fixed = {}, {}
    for s in self._spent.values():
      if s.examples:
        t, n = per_example.get(s.kind, (0.0, 0))
        per_example[s.kind] = (t + s.seconds, n + s.examples)
      else:
        fixed.setdefault(s.kind, []).append(s.seconds)
    rates = {k: t / n for k, (t, n) in per_example.items()}
    left, estimate, current_rate, stepping = 0.0, False, None, None
    if self._loop is not None and step is not None:
      stepping, total, start, t0 = self._loop
      done, batch = step - start, self.plan[stepping].batch_size
      if done > 0:
        current_rate = (self._clock() - t0) / (done * batch)
        left += (total - step) * batch * current_rate
        rates.setdefault(self.plan[stepping].kind, current_rate)
    for name in self.names:
      if name in self._spent or name in self._skipped or (name == stepping and current_rate):
        continue
      p = self.plan[name]
      if p.steps is None:
        return None, True
      if not p.steps:
        known = fixed.get(p.kind)
        estimate |= known is None
        left += sum(known) / len(known) if known else 0.0
        continue
      rate = rates.get(p.kind)
      if rate is None:
        estimate = True
        rate = current_rate or (sum(rates.values()) / len(rates) if rates else None)
        if rate is None:
          return None, True
      left += p.steps * p.batch_size * rate
    return left, estimate

  def run_text(self, step=None):
    """'run 12m03s elapsed, ~40m10s left' ('?' while nothing has been measured)."""
    left, estimate = self.remaining(step)
    shown = '?' if left is None else ('~' if estimate else '') + duration(left)
    return f'run {duration(self._clock() - self._t0)} elapsed, {shown} left'


@contextlib.contextmanager
def running(run):
  """Makes `run` the one whose stages the trainer's step lines report on."""
  _ACTIVE.append(run)
  try:
    yield run
  finally:
    _ACTIVE.remove(run)


def active():
  return _ACTIVE[-1] if _ACTIVE else None


class StageProgress:
  """A stage's console step lines: steps/s, examples/s, its ETA, and the run's when one is
  active."""

  def __init__(self, stage, total_steps, start_step=0, batch_size=1, clock=time.time):
    self.stage, self.total, self.batch_size, self._clock = stage, total_steps, batch_size, clock
    self._t0, self._s0 = clock(), start_step
    self._run = active()
    if self._run is not None:
      self._run.loop_start(stage, total_steps, start_step, batch_size)

  def line(self, step, metrics):
    elapsed = max(self._clock() - self._t0, 1e-9)
    rate = (step - self._s0) / elapsed
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    shown = ' '.join(f'{k}={float(v):.4g}' for k, v in sorted(metrics.items()))
    line = (f'[{self.stage}] step {step}/{self.total} {shown} | {rate:.2f} steps/s '
            f'{rate * self.batch_size:.1f} ex/s | ETA {duration(eta)}')
    return line + (f' | {self._run.run_text(step)}' if self._run is not None else '')


def duration(seconds):
  if seconds != seconds:  # NaN: no rate yet
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def summary(results, workdir):
  """The run's closing text: each stage's dev score and time, the final student's score as a
  percentage of the teacher's, and the packed and ONNX outputs with their sizes."""
  stages = results.get('stages') or {}
  score = lambda r: ((r or {}).get('dev') or {}).get('score')
  table = [('stage', 'kind', 'bits', 'dev score', 'time')]
  for name, r in stages.items():
    s = score(r)
    table.append((name, r.get('kind', '?'), r.get('policy') or '-',
                  '-' if s is None else f'{s:.4f}', duration(r.get('seconds') or 0.0)))
  widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
  lines = [f'run summary ({workdir})']
  lines += ['  ' + '  '.join(c.rjust(w) if i >= 3 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in table]
  total = sum(r.get('seconds') or 0.0 for r in stages.values())
  lines.append(f'  time of all stages {duration(total)}')
  final = results.get('final') or {}
  student = score(final)
  teachers = [(n, score(r)) for n, r in stages.items() if r.get('kind') == 'finetune'
              and score(r) is not None]
  who = f'final student ({final.get("policy", "?")})'
  if student is None:
    lines.append(f'{who}: no dev score')
  elif teachers and teachers[-1][1]:
    name, teacher = teachers[-1]
    lines.append(f'{who}: dev score {student:.4f} = {100 * student / teacher:.1f}% of the '
                 f'teacher\'s {teacher:.4f} (stage {name})')
  else:
    lines.append(f'{who}: dev score {student:.4f} (the teacher was not evaluated in this run)')
  lines += _outputs(workdir)
  return '\n'.join(lines)


def _outputs(workdir):
  packed, onnx_dir = fs.join(workdir, 'packed'), fs.join(workdir, 'onnx')
  if not fs.isdir(packed):
    return ['packed: none written (a float student, or config.export.packed=False)']
  lines = [f'packed: {packed} ({size(_dir_bytes(packed))})']
  model = fs.join(onnx_dir, 'model.onnx')
  if fs.isfile(model):
    lines.append(f'onnx: {model} ({size(fs.getsize(model))}; directory '
                 f'{size(_dir_bytes(onnx_dir))})')
  else:
    lines.append(f'onnx: not exported; python -m bitbert_jax.export --format=onnx '
                 f'--checkpoint={packed} --out={onnx_dir}')
  return lines


def _dir_bytes(directory):
  return sum(fs.getsize(fs.join(directory, rel)) for rel in fs.files(directory))


def size(n):
  return f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{n / 2**10:.1f} KiB'
