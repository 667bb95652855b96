"""Config field checks with one message shape: `field=value: what is wrong; valid: ...`."""
import math
import numbers

from bitbert_jax.errors import BitbertError


def is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_int(v, field, lo, what=''):
  if not is_int(v) or v < lo:
    raise BitbertError(f'{field}={v!r}: need an integer >= {lo}{what}')


def check_number(v, field, lo=None, positive=False, what=''):
  bad = not is_number(v) or (positive and v <= 0) or (lo is not None and v < lo)
  if bad:
    bound = '> 0' if positive else f'>= {lo}' if lo is not None else 'finite'
    raise BitbertError(f'{field}={v!r}: need a number {bound}{what}')


def check_bool(v, field):
  if not isinstance(v, bool):
    raise BitbertError(f'{field}={v!r}: need True or False')


def check_choice(v, field, valid):
  if v not in valid:
    raise BitbertError(f'{field}={v!r}: valid: {", ".join(map(str, valid))}')
