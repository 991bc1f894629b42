"""IsoMax (Macêdo et al. 2021) and the DM loss of Padhy et al. 2020 (IsoMax with entropic scale 1).

Distance logits to zero-initialised prototypes; the entropic scale multiplies them in the loss
only, and predictions and scores use the raw logits ("the entropy maximization trick").
"""

from __future__ import annotations

import jax

from ood_jax import losses
from ood_jax.methods import base

ISOMAX = base.Method(
    name='isomax',
    head='distance',
    loss=base.classification_loss(losses.isomax),
    probabilities=jax.nn.softmax,
    # ES (paper default), MPS, MDS (= max logit = −min distance).
    scores=('entropic_score', 'max_softmax', 'max_logit'),
    hparams={'entropic_scale': 10.0},
)

DM = base.Method(
    name='dm',
    head='distance',
    loss=base.classification_loss(losses.isomax),
    probabilities=jax.nn.softmax,
    scores=('max_softmax', 'entropic_score', 'max_logit'),
    hparams={'entropic_scale': 1.0},
)
