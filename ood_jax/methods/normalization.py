"""Normalisation baselines of OpenOOD v1.5's leaderboard: LogitNorm and T2FNorm.

  LogitNorm (Wei et al. 2022, eq. 4): CE(z / (τ‖z‖), y) on a dense head (`losses.logit_norm`), τ = 0.04;
             predictions and scores use the raw logits z.
  T2FNorm (Regmi et al. 2023): CE(W·(h/‖h‖)/τ + b, y), the pooled features h scaled to norm 1/τ before
             the dense head in training only (head 't2fnorm', `layers.FeatureNormDense`), τ = 0.1;
             inference runs the head on the raw features, W·h/τ + b.

Both are ranked by MSP in OpenOOD v1.5 (T2FNorm's postprocessor is MSP on the raw-feature logits).
"""

from __future__ import annotations

import jax

from ood_jax import losses
from ood_jax.methods import base


def _t2fnorm_cross_entropy(logits, labels, *, temperature):
  del temperature  # the head's: the normalisation happens in layers.FeatureNormDense
  return losses.softmax_cross_entropy(logits, labels)


LOGITNORM = base.Method(
    name='logitnorm', head='dense', loss=base.classification_loss(losses.logit_norm), probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'),
    hparams={'temperature': 0.04})  # τ of CIFAR-10 (the paper and OpenOOD)

T2FNORM = base.Method(
    name='t2fnorm', head='t2fnorm', loss=base.classification_loss(_t2fnorm_cross_entropy),
    probabilities=jax.nn.softmax, scores=('max_softmax', 'energy', 'max_logit'),
    hparams={'temperature': 0.1}, head_hparams=('temperature',))  # τ of OpenOOD's recipe
