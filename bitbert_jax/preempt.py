"""SIGTERM as a request to stop at the next safe point: a flag, read by the loops that can last
minutes (train steps, tokenization, corpus streaming, augmentation, evaluation, export)."""
import contextlib
import signal
import threading

import jax

from bitbert_jax import distributed


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was written where there is train state; exit cleanly."""

  def __init__(self, stage, step, during=None):
    at = f'at stage {stage} step {step}' if stage is not None else ''
    where = f'{" " if at else ""}during {during}' if during else ''
    super().__init__(f'preempted {at}{where}; re-run the same command to resume')
    self.stage, self.step, self.during = stage, step, during


_PREEMPT = threading.Event()


def _on_sigterm(signum, frame):
  del signum, frame
  _PREEMPT.set()  # acted on at the next safe point: after a step, a data chunk, or a stage


@contextlib.contextmanager
def preemptible():
  """While active, SIGTERM sets a flag (`preempt_requested`) instead of killing the process.

  Nested uses share the outermost handler; outside the main thread it does nothing.
  """
  main = threading.current_thread() is threading.main_thread()
  if not main or signal.getsignal(signal.SIGTERM) is _on_sigterm:
    yield
    return
  _PREEMPT.clear()
  previous = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    _PREEMPT.clear()  # a request is for this run only; later library calls start clean


def local_request():
  """True once SIGTERM arrived at this process (the others may not know yet)."""
  return _PREEMPT.is_set()


def preempt_requested():
  """True once SIGTERM arrived (on any host: all hosts must stop at the same step)."""
  return distributed.any_process(_PREEMPT.is_set())[0]


def check(during):
  """Raises Preempted once SIGTERM arrived; `during` names the phase ('tokenization', ...).

  Local only (no cross-host agreement): data phases run at different speeds on each host. The
  train loop catches it and fills in its stage and step after a checkpoint. With several
  processes it never raises: the train loop's agreed step boundary stops them all together.
  """
  # One process stopping alone would leave the others waiting in their next collective.
  if _PREEMPT.is_set() and jax.process_count() == 1:
    raise Preempted(None, 0, during)
