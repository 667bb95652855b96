"""TinyBERT data augmentation: word replacements from a masked LM or word-embedding neighbours.

Each sentence field is split into words at whitespace and punctuation. Stop words and
non-alphabetic tokens are never touched. Every other word gets a candidate list:

* a word that is one WordPiece: the top-K predictions of a masked LM for that position,
  when an `mlm_fn` is given (our Flax checkpoints carry no MLM head, so by default there is
  none);
* otherwise (several pieces, [UNK], no MLM, or no usable MLM prediction): its K nearest
  neighbours (cosine) in a word-embedding table: a GloVe text file, or the checkpoint's own
  WordPiece input embeddings restricted to whole-word vocabulary entries.

Each word position is then replaced with probability p by a uniformly chosen candidate, N
times per example; the original comes first, so every example yields N + 1 rows.

Labels: augmented rows carry the original example's label only as a placeholder. The
distillation stages that train on augmented data use the teacher's outputs as targets and
never read these labels (REFERENCE.md section 6).
"""

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Callable, Iterable, Mapping, Sequence

import datasets
import jax
import numpy as np

from bitbert_jax import fs
from bitbert_jax import preempt
from bitbert_jax.data import tasks as tasks_lib
from bitbert_jax.data import tokenize as tokenize_lib
from bitbert_jax.errors import BitbertError

log = logging.getLogger('bitbert_jax')

# A masked-LM scorer: token id lists, each holding one [MASK], -> [n, M] candidate ids for the
# masked position, best first (M >= K leaves room for the filtering below).
MlmFn = Callable[[list[list[int]]], 'np.ndarray | Sequence[Sequence[int]]']

# NLTK's English list: function words whose replacement breaks grammar rather than adding variety.
STOP_WORDS = frozenset("""
a about above after again against ain all am an and any are aren aren't as at be because been
before being below between both but by can couldn couldn't d did didn didn't do does doesn
doesn't doing don don't down during each few for from further had hadn hadn't has hasn hasn't
have haven haven't having he her here hers herself him himself his how i if in into is isn isn't
it it's its itself just ll m ma me mightn mightn't more most mustn mustn't my myself needn
needn't no nor not now o of off on once only or other our ours ourselves out over own re s same
shan shan't she she's should should've shouldn shouldn't so some such t than that that'll the
their theirs them themselves then there these they this those through to too under until up ve
very was wasn wasn't we were weren weren't what when where which while who whom why will with
won won't wouldn wouldn't y you you'd you'll you're you've your yours yourself yourselves
""".split())

# Words and single punctuation marks; everything between matches is kept verbatim.
_TOKEN_RE = re.compile(r'\w+|[^\w\s]')
# Bump when the augmentation algorithm changes, so old caches are rebuilt.
_CACHE_VERSION = 1
# GloVe files are frequency-sorted; rarer words make poor replacements and slow the search.
GLOVE_POOL = 100_000
# Masked sequences per mlm_fn call, and the context cap around the mask.
_MLM_BATCH = 256
_MLM_MAX_LENGTH = 512
# Query rows per similarity matmul: bounds the [rows, pool] score matrix to ~128 MiB.
_SIM_BUDGET = 1 << 25


def is_candidate(token: str) -> bool:
  """Replaceable: purely alphabetic and not a stop word."""
  return token.isalpha() and token.lower() not in STOP_WORDS


def _is_pool_word(token: str) -> bool:
  """A usable replacement: a whole alphabetic word of 2+ letters that is not a stop word."""
  return len(token) > 1 and is_candidate(token)


def split_words(text: str) -> tuple[list[str], list[str]]:
  """(pieces, words): replaceable words and the verbatim text around them.

  `pieces` has len(words) + 1 entries and ''.join(interleaved) == text.
  """
  pieces, words, last = [], [], 0
  for m in _TOKEN_RE.finditer(text):
    if is_candidate(m.group()):
      pieces.append(text[last:m.start()])
      words.append(m.group())
      last = m.end()
  pieces.append(text[last:])
  return pieces, words


def _join(pieces: Sequence[str], words: Sequence[str]) -> str:
  out = [pieces[0]]
  for w, p in zip(words, pieces[1:]):
    out += (w, p)
  return ''.join(out)


def _match_case(source: str, word: str) -> str:
  """Carries the source word's capitalisation over (uncased vocabularies are lowercase)."""
  if len(source) > 1 and source.isupper():
    return word.upper()
  if source[:1].isupper():
    return word[:1].upper() + word[1:]
  return word


def candidate_words(texts: Iterable[str]) -> set[str]:
  """Lowercased replaceable words occurring in `texts` (the neighbour-search queries)."""
  return {w.lower() for t in texts for w in split_words(t)[1]}


def check_settings(copies, probability, candidates, field):
  if not isinstance(copies, (int, np.integer)) or isinstance(copies, bool) or copies < 0:
    raise BitbertError(f'{field}.copies={copies!r}: need an int >= 0 (augmented copies per '
                       'example, 20 in TinyBERT)')
  if not isinstance(probability, (int, float)) or not 0.0 <= probability <= 1.0:
    raise BitbertError(f'{field}.probability={probability!r}: need a number in [0, 1] '
                       '(per-word replacement probability, 0.4 in TinyBERT)')
  if not isinstance(candidates, (int, np.integer)) or isinstance(candidates, bool) \
      or candidates < 1:
    raise BitbertError(f'{field}.candidates={candidates!r}: need an int >= 1 (candidates per '
                       'word, 15 in TinyBERT)')


def _single_pieces(words: Sequence[str], tokenizer) -> dict[str, bool]:
  """Whether each word is exactly one known WordPiece (the masked-LM case)."""
  if not words:
    return {}
  ids = tokenizer(list(words), add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False)['input_ids']
  unk = tokenizer.unk_token_id
  return {w: len(i) == 1 and i[0] != unk for w, i in zip(words, ids)}


def _mlm_candidates(parsed, tokenizer, mlm_fn, single, candidates):
  """{(text index, word index): [words]} from the masked LM for one-piece words."""
  jobs, masked = [], []
  for t, (pieces, words) in enumerate(parsed):
    for j, w in enumerate(words):
      if single.get(w):
        jobs.append((t, j))
        masked.append(_join(pieces, words[:j] + [tokenizer.mask_token] + words[j + 1:]))
  if not jobs:
    return {}
  mask_id = tokenizer.mask_token_id
  vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
  specials = set(tokenizer.all_special_ids)
  out = {}
  for start in range(0, len(jobs), _MLM_BATCH):
    preempt.check('augmentation')
    ids = tokenizer(masked[start:start + _MLM_BATCH], truncation=True,
                    max_length=_MLM_MAX_LENGTH, return_attention_mask=False,
                    return_token_type_ids=False)['input_ids']
    # Truncation can cut the mask off a very long text: those words fall back to neighbours.
    keep = [k for k, x in enumerate(ids) if mask_id in x]
    if not keep:
      continue
    ranked = np.asarray(mlm_fn([ids[k] for k in keep]))
    if ranked.ndim != 2 or len(ranked) != len(keep):
      raise BitbertError(f'mlm_fn returned shape {ranked.shape} for {len(keep)} masked '
                         'sequences; it must return [n, M] ranked candidate ids')
    for k, row in zip(keep, ranked):
      t, j = jobs[start + k]
      word = parsed[t][1][j].lower()
      cands = []
      for i in row:
        tok = vocab[int(i)] if 0 <= int(i) < len(vocab) else ''
        if int(i) not in specials and _is_pool_word(tok) and tok.lower() != word \
            and tok not in cands:
          cands.append(tok)
        if len(cands) == candidates:
          break
      if cands:
        out[(t, j)] = cands
  return out


def augment_texts(texts: Sequence[str], tokenizer, mlm_fn: MlmFn | None,
                  neighbours: Mapping[str, Sequence[str]], rng: np.random.Generator,
                  copies: int, probability: float, candidates: int,
                  field: str = 'augment') -> list[list[str]]:
  """Augments one sentence field.

  Args:
    texts: the field's sentences.
    tokenizer: fast BERT tokenizer (decides which words are one WordPiece; masks for mlm_fn).
    mlm_fn: masked-LM scorer for one-piece words (see `MlmFn`), or None to use `neighbours`
      for every word.
    neighbours: lowercased word -> replacement words, nearest first (`nearest_neighbours`).
    rng: the only source of randomness; the same generator state gives the same output.
    copies: N augmented copies per text.
    probability: p, the chance that each replaceable word is replaced in a copy.
    candidates: K, how many top candidates a replacement is drawn from.
    field: config path for error messages.

  Returns:
    Per text, N + 1 strings: the original, then N augmented copies.
  """
  check_settings(copies, probability, candidates, field)
  parsed = [split_words(t) for t in texts]
  uniq = sorted({w for _, words in parsed for w in words})
  mlm = {}
  if mlm_fn is not None:
    mlm = _mlm_candidates(parsed, tokenizer, mlm_fn, _single_pieces(uniq, tokenizer),
                          candidates)
  out = []
  for t, (text, (pieces, words)) in enumerate(zip(texts, parsed)):
    preempt.check('augmentation')
    cands = [mlm.get((t, j)) or list(neighbours.get(w.lower(), ()))[:candidates]
             for j, w in enumerate(words)]
    n = np.array([len(c) for c in cands], np.int64)
    hit = rng.random((copies, len(words))) < probability
    pick = (rng.random((copies, len(words))) * n).astype(np.int64)
    rows = [text]
    for c in range(copies):
      new = [_match_case(w, cands[j][pick[c, j]]) if hit[c, j] and n[j] else w
             for j, w in enumerate(words)]
      rows.append(_join(pieces, new))
    out.append(rows)
  return out


def nearest_neighbours(queries: Mapping[str, np.ndarray], pool_words: Sequence[str],
                       pool_vectors: np.ndarray, k: int) -> dict[str, list[str]]:
  """Top-k cosine neighbours of each query among the pool, the word itself excluded.

  Args:
    queries: word -> [D] vector.
    pool_words: [V] candidate words.
    pool_vectors: [V, D] their vectors.
    k: neighbours per query.

  Returns:
    word -> up to k pool words, most similar first.
  """
  if not queries or not len(pool_words):
    return {}
  words = sorted(queries)
  q = np.stack([queries[w] for w in words]).astype(np.float32)
  p = np.asarray(pool_vectors, np.float32)
  q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
  index = {w.lower(): i for i, w in enumerate(pool_words)}
  self_idx = np.array([index.get(w.lower(), -1) for w in words])
  k = min(k, len(pool_words))
  out = {}
  rows = max(1, _SIM_BUDGET // len(pool_words))
  for s in range(0, len(words), rows):
    sims = q[s:s + rows] @ p.T
    mine = self_idx[s:s + rows]
    r = np.nonzero(mine >= 0)[0]
    sims[r, mine[r]] = -np.inf
    top = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k:]
    top_sims = np.take_along_axis(sims, top, axis=1)
    top = np.take_along_axis(top, np.argsort(-top_sims, axis=1, kind='stable'), axis=1)
    for i, row in enumerate(top):
      out[words[s + i]] = [pool_words[j] for j in row
                           if np.isfinite(sims[i, j]) and pool_words[j].lower() != words[s + i]]
  return out


def load_glove(path: str, keep: 'set[str] | None' = None,
               pool_size: int = GLOVE_POOL) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
  """Reads a GloVe text file ('word v1 v2 ... vD' per line; a word2vec 'N D' header is skipped).

  Args:
    path: the file.
    keep: lowercased words whose vectors are wanted as queries (None: none).
    pool_size: the first this many usable words form the replacement pool.

  Returns:
    (pool words, [V, D] pool vectors, {query word: vector}).
  """
  keep = keep or set()
  try:
    fh = open(path, encoding='utf-8', errors='strict')
  except OSError as e:
    raise BitbertError(f'GloVe file {path}: cannot open ({e.strerror}); set the augment '
                       "stage's glove to a GloVe text file, or '' for the model's embeddings"
                       ) from None
  dim, first = None, 0
  pool_words, pool_vecs, queries, seen = [], [], {}, set()
  with fh:
    line_no = 0
    try:
      for line_no, line in enumerate(fh, start=1):
        parts = line.split()
        if not parts:
          continue
        if dim is None and len(parts) == 2 and all(x.isdigit() for x in parts):
          continue  # word2vec header 'count dim'
        if dim is None:
          dim, first = len(parts) - 1, line_no
          if dim < 1:
            raise BitbertError(f'{path}:{line_no}: a GloVe line is a word followed by its '
                               f'vector values; got only {parts[0]!r}')
        if len(parts) - 1 != dim:
          raise BitbertError(f'{path}:{line_no}: expected {dim} values after the word (as on '
                             f'line {first}), got {len(parts) - 1}')
        word = parts[0]
        if word in seen:
          continue
        want_pool = len(pool_words) < pool_size and _is_pool_word(word)
        want_query = word.lower() in keep and word.lower() not in queries
        if not (want_pool or want_query):
          continue
        seen.add(word)
        try:
          vec = np.asarray(parts[1:], np.float32)
        except ValueError:
          bad = next(x for x in parts[1:] if not _is_float(x))
          raise BitbertError(f'{path}:{line_no}: value {bad!r} is not a number') from None
        if want_pool:
          pool_words.append(word)
          pool_vecs.append(vec)
        if want_query:
          queries[word.lower()] = vec
    except UnicodeDecodeError as e:
      raise BitbertError(f'{path}:{line_no + 1}: not UTF-8 text ({e.reason})') from None
  if dim is None:
    raise BitbertError(f'GloVe file {path}: empty (no word vectors)')
  vecs = np.stack(pool_vecs) if pool_vecs else np.zeros((0, dim), np.float32)
  return pool_words, vecs, queries


def _is_float(x: str) -> bool:
  try:
    float(x)
    return True
  except ValueError:
    return False


def glove_neighbours(path: str, words: Iterable[str], k: int,
                     pool_size: int = GLOVE_POOL) -> dict[str, list[str]]:
  """K nearest GloVe neighbours of the given (lowercased) words."""
  pool_words, pool_vecs, queries = load_glove(path, set(words), pool_size)
  return nearest_neighbours(queries, pool_words, pool_vecs, k)


def wordpiece_neighbours(words: Iterable[str], tokenizer, embedding: np.ndarray,
                         k: int) -> dict[str, list[str]]:
  """K nearest whole-word vocab entries in the model's input embeddings.

  A word's vector is the mean of its WordPiece embeddings; words with [UNK] pieces get none.
  """
  embedding = np.asarray(embedding, np.float32)
  vocab = tokenizer.get_vocab()
  pool = sorted((i, t) for t, i in vocab.items() if i < len(embedding) and _is_pool_word(t))
  pool_words = [t for _, t in pool]
  pool_vecs = embedding[[i for i, _ in pool]] if pool else np.zeros((0, embedding.shape[1]))
  words = sorted(set(words))
  queries = {}
  if words:
    ids = tokenizer(words, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False)['input_ids']
    unk = tokenizer.unk_token_id
    for w, i in zip(words, ids):
      if i and unk not in i and max(i) < len(embedding):
        queries[w] = embedding[i].mean(axis=0)
  return nearest_neighbours(queries, pool_words, pool_vecs, k)


def word_embeddings(params) -> np.ndarray:
  """[vocab, hidden] input embeddings of our Flax BERT params (or a {'params': ...} wrapper)."""
  if 'embeddings' not in params and 'params' in params:
    params = params['params']
  try:
    return np.asarray(params['embeddings']['word_embeddings']['embedding'], np.float32)
  except (KeyError, TypeError):
    raise BitbertError('checkpoint params lack embeddings/word_embeddings/embedding; cannot '
                       "build embedding neighbours (set the augment stage's glove to a GloVe "
                       'file instead)') from None


# ---------------------------------------------------------------------------------------------
# The pipeline stage's entry point: settings, cache, encoding.


def _digest(parts: Iterable[str]) -> str:
  h = hashlib.sha1()
  for p in parts:
    h.update(p.encode('utf-8', 'surrogatepass'))
    h.update(b'\x1e')
  return h.hexdigest()


def _embedding_source(ctx):
  """('teacher'|'pretrained', [V, H] embeddings) for the WordPiece neighbour path."""
  for name in ('teacher', 'pretrained'):
    model = getattr(ctx, name, None)
    if model is not None and getattr(model, 'params', None) is not None:
      return name, word_embeddings(model.params)
  raise BitbertError(f"config.stages.{ctx.name}: augment needs word embeddings: set its glove "
                     "to a GloVe text file, or run it where a teacher or pretrained checkpoint "
                     'is loaded (config.teacher / config.pretrained)')


def _settings(ctx, raw, fields, copies, probability, candidates, glove, mlm_fn, embedding):
  """Everything the augmented texts depend on; a different value means rebuild."""
  s = {'version': _CACHE_VERSION, 'task': ctx.task.name, 'fields': list(fields),
       'copies': int(copies), 'probability': float(probability),
       'candidates': int(candidates), 'seed': int(ctx.config.seed),
       'examples': len(raw['label']),
       'data': _digest(str(x) for f in (*fields, 'label') for x in raw[f]),
       'mlm': None if mlm_fn is None else getattr(mlm_fn, '__qualname__', repr(mlm_fn)),
       'vocab_size': len(ctx.data.tokenizer)}
  if glove:
    st = os.stat(glove)
    s['glove'] = {'path': os.path.abspath(glove), 'bytes': st.st_size,
                  'mtime_ns': st.st_mtime_ns, 'pool': GLOVE_POOL}
  else:
    s['embeddings'] = {'source': embedding[0],
                       'sha1': hashlib.sha1(np.ascontiguousarray(embedding[1])).hexdigest()}
  return s


def _write_atomic(path: str, lines: Iterable[str]) -> None:
  if fs.is_uri(path):  # one upload: a bucket object is whole or absent
    fs.write_text(path, ''.join(lines))
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      for line in lines:
        f.write(line)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_cache(data_path, meta_path, settings, fields):
  """The cached columns if the cache matches `settings`, else None."""
  try:
    with fs.open_file(meta_path, 'rb') as f:  # UTF-8, which json reads from bytes
      if json.load(f) != settings:
        return None
    cols = {f: [] for f in (*fields, 'label')}
    with fs.open_file(data_path, 'rb') as f:
      for line in f:
        row = json.loads(line)
        for c in cols:
          cols[c].append(row[c])
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if len(cols['label']) != settings['examples'] * (settings['copies'] + 1):
    return None
  return cols


def _build(raw, fields, tokenizer, mlm_fn, neighbours, seed, copies, probability, candidates,
           field):
  cols = {}
  for f_idx, f in enumerate(fields):
    # One stream per field: adding a field never changes another field's copies.
    rng = np.random.default_rng((seed, 0xA06, f_idx))
    rows = augment_texts(raw[f], tokenizer, mlm_fn, neighbours, rng, copies,
                         probability, candidates, field)
    cols[f] = [t for r in rows for t in r]
  # Placeholder labels: distillation on augmented data uses the teacher's outputs only.
  cols['label'] = [x for x in raw['label'] for _ in range(copies + 1)]
  return cols


def augmented_split(ctx, mlm_fn: MlmFn | None = None) -> tokenize_lib.EncodedSplit:
  """The augment stage: N + 1 rows per train example, cached under ctx.workdir.

  Args:
    ctx: StageContext; reads ctx.stage.{copies, probability, candidates, glove},
      ctx.data.{tokenizer, raw_train}, ctx.task, ctx.config.{seed, task.max_length},
      ctx.teacher / ctx.pretrained (embeddings, when glove is '').
    mlm_fn: masked-LM scorer for one-piece words (`MlmFn`); None (our headless checkpoints)
      uses embedding neighbours for every word.

  Returns:
    The encoded augmented split; row i*(N+1) is example i itself, the next N its copies.
    Labels repeat the original's as placeholders (the teacher provides the targets).
  """
  field = f'config.stages.{ctx.name}'
  st = ctx.stage
  copies, probability, candidates, glove = st.copies, st.probability, st.candidates, st.glove
  check_settings(copies, probability, candidates, field)
  raw = getattr(ctx.data, 'raw_train', None)
  if raw is None:
    raise BitbertError(f'{field}: augment needs the raw train texts (TaskData.raw_train); '
                       'load the task with pipeline.load_task_data')
  task = tasks_lib.get_task(ctx.task)
  fields = task.text_fields
  missing = [c for c in (*fields, 'label') if c not in raw.column_names]
  if missing:
    raise BitbertError(f'{field}: raw train split lacks columns {missing}; columns present: '
                       f'{raw.column_names}')
  # Plain lists once: per-item access to an Arrow-backed column is slow.
  raw = raw.select_columns([*fields, 'label']).to_dict()
  if glove and not os.path.isfile(glove):
    raise BitbertError(f"{field}.glove={glove!r}: no such file; give a GloVe text file "
                       "('word v1 ... vD' per line) or '' for the model's own embeddings")
  embedding = None if glove else _embedding_source(ctx)
  settings = _settings(ctx, raw, fields, copies, probability, candidates, glove, mlm_fn,
                       embedding)
  fs.makedirs(ctx.workdir)
  data_path = fs.join(ctx.workdir, 'augmented.jsonl')
  meta_path = fs.join(ctx.workdir, 'augmented.json')
  cols = _read_cache(data_path, meta_path, settings, fields)
  if cols is not None:
    log.info('[%s] augmented data: %d rows from cache %s', ctx.name, len(cols['label']),
             data_path)
  else:
    words = candidate_words(t for f in fields for t in raw[f])
    if glove:
      neighbours = glove_neighbours(glove, words, candidates)
    else:
      neighbours = wordpiece_neighbours(words, ctx.data.tokenizer, embedding[1], candidates)
    log.info('[%s] augmenting %d examples x %d copies (%d/%d words with neighbours)',
             ctx.name, len(raw['label']), copies, len(neighbours), len(words))
    cols = _build(raw, fields, ctx.data.tokenizer, mlm_fn, neighbours, ctx.config.seed,
                  copies, probability, candidates, field)
    if jax.process_index() == 0:  # every process built the same rows; one writes them
      # Drop the old settings first: a crash mid-write must not pair them with new data.
      fs.remove(meta_path)
      n = len(cols['label'])
      _write_atomic(data_path, (json.dumps({c: cols[c][i] for c in cols}, ensure_ascii=False)
                                + '\n' for i in range(n)))
      _write_atomic(meta_path, [json.dumps(settings, indent=2) + '\n'])
  feats = {f: datasets.Value('string') for f in fields}
  feats['label'] = datasets.Value('float32' if task.is_regression else 'int64')
  ds = datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
  return tokenize_lib.encode(ds, ctx.data.tokenizer, task, ctx.config.task.max_length)
