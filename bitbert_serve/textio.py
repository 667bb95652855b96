"""The prediction CLIs' input and output: one text (or pair) per input line, one line out each.

Standard library only: `bitbert_jax.predict` (JAX) and `bitbert_serve` (ONNX Runtime, no JAX)
share their flags, input reading and output here (`run`), so both keep one output line per input
line, or stop with one error naming the line:
  * an empty line is an empty text when one column is read, and an error when two are;
  * a line that is not UTF-8 is an error naming the line and the byte (not a traceback).
"""
import sys

from bitbert_serve.errors import BitbertError



def _decoded_lines(data, where):
  """Bytes -> list of str lines (BOM dropped, '\\r\\n' or '\\n' ends); BitbertError at the first
  line that is not UTF-8."""
  if data.startswith(b'\xef\xbb\xbf'):
    data = data[3:]
  raw = data.split(b'\n')
  if raw and raw[-1] == b'':  # the final newline ends the last line; it starts none
    raw.pop()
  lines = []
  for number, line in enumerate(raw, start=1):
    line = line[:-1] if line.endswith(b'\r') else line
    try:
      lines.append(line.decode('utf-8'))
    except UnicodeDecodeError as e:
      raise BitbertError(f'{where}:{number}: not UTF-8 text (byte 0x{line[e.start]:02x} at '
                         f'column {e.start + 1}); save the input as UTF-8') from None
  return lines


def _read_bytes(path_or_file):
  if path_or_file == '-':  # bytes: the text layer would hide bad bytes as surrogates
    path_or_file = getattr(sys.stdin, 'buffer', sys.stdin)
  if hasattr(path_or_file, 'read'):
    data = path_or_file.read()
    # surrogateescape gives back the bytes a text layer could not decode, to be named below
    return data.encode('utf-8', 'surrogateescape') if isinstance(data, str) else data
  try:
    with open(path_or_file, 'rb') as f:
      return f.read()
  except OSError as e:
    raise BitbertError(f'input {path_or_file}: cannot read ({e.strerror})') from None


def _column(header, col, where):
  if header is None or str(col).lstrip('-').isdigit():
    try:
      return int(col)
    except ValueError:
      raise BitbertError(f'{where}: column {col!r}: the input has no header; give column '
                         f'numbers (0-based)') from None
  if col not in header:
    raise BitbertError(f'{where}: no column {col!r}; columns: {", ".join(header)}')
  return header.index(col)


def read_texts(path_or_file, text_columns=None, header=True, label_column=None):
  """Reads a TSV of inputs (GLUE layout: tab-separated, quotes are literal characters), one item per line.

  Args:
    path_or_file: file path, '-' for stdin, or an open file (text or binary).
    text_columns: one or two column names (or 0-based numbers); default: every column of a
      file that has one or two.
    header: the first row names the columns.
    label_column: also return this column's values (e.g. 'Quality' for MRPC).

  Returns:
    list of str (one column) or of (a, b) tuples, exactly one per data line; with
    label_column, (texts, labels).
  """
  where = '<stdin>' if path_or_file == '-' else getattr(path_or_file, 'name', path_or_file)
  lines = _decoded_lines(_read_bytes(path_or_file), where)
  rows = [line.split('\t') for line in lines]  # csv's QUOTE_NONE TSV, one row per line
  names = rows.pop(0) if header and rows else None
  width = len(names) if names else (len(rows[0]) if rows else 0)
  if text_columns is None:
    if width not in (1, 2):
      raise BitbertError(f'{where}: {width} columns; say which hold the text with '
                         f'--text_columns (columns: {", ".join(names or map(str, range(width)))})')
    text_columns = list(range(width))
  if isinstance(text_columns, str):
    text_columns = [text_columns]
  if len(text_columns) not in (1, 2):
    raise BitbertError(f'text_columns {list(text_columns)}: give one or two columns')
  idx = [_column(names, c, where) for c in text_columns]
  lab = None if label_column is None else _column(names, label_column, where)
  need = max(idx + ([lab] if lab is not None else [])) + 1
  texts, labels = [], []
  for line, row in enumerate(rows, start=2 if names else 1):
    if len(row) < need:
      what = 'empty line' if row == [''] else f'{len(row)} field{"s" * (len(row) != 1)}'
      raise BitbertError(f'{where}:{line}: {what}; need {need} tab-separated fields (one '
                         f'output line per input line: remove or fill this line)')
    texts.append(row[idx[0]] if len(idx) == 1 else (row[idx[0]], row[idx[1]]))
    if lab is not None:
      labels.append(row[lab])
  return (texts, labels) if label_column is not None else texts


def text_columns(cols):
  """`--text_columns 0 1` or `--text_columns 0,1` -> ['0', '1'] (None stays None)."""
  if cols and len(cols) == 1 and ',' in cols[0]:
    return cols[0].split(',')
  return cols


def write_predictions(labels, logits, with_logits=False, out=None):
  """One line per input line: the label, then its logits when asked."""
  out = out or sys.stdout
  for label, row in zip(labels, logits):
    extra = '\t' + '\t'.join(f'{v:.6g}' for v in row) if with_logits else ''
    print(f'{label}{extra}', file=out)


def add_arguments(parser):
  """The input and output flags both CLIs share (predict under JAX, serve under ONNX Runtime)."""
  parser.add_argument('--input', default='-', help='TSV file with a header row, or - (stdin)')
  parser.add_argument('--text_columns', nargs='+', default=None,
                      help='one or two column names (or 0-based numbers with --no_header)')
  parser.add_argument('--no_header', action='store_true', help='the input has no header row')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--max_length', type=int, default=128)
  parser.add_argument('--logits', action='store_true', help='also print the logits')


def run(args, load, predict):
  """The body of both CLIs: read the inputs, load(), predict(model, texts, batch_size,
  max_length), print one line per input; 0, or 1 after printing the BitbertError's one line."""
  try:
    texts = read_texts(args.input, text_columns(args.text_columns), header=not args.no_header)
    model = load()
    logits, labels = predict(model, texts, args.batch_size, args.max_length)
  except BitbertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  write_predictions(labels, logits, args.logits)
  return 0
