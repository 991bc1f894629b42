"""Feature-space detectors: Gaussian, subspace, nearest-neighbour and neural-collapse scores.

On penultimate features h `[N, D]` (higher = more in-distribution):

* Mahalanobis (Lee et al. 2018, eq. 2): −min_k (h − μ_k)ᵀ Σ⁻¹ (h − μ_k), tied covariance
  (`ood_jax.scores.fit_gaussian` / `ood_jax.scores.mahalanobis`).
* Multi-layer Mahalanobis (Lee et al. 2018, Algorithm 1): per-layer Gaussians on mean-pooled feature
  maps, optional input preprocessing x̂ = x − ε·sign(∇ₓ D_ĉ(x)), and logistic-regression layer weights
  fitted on validation ID vs OOD layer scores.
* RMDS (Ren et al. 2021, "A simple fix to Mahalanobis distance", eq. 4): −min_k (MD_k(h) − MD_0(h)),
  MD_0 the distance under one class-agnostic "background" Gaussian.
* KNN (Sun et al. 2022): −distance to the k-th nearest normalised training feature (`ood_jax.scores.knn`).
* ViM (Wang et al. 2022, "ViM: Out-of-distribution with virtual-logit matching", eq. 6–9): energy minus
  α·‖residual of h − u outside the principal subspace‖, u = −(Wᵀ)⁺b.
* Residual (same paper): −‖residual‖.
* SHE (Zhang et al. 2023, "Out-of-distribution detection based on in-distribution data patterns
  memorization with modern Hopfield energy", eq. 6): ⟨h, S_ŷ⟩, S_k the mean feature of correctly
  classified training examples of class k.
* NNGuide (Park et al. 2023, "Nearest neighbor guidance for out-of-distribution detection", eq. 4–5):
  energy × mean of the k largest inner products with a confidence-scaled training bank.
* fDBD (Liu & Qin 2024, "Fast decision boundary based out-of-distribution detector", eq. 5): mean
  feature-space distance to the decision boundaries, divided by ‖h − μ_train‖.
* NECO (Ammar et al. 2024, "NECO: NEural Collapse based out-of-distribution detection", eq. 6):
  ‖P_d h‖ / ‖h‖, P_d the projection on the d leading principal components.
* NCI (Liu & Qin 2025, "Detecting out-of-distribution through the lens of neural collapse"):
  w_ŷ·(h − μ)/‖h − μ‖ + α‖h‖₁, following the authors' OpenOOD implementation.

Fits stream over batches in float64 on the host (class moments merged with Chan et al.'s pairwise
update, so nothing is computed as E[hhᵀ] − μμᵀ); covariances are factored by Cholesky or `eigh`, never
inverted; banks (KNN, NNGuide) are the only fits that keep examples, and both can subsample.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax import layers
from ood_jax import scores
from ood_jax.detectors import _base as base

__all__ = [
    'FeatureStatsState',
    'GaussianState',
    'KNNState',
    'MultiLayerState',
    'NNGuideState',
    'PCAState',
    'RMDSState',
    'SHEState',
    'SubspaceState',
    'fdbd',
    'fit_fdbd',
    'fit_knn',
    'fit_layer_weights',
    'fit_mahalanobis',
    'fit_multilayer',
    'fit_neco',
    'fit_nnguide',
    'fit_rmds',
    'fit_she',
    'fit_subspace',
    'knn',
    'layer_scores',
    'mahalanobis',
    'mahalanobis_ensemble',
    'multilayer_mahalanobis',
    'nci',
    'neco',
    'nnguide',
    'perturbed_layer_scores',
    'residual',
    'rmds',
    'she',
    'vim',
    'vim_default_dim',
]


# ------------------------------------------------------------------------------------------------
# Streamed moments.
# ------------------------------------------------------------------------------------------------


class _ClassMoments:
  """Per-class counts, means and the pooled within-class scatter, merged batch by batch in float64.

  Each batch is centred on its own class means, then merged with Chan et al.'s (1979) pairwise update
  M₂ ← M₂ + M₂ᵇ + (n·nᵇ/(n + nᵇ))·δδᵀ, as `ood_jax.scores.fit_gaussian` does.
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
    total = self.counts + batch_counts
    delta = batch_means - self.means
    weight = self.counts * batch_counts / np.maximum(total, 1)
    both = np.flatnonzero(weight)
    if both.size:
      d = delta[both]
      self.scatter += (d * weight[both, None]).T @ d
    self.means += delta * (batch_counts / np.maximum(total, 1))[:, None]
    self.counts = total

  def check(self, detector: str):
    if self.means is None or not self.counts.sum():
      raise ValueError(f'detector {detector!r}: batches yielded no examples.')
    missing = np.flatnonzero(self.counts == 0)
    if missing.size:
      raise ValueError(f'detector {detector!r}: class {missing[0]} has no examples (classes without '
                       f'examples: {missing.tolist()[:10]}); every class in [0, {self.num_classes}) needs one.')

  def within_covariance(self):
    return self.scatter / self.counts.sum()

  def total_mean_and_covariance(self):
    """Class-agnostic mean and covariance, from the class moments (no second pass)."""
    n = self.counts.sum()
    mean = (self.counts[:, None] * self.means).sum(axis=0) / n
    offsets = self.means - mean
    between = (offsets * self.counts[:, None]).T @ offsets
    return mean, (self.scatter + between) / n


def _cholesky(covariance: np.ndarray, ridge: float, what: str) -> np.ndarray:
  """Cholesky factor of covariance + ridge·(tr/D)·I, with the spectrum test of `fit_gaussian`."""
  dim = covariance.shape[0]
  covariance = 0.5 * (covariance + covariance.T)
  if ridge > 0:
    covariance = covariance + ridge * (np.trace(covariance) / dim) * np.eye(dim)
  eigenvalues = np.linalg.eigvalsh(covariance)
  tolerance = dim * np.finfo(np.float64).eps * max(eigenvalues[-1], 0.0)
  if eigenvalues[-1] <= 0 or eigenvalues[0] <= tolerance:
    raise ValueError(f'the {what} covariance is singular (eigenvalues in [{eigenvalues[0]:.3g}, '
                     f'{eigenvalues[-1]:.3g}], dim {dim}); pass ridge > 0 (e.g. ridge=1e-6).')
  return np.linalg.cholesky(covariance)


@jax.jit
def _neg_sq_mahalanobis(features, white_means, cholesky):
  """−‖L⁻¹h − L⁻¹μ_k‖² for every class: `[N, K]`, by one triangular solve and one matrix product.

  The expansion ‖a‖² − 2a·b + ‖b‖² runs at matrix-multiply speed (the explicit `[N, K, D]`
  difference of `ood_jax.layers.mahalanobis_logits` is much slower at 1 000 classes × 2 048
  features). Its float32 round-off is ~eps·‖a‖², so callers subtract a central point (the mean of the
  class means, stored at fit time) from features and means first: distances are unchanged and ‖a‖
  stays of the order of the distances themselves.
  """
  white = jax.scipy.linalg.solve_triangular(cholesky, features.T, lower=True).T
  cross = jnp.dot(white, white_means.T, precision=jax.lax.Precision.HIGHEST)
  sq = (jnp.sum(jnp.square(white), axis=-1, keepdims=True) - 2.0 * cross
        + jnp.sum(jnp.square(white_means), axis=-1))
  return -jnp.maximum(sq, 0.0)


def _white_means(means: np.ndarray, cholesky: np.ndarray) -> np.ndarray:
  return np.linalg.solve(cholesky, means.T).T  # Triangular, float64, once per fit.


def _labelled(batch, index, num_classes, detector, dim):
  features = base.host(batch, 'features', index, detector=detector)
  base.check_dim('features', features, dim, index)
  labels = base.host_labels(batch, index, num_classes, features.shape[0], detector=detector)
  return features, labels


# ------------------------------------------------------------------------------------------------
# Mahalanobis and RMDS.
# ------------------------------------------------------------------------------------------------


class GaussianState(NamedTuple):
  """Tied Gaussian of the Mahalanobis detector: an `ood_jax.scores.Gaussian`, plus the means whitened
  after subtracting `offset` (the mean of the class means; see `_neg_sq_mahalanobis`)."""

  gaussian: scores.Gaussian
  white_means: jax.Array
  offset: jax.Array


def fit_mahalanobis(batches, *, num_classes, ridge=0.0):
  """Class means and the tied covariance, streamed by `ood_jax.scores.fit_gaussian` (Lee et al. 2018).

  Args:
    batches: batches with 'features' `[B, D]` and 'labels' `[B]`.
    num_classes: K.
    ridge: relative shrinkage (see `fit_gaussian`); 0 is the maximum-likelihood estimate.

  Returns:
    `GaussianState`.
  """
  name = 'mahalanobis'
  source = base.batch_source(batches, detector=name)

  def pairs():
    for index, batch in enumerate(source()):
      yield (base.host(batch, 'features', index, detector=name),
             base.host(batch, 'labels', index, detector=name, ndim=1, dtype=np.int64))

  gaussian = scores.fit_gaussian(pairs(), num_classes=num_classes, ridge=ridge)
  means = np.asarray(gaussian.means, np.float64)
  offset = means.mean(axis=0)
  white = _white_means(means - offset, np.asarray(gaussian.cholesky, np.float64))
  dtype = gaussian.means.dtype
  return GaussianState(gaussian, jnp.asarray(white, dtype), jnp.asarray(offset, dtype))


def mahalanobis(state: GaussianState, features):
  """−min_k (h − μ_k)ᵀ Σ⁻¹ (h − μ_k) (Lee et al. 2018, eq. 2; no input preprocessing).

  The same value as `ood_jax.scores.mahalanobis(features, state.gaussian)`, computed by one
  triangular solve and one matrix product per batch (see `_neg_sq_mahalanobis`).
  """
  state = base.check_state(state, GaussianState, detector='mahalanobis')
  h = base.features_arg(features, detector='mahalanobis', dim=state.gaussian.means.shape[1])
  h = h - state.offset.astype(h.dtype)
  return jnp.max(_neg_sq_mahalanobis(h, state.white_means.astype(h.dtype),
                                     state.gaussian.cholesky.astype(h.dtype)), axis=-1)


class RMDSState(NamedTuple):
  """Class-conditional tied Gaussian plus the class-agnostic background Gaussian of RMDS (means
  whitened after subtracting `offset`, the background mean)."""

  white_means: jax.Array
  cholesky: jax.Array
  white_background_mean: jax.Array
  background_cholesky: jax.Array
  offset: jax.Array


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
  moments = _ClassMoments(num_classes)
  dim = None
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    features, labels = _labelled(batch, index, num_classes, name, dim)
    dim = features.shape[1]
    moments.update(features, labels)
  moments.check(name)
  chol = _cholesky(moments.within_covariance(), float(ridge), 'shared within-class')
  mean0, cov0 = moments.total_mean_and_covariance()
  chol0 = _cholesky(cov0, float(ridge), 'background')
  dtype = base.out_dtype()
  return RMDSState(jnp.asarray(_white_means(moments.means - mean0, chol), dtype), jnp.asarray(chol, dtype),
                   jnp.zeros((1, mean0.shape[0]), dtype), jnp.asarray(chol0, dtype), jnp.asarray(mean0, dtype))


def rmds(state: RMDSState, features):
  """Relative Mahalanobis: max_k (−MD_k(h) + MD_0(h)) (Ren et al. 2021, eq. 4, negated).

  As in the paper and OpenOOD, MD is the squared distance, with the tied class covariance for MD_k and
  the background covariance for MD_0.
  """
  state = base.check_state(state, RMDSState, detector='rmds')
  h = base.features_arg(features, detector='rmds', dim=state.cholesky.shape[0])
  h = h - state.offset.astype(h.dtype)
  cls = jnp.max(_neg_sq_mahalanobis(h, state.white_means.astype(h.dtype), state.cholesky.astype(h.dtype)),
                axis=-1)
  background = _neg_sq_mahalanobis(h, state.white_background_mean.astype(h.dtype),
                                   state.background_cholesky.astype(h.dtype))[:, 0]
  return cls - background


# ------------------------------------------------------------------------------------------------
# Multi-layer Mahalanobis with input preprocessing (Lee et al. 2018).
# ------------------------------------------------------------------------------------------------


class MultiLayerState(NamedTuple):
  """Per-layer tied Gaussians and the logistic-regression layer weights.

  Attributes:
    white_means: tuple of `[K, C_l]` whitened class means (after subtracting `offsets`), per layer.
    choleskys: tuple of `[C_l, C_l]` Cholesky factors.
    offsets: tuple of `[C_l]` means of the class means.
    weights: `[L]` layer weights (1/L each until `fit_layer_weights`).
    bias: scalar bias of the logistic regression (0 until fitted).
  """

  white_means: tuple
  choleskys: tuple
  offsets: tuple
  weights: jax.Array
  bias: jax.Array


def _maps_list(feature_maps, detector, num_layers=None):
  if feature_maps is None:
    raise ValueError(f'detector {detector!r} needs feature_maps (a dict or list of per-layer maps).')
  # Dicts are read in sorted-key order: `jax.jit` returns dicts with sorted keys, so fit-time and
  # score-time maps line up whichever way they were produced.
  maps = ([feature_maps[k] for k in sorted(feature_maps)] if isinstance(feature_maps, Mapping)
          else list(feature_maps))
  if not maps:
    raise ValueError(f'detector {detector!r} needs at least one feature map; got none.')
  if num_layers is not None and len(maps) != num_layers:
    raise ValueError(f'detector {detector!r} was fitted on {num_layers} feature maps, got {len(maps)}.')
  return maps


def _pool(x, xp=jnp):
  """Mean over every axis between the batch and the channel axis (Lee et al.'s "mean" feature)."""
  return x if x.ndim == 2 else xp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def fit_multilayer(batches, *, num_classes, ridge=0.0):
  """Per-layer tied Gaussians on mean-pooled feature maps, in one streamed pass (Lee et al. 2018).

  Args:
    batches: batches with 'feature_maps' (a dict of `[B, ..., C_l]` maps, read in sorted-key order,
      or a list in a fixed order) and 'labels'.
    num_classes: K.
    ridge: relative shrinkage of every covariance (early layers are often rank-deficient).

  Returns:
    `MultiLayerState` with uniform weights.
  """
  name = 'mahalanobis_multilayer'
  num_classes = _checks.positive_int('num_classes', num_classes)
  moments = None
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    if not isinstance(batch, Mapping) or batch.get('feature_maps') is None:
      raise ValueError(f'detector {name!r} needs "feature_maps" in every batch; batch {index} has none.')
    maps = _maps_list(batch['feature_maps'], name, None if moments is None else len(moments))
    if moments is None:
      moments = [_ClassMoments(num_classes) for _ in maps]
    labels = None
    for layer, m in enumerate(maps):
      pooled = _pool(base.host({'map': m}, 'map', index, detector=name, ndim=None), np)
      if labels is None:
        labels = base.host_labels(batch, index, num_classes, pooled.shape[0], detector=name)
      if moments[layer].means is not None:
        base.check_dim(f'feature map {layer}', pooled, moments[layer].means.shape[1], index)
      moments[layer].update(pooled, labels)
  if moments is None:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  dtype = base.out_dtype()
  whites, chols, offsets = [], [], []
  for layer, m in enumerate(moments):
    m.check(name)
    chol = _cholesky(m.within_covariance(), float(ridge), f'layer-{layer}')
    offset = m.means.mean(axis=0)
    whites.append(jnp.asarray(_white_means(m.means - offset, chol), dtype))
    chols.append(jnp.asarray(chol, dtype))
    offsets.append(jnp.asarray(offset, dtype))
  num_layers = len(moments)
  return MultiLayerState(tuple(whites), tuple(chols), tuple(offsets),
                         jnp.full((num_layers,), 1.0 / num_layers, dtype), jnp.zeros((), dtype))


def layer_scores(state: MultiLayerState, feature_maps):
  """Per-layer Mahalanobis confidences −min_k MD_k, `[N, L]`, without input preprocessing."""
  state = base.check_state(state, MultiLayerState, detector='mahalanobis_multilayer')
  maps = _maps_list(feature_maps, 'mahalanobis_multilayer', len(state.choleskys))
  out = []
  for m, white, chol, offset in zip(maps, state.white_means, state.choleskys, state.offsets):
    pooled = _pool(_checks.floating('feature_maps', m, min_ndim=2))
    pooled = pooled.astype(_checks.compute_dtype(pooled))
    if pooled.shape[1] != chol.shape[0]:
      raise ValueError(f'a feature map has {pooled.shape[1]} channels; the fitted layer has {chol.shape[0]}.')
    pooled = pooled - offset.astype(pooled.dtype)
    out.append(jnp.max(_neg_sq_mahalanobis(pooled, white.astype(pooled.dtype), chol.astype(pooled.dtype)),
                       axis=-1))
  return jnp.stack(out, axis=-1)


def perturbed_layer_scores(state: MultiLayerState, apply_fn: Callable, inputs, *, noise=0.0014):
  """Per-layer confidences after Lee et al.'s input preprocessing (2018, eq. 4), `[N, L]`.

    ĉ_l = argmin_k MD_k^l(x),  x̂_l = x − ε·sign(∇ₓ MD_ĉ^l(x)),  score_l = −min_k MD_k^l(x̂_l)

  One backward and one extra forward pass per layer, each batched: the gradient of the batch sum is
  the per-example gradient when examples do not interact (inference-mode BatchNorm, no dropout), as
  in `ood_jax.scores.odin`. ε is in the units of `inputs`; the reference code perturbs normalised
  images by ε/std, i.e. ε in [0, 1] pixel units, so let `apply_fn` normalise inside to match it.

  Args:
    state: from `fit_multilayer`.
    apply_fn: inputs `[N, ...]` → a dict with 'feature_maps' (as fitted), e.g. from
      `ood_jax.detectors.adapter.feature_extractor`.
    inputs: `[N, ...]` floating inputs.
    noise: ε ≥ 0; 0.0014 is OpenOOD's default (Lee et al. tune it over {0, 0.0005, 0.001, 0.0014,
      0.002, 0.005, 0.01}).

  Returns:
    `[N, L]` layer scores.
  """
  state = base.check_state(state, MultiLayerState, detector='mahalanobis_ensemble')
  if not callable(apply_fn):
    raise ValueError("detector 'mahalanobis_ensemble' needs apply_fn (inputs -> {'feature_maps': ...}).")
  inputs = _checks.floating('inputs', inputs, min_ndim=1)
  _checks.nonnegative('noise', noise)
  dtype = _checks.compute_dtype(inputs)
  x = inputs.astype(dtype)

  def layer_confidence(x, layer):
    maps = _maps_list(apply_fn(x)['feature_maps'], 'mahalanobis_ensemble', len(state.choleskys))
    pooled = _pool(maps[layer]).astype(dtype) - state.offsets[layer].astype(dtype)
    return _neg_sq_mahalanobis(pooled, state.white_means[layer].astype(dtype),
                               state.choleskys[layer].astype(dtype))

  out = []
  for layer in range(len(state.choleskys)):
    def nearest_distance(x, layer=layer):
      neg = layer_confidence(x, layer)
      nearest = jnp.argmax(jax.lax.stop_gradient(neg), axis=-1)
      return -jnp.sum(jnp.take_along_axis(neg, nearest[:, None], axis=-1))

    grad = jax.grad(nearest_distance)(x)
    x_hat = x - jnp.asarray(noise, dtype) * jnp.sign(grad)
    out.append(jnp.max(layer_confidence(x_hat, layer), axis=-1))
  return jnp.stack(out, axis=-1)


def fit_layer_weights(state: MultiLayerState, id_scores, ood_scores, *, l2=1e-4, max_iter=100):
  """Logistic-regression layer weights on validation layer scores (Lee et al. 2018, Section 2.2).

  P(in | s) = σ(wᵀs + b) is fitted by Newton's method (IRLS) in float64 on standardised columns with
  an L2 penalty `l2`·‖w‖² (the reference uses scikit-learn's `LogisticRegressionCV`); the returned
  state scores wᵀs + b, the logit of P(in), so higher = more in-distribution.

  Args:
    state: from `fit_multilayer`.
    id_scores: `[N, L]` layer scores of validation in-distribution inputs (`layer_scores` or
      `perturbed_layer_scores`).
    ood_scores: `[M, L]` layer scores of validation OOD (or adversarial) inputs.
    l2: L2 penalty ≥ 0 on the standardised weights.
    max_iter: Newton iterations.

  Returns:
    A `MultiLayerState` with fitted `weights` and `bias`.
  """
  state = base.check_state(state, MultiLayerState, detector='mahalanobis_ensemble')
  num_layers = len(state.choleskys)
  pos = np.asarray(id_scores, np.float64)
  neg = np.asarray(ood_scores, np.float64)
  for what, arr in (('id_scores', pos), ('ood_scores', neg)):
    if arr.ndim != 2 or arr.shape[1] != num_layers or not arr.shape[0]:
      raise ValueError(f'{what} must have shape [N, {num_layers}] with N > 0, got {arr.shape}.')
  x = np.concatenate([pos, neg])
  y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
  mu, sigma = x.mean(axis=0), x.std(axis=0)
  sigma = np.where(sigma > 0, sigma, 1.0)
  design = np.concatenate([(x - mu) / sigma, np.ones((len(x), 1))], axis=1)
  theta = np.zeros(num_layers + 1)
  penalty = np.full(num_layers + 1, float(l2) * len(x))
  penalty[-1] = 0.0  # The intercept is not penalised.
  for _ in range(max_iter):
    p = 1.0 / (1.0 + np.exp(-design @ theta))
    grad = design.T @ (p - y) + penalty * theta
    hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-12 * np.eye(num_layers + 1)
    step = np.linalg.solve(hess, grad)
    theta -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  weights = theta[:-1] / sigma
  bias = theta[-1] - np.sum(theta[:-1] * mu / sigma)
  dtype = base.out_dtype()
  return state._replace(weights=jnp.asarray(weights, dtype), bias=jnp.asarray(bias, dtype))


def multilayer_mahalanobis(state: MultiLayerState, feature_maps):
  """Σ_l w_l·score_l + b on the feature maps, no preprocessing (the 'mahalanobis_multilayer' score)."""
  s = layer_scores(state, feature_maps)
  return s @ state.weights.astype(s.dtype) + state.bias.astype(s.dtype)


def mahalanobis_ensemble(state: MultiLayerState, apply_fn, inputs, *, noise=0.0014):
  """Σ_l w_l·score_l(x̂_l) + b: the full Lee et al. (2018) detector with input preprocessing."""
  s = perturbed_layer_scores(state, apply_fn, inputs, noise=noise)
  return s @ state.weights.astype(s.dtype) + state.bias.astype(s.dtype)


# ------------------------------------------------------------------------------------------------
# Banks: KNN and NNGuide.
# ------------------------------------------------------------------------------------------------


class KNNState(NamedTuple):
  """The training bank `[M, D]` of (unnormalised) features."""

  bank: jax.Array


def _bernoulli_bank(batches, fraction, seed, detector, transform):
  if not 0 < float(fraction) <= 1:
    raise ValueError(f'the bank fraction must lie in (0, 1], got {fraction}.')
  rng = np.random.default_rng(seed)
  rows, dim = [], None
  for index, batch in enumerate(base.batch_source(batches, detector=detector)()):
    features = base.host(batch, 'features', index, detector=detector)
    dim = base.check_dim('features', features, dim, index)
    keep = rng.random(features.shape[0]) < fraction if fraction < 1 else slice(None)
    rows.append(transform(batch, index, features)[keep].astype(np.float32))
  if not rows or not sum(len(r) for r in rows):
    raise ValueError(f'detector {detector!r}: the bank is empty (no examples, or the fraction {fraction} '
                     f'sampled none).')
  return np.concatenate(rows)


def fit_knn(batches, *, fraction=1.0, seed=0):
  """The KNN bank: every training feature, or a Bernoulli(`fraction`) random subset (Sun et al. 2022
  use 1 % of ImageNet), stored float32."""
  bank = _bernoulli_bank(batches, fraction, seed, 'knn', lambda b, i, f: f)
  return KNNState(jnp.asarray(bank))


def knn(state: KNNState, features, *, k=50):
  """−‖ĥ − b̂_(k)‖, the k-th nearest normalised bank feature (Sun et al. 2022); `ood_jax.scores.knn`.

  k = 50 is the paper's CIFAR-10 setting and OpenOOD's default (ImageNet: 1 000 with 1 % of the
  training set). k is clipped to the bank size, so small smoke runs still score.
  """
  state = base.check_state(state, KNNState, detector='knn')
  h = base.features_arg(features, detector='knn', dim=state.bank.shape[1])
  k = min(_checks.positive_int('k', k), state.bank.shape[0])
  return scores.knn(h, state.bank, k=k)


class NNGuideState(NamedTuple):
  """NNGuide's guide bank `[M, D]`: unit training features times their energy confidence."""

  bank: jax.Array
  head: base.Head


def fit_nnguide(batches, *, head, fraction=0.01, seed=0):
  """The guide bank ĥ_i·E(x_i), ĥ the unit feature and E = logsumexp(z) (Park et al. 2023, eq. 4).

  The bank is a Bernoulli(`fraction`) random subset of the training set (α = 1 % as OpenOOD's default
  and the paper's ImageNet setting; OpenOOD takes the first batches instead of a random subset).
  """
  name = 'nnguide'
  head = base.as_head(head, detector=name)
  w = np.asarray(head.kernel, np.float64)
  b = np.asarray(head.bias, np.float64)

  def guide(batch, index, features):
    del batch, index
    z = features @ w + b
    m = z.max(axis=1, keepdims=True)
    conf = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))
    norm = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features / norm * conf

  return NNGuideState(jnp.asarray(_bernoulli_bank(batches, fraction, seed, name, guide)), head)


@functools.partial(jax.jit, static_argnames=('k', 'chunk'))
def _topk_mean_inner(queries, bank, *, k, chunk):
  """Mean of the k largest ⟨q, b_i⟩ per query, scanning the bank in chunks (never `[N, M]`)."""
  size = bank.shape[0]
  num_chunks = -(-size // chunk)
  padded = jnp.pad(bank, ((0, num_chunks * chunk - size), (0, 0))).reshape(num_chunks, chunk, -1)

  def step(best, xs):
    start, b = xs
    sims = jnp.dot(queries, b.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(start + jnp.arange(chunk) < size, sims, -jnp.inf)
    return jax.lax.top_k(jnp.concatenate([best, sims], axis=-1), k)[0], None

  init = jnp.full((queries.shape[0], k), -jnp.inf, queries.dtype)
  best, _ = jax.lax.scan(step, init, (jnp.arange(num_chunks) * chunk, padded))
  return jnp.mean(best, axis=-1)


def nnguide(state: NNGuideState, features, *, k=100, logits=None, chunk=2048):
  """NNGuide: E(x)·mean of the k largest ⟨ĥ(x), bank_i⟩ (Park et al. 2023, eq. 5).

  E(x) = logsumexp(z) is the energy confidence; k = 100 is OpenOOD's default (the paper's ImageNet
  setting), clipped to the bank size. The inner products against the confidence-scaled bank are
  computed in chunks of `chunk` bank rows.

  Args:
    state: from `fit_nnguide`.
    features: `[N, D]`.
    k: neighbours.
    logits: optional `[N, K]` logits (default: the head applied to the features).
    chunk: bank rows per chunk.

  Returns:
    `[N]` scores.
  """
  state = base.check_state(state, NNGuideState, detector='nnguide')
  h = base.features_arg(features, detector='nnguide', dim=state.bank.shape[1])
  k = min(_checks.positive_int('k', k), state.bank.shape[0])
  z = base.head_logits(h, state.head) if logits is None else base.logits_arg(logits, detector='nnguide')
  guidance = _topk_mean_inner(layers.l2_normalize(h), state.bank.astype(h.dtype), k=k,
                              chunk=min(_checks.positive_int('chunk', chunk), state.bank.shape[0]))
  return jax.nn.logsumexp(z, axis=-1) * guidance


# ------------------------------------------------------------------------------------------------
# ViM and Residual.
# ------------------------------------------------------------------------------------------------


class SubspaceState(NamedTuple):
  """Principal subspace of ViM / Residual around the origin u = −(Wᵀ)⁺b.

  Attributes:
    head: the final layer.
    origin: `[D]` u.
    basis: `[D, D]` eigenvectors of E[(h − u)(h − u)ᵀ] as columns, eigenvalues descending.
    eigenvalues: `[D]` descending.
    alpha: `[D + 1]` α_d = mean training max-logit / mean training residual norm outside the first d
      components, for every d (so the principal dimension is a scoring-time choice).
  """

  head: base.Head
  origin: jax.Array
  basis: jax.Array
  eigenvalues: jax.Array
  alpha: jax.Array


def vim_default_dim(feature_dim: int) -> int:
  """ViM's principal dimension rule (Wang et al. 2022, Section 4): 1 000 for D ≥ 1 500, 512 for
  D ≥ 768, else D/2 (256 for CIFAR's 512-d ResNet-18 features, OpenOOD's CIFAR setting)."""
  if feature_dim >= 1500:
    return 1000
  if feature_dim >= 768:
    return 512
  return max(feature_dim // 2, 1)


def fit_subspace(batches, *, head):
  """Two streamed passes: E[(h − u)(h − u)ᵀ] and mean max-logit, then mean residual norms.

  Pass 1 sums (h − u)(h − u)ᵀ and max_k z_k in float64 (u is known from the head, so this second
  moment is a plain sum, the peers' `EmpiricalCovariance(assume_centered=True)` on h − u); `eigh`
  gives the basis. Pass 2 accumulates ‖(h − u)ᵀV_{d:}‖ for every d at once from the tail cumulative
  sums of the squared coordinates, so α is known for every principal dimension. The batches must be
  re-iterable (a list or a callable).

  Returns:
    `SubspaceState`.
  """
  name = 'vim'
  head = base.as_head(head, detector=name)
  source = base.batch_source(batches, detector=name, passes=2)
  w = np.asarray(head.kernel, np.float64)
  b = np.asarray(head.bias, np.float64)
  dim = w.shape[0]
  origin = -np.linalg.pinv(w.T) @ b
  second = np.zeros((dim, dim))
  max_logit_sum = 0.0
  count = 0
  for index, batch in enumerate(source()):
    h = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', h, dim, index)
    c = h - origin
    second += c.T @ c
    max_logit_sum += (h @ w + b).max(axis=1).sum()
    count += h.shape[0]
  if not count:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  eigenvalues, vectors = np.linalg.eigh(second / count)
  eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
  residual_sum = np.zeros(dim + 1)
  for index, batch in enumerate(source()):
    coords = (base.host(batch, 'features', index, detector=name) - origin) @ vectors
    tail = np.cumsum(np.square(coords)[:, ::-1], axis=1)[:, ::-1]  # tail[:, d] = Σ_{j ≥ d} c_j².
    residual_sum[:dim] += np.sqrt(tail).sum(axis=0)
  mean_residual = residual_sum / count
  with np.errstate(divide='ignore'):
    alpha = np.where(mean_residual > 0, (max_logit_sum / count) / np.where(mean_residual > 0, mean_residual, 1),
                     0.0)
  dtype = base.out_dtype()
  return SubspaceState(head, jnp.asarray(origin, dtype), jnp.asarray(vectors, dtype),
                       jnp.asarray(eigenvalues, dtype), jnp.asarray(alpha, dtype))


def _residual_norm(state, h, dim, detector):
  dim = vim_default_dim(h.shape[1]) if dim is None else dim
  if isinstance(dim, (bool, np.bool_, float, np.floating)):
    raise TypeError(f'dim must be an integer, got {type(dim).__name__}.')
  if _checks.is_concrete(dim) and not 0 <= int(dim) <= h.shape[1]:
    raise ValueError(f'dim must lie in [0, {h.shape[1]}] for detector {detector!r}, got {dim}.')
  coords = jnp.dot(h - state.origin.astype(h.dtype), state.basis.astype(h.dtype),
                   precision=jax.lax.Precision.HIGHEST)
  outside = jnp.arange(h.shape[1]) >= dim
  return jnp.sqrt(jnp.sum(jnp.where(outside, jnp.square(coords), 0.0), axis=-1)), dim


def vim(state: SubspaceState, features, *, dim=None):
  """ViM: logsumexp(z) − α‖(h − u)ᵀ V_{⊥}‖ (Wang et al. 2022, eq. 6–9, in energy form).

  The paper's score is the softmax probability of the virtual logit l₀ = α‖x^{P⊥}‖ against the class
  logits, p₀ = σ(l₀ − logsumexp(z)), with lower p₀ = more in-distribution; −p₀ is a decreasing
  function of l₀ − logsumexp(z), so logsumexp(z) − l₀ (what the authors' code and both peers return)
  ranks examples identically and is returned here. α = mean training max-logit / mean training
  residual norm (paper eq. 8). `dim` (the principal dimension) defaults to `vim_default_dim(D)`.

  Args:
    state: from `fit_subspace`.
    features: `[N, D]`.
    dim: principal dimension in [0, D], a Python int or a traced integer.

  Returns:
    `[N]` scores.
  """
  state = base.check_state(state, SubspaceState, detector='vim')
  h = base.features_arg(features, detector='vim', dim=state.origin.shape[0])
  norm, dim = _residual_norm(state, h, dim, 'vim')
  energy = jax.nn.logsumexp(base.head_logits(h, state.head), axis=-1)
  return energy - state.alpha.astype(h.dtype)[dim] * norm


def residual(state: SubspaceState, features, *, dim=None):
  """Residual: −‖(h − u)ᵀ V_{⊥}‖, the norm outside the `dim` leading components (Wang et al. 2022)."""
  state = base.check_state(state, SubspaceState, detector='residual')
  h = base.features_arg(features, detector='residual', dim=state.origin.shape[0])
  return -_residual_norm(state, h, dim, 'residual')[0]


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
    h, labels = _labelled(batch, index, k, name, dim)
    pred = np.argmax(base.host_logits(batch, index, head, detector=name), axis=1)
    for row, mask in enumerate((pred == labels, np.ones_like(labels, bool))):
      np.add.at(sums[row], labels[mask], h[mask])
      counts[row] += np.bincount(labels[mask], minlength=k)
  if not counts[1].sum():
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  patterns = np.where(counts[0][:, None] > 0, sums[0] / np.maximum(counts[0], 1)[:, None],
                      sums[1] / np.maximum(counts[1], 1)[:, None])
  return SHEState(jnp.asarray(patterns, base.out_dtype()), head)


def she(state: SHEState, features, *, logits=None):
  """SHE: ⟨h, S_ŷ⟩ with ŷ = argmax z (Zhang et al. 2023, eq. 6; OpenOOD's default inner-product metric)."""
  state = base.check_state(state, SHEState, detector='she')
  h = base.features_arg(features, detector='she', dim=state.patterns.shape[1])
  z = base.head_logits(h, state.head) if logits is None else base.logits_arg(logits, detector='she')
  pattern = state.patterns.astype(h.dtype)[jnp.argmax(z, axis=-1)]
  return jnp.sum(h * pattern, axis=-1)


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
  dtype = base.out_dtype()
  return FeatureStatsState(head, jnp.asarray(total / count, dtype), jnp.asarray(distances, dtype))


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
  z = base.head_logits(h, state.head)
  k = z.shape[1]
  pred = jnp.argmax(z, axis=-1)
  gaps = jnp.abs(jnp.max(z, axis=-1, keepdims=True) - z)  # 0 at the predicted class.
  boundary = jnp.sum(gaps / state.weight_distances.astype(h.dtype)[pred], axis=-1) / max(k - 1, 1)
  ref = h - state.mean.astype(h.dtype) if normalizer == 'distance' else h
  return boundary / jnp.maximum(jnp.linalg.norm(ref, axis=-1), 1e-12)


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
  z = base.head_logits(h, state.head)
  w = state.head.kernel.astype(h.dtype).T[jnp.argmax(z, axis=-1)]  # [N, D]
  centred = h - state.mean.astype(h.dtype)
  proximity = jnp.sum(w * centred, axis=-1) / jnp.maximum(jnp.linalg.norm(centred, axis=-1), 1e-12)
  return proximity + jnp.asarray(alpha, h.dtype) * jnp.sum(jnp.abs(h), axis=-1)


# ------------------------------------------------------------------------------------------------
# NECO.
# ------------------------------------------------------------------------------------------------


class PCAState(NamedTuple):
  """Principal components of the training features (NECO).

  Attributes:
    head: the final layer.
    mean: `[D]` training mean.
    scale: `[D]` training standard deviation (1 where a unit is constant).
    basis: `[D, D]` eigenvectors of the covariance (columns, eigenvalues descending).
    standardized_basis: `[D, D]` the same for the standardised features (the authors' code).
  """

  head: base.Head
  mean: jax.Array
  scale: jax.Array
  basis: jax.Array
  standardized_basis: jax.Array


def fit_neco(batches, *, head):
  """Streamed mean and covariance (one class, Chan merge), then `eigh`, for NECO's PCA."""
  name = 'neco'
  head = base.as_head(head, detector=name)
  dim = head.kernel.shape[0]
  moments = _ClassMoments(1)
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    h = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', h, dim, index)
    moments.update(h, np.zeros(h.shape[0], np.int64))
  moments.check(name)
  cov = moments.within_covariance()
  cov = 0.5 * (cov + cov.T)
  std = np.sqrt(np.maximum(np.diag(cov), 0.0))
  std = np.where(std > 0, std, 1.0)
  vectors = np.linalg.eigh(cov)[1][:, ::-1]
  std_vectors = np.linalg.eigh(cov / std[:, None] / std[None, :])[1][:, ::-1]
  dtype = base.out_dtype()
  return PCAState(head, jnp.asarray(moments.means[0], dtype), jnp.asarray(std, dtype),
                  jnp.asarray(vectors, dtype), jnp.asarray(std_vectors, dtype))


def neco(state: PCAState, features, *, dim=None, standardize=False, use_max_logit=False):
  """NECO: ‖P_d h‖ / ‖h‖ (Ammar et al. 2024, eq. 6), optionally × max-logit.

  P_d projects on the d leading principal components of the training features. The paper's equation
  uses h itself (default); the authors' released code standardises h first (z = (h − μ)/σ, then
  ‖P_d z‖/‖z‖: `standardize=True`) and multiplies by the max logit for ViT / DeiT
  (`use_max_logit=True`). The paper tunes d per model; the default here is d = K (the number of
  classes, the dimension of the neural-collapse simplex plus its offset), clipped to D.

  Returns:
    `[N]` scores in [0, 1] (times the max logit if requested).
  """
  state = base.check_state(state, PCAState, detector='neco')
  h = base.features_arg(features, detector='neco', dim=state.mean.shape[0])
  d = state.head.bias.shape[0] if dim is None else _checks.positive_int('dim', dim)
  d = min(d, h.shape[1])
  if standardize:
    x = (h - state.mean.astype(h.dtype)) / state.scale.astype(h.dtype)
    basis = state.standardized_basis
  else:
    x, basis = h, state.basis
  proj = jnp.dot(x, basis.astype(h.dtype)[:, :d], precision=jax.lax.Precision.HIGHEST)
  out = jnp.linalg.norm(proj, axis=-1) / jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-12)
  if use_max_logit:
    out = out * jnp.max(base.head_logits(h, state.head), axis=-1)
  return out

