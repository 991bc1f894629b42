"""CIDER (Ming, Sun, Dia & Li 2023, "How to Exploit Hyperspherical Embeddings for Out-of-Distribution Detection?").

The model is backbone → projection head → unit embeddings z (`layers.PrototypeProjectionHead`), trained on two
augmented views per image (`augment='two_views'`, as SupCon) with no classifier, so it is evaluated like the
contrastive models: KNN on the normalised backbone features (CIDER's score), Mahalanobis, and a linear probe
for the accuracy. Each class has a prototype μ_k on the unit sphere, the head's state in 'batch_stats',
moved towards every embedding of its class, example after example, by an exponential moving average
μ_y ← normalise(m·μ_y + (1 − m)·z) (`layers.ema_prototypes`, eq. 6; in the step, before the loss). The loss is

  L = w·(τ/τ_base)·L_comp + L_dis

with L_comp the cross-entropy of each embedding against the (detached) prototypes at temperature τ (eq. 5,
`losses.prototype_compactness`) and L_dis the dispersion of the updated prototypes (eq. 4,
`losses.prototype_dispersion`, whose gradient reaches the embeddings through this step's update, as the
reference's in-graph loop). Defaults are OpenOOD's CIFAR recipe (`train_cider.yml`): τ = 0.1, m = 0.95, w = 2;
τ_base = 0.07 is the reference `CompLoss`'s default, which OpenOOD and the authors' code keep, so the
compactness term carries a factor τ/0.07.

Simplifications: the prototypes start at zero, so each becomes the first embedding of its class (the
reference initialises them from one pass of the untrained model over the data); the embeddings enter the
moving average in the order example, view (the reference's order is view, example).

NPOS (`methods.synthesis`) adds its outlier loss to the same two terms (`hyperspherical_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import layers
from ood_jax import losses
from ood_jax.methods import base

# τ_base of the reference CompLoss (its default; OpenOOD's CIDER and NPOS trainers do not set it).
BASE_TEMPERATURE = 0.07


def two_view_inputs(batch, rng, hparams, base_model):
  """The B·V images of `[B, V, H, W, C]` views, row b·V + v (as `methods.contrastive`)."""
  del rng, hparams, base_model
  images = batch['image']
  return images.reshape((-1,) + images.shape[2:])


def row_labels(batch, num_rows):
  """The label of each of `num_rows` = B·V rows (row b·V + v has example b's label)."""
  labels = batch['label']
  return jnp.repeat(labels, num_rows // labels.shape[0], total_repeat_length=num_rows)


def hyperspherical_loss(embeddings, prototypes, labels, *, temperature, compactness_weight, dispersion_weight):
  """(compactness_weight·(τ/0.07)·mean L_comp + dispersion_weight·mean L_dis, metrics): CIDER's and NPOS's loss.

  `prototypes` are those after this batch's update; the compactness term sees them detached, the dispersion
  term with their gradient (the reference's `criterion_dis.prototypes` and in-graph loop).
  """
  compactness = losses.prototype_compactness(embeddings, jax.lax.stop_gradient(prototypes), labels,
                                             temperature=temperature).mean()
  dispersion = losses.prototype_dispersion(prototypes, temperature=temperature).mean()
  total = compactness_weight * (temperature / BASE_TEMPERATURE) * compactness + dispersion_weight * dispersion
  return total, {'compactness': compactness, 'dispersion': dispersion}


def update_prototypes(head_state, embeddings, labels, *, momentum):
  """(head state with the moved prototypes, detached; the moved prototypes, differentiable)."""
  prototypes = layers.ema_prototypes(head_state['prototypes'], embeddings, labels, momentum=momentum)
  return {**head_state, 'prototypes': jax.lax.stop_gradient(prototypes)}, prototypes


def _cider_update(batch_stats, embeddings, features, batch, *, temperature, weight, momentum):
  del features, temperature, weight
  head, prototypes = update_prototypes(batch_stats['head'], embeddings, row_labels(batch, embeddings.shape[0]),
                                       momentum=momentum)
  return {**batch_stats, 'head': head}, {'prototypes': prototypes}


def _cider_loss(embeddings, features, batch, *, temperature, weight, momentum):
  del features, momentum
  return hyperspherical_loss(embeddings, batch['prototypes'], row_labels(batch, embeddings.shape[0]),
                             temperature=temperature, compactness_weight=weight, dispersion_weight=1.0)


CIDER = base.Method(
    name='cider', head='prototype_projection', loss=_cider_loss, probabilities=None, scores=('knn', 'mahalanobis'),
    inputs=two_view_inputs, augment='two_views', update_state=_cider_update,
    hparams={'temperature': 0.1, 'weight': 2.0, 'momentum': 0.95})  # OpenOOD's train_cider.yml
