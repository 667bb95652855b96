"""Which teacher layer each student layer learns from (REFERENCE section 4)."""
import dataclasses

from bitbert_jax.errors import BitbertError


@dataclasses.dataclass(frozen=True)
class LayerMap:
  """hidden[j]: teacher hidden-state index for student hidden state j (0 = embeddings);
  attention[i]: teacher layer (0-based) for student layer i's attention scores."""
  hidden: tuple[int, ...]
  attention: tuple[int, ...]


def uniform(teacher_layers, student_layers):
  """TinyBERT: k = N/M; hidden m <- teacher m*k; attention i <- teacher i*k + k - 1."""
  if student_layers < 1 or teacher_layers % student_layers:
    raise BitbertError(f'uniform layer map: the teacher depth {teacher_layers} must be a multiple '
                       f'of the student depth {student_layers}; give an explicit layer list '
                       'instead (config field layers)')
  k = teacher_layers // student_layers
  return LayerMap(hidden=tuple(m * k for m in range(student_layers + 1)),
                  attention=tuple(i * k + k - 1 for i in range(student_layers)))


def from_layers(layers, teacher_layers):
  """XTC: attention i <- layers[i]; hidden [first-1] + [l+1 for l in layers] (first-1 >= 0)."""
  check_layer_list(layers, teacher_layers)
  return LayerMap(hidden=(max(layers[0] - 1, 0),) + tuple(l + 1 for l in layers),
                  attention=tuple(layers))


def check_layer_list(layers, teacher_layers, field='layers'):
  layers = list(layers)
  if not layers:
    raise BitbertError(f'{field}: empty layer list; give 0-based teacher layers in '
                       f'[0, {teacher_layers - 1}]')
  if len(layers) > teacher_layers:
    raise BitbertError(f'{field}={layers}: {len(layers)} layers but the teacher has only '
                       f'{teacher_layers}')
  bad = [l for l in layers if not 0 <= l < teacher_layers]
  if bad:
    raise BitbertError(f'{field}={layers}: layers {bad} out of range; valid: 0..{teacher_layers - 1}')
  if sorted(set(layers)) != layers:
    raise BitbertError(f'{field}={layers}: layers must be strictly increasing')


# The XTC reference's lists (0-based) where it gives one; otherwise every k-th layer, k = N // M.
_XTC_LAYERS = {(12, 6): (1, 3, 5, 7, 9, 11), (12, 5): (2, 4, 6, 8, 10)}


def xtc_default_layers(teacher_layers, student_layers):
  """Teacher layers a reduced student copies, e.g. 12 -> 6: [1,3,5,7,9,11]; 6 -> 3: [1,3,5]."""
  if not 1 <= student_layers <= teacher_layers:
    raise BitbertError(f'student depth {student_layers} not in [1, teacher depth {teacher_layers}]')
  if (teacher_layers, student_layers) in _XTC_LAYERS:
    return list(_XTC_LAYERS[teacher_layers, student_layers])
  k = teacher_layers // student_layers
  return [i * k + k - 1 for i in range(student_layers)]
