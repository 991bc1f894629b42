"""Training methods: how a batch becomes a loss, and how a trained model is read out.

A method is a `Method` record in a small module of its own, plus one line in `METHODS`. The trainer
runs the model once per step on `method.inputs(batch)` and hands the logits and features to
`method.loss`; the evaluator turns logits into predictive probabilities with `method.probabilities`
(softmax, σ or 2σ) and computes every score in `method.scores`, the first being the method's
default (e.g. the entropic score for IsoMax).
"""

from __future__ import annotations

from ood_jax.methods.base import BaseModel
from ood_jax.methods.base import Method
from ood_jax.methods import confidence
from ood_jax.methods import contrastive
from ood_jax.methods import isomax
from ood_jax.methods import mixup
from ood_jax.methods import normalization
from ood_jax.methods import outlier_exposure
from ood_jax.methods import ova
from ood_jax.methods import prototypes
from ood_jax.methods import rotation
from ood_jax.methods import smot
from ood_jax.methods import softmax
from ood_jax.methods import synthesis

METHODS: dict[str, Method] = {
    'softmax': softmax.SOFTMAX,
    'isomax': isomax.ISOMAX,
    'dm': isomax.DM,
    'one_vs_all': ova.ONE_VS_ALL,
    'distance_one_vs_all': ova.DISTANCE_ONE_VS_ALL,
    'oe': outlier_exposure.OE,
    'energy': outlier_exposure.ENERGY,
    'ice': outlier_exposure.ICE,
    'supcon': contrastive.SUPCON,
    'reweightood': contrastive.REWEIGHTOOD,
    'smot': smot.SMOT,
    # Training baselines of OpenOOD v1.5's leaderboard.
    'logitnorm': normalization.LOGITNORM,
    't2fnorm': normalization.T2FNORM,
    'mixup': mixup.MIXUP,
    'regmixup': mixup.REGMIXUP,
    'confbranch': confidence.CONFBRANCH,
    'godin': confidence.GODIN,
    'rotpred': rotation.ROTPRED,
    'mixoe': mixup.MIXOE,
    'vos': synthesis.VOS,
    'npos': synthesis.NPOS,
    'cider': prototypes.CIDER,
}


def get_method(name: str) -> Method:
  """The method called `name`; unknown names fail with the list of valid ones."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(f'Unknown method {name!r}; valid methods: {", ".join(sorted(METHODS))}.') from None


__all__ = ['METHODS', 'BaseModel', 'Method', 'get_method']
