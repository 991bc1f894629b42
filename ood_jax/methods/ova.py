"""One-vs-all and distance one-vs-all ("OvA DM") of Padhy et al. 2020.

Each class is a binary problem; OvA predicts p_k = σ(z_k) from affine logits, OvA DM predicts
p_k = 2σ(−d_k) from distances to zero-initialised centres. The top-label confidence for ECE is
max_k p_k, as in the paper.
"""

from __future__ import annotations

import jax

from ood_jax import losses
from ood_jax.methods import base

ONE_VS_ALL = base.Method(
    name='one_vs_all',
    head='dense',
    loss=base.classification_loss(losses.one_vs_all),
    probabilities=jax.nn.sigmoid,
    scores=('max_sigmoid', 'max_softmax', 'energy'),  # max σ ranks like max logit
    calibration='platt',
)

DISTANCE_ONE_VS_ALL = base.Method(
    name='distance_one_vs_all',
    head='distance',
    loss=base.classification_loss(losses.distance_one_vs_all),
    probabilities=base.distance_probabilities,
    scores=('max_distance_sigmoid', 'max_softmax', 'entropic_score'),  # max 2σ ranks like −min d
    calibration='platt',  # σ(a_k·z_k + b_k) of the negative distances, in place of 2σ(z_k)
)
