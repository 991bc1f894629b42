"""The `Method` record every training method fills in, and helpers shared by simple methods."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
# loss(logits, features, batch, **hparams) -> (scalar loss, dict of scalar metrics to log)
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def image_inputs(batch: Batch, rng: jax.Array) -> jax.Array:
  """The default model input: the in-distribution images of the batch."""
  del rng
  return batch['image']


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method.

  Attributes:
    name: registry name.
    head: logit layer the model needs: 'dense', 'distance' or 'mahalanobis'.
    loss: `loss(logits, features, batch, **hparams) -> (loss, metrics)`, mean over the batch.
      `hparams` come from `config.method_kwargs`.
    probabilities: logits `[B, K]` → predictive probabilities `[B, K]` used for accuracy, NLL
      and ECE (rows of one-vs-all probabilities need not sum to one).
    scores: names of functions in `ood_jax.scores` taking logits; the first is the default.
    inputs: `inputs(batch, rng)` → the images the model runs on in a training step.
    hparams: default keyword arguments of `loss`; config values override them.
    needs_outliers: the trainer adds `batch['outlier']`, a batch of auxiliary outliers
      (`config.outliers`), to every training batch.
  """

  name: str
  head: str
  loss: LossFn
  probabilities: Callable[[jax.Array], jax.Array]
  scores: tuple[str, ...]
  inputs: Callable[[Batch, jax.Array], jax.Array] = image_inputs
  hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
  needs_outliers: bool = False


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
