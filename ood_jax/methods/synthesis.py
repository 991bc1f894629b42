"""Outlier synthesis in feature space: VOS (Du et al. 2022) and NPOS (Tao et al. 2023).

Both keep a per-class queue of the last S penultimate features as the head's state ('batch_stats', so
checkpoints and bitwise resume need nothing else), written after each forward pass by the method's
`update_state` (`layers.enqueue`), and read by the head, which synthesises outliers from it in its training
forward pass with the step's 'dropout' key (pure in (seed, step)). The outlier loss counts from the first step
at which every class queue is full (checked before the batch, as the reference) and at least `start_step`
steps have been taken; until then the step computes it and weighs it by zero (one compiled program).

  VOS:  head 'virtual_outlier' (`layers.VirtualOutlierHead`). Class-conditional Gaussians with a shared
        covariance (ridge 1e-4) fitted to the queue; of `num_samples` draws per class the `select` least likely
        are virtual outliers (`layers.virtual_outliers`). Loss CE + β·uncertainty loss, the logistic loss of
        φ(log Σ_k max(w_k, 0)·e^{z_k}) (learned weights w, φ a 1-d logistic regression) with the batch as
        inliers and the virtual outliers' logits (same last layer) as outliers (`losses.outlier_logistic`,
        mean over the B + M rows). Defaults: OpenOOD's `train_vos.yml` and the paper: S = 1000, 10 000 draws,
        select 1, β = 0.1, start_step 0 (OpenOOD's start_epoch 0; the paper starts at epoch 40).
        Scored by the energy of the class logits ('energy'), OpenOOD v1.5's postprocessor for VOS. The learned
        w (params['head']['energy_weight']) give the paper's weighted energy through the detector
        'weighted_energy' (`detectors.get('weighted_energy').fit(num_classes=K, weights=w)`).
  NPOS: head 'npos' (`layers.NPOSHead`), two views per image. Boundary points of each class (largest k-NN
        distance in the queue) perturbed with Gaussian noise; the candidates farthest from the queue are the
        outliers (`layers.npos_outliers`). Loss w_comp·(τ/0.07)·L_comp + w_disp·L_dis (CIDER's losses on the
        unit embeddings and EMA prototypes, `methods.prototypes`) + β·the logistic loss of a small MLP on the
        penultimate features of the batch (inliers) and of the outliers. Defaults: OpenOOD's `train_npos.yml`
        (S = 1000, k = `neighbours` = 300, 200 boundary points, 2 picked, 600 candidates each with noise
        σ = 0.1, 200 kept per picked point, τ = 0.1, m = 0.95, w_comp = 1, w_disp = 0.5, β = 0.1; its
        start_epoch_KNN 40 is start_step here, 0 by default). An embedding model: scored by KNN on the
        normalised backbone features ('knn'). Simplifications: OpenOOD clears its queue every epoch
        (while its fill counters stay full) — here it persists, as in VOS; the MLP trains at the backbone's
        learning rate (OpenOOD: ×0.1); prototypes start at zero (see `methods.prototypes`).

Known difference from both references: the outliers of a step are drawn from the queue before the batch's
features join it (the reference enqueues first), so the head needs no labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import layers
from ood_jax import losses
from ood_jax.methods import base
from ood_jax.methods import prototypes


def _enqueue(head, features, labels, *, queue_size, start_step):
  """(head state after adding the batch's features, whether the outlier loss counts in this step)."""
  active = jnp.all(head['count'] >= queue_size) & (head['steps'] >= start_step)
  queue, count, pointer = layers.enqueue(head['queue'], head['count'], head['pointer'],
                                         jax.lax.stop_gradient(features), labels)
  return {**head, 'queue': queue, 'count': count, 'pointer': pointer, 'steps': head['steps'] + 1}, active


def _vos_update(batch_stats, outputs, features, batch, *, queue_size, start_step, **unused):
  del outputs, unused
  head, active = _enqueue(batch_stats['head'], features, batch['label'], queue_size=queue_size,
                          start_step=start_step)
  return {**batch_stats, 'head': head}, {'synthesis': active}


def _vos_loss(outputs, features, batch, *, weight, **unused):
  del features, unused  # the head's hyperparameters and the update's
  n = batch['label'].shape[0]
  logits, uncertainty = outputs[:n, :-1], outputs[:, -1]
  cross_entropy = losses.softmax_cross_entropy(logits, batch['label']).mean()
  regularization = losses.outlier_logistic(uncertainty[:n], uncertainty[n:]).mean()
  active = batch['synthesis']
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch['label'])
  return (cross_entropy + weight * jnp.where(active, regularization, 0.0),
          {'accuracy': accuracy, 'uncertainty_loss': regularization, 'synthesis': active.astype(jnp.float32)})


def _npos_update(batch_stats, outputs, features, batch, *, queue_size, start_step, momentum, **unused):
  del unused
  num_rows = features.shape[0]
  labels = prototypes.row_labels(batch, num_rows)
  head, active = _enqueue(batch_stats['head'], features, labels, queue_size=queue_size, start_step=start_step)
  head, moved = prototypes.update_prototypes(head, outputs[:num_rows, :-1], labels, momentum=momentum)
  return {**batch_stats, 'head': head}, {'synthesis': active, 'prototypes': moved}


def _npos_loss(outputs, features, batch, *, temperature, compactness_weight, dispersion_weight, weight, **unused):
  del unused
  num_rows = features.shape[0]
  total, metrics = prototypes.hyperspherical_loss(
      outputs[:num_rows, :-1], batch['prototypes'], prototypes.row_labels(batch, num_rows),
      temperature=temperature, compactness_weight=compactness_weight, dispersion_weight=dispersion_weight)
  scores = outputs[:, -1]
  regularization = losses.outlier_logistic(scores[:num_rows], scores[num_rows:]).mean()
  active = batch['synthesis']
  return (total + weight * jnp.where(active, regularization, 0.0),
          {**metrics, 'outlier_loss': regularization, 'synthesis': active.astype(jnp.float32)})


VOS = base.Method(
    name='vos', head='virtual_outlier', loss=_vos_loss, probabilities=jax.nn.softmax,
    scores=('energy', 'max_softmax', 'max_logit'), update_state=_vos_update,
    hparams={'weight': 0.1, 'start_step': 0, 'queue_size': 1000, 'num_samples': 10000, 'select': 1,
             'ridge': 1e-4},
    head_hparams=('queue_size', 'num_samples', 'select', 'ridge'))

NPOS = base.Method(
    name='npos', head='npos', loss=_npos_loss, probabilities=None, scores=('knn', 'mahalanobis'),
    inputs=prototypes.two_view_inputs, augment='two_views', update_state=_npos_update,
    hparams={'temperature': 0.1, 'momentum': 0.95, 'compactness_weight': 1.0, 'dispersion_weight': 0.5,
             'weight': 0.1, 'start_step': 0, 'queue_size': 1000, 'neighbours': 300, 'boundary': 200, 'pick': 2,
             'num_candidates': 600, 'noise': 0.1, 'keep': 200},
    head_hparams=('queue_size', 'neighbours', 'boundary', 'pick', 'num_candidates', 'noise', 'keep'))
