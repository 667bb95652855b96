"""Layer maps: TinyBERT uniform and XTC explicit lists (REFERENCE section 4)."""
import pytest

from bitbert_jax.distill import layer_map
from bitbert_jax.errors import BitbertError


def test_uniform_tinybert_map():
  m = layer_map.uniform(12, 4)
  assert m.hidden == (0, 3, 6, 9, 12)
  assert m.attention == (2, 5, 8, 11)


def test_xtc_lists_and_hidden_map():
  assert layer_map.xtc_default_layers(12, 6) == [1, 3, 5, 7, 9, 11]
  assert layer_map.xtc_default_layers(12, 5) == [2, 4, 6, 8, 10]
  assert layer_map.xtc_default_layers(6, 3) == [1, 3, 5]
  m = layer_map.from_layers([1, 3, 5, 7, 9, 11], 12)
  assert m.hidden == (0, 2, 4, 6, 8, 10, 12)
  assert m.attention == (1, 3, 5, 7, 9, 11)
  assert layer_map.from_layers([2, 4, 6, 8, 10], 12).hidden == (1, 3, 5, 7, 9, 11)


@pytest.mark.parametrize('layers,needle', [([], 'empty'), ([0, 1, 2, 3, 4, 5, 6], 'only 6'),
                                           ([0, 6], 'out of range'), ([3, 1], 'increasing')])
def test_bad_layer_lists(layers, needle):
  with pytest.raises(BitbertError, match=needle):
    layer_map.from_layers(layers, 6)


def test_uniform_refuses_non_divisor():
  with pytest.raises(BitbertError, match='multiple'):
    layer_map.uniform(6, 4)
