"""python -m bitbert_serve: one label per input line on stdout, like bitbert_jax.predict."""
import argparse

from bitbert_serve import runtime
from bitbert_serve import textio


def main(argv=None, prog='python -m bitbert_serve'):
  parser = argparse.ArgumentParser(prog=prog,
                                   description='Predict labels with an exported ONNX model.')
  parser.add_argument('--model', required=True,
                      help='ONNX directory (python -m bitbert_jax.export --format=onnx)')
  textio.add_arguments(parser)
  parser.add_argument('--threads', type=int, default=None, help='ONNX Runtime threads')
  parser.add_argument('--no_verify', action='store_true',
                      help='skip checking the model and tokenizer files against the sha256 and '
                           'sizes in manifest.json')
  args = parser.parse_args(argv)
  return textio.run(args, lambda: runtime.load(args.model, threads=args.threads,
                                               verify=not args.no_verify), runtime.predict)
