"""python -m bitbert_serve: one label per input line on stdout, like bitbert_jax.predict."""
import argparse
import sys

from bitbert_serve import runtime
from bitbert_serve import textio
from bitbert_serve.errors import BitbertError


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
  try:
    cols = textio.text_columns(args.text_columns)
    model = runtime.load(args.model, threads=args.threads, verify=not args.no_verify)
    texts = textio.read_texts(args.input, cols, header=not args.no_header)
    logits, labels = runtime.predict(model, texts, args.batch_size, args.max_length)
  except BitbertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  textio.write_predictions(labels, logits, args.logits)
  return 0
