"""Prototype detectors: SHE, fDBD, NCI, OpenMax, CARef and CADRef, scores against per-class or mean training vectors.

On penultimate features h `[N, D]`, the final layer (W `[D, K]`, b `[K]`) and ŷ = argmax z (higher = more
in-distribution):

* SHE (Zhang et al. 2023, "Out-of-distribution detection based on in-distribution data patterns
  memorization with modern Hopfield energy", eq. 6): ⟨h, S_ŷ⟩, S_k the mean feature of correctly
  classified training examples of class k.
* fDBD (Liu & Qin 2024, "Fast decision boundary based out-of-distribution detector", eq. 5): mean
  feature-space distance to the decision boundaries, divided by ‖h − μ_train‖.
* NCI (Liu & Qin 2025, "Detecting out-of-distribution through the lens of neural collapse"):
  w_ŷ·(h − μ)/‖h − μ‖ + α‖h‖₁, following the authors' OpenOOD implementation.
* OpenMax (Bendale & Boult 2016, "Towards open set deep networks", Algorithms 1–2): −P(unknown) after
  recalibrating the top classes' logits by a Weibull model of their distance to the class's mean activation
  vector (libMR's FitHigh convention, `fit_weibull` the maximum-likelihood fit).
* CARef (Ling et al. 2025, "CADRef: Robust out-of-distribution detection via class-aware decoupled relative
  feature leveraging", CVPR): −‖h − μ_ŷ‖₁/‖h‖₁, μ_k the mean feature of the training examples
  predicted as class k.
* CADRef (same paper, eqs. 7–10): the relative error split by the sign of w_ŷ into the part that raises the
  predicted logit, divided by the example's logit confidence S(z), and the part that lowers it, divided by
  the training mean of S; negated.

Each fit is one streamed float64 pass (OpenMax's two: means, then distance tails).
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
    'FeatureStatsState',
    'OpenMaxState',
    'SHEState',
    'fdbd',
    'fit_caref',
  'fit_fdbd',
    'fit_openmax',
    'fit_she',
    'fit_weibull',
    'nci',
    'openmax',
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


# ------------------------------------------------------------------------------------------------
# OpenMax.
# ------------------------------------------------------------------------------------------------


# libMR's FitHigh translation: the tail is shifted to start at this value before the Weibull fit.
_LIBMR_TRANSLATE = 10000.0
# Distance weights (Euclidean, cosine): OSDN's 'eucos' is ‖v − μ‖/200 + cos-distance.
_OPENMAX_DISTANCES = {'euclidean': (1.0, 0.0), 'eucos': (1.0 / 200.0, 1.0), 'cosine': (0.0, 1.0)}
# Shape of a tail whose values are all equal (the likelihood grows without bound): the CDF is a step.
_WEIBULL_MAX_SHAPE = 1e12


def fit_weibull(x, mask=None) -> tuple[np.ndarray, np.ndarray]:
  """Maximum-likelihood two-parameter Weibull (location 0) of each row of `x` `[R, T]` > 0, in float64.

  The shape k solves the likelihood equation Σ x^k ln x / Σ x^k − 1/k − mean(ln x) = 0, whose left side
  increases from −∞ to −mean(ln(x / max x)) ≥ 0; it is bracketed by doubling and bisected in log k to
  machine precision (on x / max x, so x^k cannot overflow however large k is). Then the scale is
  λ = (mean x^k)^{1/k}. Rows whose values are all equal get k = 1e12 (a step at that value).

  Args:
    x: `[R, T]` positive values (a 1-D array is one row).
    mask: `[R, T]` booleans, the valid entries (default all); every row needs one.

  Returns:
    (shape `[R]`, scale `[R]`), float64.
  """
  x = np.atleast_2d(np.asarray(x, np.float64))
  mask = np.ones(x.shape, bool) if mask is None else np.atleast_2d(np.asarray(mask, bool))
  if not np.all(x[mask] > 0) or not np.all(mask.any(axis=1)):
    raise ValueError('fit_weibull needs positive values and at least one per row.')
  top = np.where(mask, x, -np.inf).max(axis=1)
  ly = np.where(mask, np.log(np.where(mask, x, 1.0) / top[:, None]), 0.0)  # ≤ 0, 0 at the maximum
  count = mask.sum(axis=1)
  mean_ly = ly.sum(axis=1) / count

  def equation(k):
    e = np.where(mask, np.exp(k[:, None] * ly), 0.0)
    return (e * ly).sum(axis=1) / e.sum(axis=1) - 1.0 / k - mean_ly

  spread = -ly.min(axis=1)
  lo = 0.5 / np.maximum(spread, 1e-300)  # f(lo) ≤ spread − 1/lo < 0
  hi = np.maximum(lo, 1.0)
  for _ in range(200):
    grow = (equation(hi) <= 0) & (hi < _WEIBULL_MAX_SHAPE)
    if not grow.any():
      break
    lo = np.where(grow, hi, lo)
    hi = np.where(grow, np.minimum(2 * hi, _WEIBULL_MAX_SHAPE), hi)
  step = equation(hi) <= 0  # no sign change below the cap: all values (numerically) equal
  log_lo, log_hi = np.log(lo), np.log(hi)
  for _ in range(200):
    mid = 0.5 * (log_lo + log_hi)
    below = equation(np.exp(mid)) <= 0
    log_lo, log_hi = np.where(below, mid, log_lo), np.where(below, log_hi, mid)
  shape = np.where(step, _WEIBULL_MAX_SHAPE, np.exp(0.5 * (log_lo + log_hi)))
  mean_pow = np.where(mask, np.exp(shape[:, None] * ly), 0.0).sum(axis=1) / count
  scale = top * np.exp(np.log(mean_pow) / shape)
  return shape, scale


class OpenMaxState(NamedTuple):
  """OpenMax's per-class mean activation vectors and Weibull models of their distance tails.

  Attributes:
    means: `[K, K]` mean activation vector (logits) of each class.
    shape: `[K]` Weibull shape k of each class's tail.
    scale: `[K]` Weibull scale λ (of the translated distances, as libMR fits them).
    center: `[K]` the distance d at which the translated distance equals λ: w(d) = 1 − exp(−(1 + (d −
      center)/λ)^k), the libMR CDF written so that float32 keeps the precision its 10 000 shift would cost.
    distance_weights: `[2]` weights of the Euclidean and the cosine distance.
  """

  means: jax.Array
  shape: jax.Array
  scale: jax.Array
  center: jax.Array
  distance_weights: jax.Array


def _openmax_distances(v, means, weights):
  """weights[0]·‖v − μ_k‖ + weights[1]·(1 − cos(v, μ_k)) for every class, float64 NumPy `[B, K]`."""
  sq = np.sum(np.square(v[:, None, :] - means[None]), axis=-1)
  cos = (v @ means.T) / np.maximum(np.linalg.norm(v, axis=1, keepdims=True) * np.linalg.norm(means, axis=1), 1e-12)
  return weights[0] * np.sqrt(sq) + weights[1] * (1.0 - cos)


def fit_openmax(batches, *, num_classes=None, head=None, tailsize=20, distance='euclidean'):
  """Per class the mean activation vector and a Weibull fit of its largest distances (Bendale & Boult 2016,
  Algorithm 1), in two streamed float64 passes.

  Pass 1: the MAV μ_k, the mean logits of the training examples of class k that are classified correctly
  (all of its examples when none is, where OpenOOD would fail). Pass 2: the distances of those examples to
  μ_k, of which only the `tailsize` largest per class are kept (a running top-`tailsize`). The tail is
  fitted as libMR's `FitHigh` does it (OpenOOD and pytorch-ood's `LibNotMR` follow it): shifted by
  10 000 − (its smallest value), then a two-parameter maximum-likelihood Weibull (`fit_weibull`). The
  batches must be re-iterable (a list or a callable).

  Args:
    batches: batches with 'logits' `[B, K]` (or 'features' and `head`) and 'labels'.
    num_classes: K, checked against the logits when given.
    head: the final layer, used only for batches without logits.
    tailsize: distances per class in the fit (the paper's 20; pytorch-ood 25).
    distance: 'euclidean' (OpenOOD's and pytorch-ood's default), 'eucos' (the authors' code:
      ‖v − μ‖/200 + cosine distance) or 'cosine'.

  Returns:
    `OpenMaxState`.
  """
  name = 'openmax'
  tailsize = _checks.positive_int('tailsize', tailsize)
  if distance not in _OPENMAX_DISTANCES:
    raise ValueError(f'distance must be one of {sorted(_OPENMAX_DISTANCES)}, got {distance!r}.')
  weights = _OPENMAX_DISTANCES[distance]
  head = None if head is None else base.as_head(head, detector=name)
  source = base.batch_source(batches, detector=name, passes=2)

  def labelled_logits():
    k = num_classes
    for index, batch in enumerate(source()):
      z = base.host_logits(batch, index, head, detector=name)
      k = base.check_dim('logits', z, k, index)
      labels = base.host_labels(batch, index, k, z.shape[0], detector=name)
      yield z, labels, np.argmax(z, axis=1) == labels

  sums = counts = None
  for z, labels, correct in labelled_logits():
    if sums is None:
      k = z.shape[1]
      sums, counts = np.zeros((2, k, k)), np.zeros((2, k))
    for row, keep in enumerate((correct, np.ones_like(correct))):
      np.add.at(sums[row], labels[keep], z[keep])
      counts[row] += np.bincount(labels[keep], minlength=k)
  if counts is None or not counts[1].sum():
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  missing = np.flatnonzero(counts[1] == 0)
  if missing.size:
    raise ValueError(f'detector {name!r}: class {missing[0]} has no examples; every class in [0, {k}) needs '
                     f'some to estimate its mean activation vector.')
  use_correct = counts[0] > 0
  means = np.where(use_correct[:, None], sums[0] / np.maximum(counts[0], 1)[:, None],
                   sums[1] / np.maximum(counts[1], 1)[:, None])
  tails = np.full((k, tailsize), -np.inf)
  for z, labels, correct in labelled_logits():
    keep = np.where(use_correct[labels], correct, True)
    z, labels = z[keep], labels[keep]
    d = _openmax_distances(z, means, weights)[np.arange(len(labels)), labels]
    for c in np.unique(labels):
      merged = np.concatenate([tails[c], d[labels == c]])
      tails[c] = merged[np.argpartition(merged, -tailsize)[-tailsize:]] if merged.size > tailsize else merged
  valid = np.isfinite(tails)
  small = np.where(valid, tails, np.inf).min(axis=1)
  shape, scale = fit_weibull(np.where(valid, tails - small[:, None] + _LIBMR_TRANSLATE, 1.0), valid)
  center = small + (scale - _LIBMR_TRANSLATE)
  return OpenMaxState(base.to_device(means), base.to_device(shape), base.to_device(scale), base.to_device(center),
                      base.to_device(np.asarray(weights)))


def openmax(state: OpenMaxState, logits, *, alpha=10):
  """−P(unknown) of the OpenMax layer (Bendale & Boult 2016, Algorithm 2), higher = in-distribution.

  For the top-α classes by activation (rank r = 0, 1, …), the activation v_k is shrunk by its weight
  ω_k = (α − r)/α times the Weibull CDF w_k of its distance to μ_k: v̂_k = v_k(1 − ω_k w_k); the unknown
  class gets v̂_0 = Σ_k v_k ω_k w_k, and P(unknown) = softmax(v̂_0, v̂_1, …, v̂_K)_0. pytorch-ood returns
  P(unknown) as its outlier score; OpenOOD returns the whole OpenMax distribution. α = 10 is the paper's
  (pytorch-ood's default; OpenOOD uses 3), clipped to K; it is traced, so its grid compiles once.
  Distances to every class's MAV use ‖v‖² − 2v·μ + ‖μ‖² (no `[N, K, K]` difference).

  Args:
    state: from `fit_openmax`.
    logits: `[N, K]`.
    alpha: how many top classes are recalibrated, ≥ 1.

  Returns:
    `[N]` scores in [−1, 0].
  """
  state = base.check_state(state, OpenMaxState, detector='openmax')
  num_classes = state.means.shape[0]
  logits = base.logits_arg(logits, detector='openmax', num_classes=num_classes)
  if isinstance(alpha, (bool, np.bool_)) or (_checks.is_concrete(alpha) and not float(alpha) >= 1):
    raise ValueError(f'alpha must be a number >= 1, got {alpha!r}.')
  alpha = min(base.as_float(alpha), float(num_classes)) if _checks.is_concrete(alpha) else alpha
  return _openmax(state, logits, alpha)


@jax.jit
def _openmax(state, logits, alpha):
  v = base.compute(logits)
  mu = state.means.astype(v.dtype)
  sq = (jnp.sum(jnp.square(v), axis=-1, keepdims=True)
        - 2.0 * jnp.dot(v, mu.T, precision=jax.lax.Precision.HIGHEST) + jnp.sum(jnp.square(mu), axis=-1))
  norms = jnp.linalg.norm(v, axis=-1, keepdims=True) * jnp.linalg.norm(mu, axis=-1)
  cos = jnp.dot(v, mu.T, precision=jax.lax.Precision.HIGHEST) / jnp.maximum(norms, 1e-12)
  weights = state.distance_weights.astype(v.dtype)
  d = weights[0] * jnp.sqrt(jnp.maximum(sq, 0.0)) + weights[1] * (1.0 - cos)
  # libMR's CDF 1 − exp(−((d + 10⁴ − small)/λ)^k), with (d + 10⁴ − small)/λ = 1 + (d − center)/λ.
  power = jnp.exp(state.shape.astype(v.dtype) * jnp.log1p((d - state.center.astype(v.dtype))
                                                          / state.scale.astype(v.dtype)))
  w = -jnp.expm1(-power)
  alpha = jnp.asarray(alpha, v.dtype)
  rank = jnp.argsort(jnp.argsort(-v, axis=-1, stable=True), axis=-1, stable=True).astype(v.dtype)
  omega = jnp.maximum(alpha - rank, 0.0) / alpha
  shrink = omega * w
  unknown = jnp.sum(v * shrink, axis=-1, keepdims=True)
  revised = jnp.concatenate([unknown, v * (1.0 - shrink)], axis=-1)
  return -jnp.exp(unknown[:, 0] - jax.nn.logsumexp(revised, axis=-1))


registry.register('openmax', needs={'logits'}, fit=fit_openmax, score=openmax,
                  defaults={'tailsize': 20, 'distance': 'euclidean', 'alpha': 10},
                  fit_params=('tailsize', 'distance'), grid={'alpha': (1, 2, 3, 5, 10)},
                  paper='Bendale & Boult 2016', year=2016)


# ------------------------------------------------------------------------------------------------
# CARef and CADRef.
# ------------------------------------------------------------------------------------------------


# CADRef's logit confidences S(z) (the paper's Table 1 ablation; 'energy' its default), in this order in the
# state's `mean_confidence` and the kernel's index.
_CADREF_CONFIDENCES = ('energy', 'gen', 'max_logit', 'msp')
# GEN's γ of the authors' code (and of Liu, Lochman & Zach 2023).
_CADREF_GEN_GAMMA = 0.1
# ‖h‖₁ and GEN's sum are clamped here: an all-zero (ReLU) feature scores very low instead of NaN.
_CADREF_EPS = 1e-12


def _logit_confidences(z, xp):
  """`[N, 4]` confidences S(z) of `_CADREF_CONFIDENCES`, higher = more confident, with `xp` NumPy or jax.numpy.

  The fit evaluates them in float64 NumPy for the training mean S̄, the kernel with jax.numpy, from one
  definition. Energy is logsumexp z, max-logit max z, MSP max softmax; GEN is the authors' reciprocal
  1/Σ_{j ≤ M} p_(j)^γ (1 − p_(j))^γ over the M = max(10, ⌊K/10⌋) largest probabilities (all K when fewer),
  γ = 0.1: a positive divisor, where the paper's Table 1 GEN (−Σ) would be negative.
  """
  k = z.shape[-1]
  top = xp.max(z, axis=-1, keepdims=True)
  sum_exp = xp.sum(xp.exp(z - top), axis=-1, keepdims=True)
  lse = top + xp.log(sum_exp)
  # GEN in log space: p^γ of a tiny probability is not negligible (1e-40^0.1 = 1e-4) but p itself underflows
  # in float32, and 1 − p of the top class would cancel; log(1 − p_top) is the logsumexp of the other logits.
  log_p = z - lse
  is_top = xp.arange(k) == xp.argmax(z, axis=-1)[:, None]
  others = xp.where(is_top, -np.inf, z)
  second = xp.max(others, axis=-1, keepdims=True)
  second = xp.where(xp.isfinite(second), second, 0.0)  # K = 1: no other class, 1 − p = 0
  log_rest = second + xp.log(xp.sum(xp.exp(others - second), axis=-1, keepdims=True)) - lse
  log_q = xp.where(is_top, log_rest, xp.log1p(-xp.exp(xp.minimum(log_p, np.log(0.5)))))
  terms = xp.exp(_CADREF_GEN_GAMMA * (log_p + log_q))
  largest = xp.take_along_axis(terms, xp.argsort(z, axis=-1)[:, k - min(max(10, k // 10), k):], axis=-1)
  gen = 1.0 / xp.maximum(xp.sum(largest, axis=-1), _CADREF_EPS)
  return xp.stack([lse[:, 0], gen, top[:, 0], 1.0 / sum_exp[:, 0]], axis=-1)


class CARefState(NamedTuple):
  """CARef's and CADRef's per-predicted-class mean features, the training mean confidences and the head.

  Attributes:
    head: the final layer (its argmax is ŷ; CADRef reads the signs of its columns).
    means: `[K, D]` mean feature of the training examples predicted as each class (the mean of all training
      features for a class never predicted).
    mean_confidence: `[4]` training mean S̄ of each confidence in ('energy', 'gen', 'max_logit', 'msp').
  """

  head: base.Head
  means: jax.Array
  mean_confidence: jax.Array


def fit_caref(batches, *, head, num_classes=None):
  """One streamed float64 pass: per predicted class the mean feature, and the mean of each logit confidence.

  Following the paper and the authors' code, the class means group the training examples by the model's
  prediction ŷ, not by their labels (labels are not read). A class the model never predicts gets the mean
  of all training features (as pytorch-ood does; the authors' code would give NaN). The prediction uses the
  batch's logits when it has them, else features @ W + b.

  Returns:
    `CARefState` (CADRef's S̄ for every confidence, so its `logit_score` is a scoring-time choice).
  """
  name = 'caref'
  head = base.as_head(head, detector=name)
  k = head.bias.shape[0]
  if num_classes is not None and num_classes != k:
    raise ValueError(f'head has {k} outputs but num_classes={num_classes}.')
  dim = head.kernel.shape[0]
  sums, counts = np.zeros((k, dim)), np.zeros(k)
  confidence_sum = np.zeros(len(_CADREF_CONFIDENCES))
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    h = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', h, dim, index)
    z = base.host_logits(batch, index, head, detector=name)
    base.check_dim('logits', z, k, index)
    if z.shape[0] != h.shape[0]:
      raise ValueError(f'logits (batch {index}) have {z.shape[0]} rows for {h.shape[0]} features.')
    pred = np.argmax(z, axis=1)
    np.add.at(sums, pred, h)
    counts += np.bincount(pred, minlength=k)
    confidence_sum += _logit_confidences(z, np).sum(axis=0)
  total = counts.sum()
  if not total:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], sums.sum(axis=0) / total)
  return CARefState(head, base.to_device(means), base.to_device(confidence_sum / total))


def _caref_inputs(state, features, logits, detector):
  state = base.check_state(state, CARefState, detector=detector)
  h = base.features_arg(features, detector=detector, dim=state.means.shape[1])
  if logits is not None:
    logits = base.logits_arg(logits, detector=detector, num_classes=state.means.shape[0])
    if logits.shape[0] != h.shape[0]:
      raise ValueError(f'logits have {logits.shape[0]} rows but features {h.shape[0]}.')
  return state, h, logits


def caref(state: CARefState, features, *, logits=None):
  """CARef: −‖h − μ_ŷ‖₁ / ‖h‖₁, ŷ = argmax z (Ling et al. 2025), higher = in-distribution.

  The relative error of the feature against the mean feature of its predicted class, negated as the paper's
  Score_CARef is (pytorch-ood's `CARef` returns +‖h − μ_ŷ‖₁/‖h‖₁ as its outlier score). ‖h‖₁ is clamped at
  1e-12 (pytorch-ood's clamp; the authors' code would give NaN for an all-zero feature). Hyperparameter-free.

  Args:
    state: from `fit_caref`.
    features: `[N, D]`.
    logits: `[N, K]` for ŷ (default features @ W + b).

  Returns:
    `[N]` scores ≤ 0 for non-negative features.
  """
  state, h, logits = _caref_inputs(state, features, logits, 'caref')
  return _caref(state, h, logits)


@jax.jit
def _caref(state, h, logits):
  h = base.compute(h)
  z = base.head_logits(h, state.head) if logits is None else base.compute(logits)
  mu = state.means.astype(h.dtype)[jnp.argmax(z, axis=-1)]
  norm = jnp.maximum(jnp.sum(jnp.abs(h), axis=-1), _CADREF_EPS)
  return -jnp.sum(jnp.abs(h - mu), axis=-1) / norm


registry.register('caref', needs={'features', 'head'}, fit=fit_caref, score=caref, paper='Ling et al. 2025',
                  year=2025)


def cadref(state: CARefState, features, *, logits=None, logit_score='energy'):
  """CADRef: −(E_p / S(z) + E_n / S̄) (Ling et al. 2025, eqs. 7–10), higher = in-distribution.

  With r = h − μ_ŷ (CARef's relative feature) and s = sign(w_ŷ), the column of the head for ŷ,
  E_p = Σ_i max(s_i r_i, 0) / ‖h‖₁ is the error along the directions that raise the predicted logit and
  E_n = Σ_i max(−s_i r_i, 0) / ‖h‖₁ the rest (E_p + E_n is CARef's error wherever w_ŷ has no zero).
  E_p is scaled by the example's logit confidence S(z), E_n by its training mean S̄ (from the fit).
  This follows the authors' code and pytorch-ood, which split the relative feature by the weight signs and
  sum absolute values; the printed eqs. 7–8 split on sign(w_i h_i), which contradicts the paper's text and
  its claim E_p + E_n = CARef's error. pytorch-ood's `CADRef` returns the un-negated sum (outlier score).

  S(z) is assumed positive, as in the paper: energy (logsumexp z, the default) and max-logit can be ≤ 0 for
  unusual logits, where the score is then meaningless; MSP and GEN are always positive.

  Args:
    state: from `fit_caref`.
    features: `[N, D]`.
    logits: `[N, K]` for ŷ and S (default features @ W + b).
    logit_score: S, one of 'energy' (the paper's default), 'gen' (the authors' reciprocal, γ = 0.1,
      M = max(10, K/10)), 'max_logit', 'msp'; traced in the kernel, so a grid over it compiles once.

  Returns:
    `[N]` scores.
  """
  state, h, logits = _caref_inputs(state, features, logits, 'cadref')
  if logit_score not in _CADREF_CONFIDENCES:
    raise ValueError(f'logit_score must be one of {list(_CADREF_CONFIDENCES)}, got {logit_score!r}.')
  return _cadref(state, h, logits, _CADREF_CONFIDENCES.index(logit_score))


@jax.jit
def _cadref(state, h, logits, which):
  h = base.compute(h)
  z = base.head_logits(h, state.head) if logits is None else base.compute(logits)
  pred = jnp.argmax(z, axis=-1)
  aligned = (h - state.means.astype(h.dtype)[pred]) * jnp.sign(state.head.kernel.astype(h.dtype).T[pred])
  norm = jnp.maximum(jnp.sum(jnp.abs(h), axis=-1), _CADREF_EPS)
  positive = jnp.sum(jnp.maximum(aligned, 0.0), axis=-1) / norm
  negative = jnp.sum(jnp.maximum(-aligned, 0.0), axis=-1) / norm
  confidence = _logit_confidences(z, jnp)[:, which]
  return -(positive / confidence + negative / state.mean_confidence.astype(h.dtype)[which])


# The grid is the paper's ablation of S (pytorch-ood's `hyperparameter_space`); energy is its choice.
registry.register('cadref', needs={'features', 'head'}, fit=fit_caref, score=cadref,
                  defaults={'logit_score': 'energy'}, grid={'logit_score': _CADREF_CONFIDENCES},
                  paper='Ling et al. 2025', year=2025)
