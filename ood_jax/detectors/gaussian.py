"""Gaussian detectors: Mahalanobis, RMDS and GMM, and the one Mahalanobis fit and kernel of the library.

On penultimate features h `[N, D]` (higher = more in-distribution):

* Mahalanobis (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples
  and adversarial attacks", eq. 2): −min_k (h − μ_k)ᵀ Σ⁻¹ (h − μ_k), class means μ_k and one tied
  covariance Σ.
* RMDS (Ren et al. 2021, "A simple fix to Mahalanobis distance for improving near-OOD detection",
  eq. 4): −min_k (MD_k(h) − MD_0(h)), MD_0 the distance under one class-agnostic "background" Gaussian.
* GMM (OpenOOD v1.5's `gmm`, after Lee et al. 2018's generative view): log Σ_k π_k Σ_c w_kc N(h; μ_kc, Σ),
  per class a mixture with one tied covariance, fitted by streamed EM (one pass per iteration).

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
    'GMMState',
    'Gaussian',
    'GaussianState',
    'RMDSState',
    'class_scores',
    'factor',
    'fit_gaussian',
    'fit_gmm',
    'fit_mahalanobis',
    'fit_rmds',
    'gmm',
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


# ------------------------------------------------------------------------------------------------
# Class-conditional Gaussian mixture (GMM).
# ------------------------------------------------------------------------------------------------


class GMMState(NamedTuple):
  """A Gaussian mixture with one tied covariance, its components grouped by class, ready to score.

  Attributes:
    offset: `[D]` training mean, subtracted before the projection (a translation: densities are unchanged).
    projection: `[D, d]` the d leading principal axes of the training features (the identity when not reduced).
    components: the `[C, d]` component means (class-major: class k owns rows k·c … k·c + c − 1) and the tied
      covariance, whitened (`GaussianState`).
    log_weights: `[C]` log of each component's weight in the whole mixture, log π_k + log w_kc (class prior
      π_k = n_k / N times the within-class weight).
    log_norm: scalar −½(d·log 2π + log det Σ), the normalising constant every component shares.
  """

  offset: jax.Array
  projection: jax.Array
  components: GaussianState
  log_weights: jax.Array
  log_norm: jax.Array


def _gmm_sample(rows, keys, group_ids, features, rng):
  """Keeps, per group, the rows with the smallest uniform random keys: a uniform sample without replacement
  that does not depend on how the data are split into batches."""
  new_keys = rng.random(features.shape[0])
  for group in np.unique(group_ids):
    sel = group_ids == group
    all_keys = np.concatenate([keys[group], new_keys[sel]])
    keep = np.argsort(all_keys, kind='stable')[:keys.shape[1]]
    rows[group] = np.concatenate([rows[group], features[sel]])[keep]
    keys[group] = all_keys[keep]


def fit_gmm(batches, *, num_classes=None, num_components=3, class_conditional=True, reduce_dim=50, max_iter=100,
            tol=1e-3, reg_covar=1e-6, seed=0):
  """Per class a mixture of `num_components` Gaussians with one covariance tied across every component, by EM.

  The generative view of Lee et al. (2018) with each class a mixture instead of one Gaussian:
  p(h) = Σ_k π_k Σ_c w_kc N(h; μ_kc, Σ). With `class_conditional=False` it is one mixture over all
  features, labels unused: OpenOOD v1.5's `gmm` postprocessor (scikit-learn's
  `GaussianMixture(covariance_type='tied')` on the penultimate features reduced by PCA to 50
  dimensions, `num_clusters` 50, `n_init` 1), so `class_conditional=False, num_components=50`
  reproduces its configuration.

  Streamed: pass 0 gathers, in float64 with `ClassMoments`, the class (or total) means, the within-class
  scatter W and the total covariance (whose `reduce_dim` leading eigenvectors are the PCA projection),
  and a uniform random sample of `num_components` rows per class (seeded), the initial means (scikit-learn's
  `init_params='random_from_data'`; initial weights uniform, initial Σ = W / N + reg_covar·I). Each EM
  iteration is then one pass: the E-step's responsibilities r_ic (over the components of example i's
  class only) are accumulated into float64 sufficient statistics S0_kc = Σ_i r_ic and
  T_kc = Σ_i r_ic (z_i − m_k) around the class mean m_k, and the M-step sets w_kc = S0_kc / n_k,
  μ_kc = m_k + T_kc / S0_kc and Σ = (W − Σ_kc T_kc T_kcᵀ / S0_kc) / N + reg_covar·I. Writing the scatter
  around the class means (W, exact from pass 0) keeps features with a large common offset precise.
  Iteration stops when the mean log-likelihood log p(h | y) (log p(h) when not class-conditional)
  changes by less than `tol`, or after `max_iter` passes, as in scikit-learn (whose 10·eps guard on
  empty components is kept). `max_iter=0` returns the initialisation. The batches must be
  re-iterable (a list or a callable).

  Args:
    batches: batches with 'features' `[B, D]` (and 'labels' `[B]` when class-conditional).
    num_classes: K (required when class-conditional); every class needs `num_components` examples.
    num_components: mixture components per class (per mixture when not class-conditional).
    class_conditional: one mixture per class (default) or one over all features (OpenOOD).
    reduce_dim: PCA dimension d (OpenOOD: 50); None, or d ≥ D, keeps the features as they are.
    max_iter: EM iterations (passes), ≥ 0; scikit-learn's default 100.
    tol: convergence threshold on the mean log-likelihood; scikit-learn's default 1e-3.
    reg_covar: added to the covariance's diagonal (absolute, scikit-learn's convention and default).
    seed: seed of the initial sample.

  Returns:
    `GMMState`.
  """
  name = 'gmm'
  class_conditional = _checks.boolean('class_conditional', class_conditional)
  if class_conditional:
    if num_classes is None:
      raise ValueError("detector 'gmm' is class-conditional: pass num_classes (or class_conditional=False).")
    num_classes = _checks.positive_int('num_classes', num_classes)
  num_components = _checks.positive_int('num_components', num_components)
  reduce_dim = None if reduce_dim is None else _checks.positive_int('reduce_dim', reduce_dim)
  if isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
    raise ValueError(f'max_iter must be an int >= 0, got {max_iter!r}.')
  tol = float(_checks.nonnegative('tol', tol))
  reg_covar = float(_checks.nonnegative('reg_covar', reg_covar))
  source = base.batch_source(batches, detector=name, passes=2)
  groups = num_classes if class_conditional else 1

  def group_batches():
    dim = None
    for index, batch in enumerate(source()):
      if class_conditional:
        h, g = base.labelled(batch, index, num_classes, detector=name, dim=dim)
      else:
        h = base.host(batch, 'features', index, detector=name)
        base.check_dim('features', h, dim, index)
        g = np.zeros(h.shape[0], np.int64)
      dim = h.shape[1]
      yield h, g

  # Pass 0: moments, the PCA projection and the initial means.
  moments = ClassMoments(groups)
  rng = np.random.default_rng(seed)
  rows = keys = None
  for h, g in group_batches():
    if rows is None:
      keys = np.full((groups, num_components), np.inf)  # an empty slot: any real key replaces it
      rows = np.zeros((groups, num_components, h.shape[1]))
    moments.update(h, g)
    _gmm_sample(rows, keys, g, h, rng)
  moments.check(f'detector {name!r}')
  short = np.flatnonzero(moments.counts < num_components)
  if short.size:
    raise ValueError(f'detector {name!r}: {"class" if class_conditional else "the data"} {short[0]} has '
                     f'{moments.counts[short[0]]} examples, fewer than num_components={num_components}.')
  count = int(moments.counts.sum())
  dim = moments.means.shape[1]
  mean, total_cov = moments.total_mean_and_covariance()
  if reduce_dim is None or reduce_dim >= dim:
    projection = np.eye(dim)
  else:
    projection = np.linalg.eigh(0.5 * (total_cov + total_cov.T))[1][:, ::-1][:, :reduce_dim]
  d = projection.shape[1]
  group_means = (moments.means - mean) @ projection  # [G, d]
  scatter = projection.T @ moments.scatter @ projection
  means = (rows - mean) @ projection  # [G, c, d]
  weights = np.full((groups, num_components), 1.0 / num_components)
  covariance = scatter / count + reg_covar * np.eye(d)

  eps10 = 10 * np.finfo(np.float64).eps
  previous = -np.inf
  for _ in range(max_iter):
    _, cholesky = factor(covariance, 0.0, what='tied mixture', count=count)
    log_norm = -0.5 * (d * np.log(2 * np.pi)) - np.sum(np.log(np.diag(cholesky)))
    white_means = np.linalg.solve(cholesky, means.reshape(-1, d).T).T.reshape(groups, num_components, d)
    log_weights = np.log(weights)
    s0 = np.zeros((groups, num_components))
    t = np.zeros((groups, num_components, d))
    total = 0.0
    for h, g in group_batches():
      z = (h - mean) @ projection
      white = np.linalg.solve(cholesky, z.T).T
      sq = np.sum(np.square(white[:, None, :] - white_means[g]), axis=-1)  # [B, c]
      log_p = log_weights[g] - 0.5 * sq + log_norm
      top = log_p.max(axis=1, keepdims=True)
      lse = top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))
      r = np.exp(log_p - lse[:, None])
      total += lse.sum()
      np.add.at(s0, g, r)
      np.add.at(t, g, r[:, :, None] * (z - group_means[g])[:, None, :])
    nk = s0 + eps10
    weights = nk / nk.sum(axis=1, keepdims=True)
    means = group_means[:, None, :] + t / nk[:, :, None]
    between = np.einsum('gcd,gce->de', t / nk[:, :, None], t)
    covariance = (scatter - between) / count + reg_covar * np.eye(d)
    current = total / count
    if abs(current - previous) < tol:
      break
    previous = current

  covariance, cholesky = factor(covariance, 0.0, what='tied mixture', count=count)
  priors = moments.counts / count
  log_weights = (np.log(priors)[:, None] + np.log(weights)).reshape(-1)
  log_norm = -0.5 * d * np.log(2 * np.pi) - np.sum(np.log(np.diag(cholesky)))
  dtype = base.out_dtype()
  components = whiten(Gaussian(means.reshape(-1, d), covariance, cholesky), dtype=dtype)
  return GMMState(base.to_device(mean), base.to_device(projection), components, base.to_device(log_weights),
                  base.to_device(log_norm))


def gmm(state: GMMState, features):
  """log p(h) = log Σ_k π_k Σ_c w_kc N(Pᵀ(h − m); μ_kc, Σ), the mixture's log-density (`fit_gmm`).

  The sum over classes and components is OpenOOD's (it scores log Σ_j w_j exp(−½ d_j²), this
  density without its constant); the full log-density is returned here (a constant shift: same
  ranking), by a log-sum-exp that cannot underflow where OpenOOD's sum of exponentials does (its
  1e-40 floor).
  """
  state = base.check_state(state, GMMState, detector='gmm')
  return _gmm(state, base.features_arg(features, detector='gmm', dim=state.offset.shape[0]))


@jax.jit
def _gmm(state, h):
  h = base.compute(h)
  z = jnp.dot(h - state.offset.astype(h.dtype), state.projection.astype(h.dtype),
              precision=jax.lax.Precision.HIGHEST)
  log_p = state.log_weights.astype(h.dtype) + 0.5 * class_scores(state.components, z)
  return jax.nn.logsumexp(log_p, axis=-1) + state.log_norm.astype(h.dtype)


# OpenOOD's reduction (PCA to 50) and scikit-learn's EM defaults; 3 components per class (OpenOOD's 50 unlabelled
# clusters are ~5 per class on CIFAR-10; `class_conditional=False, num_components=50` is its configuration).
registry.register('gmm', needs={'features'}, fit=fit_gmm, score=gmm,
                  defaults={'num_components': 3, 'class_conditional': True, 'reduce_dim': 50, 'max_iter': 100,
                            'tol': 1e-3, 'reg_covar': 1e-6, 'seed': 0},
                  fit_params=('num_components', 'class_conditional', 'reduce_dim', 'max_iter', 'tol', 'reg_covar',
                              'seed'),
                  paper='Lee et al. 2018', year=2018)
