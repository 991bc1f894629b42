"""The training loop: `train_and_evaluate(config, workdir)`, used by the CLI, the notebook and the tests.

One jitted `step.train_step` over a `Mesh` of every device: parameters replicated, the global
batch sharded over the mesh axis 'data', state donated. The step's randomness is
fold_in(key(seed), step) and the batch is a pure function of (seed, step) (`ood_jax.data.pipeline`),
so a run restored from its latest orbax checkpoint continues bitwise as if it had never stopped. A
non-finite loss or gradient leaves the state untouched, is recorded with its step, and stops the run
at the next host check before anything is saved, so the last good checkpoint stays intact.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from ood_jax import checkpoint
from ood_jax import evaluate
from ood_jax import experiment as experiment_lib
from ood_jax import finetune
from ood_jax import optim
from ood_jax import report
from ood_jax import sharding
from ood_jax import step as step_lib
from ood_jax.data import catalog
from ood_jax.data import pipeline
from ood_jax.data import sources


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produced a non-finite loss or gradient."""


def _check_finite(state: step_lib.TrainState, manager) -> None:
  bad = int(state.bad_step)
  if bad >= 0:
    manager.wait_until_finished()  # let the last good (asynchronous) save complete before we stop
    last = manager.latest_step()
    kept = f'the last good checkpoint (step {last}) was left intact' if last is not None else 'no checkpoint was saved'
    raise NonFiniteLossError(
        f'Non-finite loss or gradient at step {bad}; training stopped. The parameters are those '
        f'before that step; {kept}. A lower --config.optimizer.learning_rate or gradient clipping '
        f'(--config.optimizer.grad_clip_norm=1.0, which ICE needs) usually cures it.')


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
  config = exp.config
  stream = pipeline.TrainStream(train_data.images, train_data.labels, global_batch_size=config.batch_size,
                                seed=config.seed, mesh=mesh, augment=config.augment, mean=exp.mean, std=exp.std)
  outliers = None
  if exp.method.needs_outliers:
    cfg = config.outliers
    data = catalog.load_outlier_set(cfg.source, exp.info, data_dir=config.get('data_dir'),
                                    split=cfg.get('split', 'train'), max_examples=cfg.get('max_examples'),
                                    seed=config.seed)
    outliers = pipeline.outlier_stream(data.images, global_batch_size=cfg.batch_size, seed=config.seed, mesh=mesh,
                                       augment=cfg.get('augment') or config.augment, mean=exp.mean, std=exp.std)
  def batch_at(step):
    batch = wait(stream.batch(step))
    if outliers is not None:
      batch['outlier'] = wait(outliers.batch(step)['image'])
    return batch

  return batch_at, math.ceil(stream.steps_per_epoch)


def train(exp: experiment_lib.Experiment, workdir: str, mesh) -> step_lib.TrainState:
  """Trains `exp` to its last step, checkpointing to <workdir>/checkpoints; returns the final state."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  config = exp.config
  train_data, _ = catalog.load_train_and_validation(
      exp.info, validation_fraction=config.get('validation_fraction', 0.0), data_dir=config.get('data_dir'))
  wait = sharding.program_barrier(mesh)
  batch_at, steps_per_epoch = _batches(exp, train_data, mesh, wait)
  total_steps = config.get('num_steps') or config.num_epochs * steps_per_epoch
  schedule = optim.make_schedule(config.optimizer, steps_per_epoch, total_steps)
  optimizer = optim.make_optimizer(config.optimizer, schedule)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  replicated = sharding.replicated(mesh)
  state_fn = functools.partial(step_lib.create_state, exp.model, optimizer, exp.info.image_shape)
  abstract_state = jax.eval_shape(state_fn, init_key)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  manager = checkpoint.manager(workdir, max_to_keep=config.get('keep_checkpoints', 2))

  # Initialisation, in order of precedence:
  # 1. resume: the latest checkpoint of this workdir, exactly (same shardings, same step);
  # 2. fine-tune: fresh state with the pretrained variables of config.init_from merged in;
  # 3. scratch: fresh state from key(seed).
  if manager.latest_step() is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                          state_sharding)
    state = checkpoint.restore(workdir, target=target)
    logging.info('Restored checkpoint at step %d from %s.', int(state.step), manager.directory)
  else:
    state = jax.jit(state_fn, out_shardings=state_sharding)(init_key)
    if config.get('init_from'):
      state = finetune.initialize_from(exp, state, train_data, mesh=mesh, state_sharding=state_sharding)

  base_model, base_variables = None, None
  if exp.base is not None:
    base_model = exp.base.model
    restored = checkpoint.restore(config.base_model, sharding=replicated)
    base_variables = step_lib.model_variables(restored['params'], restored.get('batch_stats'))
  step_fn = jax.jit(
      functools.partial(step_lib.train_step, model=exp.model, method=exp.method, optimizer=optimizer,
                        schedule=schedule, hparams={**exp.method.hparams, **config.get('method_kwargs', {})},
                        key=step_key, base_model=base_model),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  log_every = config.get('log_every_steps', 100)
  checkpoint_every = config.get('checkpoint_every_steps', steps_per_epoch)
  start = int(state.step)
  interval_start, interval_step, sums = time.perf_counter(), start, None
  for step in range(start, total_steps):
    state, step_metrics = wait(step_fn(state, batch_at(step), base_variables))
    sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
    done = step + 1
    if done % log_every == 0 or done == total_steps:
      _check_finite(state, manager)
      means = {name: float(total) / (done - interval_step) for name, total in sums.items()}
      steps_per_sec = (done - interval_step) / max(time.perf_counter() - interval_start, 1e-9)
      writer.write_scalars(done, {**means, 'steps_per_sec': steps_per_sec})
      _append_jsonl(os.path.join(workdir, 'metrics.jsonl'), {'step': done, **means, 'steps_per_sec': steps_per_sec})
      logging.info('step %d/%d epoch %.2f loss %.4f %.2f steps/s ETA %s', done, total_steps,
                   done / steps_per_epoch, means['loss'], steps_per_sec,
                   _format_eta((total_steps - done) / steps_per_sec))
      interval_start, interval_step, sums = time.perf_counter(), done, None
    if done % checkpoint_every == 0 or done == total_steps:
      _check_finite(state, manager)
      checkpoint.save(manager, done, state)
  manager.wait_until_finished()
  writer.flush()
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured model (resuming from <workdir>/checkpoints if there are any), then evaluates it.

  Returns:
    the evaluation results (also written to <workdir>/results.json and results.md).
  """
  if config.get('distributed', False):
    jax.distributed.initialize()
  exp = experiment_lib.make_experiment(config)
  checkpoint.save_config(config, workdir)
  mesh = sharding.make_mesh(jax.devices()[:config.num_devices] if config.get('num_devices') else None)
  state = train(exp, workdir, mesh)
  results = evaluate.evaluate_model(exp, step_lib.model_variables(state.params, state.batch_stats), mesh)
  report.write_results(results, workdir)
  return results
