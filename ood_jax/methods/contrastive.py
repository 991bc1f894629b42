"""Contrastive training (Regmi et al. 2024): SupCon and ReweightOOD on two augmented views.

The model is backbone → projection head (128-d, unit norm); the batch holds V = 2 views per image
(`augment='two_views'`), which go through the network as one batch of B·V images. There is no
classifier: the evaluator scores with KNN and Mahalanobis on the backbone features and measures
accuracy with a linear probe on the frozen features, as the paper does.
"""

from __future__ import annotations

from ood_jax import losses
from ood_jax.methods import base


def _inputs(batch, rng, hparams, base):
  del rng, hparams, base
  images = batch['image']  # [B, V, H, W, C]
  return images.reshape((-1,) + images.shape[2:])


def _embeddings(embeddings, batch):
  num_examples = batch['label'].shape[0]
  return embeddings.reshape(num_examples, -1, embeddings.shape[-1])  # row b·V + v → [B, V, E]


def _supcon_loss(embeddings, features, batch, *, temperature):
  del features
  values = losses.supervised_contrastive(_embeddings(embeddings, batch), batch['label'], temperature=temperature)
  return values.mean(), {}


def _reweight_loss(embeddings, features, batch, *, temperature, between, within, stop_gradient_weights, variant):
  del features
  values = losses.reweighted_contrastive(
      _embeddings(embeddings, batch), batch['label'], temperature=temperature, between=tuple(between),
      within=tuple(within), stop_gradient_weights=stop_gradient_weights, variant=variant)
  return values.mean(), {}


SUPCON = base.Method(
    name='supcon', head='projection', loss=_supcon_loss, probabilities=None, scores=('knn', 'mahalanobis'),
    inputs=_inputs, hparams={'temperature': 0.1}, augment='two_views')

REWEIGHTOOD = base.Method(
    name='reweightood', head='projection', loss=_reweight_loss, probabilities=None,
    scores=('knn', 'mahalanobis'), inputs=_inputs, augment='two_views',
    # CIFAR-10 values of the paper; CIFAR-100 uses between=(5, −2).
    hparams={'temperature': 0.1, 'between': (5.0, -4.0), 'within': (2.0, 1.0),
             'stop_gradient_weights': True, 'variant': 'paper'})
