"""Quantization policy: parameter-path rules -> weight quantizers, plus activation bits.

The model never branches on bit widths: each quantized layer asks the policy what to do with
its named parameter (`encoder/layer_0/attention/query/kernel`, ...). Defaults follow REFERENCE
section 3: Q, K, V, attention output, FFN in/out and word embeddings quantized; position and
token-type embeddings, LayerNorms, biases, pooler and classifier kept in float. Activations are
quantized at the inputs of the linear layers that the rules name (a 32-bit rule names a layer
whose weight stays float, e.g. in '32-32-8').

A policy is a frozen, hashable dataclass (a static jit argument and a Flax module attribute);
`to_dict` / `from_dict` round-trip it through JSON.
"""
import dataclasses
import numbers
import re

from bitbert_jax.errors import BitbertError

# Parameter-path patterns (regex, full match) of the reference's quantized weights.
LINEAR_KERNELS = (r'encoder/layer_\d+/'
                  r'(attention/(query|key|value|output)|intermediate|output)/kernel')
FFN_OUTPUT_KERNELS = r'encoder/layer_\d+/output/kernel'
WORD_EMBEDDINGS = r'embeddings/word_embeddings/embedding'

WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
ACT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
ACT_MODES = ('dynamic', 'static', 'lsq', 'elastic')
BINARY_MODES = ('bwn', 'centered')
NAMED = ('32-32-32', '8-8-8', '2-2-8', '1-1-8', '1-1-4', '1-1-2', '1-1-1')


def _choices(values):
  return ', '.join(map(str, values))


def _check_groups(num_groups, field):
  if num_groups == 'row':
    return num_groups
  if isinstance(num_groups, str) and num_groups.isdigit():
    num_groups = int(num_groups)  # e.g. from a command-line override
  if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
    raise BitbertError(f'{field} {num_groups!r} not supported; valid: a positive int (scales per '
                       f'weight tensor) or "row" (one scale per output row)')
  return int(num_groups)


@dataclasses.dataclass(frozen=True)
class WeightQuant:
  """How one weight is quantized. num_groups: an int, or 'row' (one scale per output row).

  bits: 1 binary, 2 ternary, 3-8 symmetric uniform, 32 float. mode (1-bit only): 'bwn'
  (alpha * sign(w)) or 'centered' (BiT: alpha * sign(w - mean) + mean, per group).
  split (1-bit only, read by a split policy): the weight carries the two binary planes of
  weight splitting (True, the default), or keeps one plane (False: a weight that was already
  1-bit before splitting, where BWN(w) is already the function and there is nothing to split).
  """
  bits: int
  num_groups: int | str = 1
  mode: str = 'bwn'
  split: bool = True

  def __post_init__(self):
    if self.bits not in WEIGHT_BITS or isinstance(self.bits, bool):
      raise BitbertError(f'weight bits {self.bits!r} not supported; valid: {_choices(WEIGHT_BITS)}')
    if self.mode not in BINARY_MODES:
      raise BitbertError(f'binary_mode {self.mode!r} unknown; valid: {_choices(BINARY_MODES)}')
    if self.mode != 'bwn' and self.bits != 1:
      raise BitbertError(f'binary_mode {self.mode!r} is for 1-bit weights, not {self.bits}-bit')
    if not isinstance(self.split, bool):
      raise BitbertError(f'weight rule split {self.split!r}: expected true or false')
    if not self.split and self.bits != 1:
      raise BitbertError(f'weight rule split=false marks a 1-bit weight that keeps one plane in '
                         f'a split policy; a {self.bits}-bit weight is never split')
    object.__setattr__(self, 'num_groups', _check_groups(self.num_groups, 'num_groups'))


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """Activation quantization at the inputs of quantized linear layers (see `activations`)."""
  bits: int = 32
  mode: str = 'dynamic'

  def __post_init__(self):
    if self.bits not in ACT_BITS or isinstance(self.bits, bool):
      raise BitbertError(f'activation bits {self.bits!r} not supported; valid: '
                         f'{_choices(ACT_BITS)}')
    if self.mode not in ACT_MODES:
      raise BitbertError(f'activation mode (act_mode) {self.mode!r} unknown; valid: '
                         f'{_choices(ACT_MODES)}')
    if self.bits == 1 and self.mode != 'elastic':
      raise BitbertError(f'1-bit activations need act_mode "elastic" (BiT); got {self.mode!r}')
    if self.mode == 'elastic' and self.bits not in (1, 32):
      raise BitbertError(f'act_mode "elastic" is the 1-bit (BiT) binarizer; for {self.bits}-bit '
                         f'activations use one of: dynamic, static, lsq')


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
  """Rules (pattern, WeightQuant) tried in order, first full match wins; no match = float.

  split: the binary model after weight splitting. Each 1-bit quantized kernel (and its bias)
  whose rule has split=True (the default) carries a leading axis of 2; the layer sums the two
  binarized halves. A 1-bit rule with split=False keeps one plane (see `is_split`).
  packed: quantized weights arrive as packed integer codes and scales (a packed export); the
  model then runs under `bitbert_jax.packed.layers.packed_mode()`, which computes from them.
  """
  weight_bits: int = 32
  embed_bits: int = 32
  act: ActQuant = ActQuant()
  rules: tuple[tuple[str, WeightQuant], ...] = ()
  split: bool = False
  packed: bool = False  # inference from packed codes (under bitbert_jax.packed.layers)

  def __post_init__(self):
    if not isinstance(self.act, ActQuant):
      raise BitbertError(f'policy act {self.act!r}: expected an ActQuant')
    rules = tuple((str(p), q) for p, q in self.rules)  # tuples keep the policy hashable
    for pattern, quant in rules:
      if not isinstance(quant, WeightQuant):
        raise BitbertError(f'policy rule {pattern!r}: {quant!r} is not a WeightQuant')
      try:
        re.compile(pattern)
      except re.error as e:
        raise BitbertError(f'policy rule {pattern!r} is not a valid regex: {e}') from None
    object.__setattr__(self, 'rules', rules)

  @property
  def name(self):
    return f'{self.weight_bits}-{self.embed_bits}-{self.act.bits}'

  @property
  def enabled(self):
    """Whether anything is quantized (a weight rule below 32 bits, or activations)."""
    return any(q.bits < 32 for _, q in self.rules) or self.act.bits < 32

  def _rule(self, path):
    for pattern, quant in self.rules:
      if re.fullmatch(pattern, path):
        return quant
    return None

  def weight_quant(self, path):
    """The WeightQuant for a parameter path, or None when the parameter stays float."""
    quant = self._rule(path)
    return quant if quant is not None and quant.bits < 32 else None  # 32-bit rule: float

  def input_quant(self, path):
    """The ActQuant for the input of the layer owning `path` (a kernel), or None.

    Inputs are quantized for every layer a rule names, whatever its weight bits.
    """
    if self.act.bits >= 32 or self._rule(path) is None:
      return None
    return self.act

  def is_split(self, path):
    """Whether the parameter at `path` carries the leading split axis of 2: a split policy's
    1-bit weight whose rule has split=True."""
    quant = self.weight_quant(path)
    return self.split and quant is not None and quant.bits == 1 and quant.split

  def to_dict(self):
    """Plain JSON-able dict (rules as [pattern, {bits, num_groups, mode}] pairs; a rule's
    `split` only when false, so a policy without one-plane rules reads as it always has)."""
    d = dataclasses.asdict(self)
    d['rules'] = tuple((p, {k: v for k, v in q.items() if k != 'split' or not v})
                       for p, q in d['rules'])
    return d

  @classmethod
  def from_dict(cls, d):
    """Inverse of to_dict; accepts what json.load gives back (lists for tuples)."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise BitbertError(f'quantization policy: unknown field(s) {", ".join(unknown)}; valid: '
                         f'{_choices(sorted(names))}')
    if 'act' in d:
      d['act'] = d['act'] if isinstance(d['act'], ActQuant) else ActQuant(**d['act'])
    if 'rules' in d:
      d['rules'] = tuple((p, _weight_quant_from(q)) for p, q in d['rules'])
    return cls(**d)


def _weight_quant_from(q):
  if isinstance(q, WeightQuant):
    return q
  return WeightQuant(**q) if isinstance(q, dict) else WeightQuant(*q)


def _parse_bits(name):
  parts = str(name).split('-')
  if len(parts) != 3 or not all(p.isdigit() for p in parts):
    raise BitbertError(
        f'bit setting {name!r} is not of the form W-E-A (e.g. 1-1-8); named settings: '
        f'{_choices(NAMED)}')
  w, e, a = (int(p) for p in parts)
  for field, value, valid in (('weight (W)', w, WEIGHT_BITS), ('embedding (E)', e, WEIGHT_BITS),
                              ('activation (A)', a, ACT_BITS)):
    if value not in valid:
      raise BitbertError(
          f'bit setting {name!r}: {field} bits {value} not supported; valid: '
          f'{_choices(valid)}. Named settings: {_choices(NAMED)}')
  return w, e, a


def policy_from_name(name, weight_groups=1, ffn_output_bits=None, act_mode=None, split=False,
                     binary_mode='bwn'):
  """Builds the reference policy for a W-E-A name such as '1-1-8'.

  weight_groups: scales per linear weight (int, or 'row'); word embeddings always get one per row.
  ffn_output_bits: optional different bits for the FFN output dense (some reference configs use 2);
    32 keeps that weight float (its input is still quantized at A bits).
  act_mode: 'dynamic' (default for A >= 2), 'static' (EMA ranges), 'lsq', or 'elastic'
    (the only choice, and the default, for A = 1).
  binary_mode: 'bwn' or 'centered', for every 1-bit rule (see WeightQuant).
  '32-32-32' gives QuantPolicy(): no rules, nothing quantized.
  """
  w, e, a = _parse_bits(name)
  if act_mode is None:
    act_mode = 'elastic' if a == 1 else 'dynamic'
  try:
    act = ActQuant(a, act_mode)
  except BitbertError as err:
    raise BitbertError(f'bit setting {name!r}: {err}') from None
  weight_groups = _check_groups(weight_groups, 'weight_groups')
  rules = []
  if e < 32:
    rules.append((WORD_EMBEDDINGS, WeightQuant(e, 'row')))
  if ffn_output_bits is not None and ffn_output_bits != w:
    if ffn_output_bits not in WEIGHT_BITS:
      raise BitbertError(f'ffn_output_bits {ffn_output_bits!r} not supported; valid: '
                         f'{_choices(WEIGHT_BITS)}')
    rules.append((FFN_OUTPUT_KERNELS, WeightQuant(ffn_output_bits, weight_groups)))
  if w < 32 or a < 32:
    rules.append((LINEAR_KERNELS, WeightQuant(w, weight_groups)))
  if binary_mode not in BINARY_MODES:
    raise BitbertError(f'binary_mode {binary_mode!r} unknown; valid: {_choices(BINARY_MODES)}')
  rules = [(p, dataclasses.replace(q, mode=binary_mode) if q.bits == 1 else q) for p, q in rules]
  return QuantPolicy(weight_bits=w, embed_bits=e, act=act, rules=tuple(rules), split=split)
