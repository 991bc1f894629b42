"""Mixup (Zhang et al. 2018), RegMixup (Pinto et al. 2022) and MixOE (Zhang et al. 2023): training on mixed images.

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
  MixOE:    Mixture Outlier Exposure (Zhang, Inkawhich, Linderman, Chen & Li 2023): each in-distribution image
            is mixed with an auxiliary outlier (`batch['outlier']`, as OE) by `mix_outliers`, cutmix (OpenOOD's
            default: a box of the outlier pasted into the image) or mixup, with λ ~ Beta(α, β), α = 0.1, β = 1
            (mostly near 0: a box nearly the image's size, which clipping at the border leaves covering about
            half of it on average), from the step's key; the model sees [x; x̃] in one forward pass and the loss is
            CE(z, y) + β_oe·CE(z̃, λ·onehot(y) + (1 − λ)·uniform) (`losses.mixoe`, β_oe = 1). OpenOOD runs the
            two halves through the network in two passes (BatchNorm statistics per half); one pass here, as
            OE and RegMixup. OpenOOD fine-tunes a cross-entropy model with it (10 epochs, lr 0.001).
All are scored by MSP (OpenOOD v1.5).
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


MIX_OPS = ('cutmix', 'mixup')


def mix_outliers(images, outliers, key, *, alpha, beta, op='cutmix'):
  """(mixed images, λ): each image mixed with the outlier of its row, λ the share of the image (MixOE).

  λ ~ Beta(α, β), one draw per batch (as OpenOOD's `MixOETrainer`). 'mixup': x̃ = λ·x + (1 − λ)·x_out.
  'cutmix' (Yun et al. 2019's box, OpenOOD's `rand_bbox`): a box with sides ⌊H·√(1 − λ)⌋ and ⌊W·√(1 − λ)⌋
  around a uniform random centre, clipped to the image (its half-sides rounded down), is cut from the
  outlier and pasted into the image, the same box for the whole batch; λ is then recomputed as the share of
  the image's pixels left, 1 − box area / (H·W), as OpenOOD does. Pure in `key` (jit-able).

  Args:
    images: `[B, H, W, C]` floating in-distribution images (normalised inputs).
    outliers: `[B, H, W, C]` outliers of the same shape, row i mixed into image i.
    key: a PRNG key.
    alpha: α > 0 of the Beta distribution (0.1 in OpenOOD).
    beta: β > 0 of the Beta distribution (1 in OpenOOD).
    op: 'cutmix' (OpenOOD's default) or 'mixup'.
  """
  _checks.positive('alpha', alpha)
  _checks.positive('beta', beta)
  if op not in MIX_OPS:
    raise ValueError(f"op (MixOE's mix_op) must be one of {MIX_OPS}, got {op!r}.")
  images = _checks.floating('images', images, ndim=4)
  outliers = _checks.floating('outliers', outliers, ndim=4)
  if outliers.shape != images.shape:
    raise ValueError(f'outliers must have the shape of images {tuple(images.shape)}, got {tuple(outliers.shape)}.')
  mix_key, row_key, column_key = jax.random.split(key, 3)
  mix = jax.random.beta(mix_key, alpha, beta)
  outliers = outliers.astype(images.dtype)
  if op == 'mixup':
    return mix.astype(images.dtype) * images + (1 - mix).astype(images.dtype) * outliers, mix
  height, width = images.shape[1:3]
  side = jnp.sqrt(1.0 - mix)

  def span(size, k):
    cut = jnp.floor(size * side).astype(jnp.int32)
    centre = jax.random.randint(k, (), 0, size)
    return jnp.clip(centre - cut // 2, 0, size), jnp.clip(centre + cut // 2, 0, size)

  (top, bottom), (left, right) = span(height, row_key), span(width, column_key)
  rows, columns = jnp.arange(height), jnp.arange(width)
  box = (((rows >= top) & (rows < bottom))[:, None] & ((columns >= left) & (columns < right))[None, :])
  mixed = jnp.where(box[None, :, :, None], outliers, images)
  return mixed, 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)


def _mixoe_inputs(batch, rng, hparams, base_model):
  del base_model
  images, outliers = batch['image'], batch['outlier']
  n = images.shape[0]
  if outliers.shape[0] < n:
    raise ValueError(f'MixOE mixes every in-distribution image with an outlier: the outlier batch '
                     f'({outliers.shape[0]}, config.outliers.batch_size) must be at least the batch ({n}).')
  mixed, mix = mix_outliers(images, outliers[:n], rng, alpha=hparams['alpha'], beta=hparams['beta'],
                            op=hparams['mix_op'])
  return jnp.concatenate([images, mixed], axis=0), {'mix': mix}


def _mixoe_loss(logits, features, batch, *, alpha, beta, mix_op, weight):
  del features, alpha, beta, mix_op
  n = batch['label'].shape[0]
  values = losses.mixoe(logits[:n], logits[n:], batch['label'], batch['mix'], weight=weight)
  accuracy = jnp.mean(jnp.argmax(logits[:n], axis=-1) == batch['label'])
  return values.mean(), {'accuracy': accuracy, 'mix': batch['mix']}


MIXUP = base.Method(
    name='mixup', head='dense', loss=_mixup_loss, probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'), inputs=_mixup_inputs,
    hparams={'alpha': 1.0})  # Zhang et al.'s CIFAR-10 value

REGMIXUP = base.Method(
    name='regmixup', head='dense', loss=_regmixup_loss, probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'), inputs=_regmixup_inputs,
    hparams={'alpha': 20.0, 'weight': 1.0})  # CIFAR-10 (the authors' commands, OpenOOD)

MIXOE = base.Method(
    name='mixoe', head='dense', loss=_mixoe_loss, probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'), inputs=_mixoe_inputs, needs_outliers=True,
    hparams={'alpha': 0.1, 'beta': 1.0, 'mix_op': 'cutmix', 'weight': 1.0})  # OpenOOD's train_mixoe.yml
