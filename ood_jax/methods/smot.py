"""SMOT, smooth training ("Out-of-Distribution Detection with Smooth Training", an anonymous ICLR 2024
submission).

Stage 1 is an ordinary softmax run (the base model). Stage 2 (`config.base_model=<its workdir>`)
computes, inside the jitted step, the base model's class activation map of each image's label,
CAM_y = Σ_d A[h, w, d]·W[d, y] (A the last feature map, W the dense head), upsamples it to the
input size and scales it to [0, 255] per image. A threshold t = 255·Beta(α, β) per image masks
the most class-discriminative pixels, M[i, j] = 0 where CAM ≥ t, and the masked image is trained
towards the soft label (1 − ε(t))·y + ε(t)/K, ε(t) = 1 − exp((t − 255)/T):

  loss = (1 − λ)·CE(f(x), y) + λ·CE(f(M ⊙ x), y_ε(t))   (paper eq. 8), α = 50, β = 20, λ = 0.1.

Masked pixels are set to 0 *after* normalisation, i.e. to the dataset's mean colour (the batch
arrives normalised); the paper does not say which value a masked pixel takes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import losses
from ood_jax.methods import base as base_lib


def class_activation_map(feature_map, kernel, labels, image_size):
  """CAM of each example's label, upsampled (bilinear) to `image_size` and scaled to [0, 255].

  Args:
    feature_map: `[B, h, w, D]` last feature map of the base model.
    kernel: `[D, K]` weights of its dense head.
    labels: `[B]` classes whose map is taken.
    image_size: (H, W) of the inputs.

  Returns:
    `[B, H, W]` float32 maps; per image the minimum is 0 and the maximum 255 (a constant map is 0).
  """
  cam = jnp.einsum('bhwd,db->bhw', feature_map.astype(jnp.float32), kernel[:, labels].astype(jnp.float32))
  cam = jax.image.resize(cam, (cam.shape[0],) + tuple(image_size), method='bilinear')
  low = jnp.min(cam, axis=(1, 2), keepdims=True)
  span = jnp.max(cam, axis=(1, 2), keepdims=True) - low
  return 255.0 * (cam - low) / jnp.where(span > 0, span, 1.0)


def mask_images(images, cam, threshold):
  """M ⊙ x with M = 0 where CAM ≥ t (per-image threshold `[B]`), broadcast over channels."""
  keep = cam < threshold[:, None, None]
  return images * keep[..., None].astype(images.dtype)


def _inputs(batch, rng, hparams, base):
  images, labels = batch['image'], batch['label']
  _, _, feature_map = base.model.apply(base.variables, images, train=False, return_feature_map=True)
  cam = class_activation_map(jax.lax.stop_gradient(feature_map), base.variables['params']['head']['kernel'],
                             labels, images.shape[1:3])
  threshold = 255.0 * jax.random.beta(rng, hparams['alpha'], hparams['beta'], (images.shape[0],))
  masked = mask_images(images, cam, threshold)
  return jnp.concatenate([images, masked], axis=0), {'threshold': threshold}


def _loss(logits, features, batch, *, alpha, beta, weight, temperature):
  del features, alpha, beta
  n = batch['label'].shape[0]
  smoothing = losses.smot_smoothing(batch['threshold'], temperature=temperature)
  values = losses.smooth_training(logits[:n], logits[n:], batch['label'], smoothing, weight=weight)
  accuracy = jnp.mean(jnp.argmax(logits[:n], axis=-1) == batch['label'])
  return values.mean(), {'accuracy': accuracy, 'smoothing': smoothing.mean()}


SMOT = base_lib.Method(
    name='smot', head='dense', loss=_loss, probabilities=jax.nn.softmax, scores=('max_softmax', 'energy', 'max_logit'),
    inputs=_inputs, needs_base_model=True,
    # T = 10 for CIFAR-10; 150 for CIFAR-100, 200 for ImageNet-200.
    hparams={'alpha': 50.0, 'beta': 20.0, 'weight': 0.1, 'temperature': 10.0})
