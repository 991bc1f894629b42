"""Mixup (Zhang et al. 2018) and RegMixup (Pinto et al. 2022): training on convex combinations of images.

The batch is mixed on the device, inside the jitted step, by `mix_batch`: one λ ~ Beta(α, α) per batch
and a random partner for every image (a permutation of the batch), x̃_i = λ·x_i + (1 − λ)·x_π(i), as
Zhang et al. and OpenOOD. Its randomness is the step's input key, fold_in(seed key, step), so a resumed
run mixes exactly as an uninterrupted one.

  Mixup:    the model sees x̃ only; loss λ·CE(z̃, y_i) + (1 − λ)·CE(z̃, y_π(i)) (`losses.mixup_cross_entropy`);
            α = 1 in Zhang et al.'s CIFAR-10 runs, 0.2 in OpenOOD's recipe.
  RegMixup: the model sees [x; x̃] in one forward pass (BatchNorm sees both, as the reference code);
            loss CE(z, y) + η·mixup loss of x̃ (`losses.regmixup`), η = 1, α = 20 for CIFAR-10 (10 for
            CIFAR-100; the authors' commands and OpenOOD's CIFAR-10 script). The reference code averages
            F.cross_entropy over the 2B rows, half of that sum, and so does this method (a constant factor
            that keeps the reference learning rate).
Both are scored by MSP (OpenOOD v1.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax import losses
from ood_jax.methods import base


def mix_batch(images, labels, key, *, alpha):
  """(mixed images, partner labels, λ): x̃_i = λ·x_i + (1 − λ)·x_π(i), λ ~ Beta(α, α), π a permutation.

  Pure in `key` (jit-able); one λ for the whole batch, as Zhang et al. 2018 and OpenOOD.

  Args:
    images: `[B, ...]` floating images (normalised inputs: mixing commutes with the affine normalisation).
    labels: `[B]` integer labels.
    key: a PRNG key.
    alpha: α > 0 of the Beta distribution.
  """
  _checks.positive('alpha', alpha)
  images = _checks.floating('images', images, min_ndim=1)
  beta_key, permutation_key = jax.random.split(key)
  mix = jax.random.beta(beta_key, alpha, alpha)
  partners = jax.random.permutation(permutation_key, images.shape[0])
  mixed = mix.astype(images.dtype) * images + (1 - mix).astype(images.dtype) * images[partners]
  return mixed, jnp.asarray(labels)[partners], mix


def _mixup_inputs(batch, rng, hparams, base_model):
  del base_model
  mixed, partners, mix = mix_batch(batch['image'], batch['label'], rng, alpha=hparams['alpha'])
  return mixed, {'partner_label': partners, 'mix': mix}


def _regmixup_inputs(batch, rng, hparams, base_model):
  mixed, extra = _mixup_inputs(batch, rng, hparams, base_model)
  return jnp.concatenate([batch['image'], mixed], axis=0), extra


def _mixup_loss(logits, features, batch, *, alpha):
  del features, alpha
  mix = batch['mix']
  values = losses.mixup_cross_entropy(logits, batch['label'], batch['partner_label'], mix)
  predicted = jnp.argmax(logits, axis=-1)
  # Credit for either source image, weighted as the target: the usual mixup training accuracy.
  accuracy = jnp.mean(mix * (predicted == batch['label']) + (1 - mix) * (predicted == batch['partner_label']))
  return values.mean(), {'accuracy': accuracy, 'mix': mix}


def _regmixup_loss(logits, features, batch, *, alpha, weight):
  del features, alpha
  n = batch['label'].shape[0]
  values = losses.regmixup(logits[:n], logits[n:], batch['label'], batch['partner_label'], batch['mix'],
                           weight=weight)
  accuracy = jnp.mean(jnp.argmax(logits[:n], axis=-1) == batch['label'])
  return 0.5 * values.mean(), {'accuracy': accuracy, 'mix': batch['mix']}


MIXUP = base.Method(
    name='mixup', head='dense', loss=_mixup_loss, probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'), inputs=_mixup_inputs,
    hparams={'alpha': 1.0})  # Zhang et al.'s CIFAR-10 value

REGMIXUP = base.Method(
    name='regmixup', head='dense', loss=_regmixup_loss, probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'), inputs=_regmixup_inputs,
    hparams={'alpha': 20.0, 'weight': 1.0})  # CIFAR-10 (the authors' commands, OpenOOD)
