"""Training with auxiliary outliers (Wu et al. 2022): OE, Energy and ICE.

The in-distribution images and the outliers go through the network in one forward pass (as the
reference implementations concatenate them, so BatchNorm sees both), then the logits are split:

  OE:     CE(z_in, y) + λ·mean CE(z_out, uniform),                       λ = 0.5
  Energy: CE(z_in, y) + λ·[mean relu(E_in − m_in)² + mean relu(m_out − E_out)²],  λ = 0.1
  ICE:    CE(h_in, y) + λ·[mean −h_y(z_in) + mean −log(1 − exp(max_k h_k(z_out)))],  λ = 1
          with h the Mahalanobis head (eq. 0.15).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import losses
from ood_jax.methods import base


def _inputs(batch, rng, hparams, base):
  del rng, hparams, base
  return jnp.concatenate([batch['image'], batch['outlier']], axis=0)


def _split(logits, batch):
  n = batch['label'].shape[0]
  return logits[:n], logits[n:]


def _cross_entropy(logits_in, batch):
  ce = jnp.mean(losses.softmax_cross_entropy(logits_in, batch['label']))
  accuracy = jnp.mean(jnp.argmax(logits_in, axis=-1) == batch['label'])
  return ce, accuracy


def _oe_loss(logits, features, batch, *, weight):
  del features
  logits_in, logits_out = _split(logits, batch)
  ce, accuracy = _cross_entropy(logits_in, batch)
  outlier = jnp.mean(losses.outlier_exposure(logits_out))
  return ce + weight * outlier, {'accuracy': accuracy, 'ce': ce, 'outlier_loss': outlier}


def _energy_loss(logits, features, batch, *, weight, margin_in, margin_out):
  del features
  logits_in, logits_out = _split(logits, batch)
  ce, accuracy = _cross_entropy(logits_in, batch)
  regulariser = (jnp.mean(losses.energy_in_margin(logits_in, margin=margin_in)) +
                 jnp.mean(losses.energy_out_margin(logits_out, margin=margin_out)))
  return ce + weight * regulariser, {'accuracy': accuracy, 'ce': ce, 'energy_loss': regulariser}


def _ice_loss(logits, features, batch, *, weight):
  del features
  logits_in, logits_out = _split(logits, batch)
  ce, accuracy = _cross_entropy(logits_in, batch)
  regulariser = (jnp.mean(losses.ice_in(logits_in, batch['label'])) +
                 jnp.mean(losses.ice_out(logits_out)))
  return ce + weight * regulariser, {'accuracy': accuracy, 'ce': ce, 'ice_loss': regulariser}


OE = base.Method(
    name='oe', head='dense', loss=_oe_loss, probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'), inputs=_inputs, needs_outliers=True,
    hparams={'weight': 0.5})

ENERGY = base.Method(
    name='energy', head='dense', loss=_energy_loss, probabilities=jax.nn.softmax,
    scores=('energy', 'max_softmax', 'max_logit'), inputs=_inputs, needs_outliers=True,
    # Code defaults of Liu et al.; their CIFAR-10 runs used (−23, −5), CIFAR-100 (−27, −5).
    hparams={'weight': 0.1, 'margin_in': -25.0, 'margin_out': -7.0})

ICE = base.Method(
    name='ice', head='mahalanobis', loss=_ice_loss, probabilities=jax.nn.softmax,
    # max h = log of the paper's confidence exp(max h): the same ranking, but exp underflows to 0 in
    # float32 once max h < −87, which early in training ties every example. Both are reported.
    scores=('max_logit', 'max_likelihood', 'max_softmax'), inputs=_inputs, needs_outliers=True,
    hparams={'weight': 1.0})
