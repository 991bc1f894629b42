"""Learning-rate schedules and optimisers against hand-computed values."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from ood_jax.trainer import optim


def test_schedules_against_hand_values():
  cfg = ml_collections.ConfigDict(dict(learning_rate=0.1, schedule='step', decay_epochs=(150, 200, 250),
                                       decay_factor=0.1, warmup_epochs=0.0))
  schedule = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=3000)
  got = [float(schedule(s)) for s in (0, 1499, 1500, 1999, 2000, 2500, 2999)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001], rtol=1e-6)

  cfg.schedule, cfg.warmup_epochs = 'cosine', 1.0
  schedule = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=110)
  np.testing.assert_allclose(float(schedule(0)), 0.1 * 1 / 10, rtol=1e-6)  # warm-up: (s + 1)/10
  np.testing.assert_allclose(float(schedule(9)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), 0.1 * 0.5 * (1 + np.cos(np.pi * 50 / 100)), rtol=1e-5)
  np.testing.assert_allclose(float(schedule(110)), 0.0, atol=1e-9)


def test_sgd_nesterov_with_weight_decay_on_prototypes():
  cfg = ml_collections.ConfigDict(dict(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=True,
                                       weight_decay=1e-4, schedule='constant', grad_clip_norm=0.0))
  optimizer = optim.make_optimizer(cfg, lambda step: 0.1)
  params = {'prototypes': jnp.array([[1.0, -2.0]])}
  grads = {'prototypes': jnp.array([[0.5, 0.25]])}
  state = optimizer.init(params)
  # PyTorch SGD(nesterov, weight_decay): g' = g + wd·p; buf = g'; step = g' + μ·buf.
  updates, state = optimizer.update(grads, state, params)
  g = np.array([[0.5, 0.25]]) + 1e-4 * np.array([[1.0, -2.0]])
  np.testing.assert_allclose(updates['prototypes'], -0.1 * (g + 0.9 * g), rtol=1e-6)

