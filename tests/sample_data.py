"""Generated test data: small GLUE-layout TSVs of all nine tasks, and a general-KD corpus.

For tests, which pass the written folder or file as `config.task.glue_dir` / `config.corpus`
(the package itself trains on real data: GLUE, the shipped sentiment set, the shipped WikiText-2
excerpt). Every sentence comes from the template grammar below, so the files are a pure function
of (task, split, seed) and carry a signal a model can learn:

* MRPC / QQP: paraphrases are the same event with synonyms swapped (and the time phrase
  moved); non-paraphrases are unrelated events or the same event with other participants.
* SST-2: sentiment adjectives and adverbs, with some 'not <positive>' negations.
* STS-B: the score falls with the number of event slots (who, did, what, where, when) changed.
* RTE / WNLI / MNLI / QNLI: the hypothesis states a subset of the premise's facts (entailment),
  a changed fact (not entailment / contradiction), or a new fact (neutral).
* CoLA: grammatical sentences versus ones with two words swapped or a word dropped.

The numbers mean nothing about real GLUE performance.
"""

import os
from typing import Sequence

import numpy as np

from bitbert_jax.errors import BitbertError

# Each slot holds synonym groups: words in a group mean the same, groups mean different things.
_SUBJECTS = (
    ('the senator', 'the lawmaker'), ('the doctor', 'the physician'),
    ('the teacher', 'the instructor'), ('the company', 'the firm'),
    ('the committee', 'the panel'), ('the farmer', 'the grower'),
    ('the mayor', 'the city leader'), ('the reporter', 'the journalist'),
    ('the lawyer', 'the attorney'), ('the chef', 'the cook'), ('the pilot', 'the aviator'),
    ('the student', 'the pupil'), ('the bank', 'the lender'), ('the coach', 'the trainer'),
    ('the author', 'the writer'), ('the police', 'the officers'),
    ('the museum', 'the gallery'), ('the nurse', 'the caregiver'),
    ('the union', 'the labor group'), ('the scientist', 'the researcher'),
)
# (base, past) forms; QNLI/QQP/MNLI questions and negations need the base form.
_VERBS = (
    (('buy', 'bought'), ('purchase', 'purchased'), ('acquire', 'acquired')),
    (('praise', 'praised'), ('commend', 'commended'), ('applaud', 'applauded')),
    (('criticize', 'criticized'), ('condemn', 'condemned'), ('fault', 'faulted')),
    (('visit', 'visited'), ('tour', 'toured')),
    (('build', 'built'), ('construct', 'constructed')),
    (('sell', 'sold'), ('auction', 'auctioned')),
    (('find', 'found'), ('discover', 'discovered'), ('locate', 'located')),
    (('start', 'started'), ('begin', 'began'), ('launch', 'launched')),
    (('help', 'helped'), ('assist', 'assisted'), ('aid', 'aided')),
    (('repair', 'repaired'), ('fix', 'fixed'), ('mend', 'mended')),
    (('study', 'studied'), ('examine', 'examined'), ('review', 'reviewed')),
    (('reject', 'rejected'), ('refuse', 'refused'), ('decline', 'declined')),
    (('support', 'supported'), ('back', 'backed'), ('endorse', 'endorsed')),
    (('close', 'closed'), ('shut', 'shut')),
)
_OBJECTS = (
    ('a car', 'an automobile'), ('the house', 'the home'), ('a new plan', 'a new proposal'),
    ('the report', 'the study'), ('a small shop', 'a little store'),
    ('the old bridge', 'the aging bridge'), ('a large farm', 'a big ranch'),
    ('the contract', 'the agreement'), ('the school', 'the academy'),
    ('a boat', 'a vessel'), ('the hospital', 'the clinic'), ('the budget', 'the spending plan'),
    ('a painting', 'an artwork'), ('the factory', 'the plant'), ('the road', 'the street'),
    ('a computer', 'a laptop'), ('the law', 'the statute'), ('the station', 'the depot'),
)
_PLACES = (
    ('in the city', 'in town'), ('near the river', 'by the river'),
    ('in the north', 'in the northern region'), ('at the harbor', 'at the port'),
    ('in the valley', 'in the lowlands'), ('near the border', 'close to the border'),
    ('in the capital', 'in the capital city'), ('on the coast', 'along the coast'),
    ('in the village', 'in the hamlet'), ('downtown', 'in the city center'),
)
_TIMES = (
    ('on monday', 'on monday'), ('last year', 'the previous year'),
    ('yesterday', 'the day before'), ('in the morning', 'early in the day'),
    ('last week', 'the previous week'), ('in march', 'during march'),
    ('on friday', 'on friday'), ('recently', 'lately'), ('in the evening', 'at night'),
    ('this spring', 'earlier this spring'),
)
_SLOTS = (_SUBJECTS, _VERBS, _OBJECTS, _PLACES, _TIMES)

_POSITIVE = ('wonderful', 'brilliant', 'charming', 'delightful', 'moving', 'funny', 'clever',
             'beautiful', 'gripping', 'heartfelt', 'superb', 'enjoyable', 'fresh', 'warm')
_NEGATIVE = ('dull', 'boring', 'awful', 'tedious', 'clumsy', 'lifeless', 'bland', 'annoying',
             'painful', 'forgettable', 'messy', 'shallow', 'stale', 'predictable')
_NEUTRAL_ADVERBS = ('quite', 'rather', 'often', 'mostly', 'somewhat', 'really', 'simply')
_FILMS = ('the film', 'this movie', 'the picture', 'the story', 'the sequel', 'this comedy',
          'the drama', 'the documentary')
_ASPECTS = ('the acting', 'the script', 'the plot', 'the soundtrack', 'the direction',
            'the dialogue', 'the ending', 'the cast', 'the pacing', 'the visuals')
_SST_TEMPLATES = ('{film} is {adv} {adj} .', '{aspect} feels {adj} .',
                  'a {adj} and {adj2} ride .', '{aspect} is {adj} , and {aspect2} is {adj2} .',
                  'an {adv} {adj} piece of work .', '{film} offers {adj} moments .')

# Official GLUE folder names and headers (load_split reads these layouts).
_DIRS = {'cola': 'CoLA', 'sst2': 'SST-2', 'mrpc': 'MRPC', 'qqp': 'QQP', 'stsb': 'STS-B',
         'mnli': 'MNLI', 'qnli': 'QNLI', 'rte': 'RTE', 'wnli': 'WNLI'}
_HEADERS = {
    'sst2': ('sentence', 'label'),
    'mrpc': ('Quality', '#1 ID', '#2 ID', '#1 String', '#2 String'),
    'qqp': ('id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'),
    'stsb': ('index', 'genre', 'filename', 'year', 'old_index', 'source1', 'source2',
             'sentence1', 'sentence2', 'score'),
    'qnli': ('index', 'question', 'sentence', 'label'),
    'rte': ('index', 'sentence1', 'sentence2', 'label'),
    'wnli': ('index', 'sentence1', 'sentence2', 'label'),
    'cola': None,  # CoLA train/dev files have no header.
}
_MNLI_HEADER = ('index', 'promptID', 'pairID', 'genre', 'sentence1_binary_parse',
                'sentence2_binary_parse', 'sentence1_parse', 'sentence2_parse', 'sentence1',
                'sentence2')
_TASK_IDS = {name: i for i, name in enumerate(_DIRS)}
_SPLIT_IDS = {'train': 0, 'dev': 1, 'dev_matched': 1, 'dev_mismatched': 2, 'corpus': 3}
DEFAULT_TASKS = ('mrpc', 'sst2', 'stsb', 'rte')


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
  """One independent stream per (seed, task, split): files never depend on each other."""
  return np.random.default_rng((seed, _TASK_IDS.get(task, 99), _SPLIT_IDS[split]))


def _event(rng) -> list[int]:
  """An event: one synonym-group index per slot (who, did, what, where, when)."""
  return [int(rng.integers(len(s))) for s in _SLOTS]


def _change(rng, event: Sequence[int], slots: Sequence[int]) -> list[int]:
  """The event with the given slots set to other groups (a different meaning)."""
  out = list(event)
  for s in slots:
    out[s] = (out[s] + 1 + int(rng.integers(len(_SLOTS[s]) - 1))) % len(_SLOTS[s])
  return out


def _words(rng, event: Sequence[int], synonyms: bool) -> list[str]:
  """Slot phrases: the first synonym, or a random one when `synonyms`."""
  pick = lambda group: group[int(rng.integers(len(group)))] if synonyms else group[0]
  phrases = [pick(_SLOTS[s][g]) for s, g in enumerate(event)]
  phrases[1] = phrases[1][1]  # past tense
  return phrases


def _sentence(rng, event: Sequence[int], synonyms: bool = False, front_time: bool = False,
              parts: Sequence[int] = (0, 1, 2, 3, 4)) -> str:
  """Renders (a subset of) an event: 'The doctor bought a car in the city on monday.'"""
  w = _words(rng, event, synonyms)
  body = [w[i] for i in (0, 1, 2, 3) if i in parts]
  if 4 in parts and front_time:
    text = f'{w[4]}, ' + ' '.join(body)
  else:
    text = ' '.join(body + ([w[4]] if 4 in parts else []))
  return text[0].upper() + text[1:] + '.'


def _question(rng, event: Sequence[int], synonyms: bool = False, style: int = 0) -> str:
  w = _words(rng, event, synonyms)
  base = _VERBS[event[1]][int(rng.integers(len(_VERBS[event[1]]))) if synonyms else 0][0]
  if style == 0:
    return f'Why did {w[0]} {base} {w[2]} {w[3]}?'
  return f'What made {w[0]} {base} {w[2]} {w[3]}?'


def _negated(rng, event: Sequence[int]) -> str:
  w = _words(rng, event, True)
  base = _VERBS[event[1]][0][0]
  text = f'{w[0]} did not {base} {w[2]} {w[3]}'
  return text[0].upper() + text[1:] + '.'


# Row generators: rng, index -> (fields..., label) in the task's file order.


def _mrpc_row(rng, i):
  a = _event(rng)
  s1 = _sentence(rng, a, synonyms=True, front_time=rng.random() < 0.3)
  label = int(rng.random() < 0.55)  # real MRPC is about two-thirds paraphrases
  if label:
    b, front = a, rng.random() < 0.5
  elif rng.random() < 0.7:
    b, front = _event(rng), rng.random() < 0.3
  else:
    b, front = _change(rng, a, rng.choice([0, 2], size=1 + int(rng.random() < 0.5),
                                          replace=False)), rng.random() < 0.3
  s2 = _sentence(rng, b, synonyms=True, front_time=front)
  return (str(label), str(100000 + 2 * i), str(100001 + 2 * i), s1, s2)


def _qqp_row(rng, i):
  a = _event(rng)
  label = int(rng.random() < 0.4)
  b = a if label else (_event(rng) if rng.random() < 0.6 else _change(rng, a, [2]))
  q1 = _question(rng, a, True, int(rng.integers(2)))
  q2 = _question(rng, b, True, int(rng.integers(2)))
  return (str(i), str(2 * i + 1), str(2 * i + 2), q1, q2, str(label))


def _sst2_row(rng, i):
  del i
  positive = rng.random() < 0.55
  pool, other = (_POSITIVE, _NEGATIVE) if positive else (_NEGATIVE, _POSITIVE)
  choose = lambda xs: xs[int(rng.integers(len(xs)))]
  if positive is False and rng.random() < 0.15:
    text = f'{choose(_FILMS)} is not {choose(_POSITIVE)} .'
  else:
    template = choose(_SST_TEMPLATES)
    adj2_pool = pool if rng.random() < 0.85 else other  # a little mixed sentiment
    text = template.format(film=choose(_FILMS), adv=choose(_NEUTRAL_ADVERBS), adj=choose(pool),
                           adj2=choose(adj2_pool), aspect=choose(_ASPECTS),
                           aspect2=choose(_ASPECTS))
  return (text + ' ', str(int(positive)))


def _stsb_row(rng, i):
  a = _event(rng)
  changed = int(rng.integers(6))
  b = _change(rng, a, sorted(rng.choice(5, size=changed, replace=False).tolist()))
  score = float(np.clip(5.0 - changed + rng.uniform(-0.3, 0.3), 0.0, 5.0))
  s1 = _sentence(rng, a, synonyms=True)
  s2 = _sentence(rng, b, synonyms=True, front_time=rng.random() < 0.3)
  return (str(i), 'main-news', 'sample', '2024', str(i), 'none', 'none', s1, s2,
          f'{score:.3f}')


def _premise_hypothesis(rng, three_way: bool):
  """(premise, hypothesis, label): label 0 entailment, 1 contradiction/not, 2 neutral."""
  a, c = _event(rng), _event(rng)
  first, second = _sentence(rng, a, synonyms=True), _sentence(rng, c)
  premise = f'{first[:-1]}, and {second[0].lower()}{second[1:]}'
  kept = sorted({0, 1, 2} | set(rng.choice([3, 4], size=int(rng.integers(3)),
                                           replace=False).tolist()))
  r = rng.random()
  if r < (0.34 if three_way else 0.5):
    return premise, _sentence(rng, a, synonyms=rng.random() < 0.5, parts=kept), 0
  if three_way and r < 0.67:
    w = _words(rng, _event(rng), True)
    return premise, f'{_sentence(rng, a, parts=kept)[:-1]} and also {w[1]} {w[2]}.', 2
  if three_way and rng.random() < 0.5:
    return premise, _negated(rng, a), 1
  return premise, _sentence(rng, _change(rng, a, [int(rng.choice([0, 2]))]), parts=kept), 1


def _rte_row(rng, i):
  p, h, label = _premise_hypothesis(rng, False)
  return (str(i), p, h, 'entailment' if label == 0 else 'not_entailment')


def _wnli_row(rng, i):
  p, h, label = _premise_hypothesis(rng, False)
  return (str(i), p, h, str(int(label == 0)))


def _mnli_row(rng, i):
  p, h, label = _premise_hypothesis(rng, True)
  name = ('entailment', 'contradiction', 'neutral')[label]
  return (str(i), str(i), f'{i}e', 'sample', '', '', '', '', p, h, name)


def _qnli_row(rng, i):
  a = _event(rng)
  q = _question(rng, a, rng.random() < 0.5, int(rng.integers(2)))
  label = int(rng.random() < 0.5)  # 0 = entailment (the sentence answers the question)
  if label == 0:
    b = a
  else:  # a sentence about something else, or about the same thing with other participants
    b = _event(rng) if rng.random() < 0.5 else _change(rng, a, [int(rng.choice([0, 1, 2]))])
  s = _sentence(rng, b, synonyms=True)[:-1] + ' because of ' + \
      _words(rng, _event(rng), False)[2] + '.'
  return (str(i), q, s, ('entailment', 'not_entailment')[label])


def _cola_row(rng, i):
  del i
  text = _sentence(rng, _event(rng), synonyms=True, front_time=rng.random() < 0.3)
  words = text[:-1].split()
  ok = rng.random() < 0.6  # real CoLA is about 70% acceptable
  if not ok:
    j = int(rng.integers(1, len(words) - 1))
    if rng.random() < 0.6:
      words[j], words[j + 1] = words[j + 1], words[j]
    else:
      del words[j]
  return ('sample', str(int(ok)), '' if ok else '*', ' '.join(words) + '.')


_ROWS = {'mrpc': _mrpc_row, 'qqp': _qqp_row, 'sst2': _sst2_row, 'stsb': _stsb_row,
         'rte': _rte_row, 'wnli': _wnli_row, 'mnli': _mnli_row, 'qnli': _qnli_row,
         'cola': _cola_row}


def _mnli_lines(rows, dev):
  """MNLI's dev files carry five annotator labels before gold_label; train carries one."""
  labels = ('label1', 'label2', 'label3', 'label4', 'label5') if dev else ('label1',)
  yield '\t'.join(_MNLI_HEADER + labels + ('gold_label',))
  for r in rows:
    yield '\t'.join(r[:-1] + (r[-1],) * len(labels) + (r[-1],))


def _write_lines(path: str, lines) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8', newline='') as f:
    for line in lines:
      f.write(line + '\n')
  os.replace(tmp, path)


def _normalise(task: str) -> str:
  from bitbert_jax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  return tasks_lib.get_task(task).name


def write_sample_glue(out_dir: str, tasks: Sequence[str] = DEFAULT_TASKS, seed: int = 0,
                      train_size: int = 400, dev_size: int = 100) -> str:
  """Writes generated GLUE-layout TSVs: out_dir/<Task>/{train,dev}.tsv.

  Args:
    out_dir: GLUE root to create (pass it as glue_dir to `load_split`).
    tasks: GLUE task names (any alias); all nine are supported.
    seed: the files are a pure function of (task, split, seed, sizes).
    train_size, dev_size: rows per split (MNLI writes dev_matched and dev_mismatched).

  Returns:
    out_dir.
  """
  if isinstance(tasks, str):
    tasks = (tasks,)
  for name, n in (('train_size', train_size), ('dev_size', dev_size)):
    if not isinstance(n, int) or n < 1:
      raise BitbertError(f'write_sample_glue: {name}={n!r}; need an int >= 1')
  for task in tasks:
    task = _normalise(task)
    folder = os.path.join(out_dir, _DIRS[task])
    os.makedirs(folder, exist_ok=True)
    splits = (('train', train_size), *((('dev_matched', dev_size), ('dev_mismatched', dev_size))
                                       if task == 'mnli' else (('dev', dev_size),)))
    for split, n in splits:
      rng = _rng(seed, task, split)
      rows = [_ROWS[task](rng, i) for i in range(n)]
      if task == 'mnli':
        lines = _mnli_lines(rows, split != 'train')
      else:
        header = _HEADERS[task]
        lines = ([] if header is None else ['\t'.join(header)]) + ['\t'.join(r) for r in rows]
      _write_lines(os.path.join(folder, f'{split}.tsv'), lines)
  return out_dir


def write_sample_corpus(path: str, paragraphs: int = 500, seed: int = 0) -> str:
  """Writes general-distillation text: wikitext-style headings and paragraphs of events.

  Args:
    path: text file to write (its folder is created).
    paragraphs: paragraph lines (3-6 sentences each); a heading starts every 20.
    seed: the file is a pure function of (paragraphs, seed).

  Returns:
    path.
  """
  if not isinstance(paragraphs, int) or paragraphs < 1:
    raise BitbertError(f'write_sample_corpus: paragraphs={paragraphs!r}; need an int >= 1')
  rng = _rng(seed, 'corpus', 'corpus')
  lines = []
  for i in range(paragraphs):
    if i % 20 == 0:
      lines += ['', f' = {_SUBJECTS[int(rng.integers(len(_SUBJECTS)))][0].title()} = ', '']
    n = int(rng.integers(3, 7))
    lines.append(' '.join(_sentence(rng, _event(rng), synonyms=True,
                                    front_time=rng.random() < 0.3) for _ in range(n)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _write_lines(path, lines)
  return path
