"""Serve an exported bitbert model with ONNX Runtime: numpy, onnxruntime and tokenizers only.

  model = bitbert_serve.load('out/mrpc-onnx')        # from `python -m bitbert_jax.export --format=onnx`
  logits, labels = bitbert_serve.predict(model, [('first sentence', 'second sentence')])

`load` checks every file the manifest lists (size and sha256) first; `load(..., verify=False)`
skips it. CLI: python -m bitbert_serve --model=<dir> [--input=file.tsv|-] [--text_columns a b]
[--no_verify] (also `python -m bitbert_jax.serve` in a full install). No JAX, Flax or torch is
imported: the package installs alone from serving/ (`pip install ./serving`), see the README.
"""
from bitbert_serve.encoding import encode_texts
from bitbert_serve.errors import BitbertError
from bitbert_serve.runtime import OnnxModel, load, predict

__all__ = ['BitbertError', 'OnnxModel', 'encode_texts', 'load', 'predict']
