"""bitbert_jax: compress BERT to 1-bit weights by knowledge distillation, in JAX/Flax."""
from bitbert_jax.errors import BitbertError

__version__ = '0.1.0'


def __getattr__(name):
  # Lazy, so that `import bitbert_jax.errors` does not pull in transformers and safetensors.
  if name in ('load_hf_checkpoint', 'save_hf_checkpoint'):
    from bitbert_jax import hf
    return getattr(hf, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
