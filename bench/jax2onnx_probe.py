"""Probe: can jax2onnx export the packed JAX forward for ONNX Runtime? (the README's tool choice)

  pip install jax2onnx   # 0.17.1 was measured
  python bench/jax2onnx_probe.py --packed=DIR [--out=/tmp/j2o.onnx]

Converts `PackedModel.logits` of a packed directory with `jax2onnx.to_onnx`, counts the matmul
ops and their operand types, and tries to load the file in ONNX Runtime.
"""
import argparse
import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from jax2onnx import to_onnx
from onnx import shape_inference

from bitbert_jax import predict
from bitbert_jax.model import BertModel


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--packed', required=True)
  parser.add_argument('--out', default='/tmp/j2o.onnx')
  args = parser.parse_args()
  m = predict.load_packed(args.packed, tokenizer=False)
  bert, variables = BertModel(m.config, m.policy), m.variables
  fn = lambda ids, mask, types: bert.apply(variables, ids, mask, types).logits
  spec = jax.ShapeDtypeStruct((8, 128), jnp.int32)
  t0 = time.time()
  model = to_onnx(fn, [spec, spec, spec])
  print(f'converted in {time.time() - t0:.0f}s')
  onnx.save(model, args.out)
  inferred = shape_inference.infer_shapes(model)
  types = {v.name: v.type.tensor_type.elem_type for v in
           list(inferred.graph.value_info) + list(inferred.graph.input)}
  types.update({i.name: i.data_type for i in model.graph.initializer})
  name = lambda v: onnx.TensorProto.DataType.Name(types.get(v, 0))
  print(collections.Counter((n.op_type, tuple(name(v) for v in n.input)) for n in model.graph.node
                            if n.op_type in ('Einsum', 'MatMul', 'MatMulInteger', 'Gemm')))
  try:
    session = ort.InferenceSession(args.out, providers=['CPUExecutionProvider'])
    feed = {i.name: np.ones((8, 128), np.int32) for i in session.get_inputs()}
    print('ONNX Runtime ran it:', session.run(None, feed)[0].shape)
  except Exception as e:  # pylint: disable=broad-except
    print('ONNX Runtime cannot load it:', str(e)[:300])


if __name__ == '__main__':
  main()
