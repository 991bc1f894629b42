"""The training loop: `train_and_evaluate(config, workdir)`, used by the CLI, the notebook and the tests.

One jitted `step.train_step` over a `Mesh` of every device: parameters replicated, the global
batch sharded over the mesh axis 'data', state donated. The step's randomness is
fold_in(key(seed), step) and the batch is a pure function of (seed, step) (`ood_jax.trainer.data.pipeline`),
so a run restored from its latest orbax checkpoint continues bitwise as if it had never stopped. A
non-finite loss or gradient leaves the state untouched, is recorded with its step, and stops the run
at the next host check before anything is saved, so the last good checkpoint stays intact.

Faults (docs/fault_tolerance.md has the table of what each costs): a preemption notice (SIGTERM,
or JAX's preemption sync point on several hosts) ends the run after the current step with a
checkpoint of that step and `PreemptedError` (`experiments.train` exits with `PREEMPTED_EXIT_CODE`); a
damaged latest checkpoint is reported and, under the same config, skipped for the previous good one
(`checkpoint.resume`); a config that changed under existing checkpoints is refused
(`checkpoint.check_config_unchanged`); a failed checkpoint write stops the run with
`checkpoint.CheckpointWriteError` and leaves the earlier steps intact. `checkpoint_every_minutes`
adds saves by wall-clock time, for epochs longer than one is willing to lose.

Every `log_every_steps` steps the loop writes the mean loss (and the method's other metrics), steps/s,
in-distribution images/s and, where the device's peak is known, the MFU of the step's XLA FLOPs
(`ood_jax.trainer.throughput`) to the log, TensorBoard and <workdir>/metrics.jsonl.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from ood_jax.trainer import checkpoint
from ood_jax.trainer import evaluate
from ood_jax.trainer import experiment as experiment_lib
from ood_jax.trainer import finetune
from ood_jax.trainer import optim
from ood_jax.trainer import preemption
from ood_jax.trainer import profiling
from ood_jax.evaluation import report
from ood_jax.trainer import sharding
from ood_jax.trainer import step as step_lib
from ood_jax.trainer import throughput
from ood_jax.trainer import xla_options
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import pipeline
from ood_jax.trainer.data import sources

# Exit status of `experiments.train` when a preemption notice stopped training after a checkpoint:
# re-run the same command to resume (os.EX_TEMPFAIL, 75).
PREEMPTED_EXIT_CODE = preemption.PREEMPTED_EXIT_CODE
PreemptedError = preemption.PreemptedError


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient."""


def _check_finite(state: step_lib.TrainState, writer: checkpoint.Writer) -> None:
  bad = int(state.bad_step)
  if bad >= 0:
    writer.wait()  # let the last good (asynchronous) save complete before we stop
    last = writer.latest_step()
    kept = f'the last good checkpoint (step {last}) was left intact' if last is not None else 'no checkpoint was saved'
    raise NonFiniteLossError(
        f'Non-finite loss or gradient at step {bad}; training stopped. The parameters are those '
        f'before that step; {kept}. A lower --config.optimizer.learning_rate or gradient clipping '
        f'(--config.optimizer.grad_clip_norm=1.0, which ICE needs) usually cures it: in a fresh --workdir, '
        f'or in this one with --config.allow_config_change=True to continue from that checkpoint.')


def _time_to_save(last_save: float, every_seconds: float, *, host_check: bool) -> bool:
  """Whether `checkpoint_every_minutes` has elapsed since the last save, the same answer on every host.

  One process decides by its clock after every step. Several must agree (a save is a collective), so
  they use process 0's clock, broadcast only at the steps where the loop synchronises with the host
  anyway (`host_check`: log and checkpoint steps); a broadcast per step would stall the dispatch
  pipeline of an accelerator.
  """
  if not every_seconds:
    return False
  if jax.process_count() == 1:
    return time.monotonic() - last_save >= every_seconds
  if not host_check:
    return False
  due = time.monotonic() - last_save >= every_seconds
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))


def _sync_hosts(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _append_jsonl(path: str, record: dict) -> None:
  # A plain-text copy of the logged scalars, for scripts and tests that should not parse TensorBoard.
  if jax.process_index() == 0:
    with open(path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')


def _batches(exp: experiment_lib.Experiment, train_data: sources.ArrayData, mesh, wait):
  """step → the global training batch ('image', 'label' and, for outlier exposure, 'outlier').

  `wait` is the mesh's `sharding.program_barrier`, applied to each program that builds a batch.
  """
  settings = exp.settings
  stream = pipeline.TrainStream(train_data.images, train_data.labels, global_batch_size=settings.batch_size,
                                seed=settings.seed, mesh=mesh, augment=settings.augment, mean=exp.mean, std=exp.std)
  outliers = None
  if settings.outliers is not None:
    cfg = settings.outliers
    data = catalog.load_outlier_set(cfg.source, exp.info, data_dir=settings.data_dir, split=cfg.split,
                                    max_examples=cfg.max_examples, seed=settings.seed, download=settings.download)
    outliers = pipeline.outlier_stream(data.images, global_batch_size=cfg.batch_size, seed=settings.seed, mesh=mesh,
                                       augment=cfg.augment, mean=exp.mean, std=exp.std)

  def batch_at(step):
    batch = wait(stream.batch(step))
    if outliers is not None:
      batch['outlier'] = wait(outliers.batch(step)['image'])
    return batch

  return batch_at, math.ceil(stream.steps_per_epoch)


def train(exp: experiment_lib.Experiment, workdir: str, mesh, *,
          config_unchanged: bool = True) -> step_lib.TrainState:
  """Trains `exp` to its last step, checkpointing to <workdir>/checkpoints; returns the final state.

  Args:
    exp: the experiment.
    workdir: the run's folder.
    mesh: the device mesh.
    config_unchanged: whether the workdir's config.json matched the config
      (`checkpoint.check_config_unchanged` found no difference); falling back past a damaged
      checkpoint to one without a config fingerprint needs it.

  Raises:
    PreemptedError: a preemption notice arrived; the checkpoint of the last completed step is on disk.
    NonFiniteLossError: a step produced a non-finite loss or gradient.
    checkpoint.CheckpointRestoreError: no checkpoint of the workdir restores (and none may be fallen back to).
    checkpoint.CheckpointWriteError: a checkpoint could not be written (disk full, …).
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  config, settings = exp.config, exp.settings
  train_data, _ = catalog.load_train_and_validation(
      exp.info, validation_fraction=settings.validation_fraction, data_dir=settings.data_dir,
      download=settings.download)
  wait = sharding.program_barrier(mesh)
  batch_at, steps_per_epoch = _batches(exp, train_data, mesh, wait)
  total_steps = settings.num_steps or settings.num_epochs * steps_per_epoch
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch, total_steps)
  optimizer = optim.make_optimizer(config.optimizer, schedule)
  init_key, step_key = jax.random.split(jax.random.key(settings.seed))
  replicated = sharding.replicated(mesh)
  state_fn = functools.partial(step_lib.create_state, exp.model, optimizer, exp.info.image_shape)
  abstract_state = jax.eval_shape(state_fn, init_key)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  fingerprint = checkpoint.config_fingerprint(config)

  # Initialisation, in order of precedence:
  # 1. resume: the newest checkpoint of this workdir that restores, exactly (same shardings, same
  #    step); a damaged newer one is reported, and skipped only under the same config;
  # 2. fine-tune: fresh state with the pretrained variables of config.init_from merged in;
  # 3. scratch: fresh state from key(seed).
  if checkpoint.latest_step(os.path.join(workdir, checkpoint.CHECKPOINTS)) is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                          state_sharding)
    state, restored_step = checkpoint.resume(workdir, target=target, fingerprint=fingerprint,
                                             config_unchanged=config_unchanged)
    logging.info('Restored checkpoint at step %d from %s.', restored_step,
                 os.path.join(workdir, checkpoint.CHECKPOINTS))
  else:
    state = jax.jit(state_fn, out_shardings=state_sharding)(init_key)
    if settings.init_from:
      state = finetune.initialize_from(exp, state, train_data, mesh=mesh, state_sharding=state_sharding)
  # Opened after `resume`, which may have moved damaged steps away: orbax lists the steps once. On
  # several hosts, only once every host has decided between resume and scratch: the Writer creates
  # the folder, and a host that saw it appear would take the other branch (and other collectives).
  _sync_hosts('ood_jax.trainer.train.resume_decided')
  checkpoints = checkpoint.Writer(workdir, max_to_keep=settings.keep_checkpoints,
                                  metadata={checkpoint.FINGERPRINT: fingerprint})

  base_model, base_variables = None, None
  if exp.base is not None:
    base_model = exp.base.model
    restored = checkpoint.restore(settings.base_model, sharding=replicated)
    base_variables = step_lib.model_variables(restored['params'], restored.get('batch_stats'))
  step_fn = jax.jit(
      functools.partial(step_lib.train_step, model=exp.model, method=exp.method, optimizer=optimizer,
                        schedule=schedule, hparams=dict(settings.method_hparams),
                        key=step_key, base_model=base_model),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0, compiler_options=xla_options.compiler_options(not settings.xla_cpu_defaults))

  # TensorBoard summaries on process 0 only; the progress line below is the one log line per interval (clu's
  # default writer would log every scalar a second time).
  writer = metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)] if jax.process_index() == 0 else [])
  log_every = settings.log_every_steps
  checkpoint_every = settings.checkpoint_every_steps
  every_seconds = 60.0 * settings.checkpoint_every_minutes
  start = int(state.step)
  interval_start, interval_step, sums = time.perf_counter(), start, None
  last_save = time.monotonic()

  flops, peak = None, throughput.peak_flops(jax.devices()[0], settings.dtype, override_tflops=settings.peak_tflops)

  def count_flops(batch):
    # Lowering is cached by jit, so the step is still traced and compiled once, by its first call.
    flops = throughput.device_flops(step_fn.lower(state, batch, base_variables), mesh.devices.size)
    logging.info('Train step: %s GFLOP per device (XLA cost analysis); peak %s TFLOP/s (%s, %s).',
                 'unknown' if flops is None else f'{flops / 1e9:,.1f}',
                 'unknown' if peak is None else f'{peak / 1e12:g}',
                 jax.devices()[0].device_kind, settings.dtype)
    return flops

  def log(done):
    means = {name: float(total) / (done - interval_step) for name, total in sums.items()}
    steps_per_sec = (done - interval_step) / max(time.perf_counter() - interval_start, 1e-9)
    rates = {'steps_per_sec': steps_per_sec,
             **throughput.rates(steps_per_sec, batch_size=settings.batch_size, flops=flops, peak=peak)}
    writer.write_scalars(done, {**means, **rates})
    _append_jsonl(os.path.join(workdir, 'metrics.jsonl'), {'step': done, **means, **rates})
    logging.info('step %d/%d epoch %.2f loss %.4f %.2f steps/s %s img/s%s ETA %s', done, total_steps,
                 done / steps_per_epoch, means['loss'], steps_per_sec, f'{rates["images_per_sec"]:,.0f}',
                 f' MFU {100 * rates["mfu"]:.1f}%' if 'mfu' in rates else '',
                 _format_eta((total_steps - done) / steps_per_sec))

  # The SIGTERM handler lives exactly as long as the loop (see `preemption`): before it nothing was
  # trained since the restored checkpoint, after it the last checkpoint is complete.
  # config.profile_steps: jax.profiler traces of those steps into <workdir>/profile (profiling.StepProfiler).
  profile = profiling.StepProfiler(settings.profile_steps, os.path.join(workdir, 'profile'))
  with preemption.Watch() as watch, profile:
    for step in range(start, total_steps):
      with profile.step(step + 1):
        batch = batch_at(step)
        if step == start:
          flops = count_flops(batch)
        state, step_metrics = wait(step_fn(state, batch, base_variables))
      profile.step_done(step + 1, state)
      sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
      done = step + 1
      preempted = watch.reached(done)  # every host, every step: JAX's sync-point protocol asks for it
      logged = done % log_every == 0 or done == total_steps
      if logged or preempted:  # a preempted run logs its partial interval: no logged step is lost
        _check_finite(state, checkpoints)
        log(done)
        interval_start, interval_step, sums = time.perf_counter(), done, None
      periodic = done % checkpoint_every == 0 or done == total_steps
      if periodic or preempted or _time_to_save(last_save, every_seconds, host_check=logged):
        _check_finite(state, checkpoints)
        checkpoints.save(done, state)
        last_save = time.monotonic()
      if preempted:
        checkpoints.wait()
        writer.flush()
        logging.warning('Preempted after step %d: checkpoint saved in %s; exiting.', done, checkpoints.directory)
        raise PreemptedError(done, checkpoints.directory)
  checkpoints.wait()
  writer.flush()
  return state


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[experiment_lib.Experiment, Any, bool]:
  """Everything before training: XLA flags, compilation cache, `jax.distributed`, config checks, config.json, mesh.

  Returns:
    (experiment, mesh, config_unchanged): `config_unchanged` is False when the workdir's checkpoints
    were trained under a config that differs in a counted field and `allow_config_change` let it
    through; `train` takes it.

  Raises:
    checkpoint.ConfigChangedError: the workdir holds checkpoints of a different config.
    sources.DatasetNotFoundError: a data set the run reads is missing (all of them are listed).
  """
  # Before anything starts JAX's backend (make_experiment counts the devices): XLA reads XLA_FLAGS when it starts,
  # and jax.distributed must come first.
  process = experiment_lib.process_settings(config)
  xla_options.set_deterministic(process.deterministic)
  xla_options.use_compilation_cache(process.compilation_cache_dir)
  if config.distributed:
    initialize_distributed()
  exp = experiment_lib.make_experiment(config)
  experiment_lib.check_data(exp)  # every data set present before anything is trained or written
  # Before save_config replaces config.json: refuse to resume checkpoints of another config.
  changed = checkpoint.check_config_unchanged(config, workdir)
  checkpoint.save_config(config, workdir)
  mesh = sharding.make_mesh(jax.devices()[:exp.settings.num_devices] if exp.settings.num_devices else None)
  return exp, mesh, not changed


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured model (resuming from <workdir>/checkpoints if there are any), then evaluates it.

  Returns:
    the evaluation results (also written to <workdir>/results.json and results.md).

  Raises:
    PreemptedError: training stopped on a preemption notice after saving (nothing is evaluated).
    checkpoint.ConfigChangedError: the workdir holds checkpoints of a different config.
  """
  exp, mesh, config_unchanged = prepare(config, workdir)
  state = train(exp, workdir, mesh, config_unchanged=config_unchanged)
  results = evaluate.evaluate_model(exp, step_lib.model_variables(state.params, state.batch_stats), mesh,
                                   workdir=workdir)
  report.write_results(results, workdir)
  return results


def initialize_distributed() -> None:
  """`jax.distributed.initialize` for `config.distributed`, from the cluster or from the environment.

  On TPU pods, Slurm and Open MPI JAX finds the coordinator, the process count and this process's
  index itself. Elsewhere (several machines by hand, or several processes on one, as the tests do)
  set JAX_COORDINATOR_ADDRESS (host:port of process 0, read by JAX), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (read here). CPU processes talk through gloo collectives, JAX's default for CPU
  since 0.4.x; it is set explicitly for versions where no implementation is the default.
  """
  if jax.distributed.is_initialized():  # a launcher (or an earlier call) did it already
    return
  kwargs = {}
  for name, key in (('JAX_NUM_PROCESSES', 'num_processes'), ('JAX_PROCESS_ID', 'process_id')):
    if os.environ.get(name):
      kwargs[key] = int(os.environ[name])
  try:
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:  # a JAX without the option: nothing to choose
    pass
  jax.distributed.initialize(**kwargs)
