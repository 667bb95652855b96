"""bitbert_jax: compress BERT to 1-bit weights by knowledge distillation, in JAX/Flax."""
from bitbert_jax.errors import BitbertError
from bitbert_jax.hf import load_hf_checkpoint, save_hf_checkpoint

__version__ = '0.1.0'
