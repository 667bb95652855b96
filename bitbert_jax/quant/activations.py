"""Activation quantization at the inputs of quantized linear layers."""
from bitbert_jax.quant.quantizers import quantize_activation


def quantize_input(module, x, act):
  """Quantizes a layer input per `act` (ActQuant). `module` owns any learned or tracked state."""
  del module
  if act.bits >= 32:
    return x
  if act.mode == 'dynamic':
    return quantize_activation(x, act.bits)
  raise NotImplementedError(f'activation mode {act.mode!r}')
