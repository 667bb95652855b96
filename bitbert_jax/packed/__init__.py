"""The packed low-bit model, one package; everything that reads or writes a packed directory.

  format       the layout: file names, tensor naming, code meaning and bit order, manifest
               reading, integrity (the standard library only)
  bits         pack codes into bytes (numpy) and unpack them (numpy, and jnp inside jit)
  write        a trained student -> a packed directory; the size report; the dequantized
               Hugging Face copy
  student      a trained student as the trainer (or `save_student`) leaves it
  load         a packed directory -> checked config, policy and tensors (the one reader)
  layers       the JAX forward on packed weights (the quantized layers' bodies on codes)
  model        load a packed directory into JAX and predict texts
  onnx_graph   a packed directory -> an ONNX graph that unpacks the codes and multiplies integers
  onnx_export  the ONNX model directory that `bitbert_serve` runs

Imports run one way: this package imports `model`, `quant` and `bitbert_serve` (the manifest,
tokenization and label mapping it shares with serving); none of them imports it.
"""
