"""RotPred (Hendrycks, Mazeika, Kadavath & Song 2019): rotation prediction as an auxiliary self-supervised task.

Every training image is shown in its four quarter turns (0°, 90°, 180°, 270°; `detectors.rotation.quarter_turns`,
on the device inside the jitted step), all 4B images in one forward pass (BatchNorm sees them together, as
OpenOOD's `RotPredTrainer` concatenates them). The 'rotation' head (`layers.RotationHead`) gives class logits
and, from the same features, 4-way rotation logits; the loss is the class cross-entropy of the unrotated copy
plus λ times the rotation cross-entropy averaged over the turns (`losses.rotation_prediction`, λ = 1 as OpenOOD).

Scored by the RotPred score (detector 'rotpred', `detectors.rotation`): the four turns' rotation predictions
and the class prediction's divergence from uniform, computed by the evaluator in its inference pass
(`Method.model_scores`); MSP, energy and max-logit of the class logits are reported beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import losses
from ood_jax.detectors import rotation
from ood_jax.methods import base


def _rotpred_inputs(batch, rng, hparams, base_model):
  del rng, hparams, base_model
  return rotation.quarter_turns(batch['image'])


def _rotpred_loss(outputs, features, batch, *, weight):
  del features
  n = batch['label'].shape[0]
  turns = rotation.NUM_ROTATIONS
  logits, rotation_logits = outputs[:n, :-turns], outputs[:, -turns:]
  # Turn-major rows (turn r of example i at r·n + i) → [n, turns, turns], row r of example i targeting r.
  per_example = jnp.swapaxes(jnp.reshape(rotation_logits, (turns, n, turns)), 0, 1)
  values = losses.rotation_prediction(logits, per_example, batch['label'], weight=weight)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch['label'])
  rotation_accuracy = jnp.mean(jnp.argmax(per_example, axis=-1) == jnp.arange(turns))
  return values.mean(), {'accuracy': accuracy, 'rotation_accuracy': rotation_accuracy}


ROTPRED = base.Method(
    name='rotpred', head='rotation', loss=_rotpred_loss, probabilities=jax.nn.softmax,
    scores=('max_softmax', 'energy', 'max_logit'), inputs=_rotpred_inputs, model_scores=('rotpred',),
    hparams={'weight': 1.0})  # OpenOOD's loss_cls + loss_rot
