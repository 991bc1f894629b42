"""Prototype detectors: SHE, fDBD and NCI, scores against per-class or mean training features and the head.

On penultimate features h `[N, D]`, the final layer (W `[D, K]`, b `[K]`) and ŷ = argmax z (higher = more
in-distribution):

* SHE (Zhang et al. 2023, "Out-of-distribution detection based on in-distribution data patterns
  memorization with modern Hopfield energy", eq. 6): ⟨h, S_ŷ⟩, S_k the mean feature of correctly
  classified training examples of class k.
* fDBD (Liu & Qin 2024, "Fast decision boundary based out-of-distribution detector", eq. 5): mean
  feature-space distance to the decision boundaries, divided by ‖h − μ_train‖.
* NCI (Liu & Qin 2025, "Detecting out-of-distribution through the lens of neural collapse"):
  w_ŷ·(h − μ)/‖h − μ‖ + α‖h‖₁, following the authors' OpenOOD implementation.

Each fit is one streamed float64 pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax.detectors import _base as base
from ood_jax.detectors import registry

__all__ = [
    'FeatureStatsState',
    'SHEState',
    'fdbd',
    'fit_fdbd',
    'fit_she',
    'nci',
    'she',
]


# ------------------------------------------------------------------------------------------------
# SHE.
# ------------------------------------------------------------------------------------------------


class SHEState(NamedTuple):
  """SHE's stored patterns `[K, D]` (mean correct-prediction feature per class) and the head."""

  patterns: jax.Array
  head: base.Head


def fit_she(batches, *, head, num_classes=None):
  """Patterns S_k = mean of h over training examples with label k predicted correctly (Zhang et al. 2023).

  A class with no correct prediction falls back to the mean of all its examples (OpenOOD's code would
  give NaN).
  """
  name = 'she'
  head = base.as_head(head, detector=name)
  k = head.bias.shape[0]
  if num_classes is not None and num_classes != k:
    raise ValueError(f'head has {k} outputs but num_classes={num_classes}.')
  dim = head.kernel.shape[0]
  sums = np.zeros((2, k, dim))
  counts = np.zeros((2, k))
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    h, labels = base.labelled(batch, index, k, detector=name, dim=dim)
    pred = np.argmax(base.host_logits(batch, index, head, detector=name), axis=1)
    for row, mask in enumerate((pred == labels, np.ones_like(labels, bool))):
      np.add.at(sums[row], labels[mask], h[mask])
      counts[row] += np.bincount(labels[mask], minlength=k)
  if not counts[1].sum():
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  patterns = np.where(counts[0][:, None] > 0, sums[0] / np.maximum(counts[0], 1)[:, None],
                      sums[1] / np.maximum(counts[1], 1)[:, None])
  return SHEState(base.to_device(patterns), head)


def she(state: SHEState, features, *, logits=None):
  """SHE: ⟨h, S_ŷ⟩ with ŷ = argmax z (Zhang et al. 2023, eq. 6; OpenOOD's default inner-product metric)."""
  state = base.check_state(state, SHEState, detector='she')
  h = base.features_arg(features, detector='she', dim=state.patterns.shape[1])
  return _she(state, h, None if logits is None else base.logits_arg(logits, detector='she'))


@jax.jit
def _she(state, h, logits):
  h = base.compute(h)
  z = base.head_logits(h, state.head) if logits is None else base.compute(logits)
  pattern = state.patterns.astype(h.dtype)[jnp.argmax(z, axis=-1)]
  return jnp.sum(h * pattern, axis=-1)


registry.register('she', needs={'features', 'head'}, fit=fit_she, score=she, paper='Zhang et al. 2023', year=2023)


# ------------------------------------------------------------------------------------------------
# fDBD and NCI (training mean + head).
# ------------------------------------------------------------------------------------------------


class FeatureStatsState(NamedTuple):
  """Training mean feature, pairwise head-weight distances and the head (fDBD, NCI).

  Attributes:
    head: the final layer.
    mean: `[D]` mean training feature.
    weight_distances: `[K, K]` ‖w_i − w_j‖ between head columns, 1 on the diagonal.
  """

  head: base.Head
  mean: jax.Array
  weight_distances: jax.Array


def fit_fdbd(batches, *, head, num_classes=None):
  """One streamed pass for the mean training feature μ; head-weight distances from the head."""
  name = 'fdbd'
  head = base.as_head(head, detector=name)
  if num_classes is not None and head.bias.shape[0] != num_classes:
    raise ValueError(f'head has {head.bias.shape[0]} outputs but num_classes={num_classes}.')
  dim = head.kernel.shape[0]
  total, count = np.zeros(dim), 0
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    h = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', h, dim, index)
    total += h.sum(axis=0)
    count += h.shape[0]
  if not count:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  w = np.asarray(head.kernel, np.float64).T  # [K, D]
  sq = np.sum(w * w, axis=1)
  distances = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * w @ w.T, 0.0))
  np.fill_diagonal(distances, 1.0)
  return FeatureStatsState(head, base.to_device(total / count), base.to_device(distances))


def fdbd(state: FeatureStatsState, features, *, normalizer='distance'):
  """fDBD: (1/(K − 1)) Σ_{j≠ŷ} |z_ŷ − z_j| / ‖w_ŷ − w_j‖, divided by ‖h − μ‖ (Liu & Qin 2024, eq. 5).

  |z_ŷ − z_j| / ‖w_ŷ − w_j‖ is the feature-space distance from h to the boundary between classes ŷ
  and j. The paper divides by the distance to the training mean (`normalizer='distance'`); OpenOOD
  tunes between that and the feature norm ‖h‖ (`normalizer='norm'`).

  Returns:
    `[N]` scores ≥ 0.
  """
  state = base.check_state(state, FeatureStatsState, detector='fdbd')
  h = base.features_arg(features, detector='fdbd', dim=state.mean.shape[0])
  if normalizer not in ('distance', 'norm'):
    raise ValueError(f"normalizer must be 'distance' or 'norm', got {normalizer!r}.")
  return _fdbd(state, h, normalizer == 'distance')


@jax.jit
def _fdbd(state, h, centred):
  # `centred` is traced (a select between two norms), so the tuning grid over the normalizer compiles once.
  h = base.compute(h)
  z = base.head_logits(h, state.head)
  k = z.shape[1]
  pred = jnp.argmax(z, axis=-1)
  gaps = jnp.abs(jnp.max(z, axis=-1, keepdims=True) - z)  # 0 at the predicted class.
  boundary = jnp.sum(gaps / state.weight_distances.astype(h.dtype)[pred], axis=-1) / max(k - 1, 1)
  ref = jnp.where(centred, h - state.mean.astype(h.dtype), h)
  return boundary / jnp.maximum(jnp.linalg.norm(ref, axis=-1), 1e-12)


registry.register('fdbd', needs={'features', 'head'}, fit=fit_fdbd, score=fdbd, defaults={'normalizer': 'distance'},
                  grid={'normalizer': ('distance', 'norm')}, paper='Liu & Qin 2024', year=2024)


def nci(state: FeatureStatsState, features, *, alpha=1e-4):
  """NCI: w_ŷ·(h − μ)/‖h − μ‖ + α‖h‖₁ (Liu & Qin 2025).

  The first term measures how well the centred feature aligns with the predicted class's weight
  (neural-collapse proximity), the second filters by feature norm. Follows the authors' OpenOOD
  implementation (w_ŷ unnormalised, α = 1e-4 their default, tuned over {1e-4, 1e-3, 1e-2, 0.1}).

  Returns:
    `[N]` scores.
  """
  state = base.check_state(state, FeatureStatsState, detector='nci')
  h = base.features_arg(features, detector='nci', dim=state.mean.shape[0])
  return _nci(state, h, base.as_float(alpha))


@jax.jit
def _nci(state, h, alpha):
  h = base.compute(h)
  z = base.head_logits(h, state.head)
  w = state.head.kernel.astype(h.dtype).T[jnp.argmax(z, axis=-1)]  # [N, D]
  centred = h - state.mean.astype(h.dtype)
  proximity = jnp.sum(w * centred, axis=-1) / jnp.maximum(jnp.linalg.norm(centred, axis=-1), 1e-12)
  return proximity + jnp.asarray(alpha, h.dtype) * jnp.sum(jnp.abs(h), axis=-1)


# α grid of the authors' OpenOOD configuration.
registry.register('nci', needs={'features', 'head'}, fit=fit_fdbd, score=nci, defaults={'alpha': 1e-4},
                  grid={'alpha': (1e-4, 1e-3, 1e-2, 1e-1)}, paper='Liu & Qin 2025', year=2025)
