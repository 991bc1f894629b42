"""The RotPred score (Hendrycks, Mazeika, Kadavath & Song 2019, "Using Self-Supervised Learning Can Improve
Model Robustness and Uncertainty"): how surely a network trained to predict rotations recognises them.

A model trained with `ood_jax.methods.rotation` (an auxiliary 4-way head that predicts which quarter turn an
image was given, `ood_jax.layers.RotationHead`) sees every test image in its four quarter turns. In-distribution
images give confident rotation predictions and a peaked class prediction; OOD images neither. OpenOOD's
`RotPredPostprocessor`, after the authors' multi-class OOD code, scores

  S(x) = KL(u ‖ softmax(z(x))) − (1/4) Σ_r KL(e_r ‖ softmax(ρ(rot_r x)))
       = −log K − (1/K) Σ_k log p_k(x) + (1/4) Σ_r log q_r(rot_r x),

with z the class logits of the unrotated image, u uniform over the K classes, ρ the rotation logits and e_r
the one-hot target of turn r; higher = more in-distribution. Both reference implementations take the
logarithms to base 2 (bits), and so does `rotpred_score`: the numbers match theirs, and the base is a constant
factor that changes no ranking.

`quarter_turns` is the one home of the rotation convention (`jnp.rot90` over the image axes, as `torch.rot90`
over OpenOOD's [2, 3]), shared by the training method and the score so that turn r means the same to both.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Callable

import jax
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import registry

__all__ = ['NUM_ROTATIONS', 'model_apply_fn', 'quarter_turns', 'rotpred', 'rotpred_score']

NUM_ROTATIONS = 4


def quarter_turns(images):
  """`[4B, H, W, C]`: the batch turned 0, 1, 2 and 3 quarter turns (counter-clockwise), stacked turn-major.

  Row r·B + i is image i turned r times (`jnp.rot90(images, r, axes=(1, 2))`). Jit-able; the images must be
  square (`[B, H, H, C]`), else a turned image would not stack with the others.

  Raises:
    ValueError: for images that are not `[B, H, W, C]` with H = W.
  """
  images = _checks.floating('images', images, ndim=4)
  if images.shape[1] != images.shape[2]:
    raise ValueError(f'images must be square [B, H, H, C] to be turned by quarter turns, got shape '
                     f'{tuple(images.shape)}.')
  return jnp.concatenate([jnp.rot90(images, r, axes=(1, 2)) for r in range(NUM_ROTATIONS)], axis=0)


def rotpred_score(logits, rotation_logits):
  """S = KL(u ‖ softmax(z)) − (1/R) Σ_r KL(e_r ‖ softmax(ρ_r)), in bits (the module docstring's formula).

  Args:
    logits: `[N, K]` class logits of the unrotated images.
    rotation_logits: `[N, R, R]` rotation logits, row r those of the copy turned r times (target r).

  Returns:
    `[N]` scores, higher = more in-distribution, in at least float32.
  """
  logits = base.logits_arg(logits, detector='rotpred')
  rotation_logits = base.floating_arg('rotation_logits', rotation_logits, ndim=3)
  n, turns = logits.shape[0], rotation_logits.shape[-1]
  if rotation_logits.shape != (n, turns, turns):
    raise ValueError(f'rotation_logits must have shape ({n}, R, R) (one R-way prediction per turn of each of '
                     f'the {n} images), got {tuple(rotation_logits.shape)}.')
  return _rotpred_score(logits, rotation_logits)


@jax.jit
def _rotpred_score(logits, rotation_logits):
  z = base.compute(logits)
  rho = rotation_logits.astype(z.dtype)
  num_classes = z.shape[-1]
  class_term = -math.log(num_classes) - jnp.mean(jax.nn.log_softmax(z, axis=-1), axis=-1)
  rotation_term = jnp.mean(jnp.diagonal(jax.nn.log_softmax(rho, axis=-1), axis1=-2, axis2=-1), axis=-1)
  return (class_term + rotation_term) / math.log(2.0)


def _outputs(out, batch: int):
  """(class logits, rotation logits) from apply_fn's output: a dict or a (logits, rotation_logits) pair."""
  if isinstance(out, Mapping):
    if 'rotation_logits' not in out or 'logits' not in out:
      raise ValueError("detector 'rotpred' needs apply_fn to return 'logits' and 'rotation_logits' (a model with "
                       f'a rotation head, layers.RotationHead: see model_apply_fn); got keys {sorted(out)}.')
    logits, rotation_logits = out['logits'], out['rotation_logits']
  elif isinstance(out, (tuple, list)) and len(out) == 2:
    logits, rotation_logits = out
  else:
    raise ValueError("detector 'rotpred' needs apply_fn to return {'logits', 'rotation_logits'} or a (logits, "
                     f'rotation_logits) pair; got {type(out).__name__}.')
  logits = base.any_logits(logits, name='apply_fn logits')
  rotation_logits = base.floating_arg('apply_fn rotation_logits', rotation_logits, ndim=2)
  if logits.ndim != 2 or logits.shape[0] != NUM_ROTATIONS * batch or rotation_logits.shape != (
      NUM_ROTATIONS * batch, NUM_ROTATIONS):
    raise ValueError(f'apply_fn on the {NUM_ROTATIONS} × {batch} turned images must return [{NUM_ROTATIONS * batch}'
                     f', K] logits and [{NUM_ROTATIONS * batch}, {NUM_ROTATIONS}] rotation logits, got shapes '
                     f'{tuple(logits.shape)} and {tuple(rotation_logits.shape)}.')
  return logits, rotation_logits


def rotpred(apply_fn: Callable, inputs):
  """The RotPred score of `inputs`: one pass of `apply_fn` over their four quarter turns, then `rotpred_score`.

  Args:
    apply_fn: maps images `[M, H, W, C]` to `{'logits': [M, K], 'rotation_logits': [M, 4]}` (or the pair) in
      inference mode; `model_apply_fn(model, variables)` builds it for an `ood_jax.models.Classifier` with
      the 'rotation' head. Examples must not interact (BatchNorm with running averages).
    inputs: `[B, H, H, C]` square images, preprocessed as the model expects.

  Returns:
    `[B]` scores in bits, higher = more in-distribution.

  Raises:
    ValueError: without apply_fn or inputs, for images that are not square, or when apply_fn gives no rotation
      logits (a model without a rotation head).
  """
  if not callable(apply_fn):
    raise ValueError("detector 'rotpred' needs apply_fn (images -> {'logits', 'rotation_logits'}) and inputs; "
                     'got no apply_fn.')
  if inputs is None:
    raise ValueError("detector 'rotpred' needs inputs (it turns them); got None.")
  turned = quarter_turns(inputs)
  batch = turned.shape[0] // NUM_ROTATIONS
  logits, rotation_logits = _outputs(apply_fn(turned), batch)
  # Turn-major rows → [B, R, R]: example i's prediction for each of its turns.
  per_example = jnp.swapaxes(jnp.reshape(rotation_logits, (NUM_ROTATIONS, batch, NUM_ROTATIONS)), 0, 1)
  return _rotpred_score(logits[:batch], per_example)


def model_apply_fn(model, variables, **apply_kwargs) -> Callable:
  """`x → {'logits', 'features', and every value the model sows into 'intermediates', by its name}`.

  For a Linen `ood_jax.models.Classifier` (outputs `(logits, features)`) run in inference mode; with the
  'rotation' head the dict has the 'rotation_logits' `rotpred` reads. A detector that only needs logits
  (ODIN) reads 'logits' from it too. Jit-able: the variables may be traced.

  Args:
    model: the Linen classifier.
    variables: its variables ({'params', 'batch_stats'}).
    **apply_kwargs: further keyword arguments of `model.apply` (default train=False).
  """
  kwargs = {'train': False, **apply_kwargs}

  def apply(x):
    out, state = model.apply(variables, x, mutable='intermediates', **kwargs)
    result = dict(zip(('logits', 'features'), out)) if isinstance(out, (tuple, list)) else {'logits': out}
    for path, value in jax.tree_util.tree_flatten_with_path(
        state.get('intermediates', {}), is_leaf=lambda v: isinstance(v, tuple))[0]:
      name = getattr(path[-1], 'key', None)
      if isinstance(name, str):  # sow keeps a tuple of every call's value: the last one
        result.setdefault(name, value[-1])
    return result

  return apply


registry.register('rotpred', needs={'model'}, score=rotpred, paper='Hendrycks, Mazeika, Kadavath & Song 2019',
                  year=2019)
