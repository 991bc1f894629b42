"""The `Method` record every training method fills in, and helpers shared by simple methods."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
# loss(logits, features, batch, **hparams) -> (scalar loss, dict of scalar metrics to log)
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def image_inputs(batch: Batch, rng: jax.Array, hparams: dict, base) -> jax.Array:
  """The default model input: the in-distribution images of the batch."""
  del rng, hparams, base
  return batch['image']


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method.

  Attributes:
    name: registry name.
    head: logit layer the model needs, a name of `ood_jax.models.HEADS` ('dense', 'distance', ...).
    loss: `loss(logits, features, batch, **hparams) -> (loss, metrics)`, mean over the batch.
      `hparams` come from `config.method_kwargs`.
    probabilities: logits `[B, K]` → predictive probabilities `[B, K]` used for accuracy, NLL
      and ECE (rows of one-vs-all probabilities need not sum to one); None for embedding models
      (contrastive), evaluated with a linear probe and feature scores instead.
    scores: names of functions in `ood_jax.scores` taking logits, or for embedding models of
      feature scores ('knn', 'mahalanobis'); the first is the default.
    inputs: `inputs(batch, rng, hparams, base)` → the images the model runs on in a training
      step, or `(images, extra)` where the dict `extra` is added to the batch the loss sees.
      `base` is `BaseModel` when `needs_base_model`, else None.
    hparams: default keyword arguments of `loss`; config values override them.
    head_hparams: the names in `hparams` that configure the head (passed to its constructor, e.g.
      T2FNorm's temperature); `loss` receives them too and ignores them.
    augment: the augmentation the method requires (e.g. 'two_views'), or None for any.
    needs_base_model: the trainer loads `config.base_model` (a workdir) and passes it to `inputs`.
    needs_outliers: the trainer adds `batch['outlier']`, a batch of auxiliary outliers
      (`config.outliers`), to every training batch.
    update_state: for methods with a memory of past batches in the head's 'batch_stats' (VOS and NPOS
      feature queues, CIDER prototypes): `update_state(batch_stats, outputs, features, batch, **hparams)
      → (batch_stats, extra)`, run in the step after the forward pass and before `loss`; `extra` is added
      to the batch the loss sees and may carry gradients (CIDER's prototypes after this batch). None: the
      head's own updates only.
    calibration: the post-hoc calibrator the evaluator fits on the validation split:
      'temperature' (softmax probabilities; Guo et al. 2017) or 'platt' (per-class sigmoids of
      one-vs-all models; Platt 1999).
    model_scores: scores that run the model rather than read its logits: names of registered
      detectors with needs {'model'} and no fit (RotPred's 'rotpred', which turns each image four
      times). The evaluator computes them in its inference pass over every set, with their default
      hyperparameters, and reports them before `scores`; the first is then the method's default.
  """

  name: str
  head: str
  loss: LossFn
  probabilities: Callable[[jax.Array], jax.Array] | None  # None: an embedding model, no classifier
  scores: tuple[str, ...]
  inputs: Callable[..., Any] = image_inputs
  hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
  head_hparams: tuple[str, ...] = ()
  augment: str | None = None
  needs_outliers: bool = False
  needs_base_model: bool = False
  update_state: Callable[..., Any] | None = None
  calibration: str = 'temperature'
  model_scores: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = set(self.head_hparams) - set(self.hparams)
    if unknown:  # the trainer builds the head from the config's values of these names
      raise ValueError(f'Method {self.name!r}: head_hparams {sorted(unknown)} are not in its hparams.')


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """A frozen, pretrained model a method consults inside the step (SMOT's class activation maps)."""

  model: Any  # a models.Classifier
  variables: Any  # its {'params', 'batch_stats'}, passed to the step as an argument, not a constant


def classification_loss(per_example: Callable[..., jax.Array]) -> LossFn:
  """A `Method.loss` from a per-example loss of (logits, labels, **hparams): batch mean + accuracy."""

  def loss(logits, features, batch, **hparams):
    del features
    values = per_example(logits, batch['label'], **hparams)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch['label'])
    return jnp.mean(values), {'accuracy': accuracy}

  return loss


def distance_probabilities(logits):
  """Distance one-vs-all probabilities p_k = 2σ(logits_k) ∈ (0, 1] for logits ≤ 0."""
  return 2.0 * jax.nn.sigmoid(logits)
