"""Methods with a second output head: ConfBranch (DeVries & Taylor 2018) and G-ODIN (Hsu et al. 2020).

  ConfBranch: head 'confidence' (`layers.ConfidenceBranch`): class logits z and a confidence c = σ(s).
              Loss −log(c·p_y + 1 − c) + λ·(−log c) (`losses.confidence_branch`), hints on a random half
              of the examples (drawn on the device from the step's key), λ adjusted every step towards
              the budget β = 0.3 from λ = 0.1 (OpenOOD's recipe; λ is the head's state). Score: c. The
              model's inference logits are log softmax(z) + log c, whose softmax is p and whose energy
              (logsumexp) is log c: the method's default score 'energy' *is* ConfBranch's log c.
  G-ODIN:     head 'godin' (`layers.GodinHead`): training logits h_i/g, h the cosine similarities and
              g = σ(BN(Linear(f))), with the plain cross-entropy; inference logits h. Score: max_i h_i
              ('max_logit'), without the input perturbation of the paper and of OpenOOD's postprocessor
              (ε = 0.0025; OpenOOD then takes the MSP of h, reported here as 'max_softmax').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import losses
from ood_jax.methods import base


def _confbranch_inputs(batch, rng, hparams, base_model):
  del base_model
  return batch['image'], {'hints': jax.random.bernoulli(rng, hparams['hint_probability'], batch['label'].shape)}


def _confbranch_loss(outputs, features, batch, *, budget, weight, hint_probability):
  del features, budget, weight, hint_probability  # the head's (λ is its state) and the inputs'
  logits, confidence, lam = outputs[:, :-2], outputs[:, -2], outputs[0, -1]
  values = losses.confidence_branch(logits, confidence, batch['label'], weight=lam, hints=batch['hints'])
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch['label'])
  return values.mean(), {'accuracy': accuracy, 'confidence': jnp.mean(jax.nn.sigmoid(confidence)),
                         'confidence_loss': jnp.mean(jax.nn.softplus(-confidence)), 'lambda': lam}


CONFBRANCH = base.Method(
    name='confbranch', head='confidence', loss=_confbranch_loss, probabilities=jax.nn.softmax,
    scores=('energy', 'max_softmax', 'max_logit'), inputs=_confbranch_inputs,
    hparams={'budget': 0.3, 'weight': 0.1, 'hint_probability': 0.5}, head_hparams=('budget', 'weight'))

GODIN = base.Method(
    name='godin', head='godin', loss=base.classification_loss(losses.softmax_cross_entropy),
    probabilities=jax.nn.softmax, scores=('max_logit', 'max_softmax'))
