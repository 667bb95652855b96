"""Quantization policy: parameter-path rules -> weight quantizers, plus activation bits.

The model never branches on bit widths: each quantized layer asks the policy what to do with
its named parameter (`encoder/layer_0/attention/query/kernel`, ...). Defaults follow REFERENCE
section 3: Q, K, V, attention output, FFN in/out and word embeddings quantized; position and
token-type embeddings, LayerNorms, biases, pooler and classifier kept in float.
"""
import dataclasses
import re

from bitbert_jax.errors import BitbertError

# Parameter-path patterns (regex, full match) of the reference's quantized weights.
LINEAR_KERNELS = r'encoder/layer_\d+/(attention/(query|key|value|output)|intermediate|output)/kernel'
FFN_OUTPUT_KERNELS = r'encoder/layer_\d+/output/kernel'
WORD_EMBEDDINGS = r'embeddings/word_embeddings/embedding'

WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
ACT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
ACT_MODES = ('dynamic', 'static', 'lsq', 'elastic')
NAMED = ('32-32-32', '8-8-8', '2-2-8', '1-1-8', '1-1-4', '1-1-2', '1-1-1')


@dataclasses.dataclass(frozen=True)
class WeightQuant:
  """How one weight is quantized. num_groups: an int, or 'row' (one scale per output row)."""
  bits: int
  num_groups: int | str = 1


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """Activation quantization at the inputs of quantized linear layers."""
  bits: int = 32
  mode: str = 'dynamic'


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
  """Rules (pattern, WeightQuant) tried in order, first full match wins; no match = float.

  split: the binary model after weight splitting. Each 1-bit quantized kernel (and its bias)
  carries a leading axis of 2; the layer sums the two binarized halves.
  packed: quantized weights arrive as packed integer codes and scales (a packed export), and the
  layers compute from them directly.
  """
  weight_bits: int = 32
  embed_bits: int = 32
  act: ActQuant = ActQuant()
  rules: tuple[tuple[str, WeightQuant], ...] = ()
  split: bool = False
  packed: bool = False  # inference from packed codes (bitbert_jax.quant.packed_layers)

  @property
  def name(self):
    return f'{self.weight_bits}-{self.embed_bits}-{self.act.bits}'

  @property
  def enabled(self):
    return bool(self.rules) or self.act.bits < 32

  def weight_quant(self, path):
    """The WeightQuant for a parameter path, or None when the parameter stays float."""
    for pattern, quant in self.rules:
      if re.fullmatch(pattern, path):
        return quant if quant.bits < 32 else None  # a 32-bit rule keeps a weight float
    return None

  def is_split(self, path):
    """Whether the parameter at `path` carries the leading split axis of 2."""
    quant = self.weight_quant(path)
    return self.split and quant is not None and quant.bits == 1

  def to_dict(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d):
    d = dict(d)
    d['act'] = ActQuant(**d['act'])
    d['rules'] = tuple((p, WeightQuant(**q) if isinstance(q, dict) else WeightQuant(*q))
                       for p, q in d['rules'])
    return cls(**d)


def _parse_bits(name):
  parts = str(name).split('-')
  if len(parts) != 3 or not all(p.isdigit() for p in parts):
    raise BitbertError(
        f'bit setting {name!r} is not of the form W-E-A (e.g. 1-1-8); named settings: '
        f'{", ".join(NAMED)}')
  w, e, a = (int(p) for p in parts)
  for field, value, valid in (('weight (W)', w, WEIGHT_BITS), ('embedding (E)', e, WEIGHT_BITS),
                              ('activation (A)', a, ACT_BITS)):
    if value not in valid:
      raise BitbertError(
          f'bit setting {name!r}: {field} bits {value} not supported; valid: '
          f'{", ".join(map(str, valid))}. Named settings: {", ".join(NAMED)}')
  return w, e, a


def policy_from_name(name, weight_groups=1, ffn_output_bits=None, act_mode=None, split=False):
  """Builds the reference policy for a W-E-A name such as '1-1-8'.

  weight_groups: scales per linear weight (int, or 'row'); word embeddings always get one per row.
  ffn_output_bits: optional different bits for the FFN output dense (some reference configs use 2).
  act_mode: 'dynamic' (default for A >= 2), 'static' (EMA ranges), 'lsq', or 'elastic'
    (default for A = 1, since 1-bit symmetric uniform has no +/- levels).
  """
  w, e, a = _parse_bits(name)
  if act_mode is None:
    act_mode = 'elastic' if a == 1 else 'dynamic'
  if act_mode not in ACT_MODES:
    raise BitbertError(f'activation mode {act_mode!r} unknown; valid: {", ".join(ACT_MODES)}')
  if a == 1 and act_mode not in ('elastic',):
    raise BitbertError(f'bit setting {name!r}: 1-bit activations need act_mode "elastic"; '
                       f'got {act_mode!r}')
  if isinstance(weight_groups, str) and weight_groups != 'row':
    raise BitbertError(f'weight_groups {weight_groups!r}: give an int or "row"')
  rules = []
  if e < 32:
    rules.append((WORD_EMBEDDINGS, WeightQuant(e, 'row')))
  if ffn_output_bits is not None and ffn_output_bits != w:
    if ffn_output_bits not in WEIGHT_BITS:
      raise BitbertError(f'ffn_output_bits {ffn_output_bits} not supported; valid: '
                         f'{", ".join(map(str, WEIGHT_BITS))}')
    rules.append((FFN_OUTPUT_KERNELS, WeightQuant(ffn_output_bits, weight_groups)))
  if w < 32:
    rules.append((LINEAR_KERNELS, WeightQuant(w, weight_groups)))
  return QuantPolicy(weight_bits=w, embed_bits=e, act=ActQuant(a, act_mode),
                     rules=tuple(rules), split=split)
