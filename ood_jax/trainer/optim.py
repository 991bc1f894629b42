"""Learning-rate schedules and optimisers from a config's `optimizer` block (the papers' recipes)."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'adam')
SCHEDULES = ('constant', 'step', 'cosine')


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
  """Learning rate per step: constant, step decay at given epochs, or cosine; optional linear warm-up."""
  base = cfg.learning_rate
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if cfg.schedule == 'step':
      epoch = jnp.floor(step / steps_per_epoch)
      drops = sum((epoch >= e).astype(jnp.float32) for e in cfg.decay_epochs)
      lr = base * cfg.decay_factor**drops
    elif cfg.schedule == 'cosine':
      progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
      lr = base * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      lr = jnp.asarray(base, jnp.float32)
    if warmup:
      lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup)
    return lr

  return schedule


def make_optimizer(cfg: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  """SGD (momentum, Nesterov) or Adam, with L2 weight decay on every parameter, optional clipping.

  Decay is added to the gradient before momentum, as PyTorch's `weight_decay` does in the papers'
  code, and applies to all parameters, prototypes included (the IsoMax recipe).
  """
  # Clipping (off by default) tames heads whose loss grows with squared distances, e.g. ICE.
  clip = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
  decay = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
  if cfg.name == 'sgd':
    step = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
  else:
    step = optax.adam(schedule)
  return optax.chain(*clip, *decay, step)
