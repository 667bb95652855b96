"""The packed low-bit format in one place.

  format      the layout: file names, tensor naming, code meaning and bit order, manifest reading
              (numpy and the standard library only; every other module reads the layout here)
  onnx_graph  a packed directory -> an ONNX graph that unpacks the codes and multiplies integers
              (imports `onnx`; only the ONNX export needs it)

Writing (`bitbert_jax.export.pack`) and the JAX layers (`bitbert_jax.quant.packed_layers`) import
`format`; nothing here imports them, so imports run one way.
"""
