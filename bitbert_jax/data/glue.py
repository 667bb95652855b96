"""GLUE splits from the official TSV layout (or the HF hub), and user splits from tsv/csv/jsonl."""

import collections
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import socket
import sys
import urllib.parse
from typing import Any, Callable, Iterator, Sequence

import datasets

from bitbert_jax.data import tasks as tasks_lib
from bitbert_jax.errors import BitbertError

# GLUE sentences are short, but csv's default 128 KiB field cap is hit by some user corpora.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

HUB_DATASET = 'nyu-mll/glue'
log = logging.getLogger('bitbert_jax')

_TASK_DIRS = {
    'cola': 'CoLA', 'sst2': 'SST-2', 'mrpc': 'MRPC', 'qqp': 'QQP', 'stsb': 'STS-B',
    'mnli': 'MNLI', 'qnli': 'QNLI', 'rte': 'RTE', 'wnli': 'WNLI',
}
_SPLIT_FILES = {'train': 'train.tsv', 'validation': 'dev.tsv', 'test': 'test.tsv'}
_MNLI_SPLIT_FILES = {
    'train': 'train.tsv',
    'validation_matched': 'dev_matched.tsv', 'validation_mismatched': 'dev_mismatched.tsv',
    'test_matched': 'test_matched.tsv', 'test_mismatched': 'test_mismatched.tsv',
}


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where a task's fields live in its TSV: header names, or an int position (-1 = last)."""
  text_columns: tuple[str, ...]
  label_column: str | int
  # Column names for header-less files (CoLA train/dev); None means the file has a header.
  headerless_names: tuple[str, ...] | None = None


_LAYOUTS = {
    'cola': _Layout(('sentence',), 'label', ('source', 'label', 'original_mark', 'sentence')),
    'sst2': _Layout(('sentence',), 'label'),
    'mrpc': _Layout(('#1 String', '#2 String'), 'Quality'),
    'qqp': _Layout(('question1', 'question2'), 'is_duplicate'),
    'stsb': _Layout(('sentence1', 'sentence2'), -1),
    'mnli': _Layout(('sentence1', 'sentence2'), 'gold_label'),
    'qnli': _Layout(('question', 'sentence'), 'label'),
    'rte': _Layout(('sentence1', 'sentence2'), 'label'),
    'wnli': _Layout(('sentence1', 'sentence2'), 'label'),
}


def split_names(task: 'str | tasks_lib.TaskSpec') -> tuple[str, ...]:
  """Valid split names of a GLUE task (MNLI has matched/mismatched dev and test)."""
  task = tasks_lib.get_task(task)
  return tuple(_MNLI_SPLIT_FILES if task.name == 'mnli' else _SPLIT_FILES)


def _features(text_fields: Sequence[str], regression: bool) -> datasets.Features:
  feats = {f: datasets.Value('string') for f in text_fields}
  feats['label'] = datasets.Value('float32' if regression else 'int64')
  return datasets.Features(feats)


def parse_label(value: Any, label_names: Sequence[str] | None, regression: bool,
                where: str) -> float | int:
  """Parses one label: a class name or integer index, or a float for regression.

  Args:
    value: the raw cell (string from tsv/csv; str/int/float from jsonl).
    label_names: valid class names in index order; None with `regression=False` means any
      non-negative integer index.
    regression: parse a finite float.
    where: 'path:line' for the error message.

  Returns:
    int class index or float target.
  """
  text = str(value).strip()
  if regression:
    try:
      if isinstance(value, bool):
        raise ValueError
      out = float(text)
      if not math.isfinite(out):
        raise ValueError
      return out
    except ValueError:
      raise BitbertError(f'{where}: regression label {text!r} is not a finite number') from None
  if label_names is not None and text in label_names:
    return label_names.index(text)
  n = None if label_names is None else len(label_names)
  if not isinstance(value, (bool, float)) and text.isdigit() and (n is None or int(text) < n):
    return int(text)
  if label_names is None:
    valid = 'a non-negative integer class index'
  else:
    valid = f'one of {list(label_names)} or an index 0..{n - 1}'
  raise BitbertError(f'{where}: bad label {text!r}; valid labels: {valid}')


def _read_rows(path: str, delimiter: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
  """Yields (line number, row) from a delimited file, BOM stripped, blank lines skipped."""
  try:
    fh = open(path, encoding='utf-8-sig', newline='')
  except OSError as e:
    raise BitbertError(f'{path}: cannot open ({e.strerror})') from None
  with fh:
    reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
    line = 0
    try:
      for row in reader:
        line = reader.line_num
        if row:
          yield line, row
    except UnicodeDecodeError as e:
      raise BitbertError(f'{path}:{line + 1}: not UTF-8 text ({e.reason} at byte {e.start} '
                         'of the read block)') from None
    except csv.Error as e:
      raise BitbertError(f'{path}:{reader.line_num}: malformed row ({e})') from None


def _column_index(path: str, header: list[str], column: str | int, what: str,
                  named: bool = False) -> int:
  if isinstance(column, int):
    return column % len(header)
  if column not in header:
    if named:  # a headerless file: the names came from the caller (config.task.columns)
      raise BitbertError(f'{path}: no {what} column {column!r} among the columns given for '
                         f'this headerless file: {header}')
    raise BitbertError(f'{path}:1: header has no {what} column {column!r}; '
                       f'header columns: {header}')
  return header.index(column)


def _label_parser(label_names: Sequence[str] | None, regression: bool) -> Callable:
  """(value, 'path:line') -> label, for `_read_table` and `_read_jsonl`."""
  return lambda value, where: parse_label(value, label_names, regression, where)


def _raw_label(value: Any, where: str) -> tuple[str, str]:
  """A label kept as read (its text and 'path:line'), for labels inferred from the file."""
  return str(value).strip(), where


def _read_table(path: str, text_columns: Sequence[str], label_column: str | int | None,
                parse: Callable, unlabeled: Any, delimiter: str, quoting: int,
                headerless_names: Sequence[str] | None = None,
                out_fields: Sequence[str] | None = None) -> dict[str, list]:
  """Reads a delimited file into {field: values, 'label': values} with row-level checks.

  `parse(value, 'path:line')` reads a label cell; rows of a file without labels get `unlabeled`.
  """
  out_fields = list(out_fields or text_columns)
  rows = _read_rows(path, delimiter, quoting)
  if headerless_names is None:
    first = next(rows, None)
    if first is None:
      raise BitbertError(f'{path}: empty split (no header and no rows)')
    header = [h.strip() for h in first[1]]
  else:
    header = list(headerless_names)
  named = headerless_names is not None
  text_idx = [_column_index(path, header, c, 'text', named) for c in text_columns]
  label_idx = None
  if label_column is not None:
    label_idx = _column_index(path, header, label_column, 'label', named)
  cols = {f: [] for f in out_fields}
  labels = []
  for line, row in rows:
    if len(row) != len(header):
      raise BitbertError(f'{path}:{line}: expected {len(header)} tab/comma-separated columns '
                         f'{header}, got {len(row)}')
    for f, i in zip(out_fields, text_idx):
      cols[f].append(row[i])
    if label_idx is None:
      labels.append(unlabeled)
    else:
      labels.append(parse(row[label_idx], f'{path}:{line}'))
  if not labels:
    raise BitbertError(f'{path}: empty split (no data rows)')
  cols['label'] = labels
  return cols


def _task_dir(task: tasks_lib.TaskSpec, glue_dir: str, filename: str) -> str:
  """`glue_dir` may be the GLUE root (holding 'MRPC/') or the task folder itself."""
  sub = os.path.join(glue_dir, _TASK_DIRS[task.name])
  if os.path.isdir(sub) or not os.path.isfile(os.path.join(glue_dir, filename)):
    return sub
  return glue_dir


def _missing_file_error(path: str, split: str) -> BitbertError:
  folder = os.path.dirname(path)
  if os.path.isdir(folder):
    present = sorted(os.listdir(folder))
    found = f'files in {folder}: {present}' if present else f'{folder} is empty'
  else:
    parent = os.path.dirname(folder)
    listing = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    found = f'folder {folder} does not exist (entries in {parent}: {listing})'
  return BitbertError(f'{path}: missing file for split {split!r}; {found}')


def load_split(task: 'str | tasks_lib.TaskSpec', split: str,
               glue_dir: str | None = None) -> datasets.Dataset:
  """Loads one GLUE split as a `datasets.Dataset`.

  Args:
    task: GLUE task name (any alias) or TaskSpec.
    split: 'train', 'validation', 'test' ('validation_matched', 'validation_mismatched',
      'test_matched', 'test_mismatched' for MNLI).
    glue_dir: folder with the official GLUE TSVs (root with per-task folders, or one task
      folder). None loads `nyu-mll/glue` from the Hugging Face hub.

  Returns:
    Dataset with columns `task.text_fields` (string) and 'label' (int64 class index, or
    float32 for STS-B; -1 on unlabeled test splits).
  """
  task = tasks_lib.get_task(task)
  if task.name not in _LAYOUTS:
    raise BitbertError(f'task {task.name!r} is not a GLUE task; use load_custom_split for '
                       f'user data; GLUE tasks: {", ".join(_LAYOUTS)}')
  files = _MNLI_SPLIT_FILES if task.name == 'mnli' else _SPLIT_FILES
  if split not in files:
    raise BitbertError(f'task {task.name!r}: unknown split {split!r}; valid splits: '
                       f'{", ".join(files)}')
  if glue_dir is None:
    return _load_hub_split(task, split)
  path = os.path.join(_task_dir(task, os.fspath(glue_dir), files[split]), files[split])
  if not os.path.isfile(path):
    raise _missing_file_error(path, split)
  layout = _LAYOUTS[task.name]
  is_test = split.startswith('test')
  cols = _read_table(
      path, layout.text_columns,
      label_column=None if is_test else layout.label_column,
      parse=_label_parser(task.label_names, task.is_regression),
      unlabeled=-1.0 if task.is_regression else -1, delimiter='\t', quoting=csv.QUOTE_NONE,
      # Official test files (CoLA's too) carry a header.
      headerless_names=None if is_test else layout.headerless_names,
      out_fields=task.text_fields)
  return datasets.Dataset.from_dict(cols, features=_features(task.text_fields,
                                                             task.is_regression))


@functools.lru_cache(maxsize=1)
def hub_offline() -> str | None:
  """Why the Hugging Face hub cannot be used (offline flag set, or unreachable), else None.

  Asked once per process, so an offline run says so once instead of retrying every file.
  """
  for var in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
    if os.environ.get(var, '').strip().lower() in ('1', 'true', 'yes', 'on'):
      return f'{var} is set'
  if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
    return None  # only the proxy can tell; let the hub client try
  url = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT') or 'https://huggingface.co')
  try:
    socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
  except OSError as e:
    return f'{url.hostname} unreachable: {e.strerror or e}'
  return None


def _load_hub_split(task: tasks_lib.TaskSpec, split: str) -> datasets.Dataset:
  """`nyu-mll/glue` already uses our field names; keep them plus a cast 'label'."""
  try:
    ds = datasets.load_dataset(HUB_DATASET, task.name, split=split)
  except Exception as e:  # Hub/network/cache errors come in many types.
    raise BitbertError(f'could not load {HUB_DATASET}/{task.name} split {split!r} from the '
                       f'Hugging Face hub ({type(e).__name__}: {e}); pass glue_dir= to read '
                       'local GLUE TSVs instead') from None
  missing = [c for c in (*task.text_fields, 'label') if c not in ds.column_names]
  if missing:
    raise BitbertError(f'{HUB_DATASET}/{task.name}: columns {missing} missing; '
                       f'got {ds.column_names}')
  ds = ds.select_columns([*task.text_fields, 'label'])
  return ds.cast(_features(task.text_fields, task.is_regression))


def _read_jsonl(path: str, text_columns: Sequence[str], label_column: str | None,
                parse: Callable, unlabeled: Any) -> dict[str, list]:
  cols = {c: [] for c in text_columns}
  labels = []
  try:
    fh = open(path, 'rb')
  except OSError as e:
    raise BitbertError(f'{path}: cannot open ({e.strerror})') from None
  with fh:
    for line_no, raw in enumerate(fh, start=1):
      where = f'{path}:{line_no}'
      try:
        text = raw.decode('utf-8-sig' if line_no == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        raise BitbertError(f'{where}: not UTF-8 text (bad byte at offset {e.start} '
                           'in the line)') from None
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise BitbertError(f'{where}: invalid JSON ({e.msg} at column {e.colno})') from None
      if not isinstance(obj, dict):
        raise BitbertError(f'{where}: expected a JSON object per line, got '
                           f'{type(obj).__name__}')
      needed = [*text_columns, *([label_column] if label_column is not None else [])]
      missing = [c for c in needed if c not in obj]
      if missing:
        raise BitbertError(f'{where}: missing keys {missing}; keys present: {sorted(obj)}')
      for c in text_columns:
        if not isinstance(obj[c], str):
          raise BitbertError(f'{where}: field {c!r} must be a string, got '
                             f'{type(obj[c]).__name__}')
        cols[c].append(obj[c])
      if label_column is None:
        labels.append(unlabeled)
      else:
        labels.append(parse(obj[label_column], where))
  if not labels:
    raise BitbertError(f'{path}: empty split (no data rows)')
  cols['label'] = labels
  return cols


def load_custom_split(path: str, text_columns: 'Sequence[str] | str',
                      label_column: str | None,
                      label_names: Sequence[str] | None = None,
                      regression: bool = False,
                      columns: Sequence[str] | None = None) -> datasets.Dataset:
  """Loads a user split from .tsv/.csv (with a header, or `columns`) or .jsonl (an object a line).

  Args:
    path: data file; the format comes from the extension.
    text_columns: one or two column names holding the input texts.
    label_column: column holding the label; None for unlabeled data (label -1).
    label_names: class names; labels may be these names or integer indices. None (and
      `regression=False`) accepts any non-negative integer index.
    regression: labels are floats.
    columns: names of a headerless .tsv/.csv file's columns, in order (e.g. ('label', 'text'));
      None: its first row is the header.

  Returns:
    Dataset with columns `text_columns` (string) and 'label' (int64, or float32 if regression).
  """
  if isinstance(text_columns, str):
    text_columns = (text_columns,)
  if label_names is not None:
    label_names = tuple(str(n) for n in label_names)
  cols = _read_custom(path, tuple(text_columns), label_column,
                      _label_parser(label_names, regression), -1.0 if regression else -1, columns)
  return datasets.Dataset.from_dict(cols, features=_features(text_columns, regression))


def _read_custom(path: str, text_columns: tuple[str, ...], label_column: str | None,
                 parse: Callable, unlabeled: Any,
                 columns: Sequence[str] | None) -> dict[str, list]:
  """A user file's {text column: values, 'label': parsed labels}; see `load_custom_split`."""
  path = os.fspath(path)
  if len(text_columns) not in (1, 2):
    raise BitbertError(f'{path}: text_columns must name one or two columns, '
                       f'got {list(text_columns)}')
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.tsv', '.csv', '.jsonl'):
    raise BitbertError(f'{path}: unsupported extension {ext!r}; valid: .tsv, .csv, .jsonl')
  if not os.path.isfile(path):
    raise _missing_file_error(os.path.abspath(path), 'custom')
  if columns is not None:
    columns = tuple(columns)
    if ext == '.jsonl':
      raise BitbertError(f'{path}: column names {list(columns)} are for headerless .tsv/.csv '
                         'files; a .jsonl line names its own fields')
    if len(set(columns)) != len(columns) or not all(columns):
      raise BitbertError(f'{path}: column names {list(columns)} must be distinct and non-empty')
  if ext == '.jsonl':
    return _read_jsonl(path, text_columns, label_column, parse, unlabeled)
  # TSVs in the wild (GLUE included) hold stray quotes; CSV needs quoting for commas.
  return _read_table(path, text_columns, label_column, parse, unlabeled,
                     delimiter='\t' if ext == '.tsv' else ',',
                     quoting=csv.QUOTE_NONE if ext == '.tsv' else csv.QUOTE_MINIMAL,
                     headerless_names=columns)


def load_custom_task(name: str, train_file: str, dev_file: str, text_columns: Sequence[str],
                     label_column: str = 'label', label_names: Sequence[str] | None = None,
                     problem: str = 'auto', columns: Sequence[str] | None = None
                     ) -> tuple[tasks_lib.TaskSpec, datasets.Dataset, datasets.Dataset]:
  """A user task and its train and dev splits; labels inferred from train without label_names.

  Args:
    name: the task's name.
    train_file, dev_file: .tsv/.csv/.jsonl files (see `load_custom_split`).
    text_columns: one or two text column names.
    label_column: the label column.
    label_names: class names in index order; None infers them from `train_file`.
    problem: 'auto' (integers or names: classes, sorted, numerically when all are integers;
      non-integer numbers: a regression), 'classification' or 'regression'.
    columns: a headerless file's column names, in order.

  Returns:
    (TaskSpec, train Dataset, dev Dataset). Without label_names one log line says what was
    inferred; a dev label that no training row has is an error naming the file and line.
  """
  tasks_lib.check_problem(problem, ','.join(label_names or ()))
  text_columns = tuple(text_columns)
  if label_names or problem == 'regression':
    task = tasks_lib.custom_task(name, text_columns, label_names or None)
    load = lambda path: load_custom_split(path, text_columns, label_column, task.label_names,
                                          task.is_regression, columns)
    if task.is_regression:
      log.info('task %s: a regression (config.task.problem=regression)', task.name)
    return task, load(train_file), load(dev_file)
  read = lambda path: _read_custom(path, text_columns, label_column, _raw_label, None, columns)
  train, dev = read(train_file), read(dev_file)
  names = tasks_lib.infer_label_names([text for text, _ in train['label']], problem,
                                      os.fspath(train_file))
  task = tasks_lib.custom_task(name, text_columns, names)
  for cols in (train, dev):
    cols['label'] = _classes_or_targets(names, cols['label'], train_file)
  log.info('task %s: %s', task.name, _inferred(task, train['label'], dev['label'], train_file))
  make = lambda cols: datasets.Dataset.from_dict(cols, features=_features(
      text_columns, task.is_regression))
  return task, make(train), make(dev)


def _classes_or_targets(names: tuple[str, ...] | None, raw: list[tuple[str, str]],
                        train_file: str) -> list:
  """Class indices of (label text, 'path:line') pairs, or their floats for a regression."""
  if names is None:
    return [parse_label(text, None, True, where) for text, where in raw]
  index = {tasks_lib.label_key(n): i for i, n in enumerate(names)}
  out = []
  for text, where in raw:
    i = index.get(tasks_lib.label_key(text))
    if i is None:
      raise BitbertError(f'{where}: label {text!r} does not occur in the training file '
                         f'{train_file}; its classes: {list(names)}')
    out.append(i)
  return out


def _inferred(task: tasks_lib.TaskSpec, train: list, dev: list, train_file: str) -> str:
  """The log line that says how the labels of `train_file` were read, and how to choose."""
  if task.is_regression:
    return (f'labels of {train_file} read as a REGRESSION (non-integer numbers, '
            f'{min(train):g} to {max(train):g}); set config.task.problem=classification to '
            'take each value as a class')
  counts = collections.Counter(train)
  dev_counts = collections.Counter(dev)
  top, top_n = dev_counts.most_common(1)[0]
  per_class = ', '.join(f'{n!r}: {counts[i]}' for i, n in enumerate(task.label_names))
  return (f'labels of {train_file} read as CLASSIFICATION, {task.num_labels} classes in index '
          f'order {list(task.label_names)} (train rows per class: {per_class}); the dev '
          f'majority class {task.label_names[top]!r} is {top_n / len(dev):.1%} of its '
          f'{len(dev)} rows; set config.task.problem=regression for numeric targets, or '
          'config.task.label_names=A,B,... to name the classes')
