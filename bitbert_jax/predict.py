"""python -m bitbert_jax.predict: one label per input line, from a packed directory, with JAX.

  python -m bitbert_jax.predict --model=<dir> [--input=file.tsv|-] [--text_columns a b]
      [--logits] [--precision=float32|float64]

Loading and inference are `bitbert_jax.packed.model`'s (`load_packed`, `predict`); the input
and output rules are `bitbert_serve.textio`'s, shared with the ONNX Runtime CLI.
"""
import argparse
import sys

from bitbert_jax import paths
from bitbert_jax.packed import model as packed_model
from bitbert_jax.packed.format import PRECISIONS
from bitbert_serve import textio


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m bitbert_jax.predict',
                                   description='Predict labels with a packed model.')
  parser.add_argument('--model', required=True, help='packed directory (bitbert_jax.export)')
  textio.add_arguments(parser)
  parser.add_argument('--precision', default='float32', choices=PRECISIONS,
                      help='float ops; float64 reproduces an ONNX export made with '
                           '--precision=float64 bit for bit (CPU)')
  args = parser.parse_args(argv)
  args.model = paths.absolute(args.model)
  if args.input != '-':
    args.input = paths.absolute(args.input)
  return textio.run(args, lambda: packed_model.load_packed(args.model, precision=args.precision),
                    packed_model.predict)


if __name__ == '__main__':
  sys.exit(main())
