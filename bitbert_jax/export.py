"""python -m bitbert_jax.export: write the packed directory (or the ONNX directory) of a student.

  python -m bitbert_jax.export --checkpoint=<trainer workdir | stage dir | student dir>
      --out=<dir> [--tokenizer_dir=<dir>] [--float_dtype=float16] [--hf_out=<dir>]
  python -m bitbert_jax.export --format=onnx --checkpoint=<student or packed dir> --out=<dir>
      [--precision=float32|float64]

The work is `bitbert_jax.packed`'s: `student.load_student` reads the checkpoint, `write.pack`
writes the packed directory (layout: `packed.format`), `onnx_export.export_onnx` the ONNX one.
"""
import argparse
import os
import sys

from bitbert_jax import paths
from bitbert_jax.errors import BitbertError
from bitbert_jax.packed import onnx_export
from bitbert_jax.packed import student as student_lib
from bitbert_jax.packed import write
from bitbert_jax.packed.format import FLOAT_DTYPES, PRECISIONS


def _export_onnx(args):
  out = onnx_export.export_onnx(args.checkpoint, args.out, tokenizer_dir=args.tokenizer_dir,
                                overwrite=args.overwrite, float_dtype=args.float_dtype,
                                precision=args.precision)
  print(f'wrote {out}')
  print(onnx_export.format_sizes(out))
  if not os.path.isfile(os.path.join(out, 'tokenizer.json')):
    print('warning: no tokenizer files found; pass --tokenizer_dir so that '
          '`python -m bitbert_serve` can tokenize text', file=sys.stderr)


def _export_packed(args):
  s = student_lib.load_student(args.checkpoint)
  tok = args.tokenizer_dir or s.tokenizer_dir
  if tok is None:
    print('warning: no tokenizer files found; pass --tokenizer_dir so that '
          '`python -m bitbert_jax.predict` can tokenize text', file=sys.stderr)
  out = write.pack(s.config, s.params, s.policy, args.out, tokenizer_dir=tok,
                   float_dtype=args.float_dtype, overwrite=args.overwrite,
                   model_state=s.model_state)
  print(f'wrote {out}')
  print(write.format_report(write.size_report(out)))
  if args.hf_out:
    hf_dir = write.export_dequantized_hf(s.config, s.params, s.policy, args.hf_out, tok,
                                         args.overwrite)
    print(f'wrote {hf_dir} (dequantized float32; no activation quantization)')


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m bitbert_jax.export',
      description='Write the packed low-bit directory of a trained student.')
  parser.add_argument('--checkpoint', required=True,
                      help='trainer workdir, stage dir or stage output (stage.json + params/), '
                           'or a directory with model_config.json, policy.json, params.msgpack')
  parser.add_argument('--out', required=True, help='directory to create')
  parser.add_argument('--format', default='packed', choices=('packed', 'onnx'),
                      help='packed: the packed low-bit directory; onnx: model.onnx for ONNX '
                           'Runtime (from a student or a packed directory)')
  parser.add_argument('--tokenizer_dir', default=None,
                      help='tokenizer files to copy (default: from the checkpoint, if present)')
  parser.add_argument('--float_dtype', default='float16', choices=FLOAT_DTYPES)
  parser.add_argument('--precision', default='float32', choices=PRECISIONS,
                      help='onnx: float ops in float32 (fast; logits within ~0.04 of predict\'s) '
                           'or float64 (reproduces predict --precision=float64 bit for bit; '
                           '4-8x slower)')
  parser.add_argument('--hf_out', default=None,
                      help='also write the dequantized student as a Hugging Face directory here')
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  for name in ('checkpoint', 'out', 'tokenizer_dir', 'hf_out'):  # Orbax needs absolute paths
    setattr(args, name, paths.absolute(getattr(args, name)))
  try:
    if args.format == 'onnx':
      _export_onnx(args)
    else:
      _export_packed(args)
  except BitbertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
