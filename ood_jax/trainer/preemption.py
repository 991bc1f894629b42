"""Preemption: the scheduler's notice (SIGTERM) becomes "finish this step, save, exit" at a step boundary.

TPU and GPU fleets preempt a job by sending SIGTERM and killing it a grace period later (typically
30 s). The default action of SIGTERM ends the process at once and loses every step since the last
checkpoint, so while the loop runs, `Watch` turns the notice into a request the loop reads after
each step: the step in flight completes, the loop saves a checkpoint of exactly that step, flushes
its logs and raises `PreemptedError`; `experiments.train` exits with `PREEMPTED_EXIT_CODE`.
Re-running the same command restores that checkpoint, and since the batch and the randomness of step s are pure
functions of (seed, s) the resumed run is bitwise the uninterrupted one.

One process: a Python SIGTERM handler sets a flag, installed only while the loop runs (outside it,
during data loading, compilation or evaluation, SIGTERM keeps its previous meaning) and restored
afterwards.

Several processes (`jax.distributed`): the hosts must agree on the step at which all of them save,
because orbax's save is a collective and a host that saved alone would wait for the others
forever. JAX's preemption service does exactly this: `jax.distributed.initialize` installs its own
SIGTERM handler (in C++, invisible to Python's `signal` module, which is why this module must not
replace it), a notice on any host is propagated to all, and
`multihost_utils.reached_preemption_sync_point(step)` becomes True on every host at the same step
(the largest step any host had reached, plus one). The loop calls it after every step, on every
host, from the same starting step, as that protocol requires.
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils

__all__ = ['PREEMPTED_EXIT_CODE', 'PreemptedError', 'Watch']

# sysexits.h's EX_TEMPFAIL, "temporary failure, the user is invited to retry": distinct from 0
# (finished), 1 (an error) and 128 + 15 = 143 (killed by SIGTERM before it could save), so a job
# scheduler or wrapper script can tell "re-run the same command" apart from a real failure.
PREEMPTED_EXIT_CODE = getattr(os, 'EX_TEMPFAIL', 75)


class PreemptedError(Exception):
  """Training stopped on a preemption notice, after saving a checkpoint of step `step`.

  Attributes:
    step: the last completed step; the checkpoint of that step is complete on disk (None if the
      notice came before the first step and there was nothing new to save).
    directory: the checkpoints folder.
  """

  def __init__(self, step: int | None, directory: str):
    self.step = step
    self.directory = directory
    saved = (f'saved a checkpoint of step {step} in {directory}' if step is not None else
             f'nothing new to save in {directory}')
    super().__init__(f'Preempted (SIGTERM): {saved}. Run the same command again to resume; it continues '
                     f'bitwise as if it had not stopped.')


class Watch:
  """Context manager: the preemption notices of one training loop.

  Use::

    with preemption.Watch() as watch:
      for step in ...:
        ...one step...
        if watch.reached(step + 1):  # every host, every step
          save; raise preemption.PreemptedError(...)
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    self._installed = False
    self._multihost = jax.process_count() > 1
    self._sync_point_available = True

  def __enter__(self) -> Watch:
    if self._multihost:
      # JAX's preemption service owns SIGTERM (see the module docstring): nothing to install.
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Training runs outside the main thread: SIGTERM cannot be caught there, so a '
                      'preemption loses the steps since the last checkpoint.')
      return self
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:
      # A handler installed outside Python (C/C++): Python could not put it back afterwards.
      logging.warning('SIGTERM has a handler installed outside Python; leaving it in place, so a preemption '
                      'loses the steps since the last checkpoint.')
      return self
    self._previous = previous
    signal.signal(signal.SIGTERM, self._handle)
    self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _handle(self, signum, frame) -> None:
    del frame
    if not self._requested:
      logging.warning('Received signal %d (preemption notice): finishing the current step, then saving a '
                      'checkpoint and exiting with status %d.', signum, PREEMPTED_EXIT_CODE)
    self._requested = True

  def requested(self) -> bool:
    """Whether this process has received a notice (one process only; several agree via `reached`)."""
    return self._requested

  def reached(self, step: int) -> bool:
    """True when the loop should save `step` (steps taken) and stop; call on every host after every step."""
    if not self._multihost:
      return self._requested
    if not self._sync_point_available:
      return False
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError as e:  # the preemption service is off (jax_enable_preemption_service=False)
      logging.warning('JAX preemption service unavailable (%s): a preemption loses the steps since the last '
                      'checkpoint.', e)
      self._sync_point_available = False
      return False
