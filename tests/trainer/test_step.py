"""The training step: one SGD step by hand, and the non-finite guard (state kept, first bad step recorded)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ood_jax import methods
from ood_jax import models
from ood_jax.trainer import step as step_lib


def _setup(learning_rate=0.5):
  model = models.make_classifier('mlp', 'dense', 3, hidden=(5,))
  optimizer = optax.sgd(learning_rate)
  state = step_lib.create_state(model, optimizer, (2, 2, 1), jax.random.key(0))
  method = methods.get_method('softmax')
  fn = jax.jit(functools.partial(step_lib.train_step, model=model, method=method, optimizer=optimizer,
                                 schedule=lambda s: learning_rate, hparams=dict(method.hparams),
                                 key=jax.random.key(1)))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32), 'label': jnp.array([0, 1, 2, 0])}
  return model, state, fn, batch


def test_create_state_starts_at_step_zero_with_no_bad_step():
  _, state, _, _ = _setup()
  assert int(state.step) == 0 and int(state.bad_step) == -1
  assert state.batch_stats == {}  # an MLP has no batch norm
  assert step_lib.model_variables(state.params, state.batch_stats) == {'params': state.params}


def test_a_step_is_plain_sgd_on_the_mean_cross_entropy():
  model, state, fn, batch = _setup()
  new_state, logged = fn(state, batch)

  def loss(params):
    logits, _ = model.apply({'params': params}, batch['image'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  grads = jax.grad(loss)(state.params)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(logged['loss']), float(loss(state.params)), rtol=1e-6)
  assert int(new_state.step) == 1 and int(new_state.bad_step) == -1 and float(logged['learning_rate']) == 0.5


def test_non_finite_step_keeps_the_state_and_records_the_first_bad_step():
  _, state, fn, batch = _setup()
  state, _ = fn(state, batch)  # step 0: fine
  poisoned = {**batch, 'image': batch['image'].at[0, 0, 0, 0].set(jnp.nan)}
  after_bad, logged = fn(state, poisoned)  # step 1: NaN loss and gradients
  assert not np.isfinite(float(logged['loss']))
  assert int(after_bad.step) == 2 and int(after_bad.bad_step) == 1
  for kept, before in zip(jax.tree.leaves((after_bad.params, after_bad.opt_state)),
                          jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(before))  # untouched, bitwise
  later, _ = fn(after_bad, poisoned)  # step 2: bad again; the first bad step stays recorded
  assert int(later.bad_step) == 1
  recovered, _ = fn(later, batch)  # a finite step after a bad one still updates
  assert int(recovered.bad_step) == 1
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(recovered.params), jax.tree.leaves(later.params)))


def test_step_randomness_is_fold_in_of_the_step():
  """Two states at the same step give the same update: no hidden randomness."""
  _, state, fn, batch = _setup()
  first, _ = fn(state, batch)
  again, _ = fn(state, batch)
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
