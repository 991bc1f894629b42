"""Traces of chosen training steps with `jax.profiler`, for TensorBoard's profile tab (`config.profile_steps`).

The loop names every step with `jax.profiler.StepTraceAnnotation('train', step_num=n)` (free while no trace is
recorded), so that the profile tab splits a trace into steps; `StepProfiler` starts a trace before the first step
of each run of consecutive chosen steps and stops it once the last one's device work has finished, writing
`<logdir>/steps_<first>-<last>/plugins/profile/<time>/<host>.xplane.pb`, the layout TensorBoard's profile plugin
(`tensorboard --logdir <workdir>`, with the `tensorboard-plugin-profile` / `xprof` package) reads, one TensorBoard
run per run of steps (the profiler names its folders by the second, so two traces of one second would collide).
The same design as flax's ImageNet example and big_vision's `train.py`, which trace a few steps of a running job.
"""

from __future__ import annotations

import contextlib
import os

from absl import logging
import jax


def _runs(steps) -> list[tuple[int, int]]:
  """Sorted step numbers → (first, last) of each run of consecutive ones."""
  runs = []
  for step in sorted(set(steps)):
    if runs and step == runs[-1][1] + 1:
      runs[-1] = (runs[-1][0], step)
    else:
      runs.append((step, step))
  return runs


class StepProfiler:
  """Records a `jax.profiler` trace of the chosen steps into `logdir`; a context manager around the loop.

  Usage: `with StepProfiler(steps, logdir) as profiler:` then, for each step n (counted from 1),
  `with profiler.step(n): ...` around the step's work and `profiler.step_done(n, outputs)` after it.
  """

  def __init__(self, steps, logdir: str):
    # Step → the run it belongs to: a run resumed in its middle is traced from the first step this process runs.
    self._run_of = {n: (first, last) for first, last in _runs(steps) for n in range(first, last + 1)}
    self._logdir = logdir
    self._tracing = False

  def __enter__(self) -> StepProfiler:
    return self

  def __exit__(self, *exc_info) -> None:
    if self._tracing:  # the loop stopped inside a traced run (preemption, error): keep what was recorded
      self._stop()

  @contextlib.contextmanager
  def step(self, n: int):
    """Around step n's host work: the step annotation; starts a trace at the first step of a run it reaches."""
    if n in self._run_of and not self._tracing:
      first, last = self._run_of[n]
      jax.profiler.start_trace(os.path.join(self._logdir, f'steps_{first}-{last}'))
      self._tracing = True
    with jax.profiler.StepTraceAnnotation('train', step_num=n):
      yield

  def step_done(self, n: int, outputs) -> None:
    """After step n: at a run's last step, waits for `outputs` (the device work) and writes the trace."""
    if self._tracing and self._run_of.get(n, (0, 0))[1] == n:
      jax.block_until_ready(outputs)
      self._stop()
      logging.info('Profile of step(s) up to %d written to %s (TensorBoard: tensorboard --logdir %s).', n,
                   self._logdir, self._logdir)

  def _stop(self) -> None:
    self._tracing = False
    jax.profiler.stop_trace()
