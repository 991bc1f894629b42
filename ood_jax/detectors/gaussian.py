"""Gaussian detectors: Mahalanobis and RMDS, and the one Mahalanobis fit and kernel of the library.

On penultimate features h `[N, D]` (higher = more in-distribution):

* Mahalanobis (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples
  and adversarial attacks", eq. 2): −min_k (h − μ_k)ᵀ Σ⁻¹ (h − μ_k), class means μ_k and one tied
  covariance Σ.
* RMDS (Ren et al. 2021, "A simple fix to Mahalanobis distance for improving near-OOD detection",
  eq. 4): −min_k (MD_k(h) − MD_0(h)), MD_0 the distance under one class-agnostic "background" Gaussian.

The pieces every Gaussian score shares live here: `ClassMoments` streams class means and the pooled
scatter over batches in float64 with Chan et al.'s (1979) pairwise update (never E[hhᵀ] − μμᵀ);
`factor` adds the ridge, tests the spectrum and takes the Cholesky factor (never an inverse);
`whiten` stores the whitened means; `class_scores` is the scoring kernel. `ood_jax.scores.fit_gaussian`
/ `mahalanobis`, the multi-layer detectors and NECO's PCA use them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import registry

__all__ = [
    'ClassMoments',
    'Gaussian',
    'GaussianState',
    'RMDSState',
    'class_scores',
    'factor',
    'fit_gaussian',
    'fit_mahalanobis',
    'fit_rmds',
    'mahalanobis',
    'rmds',
    'whiten',
]


# ------------------------------------------------------------------------------------------------
# Streamed moments and the covariance factor.
# ------------------------------------------------------------------------------------------------


class ClassMoments:
  """Per-class counts, means and the pooled within-class scatter, merged batch by batch in float64.

  Each batch is centred on its own class means, then merged with Chan et al.'s (1979) pairwise update
  M₂ ← M₂ + M₂ᵇ + (n·nᵇ/(n + nᵇ))·δδᵀ per class, so a large common offset (features around 1e4) or
  well-separated classes cost no precision to cancellation. Memory: O(K·D + D²), whatever the data size.
  """

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.counts = np.zeros(num_classes, np.int64)
    self.means = None
    self.scatter = None

  def update(self, features: np.ndarray, labels: np.ndarray):
    if self.means is None:
      self.means = np.zeros((self.num_classes, features.shape[1]))
      self.scatter = np.zeros((features.shape[1], features.shape[1]))
    if not labels.size:
      return
    batch_counts = np.bincount(labels, minlength=self.num_classes)
    sums = np.zeros_like(self.means)
    np.add.at(sums, labels, features)
    batch_means = sums / np.maximum(batch_counts, 1)[:, None]
    centred = features - batch_means[labels]
    self.scatter += centred.T @ centred
    # Classes absent from either side get weight 0; only classes present on both sides enter the
    # rank-update, which bounds its cost by the batch size.
    total = self.counts + batch_counts
    delta = batch_means - self.means
    weight = self.counts * batch_counts / np.maximum(total, 1)
    both = np.flatnonzero(weight)
    if both.size:
      d = delta[both]
      self.scatter += (d * weight[both, None]).T @ d
    self.means += delta * (batch_counts / np.maximum(total, 1))[:, None]
    self.counts = total

  def check(self, what: str):
    """Raises unless every class has an example; `what` names the caller in the message."""
    if self.means is None or not self.counts.sum():
      raise ValueError(f'{what}: batches yielded no examples.')
    missing = np.flatnonzero(self.counts == 0)
    if missing.size:
      raise ValueError(f'{what}: class {missing[0]} has no examples (classes without examples: '
                       f'{missing.tolist()[:10]}); every class in [0, {self.num_classes}) (num_classes) needs at '
                       f'least one to estimate its mean.')

  def within_covariance(self) -> np.ndarray:
    """Σ = (1/N) Σ_k Σ_{i: y_i = k} (h_i − μ_k)(h_i − μ_k)ᵀ, the maximum-likelihood tied covariance."""
    return self.scatter / self.counts.sum()

  def total_mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
    """Class-agnostic mean and covariance, from the class moments (no second pass)."""
    n = self.counts.sum()
    mean = (self.counts[:, None] * self.means).sum(axis=0) / n
    offsets = self.means - mean
    between = (offsets * self.counts[:, None]).T @ offsets
    return mean, (self.scatter + between) / n


def factor(covariance: np.ndarray, ridge: float, *, what: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(covariance + ridge·(tr/D)·I, its Cholesky factor), float64, or a ValueError suggesting a ridge.

  A rank-deficient covariance can still pass a float64 Cholesky with round-off-sized pivots and then
  whiten to garbage, so the spectrum is tested with NumPy's matrix-rank tolerance first.
  """
  dim = covariance.shape[0]
  covariance = 0.5 * (covariance + covariance.T)  # Exact symmetry for eigvalsh / cholesky.
  if ridge > 0:
    covariance = covariance + ridge * (np.trace(covariance) / dim) * np.eye(dim)
  eigenvalues = np.linalg.eigvalsh(covariance)
  tolerance = dim * np.finfo(np.float64).eps * max(eigenvalues[-1], 0.0)
  message = (f'The {what} covariance is singular (smallest eigenvalue {eigenvalues[0]:.3g}, largest '
             f'{eigenvalues[-1]:.3g}; {count} examples, dim {dim}, ridge {ridge}): this happens when dim exceeds the '
             f'number of examples or some features are constant. Pass ridge > 0 (e.g. ridge=1e-6) to shrink it '
             f'towards a multiple of the identity.')
  if eigenvalues[-1] <= 0 or eigenvalues[0] <= tolerance:
    raise ValueError(message)
  try:
    return covariance, np.linalg.cholesky(covariance)
  except np.linalg.LinAlgError:
    raise ValueError(message) from None


# ------------------------------------------------------------------------------------------------
# The Gaussian, its whitened form and the scoring kernel.
# ------------------------------------------------------------------------------------------------


class Gaussian(NamedTuple):
  """Class-conditional Gaussians with one shared covariance (`ood_jax.scores.Gaussian`).

  A NamedTuple, hence a pytree: pass it through `jax.jit` like any other argument.

  Attributes:
    means: `[num_classes, dim]` class means.
    covariance: `[dim, dim]` shared covariance (including the ridge, if any).
    cholesky: `[dim, dim]` lower-triangular factor L with LLᵀ = covariance.
  """

  means: jax.Array
  covariance: jax.Array
  cholesky: jax.Array


class GaussianState(NamedTuple):
  """A `Gaussian` ready to score: its means whitened, L⁻¹(μ_k − offset), after subtracting `offset`.

  The offset (the mean of the class means unless given) keeps the kernel's float32 expansion of
  ‖a − b‖² accurate (see `class_scores`).
  """

  gaussian: Gaussian
  white_means: jax.Array
  offset: jax.Array


def _fit(batches, num_classes, ridge, detector) -> tuple[Gaussian, np.dtype]:
  """The float64 NumPy `Gaussian` of the batches, and the dtype to store it in."""
  num_classes = _checks.positive_int('num_classes', num_classes)
  _checks.nonnegative('ridge', ridge)
  moments, in_dtype = ClassMoments(num_classes), None
  for index, batch in enumerate(base.batch_source(batches, detector=detector)()):
    features, labels = base.labelled(batch, index, num_classes, detector=detector,
                                     dim=None if moments.means is None else moments.means.shape[1])
    if in_dtype is None:
      in_dtype = getattr(batch['features'], 'dtype', None)
      in_dtype = np.asarray(batch['features']).dtype if in_dtype is None else in_dtype
    moments.update(features, labels)
  moments.check(f'detector {detector!r}')
  covariance, cholesky = factor(moments.within_covariance(), float(ridge), what='shared within-class',
                                count=int(moments.counts.sum()))
  return Gaussian(moments.means, covariance, cholesky), jax.dtypes.canonicalize_dtype(
      jnp.promote_types(in_dtype, jnp.float32))


def fit_gaussian(batches, *, num_classes, ridge=0.0, detector='mahalanobis') -> Gaussian:
  """Class means and the tied covariance streamed over batches of 'features' and 'labels' (Lee et al. 2018).

    μ_k = mean of the features of class k,
    Σ = (1/N) Σ_k Σ_{i: y_i = k} (f_i − μ_k)(f_i − μ_k)ᵀ        (maximum likelihood),

  the estimate of `sklearn.covariance.EmpiricalCovariance` on class-centred features, plus
  ridge·(tr Σ / D)·I. One pass: a generator works.

  Args:
    batches: batch dicts with 'features' `[B, D]` and 'labels' `[B]` (see `ood_jax.detectors`).
    num_classes: K; every class needs an example.
    ridge: relative shrinkage ≥ 0; 0 is the maximum-likelihood estimate.
    detector: the name errors give.

  Returns:
    A `Gaussian` in float32 (float64 if the features are float64 and x64 is enabled); the Cholesky factor
    is computed in float64 before the cast.
  """
  gaussian, dtype = _fit(batches, num_classes, ridge, detector)
  return Gaussian(*(base.to_device(x, dtype) for x in gaussian))


def whiten(gaussian: Gaussian, offset=None, *, dtype=None) -> GaussianState:
  """The `GaussianState` of a Gaussian, by one triangular solve, cast to `dtype` (default: the means').

  A fit's float64 NumPy moments are whitened on the host in float64; JAX arrays (possibly traced, as in
  `jax.jit(ood_jax.scores.mahalanobis)`) in their own dtype.
  """
  if isinstance(gaussian.means, np.ndarray) and isinstance(gaussian.cholesky, np.ndarray):
    xp, solve = np, np.linalg.solve  # once per fit, so a general solve costs nothing
  else:
    xp, solve = jnp, lambda a, b: jax.scipy.linalg.solve_triangular(a, b, lower=True)
  means = xp.asarray(gaussian.means)
  offset = means.mean(axis=0) if offset is None else xp.asarray(offset, means.dtype)
  white = solve(xp.asarray(gaussian.cholesky, means.dtype), (means - offset).T).T
  dtype = means.dtype if dtype is None else dtype
  cast = lambda x: (None if x is None else base.to_device(x, dtype) if isinstance(x, np.ndarray)
                    else jnp.asarray(x, dtype))
  return GaussianState(Gaussian(*map(cast, gaussian)), cast(white), cast(offset))


@jax.jit
def _neg_sq_distances(features, white_means, cholesky):
  """−‖L⁻¹h − L⁻¹μ_k‖² for every class, `[N, K]`, by one triangular solve and one matrix product.

  The expansion ‖a‖² − 2a·b + ‖b‖² runs at matrix-multiply speed (the explicit `[N, K, D]`
  difference of `ood_jax.layers.mahalanobis_logits` is much slower at 1 000 classes × 2 048
  features). Its float32 round-off is ~eps·‖a‖², so callers subtract a central point from features and
  means first: distances are unchanged and ‖a‖ stays of the order of the distances themselves.
  """
  white = jax.scipy.linalg.solve_triangular(cholesky, features.T, lower=True).T
  cross = jnp.dot(white, white_means.T, precision=jax.lax.Precision.HIGHEST)
  sq = (jnp.sum(jnp.square(white), axis=-1, keepdims=True) - 2.0 * cross
        + jnp.sum(jnp.square(white_means), axis=-1))
  return -jnp.maximum(sq, 0.0)


def class_scores(state: GaussianState, features):
  """−(h − μ_k)ᵀ Σ⁻¹ (h − μ_k) for every class, `[N, K]`, in the features' dtype (the scoring kernel)."""
  h = features - state.offset.astype(features.dtype)
  return _neg_sq_distances(h, state.white_means.astype(h.dtype), state.gaussian.cholesky.astype(h.dtype))


# ------------------------------------------------------------------------------------------------
# Mahalanobis.
# ------------------------------------------------------------------------------------------------


def fit_mahalanobis(batches, *, num_classes, ridge=0.0):
  """Class means and the tied covariance, streamed (Lee et al. 2018), ready to score.

  Args:
    batches: batches with 'features' `[B, D]` and 'labels' `[B]`.
    num_classes: K.
    ridge: relative shrinkage (see `fit_gaussian`); 0 is the maximum-likelihood estimate.

  Returns:
    `GaussianState`.
  """
  gaussian, dtype = _fit(batches, num_classes, ridge, 'mahalanobis')
  return whiten(gaussian, dtype=dtype)


def mahalanobis(state: GaussianState, features):
  """−min_k (h − μ_k)ᵀ Σ⁻¹ (h − μ_k) (Lee et al. 2018, eq. 2; no input preprocessing).

  `ood_jax.scores.mahalanobis(features, state.gaussian)` gives the same numbers.
  """
  state = base.check_state(state, GaussianState, detector='mahalanobis')
  return _mahalanobis(state, base.features_arg(features, detector='mahalanobis', dim=state.gaussian.means.shape[1]))


@jax.jit
def _mahalanobis(state, h):
  return jnp.max(class_scores(state, base.compute(h)), axis=-1)


# ridge = 1e-6 keeps Σ invertible where ReLU features have dead units; it moves distances by ~1e-6.
registry.register('mahalanobis', needs={'features'}, fit=fit_mahalanobis, score=mahalanobis,
                  defaults={'ridge': 1e-6}, fit_params=('ridge',), paper='Lee et al. 2018', year=2018)


# ------------------------------------------------------------------------------------------------
# RMDS.
# ------------------------------------------------------------------------------------------------


class RMDSState(NamedTuple):
  """RMDS's class-conditional tied Gaussian and class-agnostic background Gaussian, both whitened around
  the background mean."""

  classes: GaussianState
  background: GaussianState


def fit_rmds(batches, *, num_classes, ridge=0.0):
  """Fits RMDS's two Gaussians in one streamed pass (Ren et al. 2021, Section 3).

  The background Gaussian N(μ₀, Σ₀) is fitted to all training features regardless of class. Its
  moments follow exactly from the class moments (Σ₀ = Σ_within + Σ_between), so one pass suffices.

  Args:
    batches: batches with 'features' and 'labels'.
    num_classes: K.
    ridge: relative shrinkage of both covariances.

  Returns:
    `RMDSState`.
  """
  name = 'rmds'
  num_classes = _checks.positive_int('num_classes', num_classes)
  _checks.nonnegative('ridge', ridge)
  moments = ClassMoments(num_classes)
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    moments.update(*base.labelled(batch, index, num_classes, detector=name,
                                  dim=None if moments.means is None else moments.means.shape[1]))
  moments.check(f'detector {name!r}')
  count = int(moments.counts.sum())
  mean0, cov0 = moments.total_mean_and_covariance()
  classes = Gaussian(moments.means, *factor(moments.within_covariance(), float(ridge), what='shared within-class',
                                           count=count))
  background = Gaussian(mean0[None], *factor(cov0, float(ridge), what='background', count=count))
  return RMDSState(whiten(classes, mean0, dtype=base.out_dtype()), whiten(background, mean0, dtype=base.out_dtype()))


def rmds(state: RMDSState, features):
  """Relative Mahalanobis: max_k (−MD_k(h) + MD_0(h)) (Ren et al. 2021, eq. 4, negated).

  As in the paper and OpenOOD, MD is the squared distance, with the tied class covariance for MD_k and
  the background covariance for MD_0.
  """
  state = base.check_state(state, RMDSState, detector='rmds')
  return _rmds(state, base.features_arg(features, detector='rmds', dim=state.classes.gaussian.cholesky.shape[0]))


@jax.jit
def _rmds(state, h):
  h = base.compute(h)
  return jnp.max(class_scores(state.classes, h), axis=-1) - class_scores(state.background, h)[:, 0]


registry.register('rmds', needs={'features'}, fit=fit_rmds, score=rmds, defaults={'ridge': 1e-6},
                  fit_params=('ridge',), paper='Ren et al. 2021', year=2021)
