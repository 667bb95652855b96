"""python -m bitbert_jax.serve: the ONNX Runtime CLI of `bitbert_serve` (no JAX imported)."""
import sys

from bitbert_serve.cli import main

if __name__ == '__main__':
  sys.exit(main(prog='python -m bitbert_jax.serve'))
