"""The training state and the pure, jitted training step.

`train_step(state, batch, base_variables)` is pure in its arguments: its randomness is
fold_in(key, state.step), so a resumed run takes exactly the steps of an uninterrupted one. A
non-finite loss or gradient leaves parameters, batch statistics and optimiser state untouched and
records the first such step in `state.bad_step`, which the loop checks on the host.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ood_jax import methods as methods_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; exactly what a checkpoint holds."""

  step: jax.Array  # int32 scalar: the number of steps taken
  params: Any
  batch_stats: Any
  opt_state: Any
  bad_step: jax.Array  # int32 scalar: first step with a non-finite loss or gradient, −1 if none


def model_variables(params, batch_stats) -> dict:
  """The variables dict `model.apply` takes ('batch_stats' only for models that have them)."""
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def create_state(model, optimizer: optax.GradientTransformation, image_shape, key) -> TrainState:
  """Initial parameters (from `key`), batch statistics and optimiser state."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = model.init({'params': key, 'dropout': key}, dummy, train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=optimizer.init(params),
                    bad_step=jnp.full((), -1, jnp.int32))


def train_step(state: TrainState, batch, base_variables=None, *, model, method, optimizer, schedule, hparams,
               key, base_model=None):
  """One optimisation step; pure in (state, batch, base_variables).

  Args:
    state: the `TrainState` before the step.
    batch: the global batch: 'image', 'label' and, for outlier exposure, 'outlier'.
    base_variables: variables of the frozen `base_model` (SMOT), passed as an argument so that they
      are not baked into the compiled program as constants; None without a base model.
    model: the `Classifier` being trained.
    method: its `ood_jax.methods.Method`.
    optimizer: the optax transformation.
    schedule: step → learning rate (logged).
    hparams: keyword arguments of `method.loss`.
    key: the run's step key; the step uses fold_in(key, state.step).
    base_model: the frozen base `Classifier`, or None.

  Returns:
    (new state, metrics): the metrics are the loss, the learning rate and the method's own.
  """
  rng = jax.random.fold_in(key, state.step)
  input_rng, dropout_rng = jax.random.split(rng)
  base = None if base_model is None else methods_lib.BaseModel(base_model, base_variables)
  inputs = method.inputs(batch, input_rng, hparams, base)
  if isinstance(inputs, tuple):
    inputs, extra = inputs
    batch = {**batch, **extra}

  def loss_fn(params):
    (logits, features), updates = model.apply(
        model_variables(params, state.batch_stats), inputs, train=True, mutable=['batch_stats'],
        rngs={'dropout': dropout_rng})
    batch_stats, seen = updates.get('batch_stats', state.batch_stats), batch
    if method.update_state is not None:  # a memory of past batches (VOS/NPOS feature queues, CIDER prototypes)
      batch_stats, extra = method.update_state(batch_stats, logits, features, batch, **hparams)
      seen = {**batch, **extra}
    loss, metrics = method.loss(logits, features, seen, **hparams)
    return loss, (metrics, batch_stats)

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
  return new_state, {'loss': loss, 'learning_rate': schedule(state.step), **metrics}
