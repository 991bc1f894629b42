"""Post-hoc OOD scores: every score is "higher = more in-distribution" (confidence-like).

Logit scores map `[..., K]` logits to `[...]` scores:

* `max_softmax`: maximum softmax probability, MSP (Hendrycks & Gimpel 2017; "MPS" in Macêdo et al. 2021).
* `max_logit`: max_k z_k; on IsoMax distance logits this is the minimum distance score (MDS, Macêdo et al. 2021).
* `entropic_score`: negative entropy Σ_k p_k log p_k of softmax(z) (IsoMax, Macêdo et al. 2021, eq. 7).
* `energy`: negative free energy T·logsumexp(z / T) (Liu et al. 2020; Wu et al. 2022).
* `max_sigmoid`, `max_distance_sigmoid`: one-vs-all confidences σ(z) and 2σ(z) (Padhy et al. 2020).
* `max_likelihood`: ICE confidence exp(max_k h_k) on Mahalanobis logits (Wu et al. 2022).

Scores that need more than logits, doors into the detector families that hold their math:

* `odin`: temperature scaling plus one signed-gradient input perturbation (Liang et al. 2018;
  `ood_jax.detectors.gradient.odin`).
* `fit_gaussian` / `mahalanobis`: class means and one shared covariance fitted by streaming over
  training features, then −min_k Mahalanobis distance (Lee et al. 2018; Regmi et al. 2024;
  `ood_jax.detectors.gaussian`, the fit and kernel of `detectors.get('mahalanobis')`).
* `knn`: −distance to the k-th nearest normalised training feature (Sun et al. 2022; Regmi et al. 2024),
  computed in chunks so that the query × bank similarity matrix is never materialised
  (`ood_jax.detectors.neighbours.knn_scores`, the kernel of `detectors.get('knn')`).

The first four logit scores are the arithmetic of the logit detectors (`ood_jax.detectors.logit`), so
each exists once. Logit scores compute in at least float32 (`_checks.compute_dtype`), so bfloat16 logits
give float32 scores; they are pure, jit- and vmap-safe, and work in log space so that logits of ±1e4
never produce a NaN.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.detectors import gaussian as gaussian_family
from ood_jax.detectors import gradient
from ood_jax.detectors import logit
from ood_jax.detectors import neighbours

__all__ = [
    'Gaussian',
    'energy',
    'entropic_score',
    'fit_gaussian',
    'knn',
    'mahalanobis',
    'max_distance_sigmoid',
    'max_likelihood',
    'max_logit',
    'max_sigmoid',
    'max_softmax',
    'odin',
]

max_softmax = logit.max_softmax
max_logit = logit.max_logit
entropic_score = logit.entropic_score
energy = logit.energy
knn = neighbours.knn_scores
Gaussian = gaussian_family.Gaussian


def max_sigmoid(logits):
  """One-vs-all confidence, max_k σ(z_k) (Padhy et al. 2020).

  σ is increasing, so max_k σ(z_k) = σ(max_k z_k): one sigmoid per example instead of K.

  Args:
    logits: `[..., num_classes]` floating one-vs-all logits.

  Returns:
    `[...]` scores in [0, 1], in at least float32.
  """
  return jax.nn.sigmoid(max_logit(logits))


def max_distance_sigmoid(logits):
  """Distance one-vs-all confidence, max_k 2σ(z_k) for distance logits z_k = −d_k ≤ 0 (Padhy et al. 2020).

  p_k = 2σ(−d_k) ∈ (0, 1] is 1 on the prototype and decays to 0 far from it. Logits must be
  ≤ 0 (negative distances); positive logits would give values above 1 and are not clipped.

  Args:
    logits: `[..., num_classes]` negative distances.

  Returns:
    `[...]` scores in [0, 1] (exactly 1 at logit 0, a finite ~0 at logit −1e4), in at least float32.
  """
  return 2.0 * jax.nn.sigmoid(max_logit(logits))


def max_likelihood(logits):
  """ICE confidence, exp(max_k h_k) for Mahalanobis logits h_k ≤ 0 (Wu et al. 2022).

  exp(h_k) is the unnormalised Gaussian likelihood of class k; the maximum is 1 at a class mean.
  It ranks examples exactly as `max_logit` does, but in float32 it underflows to 0 once
  max h < −87, where all such examples tie; rank with `max_logit` when distances are large.

  Args:
    logits: `[..., num_classes]` ICE logits h_k = −(f − m_k)ᵀΣ⁻¹(f − m_k) ≤ 0, e.g. from
      `ood_jax.layers.mahalanobis_logits`.

  Returns:
    `[...]` scores in [0, 1], in at least float32.
  """
  return jnp.exp(max_logit(logits))


def odin(apply_fn: Callable[[jax.Array], jax.Array], inputs, *, temperature=1000.0, epsilon=0.0014):
  """ODIN score, max_k softmax(f(x̃) / T)_k of the input perturbed towards confidence (Liang et al. 2018,
  eq. 2): `ood_jax.detectors.gradient.odin`, whose docstring has the details (batching, units of ε, jit).

  Args:
    apply_fn: maps `inputs` `[batch, ...]` to logits `[batch, num_classes]`.
    inputs: `[batch, ...]` floating inputs.
    temperature: T > 0; 1000 as in the paper.
    epsilon: perturbation magnitude ε ≥ 0; 0.0014 as the paper's CIFAR-10 DenseNet setting.

  Returns:
    `[batch]` scores in (0, 1], in at least float32.
  """
  if not callable(apply_fn):
    raise TypeError(f'apply_fn must be callable, got {type(apply_fn).__name__}.')
  return gradient.odin(apply_fn, inputs, temperature=temperature, epsilon=epsilon)


_FIT_GAUSSIAN_USAGE = ('Pass fit_gaussian(features, labels, num_classes=K) for whole arrays, or an iterable of '
                       '(features, labels) batches such as [(features, labels)] or a generator.')


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _as_batch(index, pair):
  try:
    features, labels = pair
  except (TypeError, ValueError):
    shape = f' of shape {tuple(pair.shape)}' if hasattr(pair, 'shape') else ''
    raise TypeError(f'batches must yield (features, labels) pairs; item {index} is a '
                    f'{type(pair).__name__}{shape}. {_FIT_GAUSSIAN_USAGE}') from None
  return {'features': features, 'labels': labels}


def fit_gaussian(batches: Iterable | jax.Array | np.ndarray, labels=None, *, num_classes: int,
                 ridge: float = 0.0) -> Gaussian:
  """Fits class means and one shared (tied) covariance by streaming over batches (Lee et al. 2018).

    μ_k = mean of the features of class k,
    Σ = (1/N) Σ_k Σ_{i: y_i = k} (f_i − μ_k)(f_i − μ_k)ᵀ        (maximum likelihood),

  the estimate of `sklearn.covariance.EmpiricalCovariance` on class-centred features.

  Batches are consumed one at a time on the host in float64, so memory stays at one batch plus
  O(num_classes·dim + dim²) (50 000 × 512 features never sit in memory at once). Each batch is
  centred on its own per-class means and merged into the running statistics with the pairwise
  update of Chan et al. (1979), M₂ ← M₂ + M₂ᵇ + (n·nᵇ / (n + nᵇ))·δδᵀ per class. Nothing is
  ever computed as E[ffᵀ] − μμᵀ, so a large common offset (features around 1e4) or
  well-separated classes cost no precision to cancellation.

  Three spellings, the same fit:

    fit_gaussian(features, labels, num_classes=K)           # whole arrays
    fit_gaussian((features, labels), num_classes=K)         # one (features, labels) pair
    fit_gaussian(batch_iterator(), num_classes=K)           # streamed batches

  Args:
    batches: iterable of `(features [batch, dim], labels [batch])` pairs (NumPy or JAX arrays,
      floating features, integer labels in [0, num_classes)); batch sizes may differ and a batch
      may miss some classes, but every class needs at least one example overall. Consumed once,
      so a generator works. Also accepted: one `(features, labels)` pair of arrays, or the
      `[N, dim]` features array itself when `labels` is given.
    labels: `[N]` integer labels of `batches` when it is a features array; None otherwise.
    num_classes: K.
    ridge: relative shrinkage ≥ 0: the returned covariance is Σ + ridge·(tr Σ / dim)·I. The
      default 0 gives the exact maximum-likelihood estimate; pass e.g. 1e-6 when the covariance
      is singular (dim > number of examples, or dead / constant features, as ReLU features
      often have), the default of `detectors.get('mahalanobis')`.

  Returns:
    A `Gaussian(means [K, dim], covariance [dim, dim], cholesky [dim, dim])` of JAX arrays, in
    float32 (float64 if the features are float64 and x64 is enabled). The Cholesky factor is
    computed in float64 before the cast.

  Raises:
    ValueError: no examples, a class without examples, labels out of range, or a singular
      covariance.
    TypeError: input that is none of the three spellings above (the message says what to pass).
  """
  if labels is not None:
    if not _is_array(batches):
      raise TypeError(f'fit_gaussian(features, labels) needs a features array as its first argument, got a '
                      f'{type(batches).__name__}. {_FIT_GAUSSIAN_USAGE}')
    batches = [(batches, labels)]
  elif _is_array(batches):
    raise TypeError(f'fit_gaussian got a single array of shape {tuple(batches.shape)} and no labels. '
                    f'{_FIT_GAUSSIAN_USAGE}')
  elif isinstance(batches, (tuple, list)) and len(batches) == 2 and all(_is_array(b) for b in batches):
    batches = [tuple(batches)]  # one (features, labels) pair; a list of batches holds pairs, not arrays
  pairs = (_as_batch(index, pair) for index, pair in enumerate(batches))
  return gaussian_family.fit_gaussian(pairs, num_classes=num_classes, ridge=ridge, detector='fit_gaussian')


def mahalanobis(features, gaussian: Gaussian):
  """Mahalanobis score, −min_k (f − μ_k)ᵀ Σ⁻¹ (f − μ_k) (Lee et al. 2018, eq. 2, without input
  preprocessing or feature ensembles).

  The kernel of `detectors.get('mahalanobis')` (`ood_jax.detectors.gaussian.class_scores` on
  `gaussian.whiten(gaussian)`): features and means are centred on the mean of the class means, whitened
  by triangular solves against the Cholesky factor (Σ is never inverted) and compared by one matrix
  product. Equal to max_k of `ood_jax.layers.mahalanobis_logits(features, means, cholesky)` up to
  float rounding.

  Args:
    features: `[..., dim]` floating features (e.g. penultimate-layer activations).
    gaussian: a `Gaussian` from `fit_gaussian` (any object with `means` `[K, dim]` and `cholesky`
      `[dim, dim]` attributes).

  Returns:
    `[...]` scores ≤ 0, in at least float32.
  """
  features = _checks.floating('features', features, min_ndim=1)
  dim = gaussian.means.shape[-1]
  if features.shape[-1] != dim:
    raise ValueError(f'features have dimension {features.shape[-1]}, but the Gaussian has dimension {dim}.')
  h = features.reshape(-1, dim).astype(_checks.compute_dtype(features, gaussian.means))
  # Only the means and the factor are read: any object with those two attributes works.
  state = gaussian_family.whiten(gaussian_family.Gaussian(jnp.asarray(gaussian.means, h.dtype), None,
                                                          jnp.asarray(gaussian.cholesky, h.dtype)))
  return jnp.max(gaussian_family.class_scores(state, h), axis=-1).reshape(features.shape[:-1])
