"""SoftMax baseline: cross-entropy on affine logits, with optional label smoothing."""

from __future__ import annotations

import jax

from ood_jax import losses
from ood_jax.methods import base


def _cross_entropy(logits, labels, *, label_smoothing=0.0):
  # CE to (1 − α)·onehot + α/K = (1 − α)·CE + α·CE-to-uniform; the latter is the OE term.
  ce = losses.softmax_cross_entropy(logits, labels)
  if not label_smoothing:
    return ce
  return (1.0 - label_smoothing) * ce + label_smoothing * losses.outlier_exposure(logits)


SOFTMAX = base.Method(
    name='softmax',
    head='dense',
    loss=base.classification_loss(_cross_entropy),
    probabilities=jax.nn.softmax,
    scores=('max_softmax', 'max_logit', 'energy', 'entropic_score'),
    hparams={'label_smoothing': 0.0},
)
