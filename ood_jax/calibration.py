"""Post-hoc calibration and the calibration / selective-prediction metrics reported under shift.

Two halves, both pure functions:

* **Calibrators** fitted on held-out validation logits and labels, each a pair
  `fit_*(...) -> state` (host, float64 NumPy, deterministic) and `apply_*(state, ...) -> probs`
  (jit-able JAX; the `normalize` flags are Python bools, static under `jax.jit`). States are
  NamedTuples of arrays, hence pytrees: they can be saved, passed into `jax.jit` or sharded like any
  parameter.

  - temperature scaling, softmax(z / T) (Guo et al. 2017, "On Calibration of Modern Neural
    Networks", section 4.2);
  - vector scaling, softmax(w ⊙ z + b) (Guo et al. 2017);
  - per-class Platt scaling, p_k = σ(a_k z_k + b_k) (Platt 1999), the natural post-hoc calibrator
    of one-vs-all models (Padhy et al. 2020, "Revisiting One-vs-All Classifiers for Predictive
    Uncertainty and Out-of-Distribution Detection");
  - per-class (one-vs-rest) isotonic regression (Zadrozny & Elkan 2002).

* **Metrics** on the host in float64 NumPy, with the checks and the top-label binning of
  `ood_jax.metrics`: Brier score, negative log-likelihood, adaptive (equal-mass) ECE, classwise ECE
  (Kull et al. 2019), maximum calibration error (Naeini et al. 2015; Guo et al. 2017), and selective
  prediction (Geifman & El-Yaniv 2017, "Selective Classification for Deep Neural Networks";
  Geifman et al. 2019, "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers"): the
  risk-coverage curve, AURC, E-AURC and accuracy at a given coverage. The equal-width top-label ECE
  itself is `ood_jax.metrics.expected_calibration_error`.

Which probabilities to calibrate, per method
-------------------------------------------
Every calibrator takes logits (isotonic: probabilities) and leaves the choice of their scale to the
caller:

* softmax (CE), DM: `fit_temperature` / `fit_vector_scaling` on the logits.
* one-vs-all (p_k = σ(z_k)): `fit_platt` on the affine logits z; the result keeps the OvA
  convention (independent per-class probabilities, confidence max_k p_k, rows need not sum to 1).
* distance one-vs-all (p_k = 2σ(z_k), z_k = −d_k ≤ 0): `fit_platt` on the distance logits; the
  fitted σ(a_k z_k + b_k) replaces 2σ(z_k) (both are increasing in z_k, so the ranking within a class
  is kept).
* IsoMax: see below.

IsoMax
------
IsoMax (Macêdo et al. 2021, "Entropic Out-of-Distribution Detection") trains on
softmax(E_s · z) with distance logits z_k = −‖f(x) − p_k‖ and entropic scale E_s = 10, and removes
E_s at inference: its OOD scores use softmax(z), which is deliberately near-uniform (maximum
entropy). Those inference probabilities are not meant as calibrated class probabilities: their
top-label ECE is of the order of 0.5 simply because every confidence is far below the accuracy.
The distribution the model was fitted to, and so the one comparable with a cross-entropy model's
softmax, is softmax(E_s · z), whose ECE is of the order of 0.02 on the same model. Report that one
(pass `entropic_scale * logits`) when comparing calibration across methods, and say which.
`ood_jax.methods.isomax.ISOMAX.probabilities` is softmax of the raw logits (the scores' convention).

Temperature and vector scaling make the choice moot after calibration: {softmax(z / T)} and
{softmax(10 z / T)} are the same family, so fitting on z or on 10 z gives the same calibrated
probabilities (T differs by exactly 10, provided both optima lie within the temperature bounds).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks

__all__ = [
    'TemperatureState',
    'fit_temperature',
    'apply_temperature',
    'VectorScalingState',
    'fit_vector_scaling',
    'apply_vector_scaling',
    'PlattState',
    'fit_platt',
    'apply_platt',
    'IsotonicState',
    'fit_isotonic',
    'apply_isotonic',
    'brier_score',
    'negative_log_likelihood',
    'adaptive_calibration_error',
    'classwise_calibration_error',
    'maximum_calibration_error',
    'risk_coverage_curve',
    'aurc',
    'excess_aurc',
    'accuracy_at_coverage',
]

# -log p_y is clipped at -log(_TINY) ≈ 690.8 so that a probability that underflowed to 0 gives a
# large finite NLL rather than inf (the evaluator's classification metrics clip the same way).
_TINY = 1e-300


# ----------------------------------------------------------------------------------------------
# Argument conversion (host side).


def _logits_and_labels(logits, labels, *, min_classes: int) -> tuple[np.ndarray, np.ndarray]:
  z = _checks.host_float64('logits', logits, ndim=2)
  if z.shape[1] < min_classes:
    raise ValueError(f'logits must have at least {min_classes} classes (shape[1]), got shape {z.shape}.')
  return z, _checks.host_labels('labels', labels, size=z.shape[0], num_classes=z.shape[1], match='logits')


def _sum_tolerance(dtype, num_classes: int) -> float:
  # Rows of a float32 softmax sum to 1 within ~K ulps; bfloat16 / float16 rows much less exactly.
  return max(1e-4, num_classes * float(jnp.finfo(dtype).eps))


def _probs_and_labels(probs, labels, *, normalized: bool) -> tuple[np.ndarray, np.ndarray]:
  """Validated float64 probabilities [N, K] in [0, 1] (rows summing to 1 if `normalized`) and labels."""
  dtype = _checks.dtype_of(probs)
  p = _checks.host_float64('probs', probs, ndim=2)
  if p.shape[1] == 0:
    raise ValueError('probs has no classes (shape[1] == 0).')
  if p.min() < 0.0 or p.max() > 1.0:
    raise ValueError(f'probs must lie in [0, 1], got values in [{p.min()}, {p.max()}].')
  if normalized:
    error = np.abs(p.sum(axis=1) - 1.0)
    tol = _sum_tolerance(dtype, p.shape[1])
    if error.max() > tol:
      row = int(error.argmax())
      raise ValueError(f'probs rows must sum to 1 (within {tol:.2g}); row {row} sums to {p[row].sum()}. '
                       'One-vs-all probabilities must be normalised first (p / p.sum(-1, keepdims=True)).')
  return p, _checks.host_labels('labels', labels, size=p.shape[0], num_classes=p.shape[1], match='probs')


# ----------------------------------------------------------------------------------------------
# Argument checks for the jit-able apply functions: shapes and dtypes always, values when concrete.


def _apply_input(name: str, x, *, num_classes: int | None):
  dtype = _checks.dtype_of(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{name} must have a floating dtype, got {dtype}.')
  if num_classes is None and np.ndim(x) < 1:
    raise ValueError(f'{name} must have shape [..., K], got {tuple(np.shape(x))}.')
  if num_classes is not None and (np.ndim(x) < 1 or np.shape(x)[-1] != num_classes):
    raise ValueError(f'{name} must have shape [..., {num_classes}] to match the fitted state, '
                     f'got {tuple(np.shape(x))}.')
  value = _checks.host_value(x)
  if value is not None and not np.isfinite(value).all():
    raise ValueError(f'{name} contains NaN or inf; every value must be finite.')
  x = jnp.asarray(x)
  return x.astype(_checks.compute_dtype(x))


def _state_vectors(names: tuple[str, ...], *arrays) -> int:
  """Checks that the state's arrays are vectors of one common length K; returns K."""
  shapes = [tuple(np.shape(a)) for a in arrays]
  if any(len(shape) != 1 for shape in shapes) or len(set(shapes)) != 1:
    shown = ', '.join(f'{n} {s}' for n, s in zip(names, shapes))
    raise ValueError(f'the state must hold vectors of one length [K], got {shown}.')
  return shapes[0][0]


# ----------------------------------------------------------------------------------------------
# Temperature scaling.


class TemperatureState(NamedTuple):
  """Fitted temperature scaling: calibrated probabilities softmax(logits / temperature).

  Attributes:
    temperature: [] positive scalar T.
  """

  temperature: jax.Array


def _softmax_stats(z: np.ndarray, labels: np.ndarray, beta: float) -> tuple[float, float, float]:
  """Mean NLL g(β) of softmax(β z) and its first two derivatives in β (float64).

  g(β) = mean_i [logsumexp_k(β z_ik) − β z_iy], g'(β) = mean_i [E_p z_i − z_iy],
  g''(β) = mean_i Var_p(z_i) ≥ 0 with p = softmax(β z_i): g is convex in β = 1 / T.
  """
  s = beta * z
  m = s.max(axis=1, keepdims=True)
  e = np.exp(s - m)
  total = e.sum(axis=1, keepdims=True)
  p = e / total
  rows = np.arange(z.shape[0])
  nll = float(np.mean(m[:, 0] + np.log(total[:, 0]) - s[rows, labels]))
  mean_z = (p * z).sum(axis=1)
  d1 = float(np.mean(mean_z - z[rows, labels]))
  d2 = float(np.mean((p * (z - mean_z[:, None]) ** 2).sum(axis=1)))  # centred: no cancellation
  return nll, d1, d2


def _minimise_convex_1d(fn, lo: float, hi: float, start: float, *, max_iterations: int = 200) -> float:
  """argmin over [lo, hi] (0 < lo < hi) of a smooth convex g, from fn(x) = (g, g', g'').

  Safeguarded Newton on g' = 0 ("rtsafe", Press et al., Numerical Recipes, section 9.4): the
  bracket [lo, hi] with g'(lo) < 0 < g'(hi) always holds the minimiser; a Newton step is taken when
  it lands inside the bracket and is at most half the step before the previous one, otherwise the
  bracket is bisected (geometrically: β spans four decades). So the iteration cannot stall or
  leave the bracket, and near the optimum it converges quadratically. A minimiser on the boundary
  (g' of one sign on the whole interval) is returned exactly.
  """
  x = min(max(start, lo), hi)
  d_lo, d_hi = fn(lo)[1], fn(hi)[1]
  if d_lo >= 0.0 and d_hi <= 0.0:
    return x  # g' = 0 throughout (e.g. every logit row constant): every point is a minimiser.
  if d_lo >= 0.0:
    return lo
  if d_hi <= 0.0:
    return hi
  step_before, step = hi - lo, hi - lo
  for _ in range(max_iterations):
    _, d1, d2 = fn(x)
    if d1 == 0.0:
      return x
    if d1 < 0.0:
      lo = x
    else:
      hi = x
    newton = x - d1 / d2 if d2 > 0.0 else np.nan
    if lo < newton < hi and abs(newton - x) <= 0.5 * abs(step_before):
      new = newton
    else:
      new = float(np.sqrt(lo * hi))
    step_before, step = step, new - x
    if abs(step) <= 1e-15 * x or hi - lo <= 1e-15 * hi:
      return new
    x = new
  return x


def fit_temperature(logits, labels, *, min_temperature: float = 0.01,
                    max_temperature: float = 100.0) -> TemperatureState:
  """Fits T minimising the validation NLL of softmax(logits / T) (Guo et al. 2017).

  With β = 1 / T the objective g(β) = mean_i [logsumexp_k(β z_ik) − β z_iy] is convex (its second
  derivative is the mean variance of z under softmax(β z)), so the minimiser over
  β ∈ [1 / max_temperature, 1 / min_temperature] is found by safeguarded Newton in float64 on the
  host, to machine precision, in a few dozen iterations, not by a fixed number of gradient steps.
  The result is never worse than T = 1 on the validation set (T = 1 is checked explicitly when it
  lies within the bounds) and, as T > 0, never changes the argmax. When the validation data are
  perfectly separated the NLL keeps decreasing as T → 0 and the bound `min_temperature` is
  returned.

  Args:
    logits: [N, K] floating validation logits, K >= 2, all finite. For IsoMax see the module
      docstring (the fitted probabilities do not depend on the entropic scale applied beforehand).
    labels: [N] integer labels in [0, K).
    min_temperature: lower bound on T, > 0.
    max_temperature: upper bound on T, > `min_temperature`.

  Returns:
    `TemperatureState` with a scalar temperature (default JAX float dtype).
  """
  z, y = _logits_and_labels(logits, labels, min_classes=2)
  t_min = _checks.positive_real('min_temperature', min_temperature)
  t_max = _checks.positive_real('max_temperature', max_temperature)
  if not t_min < t_max:
    raise ValueError(f'min_temperature must be < max_temperature, got {t_min} and {t_max}.')
  # Logits shifted per row do not change the softmax; centring keeps exp() well scaled.
  z = z - z.mean(axis=1, keepdims=True)
  fn = lambda beta: _softmax_stats(z, y, beta)
  beta = _minimise_convex_1d(fn, 1.0 / t_max, 1.0 / t_min, start=1.0)
  if t_min <= 1.0 <= t_max and fn(beta)[0] > fn(1.0)[0]:
    beta = 1.0  # Cannot happen beyond rounding for a convex objective; guarantees the promise.
  return TemperatureState(temperature=jnp.asarray(np.float64(1.0 / beta)))  # not weakly typed


def apply_temperature(state: TemperatureState, logits) -> jax.Array:
  """Temperature-scaled probabilities softmax(logits / T); jit-able.

  The calibrated logits themselves are `logits / state.temperature` (e.g. for energy scores).

  Args:
    state: from `fit_temperature`.
    logits: [..., K] floating logits.

  Returns:
    [..., K] probabilities, in the logits' dtype promoted to at least float32.
  """
  if np.shape(state.temperature) != ():
    raise ValueError(f'state.temperature must be a scalar, got shape {np.shape(state.temperature)}.')
  z = _apply_input('logits', logits, num_classes=None)
  return jax.nn.softmax(z / jnp.asarray(state.temperature, z.dtype), axis=-1)


# ----------------------------------------------------------------------------------------------
# Vector scaling.


class VectorScalingState(NamedTuple):
  """Fitted vector scaling: calibrated probabilities softmax(scale ⊙ logits + bias).

  Attributes:
    scale: [K] per-class scale w.
    bias: [K] per-class bias b, centred to mean 0 (adding a constant to b changes nothing).
  """

  scale: jax.Array
  bias: jax.Array


def _vector_objective(z, y, w, b, l2):
  """Penalised mean NLL of softmax(w ⊙ z + b), its gradient [2K] and Hessian [2K, 2K] (float64)."""
  n = z.shape[0]
  s = z * w + b
  m = s.max(axis=1, keepdims=True)
  e = np.exp(s - m)
  total = e.sum(axis=1, keepdims=True)
  p = e / total
  rows = np.arange(n)
  value = np.mean(m[:, 0] + np.log(total[:, 0]) - s[rows, y])
  value += 0.5 * l2 * (np.sum((w - 1.0) ** 2) + np.sum(b ** 2))
  r = p.copy()
  r[rows, y] -= 1.0  # d NLL_i / d s_i
  grad = np.concatenate([(r * z).sum(0) / n + l2 * (w - 1.0), r.sum(0) / n + l2 * b])
  # Per example d²NLL / ds² = diag(p) − p pᵀ, and ds_k / dw_k = z_k, ds_k / db_k = 1.
  pz = p * z
  h_ww = np.diag((pz * z).sum(0)) - pz.T @ pz
  h_wb = np.diag(pz.sum(0)) - pz.T @ p
  h_bb = np.diag(p.sum(0)) - p.T @ p
  hess = np.block([[h_ww, h_wb], [h_wb.T, h_bb]]) / n + l2 * np.eye(2 * w.size)
  return float(value), grad, hess


def fit_vector_scaling(logits, labels, *, l2: float = 0.0, max_iterations: int = 100,
                       tolerance: float = 1e-10) -> VectorScalingState:
  """Fits per-class scale and bias minimising the validation NLL of softmax(w ⊙ z + b) (Guo et al. 2017).

  The objective mean_i −log softmax(w ⊙ z_i + b)_{y_i} + (l2 / 2)(‖w − 1‖² + ‖b‖²) is convex in
  (w, b). It is minimised by Newton's method in float64 with a backtracking (Armijo) line search,
  starting from the identity w = 1, b = 0, so the validation NLL never exceeds the uncalibrated one.
  The Hessian is singular along b → b + c·1 (softmax is shift-invariant); minimum-norm steps
  (least squares) never move along that direction, and the returned bias is centred. Deterministic.
  Unlike temperature scaling, vector scaling can change the argmax. Each iteration costs O(N K²)
  plus a (2K)³ solve: meant for K up to a few hundred classes.

  Args:
    logits: [N, K] floating validation logits, K >= 2, all finite.
    labels: [N] integer labels in [0, K).
    l2: ridge penalty towards the identity, >= 0. With 0 (Guo et al.) separable validation data
      make the NLL decrease without bound and the fit stops after `max_iterations`.
    max_iterations: Newton iterations at most.
    tolerance: stop when the max-norm of the gradient is below this.

  Returns:
    `VectorScalingState` with [K] scale and bias.
  """
  z, y = _logits_and_labels(logits, labels, min_classes=2)
  l2 = float(_checks.nonnegative('l2', l2))
  max_iterations = _checks.positive_int('max_iterations', max_iterations)
  tolerance = _checks.positive_real('tolerance', tolerance)
  k = z.shape[1]
  w, b = np.ones(k), np.zeros(k)
  value, grad, hess = _vector_objective(z, y, w, b, l2)
  for _ in range(max_iterations):
    if np.abs(grad).max() <= tolerance:
      break
    step = -np.linalg.lstsq(hess, grad, rcond=1e-12)[0]
    slope = float(grad @ step)
    if not slope < 0.0:
      step, slope = -grad, -float(grad @ grad)  # Numerically indefinite Hessian: fall back to descent.
    t = 1.0
    for _ in range(60):
      w_new, b_new = w + t * step[:k], b + t * step[k:]
      new = _vector_objective(z, y, w_new, b_new, l2)
      if new[0] <= value + 1e-4 * t * slope:
        break
      t *= 0.5
    else:
      break  # No decrease representable in float64: converged as far as it can.
    w, b = w_new, b_new
    value, grad, hess = new
  return VectorScalingState(scale=jnp.asarray(w), bias=jnp.asarray(b - b.mean()))


def apply_vector_scaling(state: VectorScalingState, logits) -> jax.Array:
  """Vector-scaled probabilities softmax(scale ⊙ logits + bias); jit-able.

  Args:
    state: from `fit_vector_scaling`.
    logits: [..., K] floating logits.

  Returns:
    [..., K] probabilities, in the logits' dtype promoted to at least float32.
  """
  k = _state_vectors(('state.scale', 'state.bias'), state.scale, state.bias)
  z = _apply_input('logits', logits, num_classes=k)
  return jax.nn.softmax(z * jnp.asarray(state.scale, z.dtype) + jnp.asarray(state.bias, z.dtype), axis=-1)


# ----------------------------------------------------------------------------------------------
# Per-class Platt scaling (one-vs-all models).


class PlattState(NamedTuple):
  """Fitted per-class Platt scaling: p_k = σ(slope_k · logits_k + intercept_k).

  Attributes:
    slope: [K] per-class slope a_k.
    intercept: [K] per-class intercept b_k.
  """

  slope: jax.Array
  intercept: jax.Array


def _platt_objective(s, t, a, b):
  """Per-class mean binary cross-entropy of σ(a s + b) against targets t, with gradient and Hessian."""
  u = s * a + b
  # softplus(u) − t u = −t log σ(u) − (1 − t) log(1 − σ(u)), stable for any u.
  value = np.mean(np.logaddexp(0.0, u) - t * u, axis=0)
  q = 0.5 * (1.0 + np.tanh(0.5 * u))  # σ(u) without overflow
  r = q - t
  v = q * (1.0 - q)
  grad = np.stack([np.mean(r * s, axis=0), np.mean(r, axis=0)], axis=-1)  # [K, 2]
  h_aa, h_ab, h_bb = np.mean(v * s * s, axis=0), np.mean(v * s, axis=0), np.mean(v, axis=0)
  return value, grad, (h_aa, h_ab, h_bb)


def fit_platt(logits, labels, *, smoothed_targets: bool = False, max_iterations: int = 100,
              tolerance: float = 1e-10) -> PlattState:
  """Fits per-class Platt scaling σ(a_k z_k + b_k) on the one-vs-rest problems (Platt 1999).

  For each class k, (a_k, b_k) is the maximum-likelihood logistic regression of the binary target
  [y_i = k] on the single feature z_ik: the K problems are independent and are solved together by
  Newton's method (2 × 2 systems) with a per-class backtracking line search from Platt's start
  a = 0, b = logit(class frequency). A class whose fit ends with a higher validation binary NLL than
  the identity a = 1, b = 0 (σ(z), the one-vs-all model's own probability; possible only when
  stopped by `max_iterations`) keeps the identity. Deterministic. Equal to scikit-learn's unpenalised
  `LogisticRegression` fitted class by class.

  How to use the result: `apply_platt` returns the K per-class probabilities. By default they are
  used as a one-vs-all model uses its sigmoids (Padhy et al. 2020): prediction argmax_k p_k,
  confidence max_k p_k, rows not summing to one; `normalize=True` divides by the row sum instead
  (Zadrozny & Elkan 2002; Guo et al. 2017, section 4.2), as NLL and Brier score require. Either way
  the argmax can differ from the uncalibrated one, because a_k, b_k differ between classes.

  Args:
    logits: [N, K] floating validation logits, all finite: affine logits for one-vs-all, distance
      logits −d_k for distance one-vs-all (σ(a z + b) then replaces 2σ(z)), or any per-class score.
    labels: [N] integer labels in [0, K).
    smoothed_targets: use Platt's regularised targets (N₊ + 1) / (N₊ + 2) and 1 / (N₋ + 2) instead
      of 1 and 0 (as scikit-learn's `CalibratedClassifierCV(method='sigmoid')` does). They keep a_k
      finite when a class is perfectly separated on the validation set; with 0/1 targets such a
      class stops after `max_iterations` with a large slope.
    max_iterations: Newton iterations at most.
    tolerance: stop when every class's gradient max-norm is below this.

  Returns:
    `PlattState` with [K] slope and intercept.
  """
  s, y = _logits_and_labels(logits, labels, min_classes=1)
  smoothed_targets = _checks.boolean('smoothed_targets', smoothed_targets)
  max_iterations = _checks.positive_int('max_iterations', max_iterations)
  tolerance = _checks.positive_real('tolerance', tolerance)
  n, k = s.shape
  t = (y[:, None] == np.arange(k)).astype(np.float64)
  if smoothed_targets:
    positives = t.sum(axis=0)
    t = np.where(t > 0, (positives + 1.0) / (positives + 2.0), 1.0 / (n - positives + 2.0))
  # Platt's starting point a = 0, b = logit(prior): Newton from the identity (a = 1, b = 0) can
  # need many damped steps when σ(z) is far from calibrated.
  prior = t.mean(axis=0)
  a, b = np.zeros(k), np.log(prior) - np.log1p(-prior)
  identity = _platt_objective(s, t, np.ones(k), np.zeros(k))[0]
  value, grad, (h_aa, h_ab, h_bb) = _platt_objective(s, t, a, b)
  active = np.ones(k, dtype=bool)
  for _ in range(max_iterations):
    active &= np.abs(grad).max(axis=1) > tolerance
    if not active.any():
      break
    det = h_aa * h_bb - h_ab ** 2
    ok = det > 1e-300 * np.maximum(h_aa * h_bb, 1e-300)
    safe = np.where(ok, det, 1.0)
    step_a = np.where(ok, -(h_bb * grad[:, 0] - h_ab * grad[:, 1]) / safe, -grad[:, 0])
    step_b = np.where(ok, -(h_aa * grad[:, 1] - h_ab * grad[:, 0]) / safe, -grad[:, 1])
    step_a, step_b = np.where(active, step_a, 0.0), np.where(active, step_b, 0.0)
    slope = grad[:, 0] * step_a + grad[:, 1] * step_b
    step_t = np.ones(k)
    pending = active.copy()
    new_a, new_b = a.copy(), b.copy()
    for _ in range(60):
      cand_a, cand_b = a + step_t * step_a, b + step_t * step_b
      cand = _platt_objective(s, t, cand_a, cand_b)[0]
      accept = pending & (cand <= value + 1e-4 * step_t * slope)
      new_a[accept], new_b[accept] = cand_a[accept], cand_b[accept]
      pending &= ~accept
      if not pending.any():
        break
      step_t = np.where(pending, 0.5 * step_t, step_t)
    active &= ~pending  # No representable decrease: that class has converged.
    a, b = new_a, new_b
    value, grad, (h_aa, h_ab, h_bb) = _platt_objective(s, t, a, b)
  # Only a class stopped by max_iterations far from its optimum can be worse than σ(z): keep σ(z).
  worse = value > identity
  a, b = np.where(worse, 1.0, a), np.where(worse, 0.0, b)
  return PlattState(slope=jnp.asarray(a), intercept=jnp.asarray(b))


def _normalise_rows(q):
  total = q.sum(axis=-1, keepdims=True)
  # A row of zeros has no preferred class: return the uniform distribution for it.
  return jnp.where(total > 0, q / jnp.where(total > 0, total, 1.0), 1.0 / q.shape[-1])


def apply_platt(state: PlattState, logits, *, normalize: bool = False) -> jax.Array:
  """Per-class Platt probabilities σ(slope_k · logits_k + intercept_k); jit-able.

  Args:
    state: from `fit_platt`.
    logits: [..., K] floating logits of the kind the state was fitted on.
    normalize: divide each row by its sum (see `fit_platt`); default False keeps the one-vs-all
      convention (confidence max_k p_k).

  Returns:
    [..., K] probabilities in [0, 1], in the logits' dtype promoted to at least float32.
  """
  normalize = _checks.boolean('normalize', normalize)
  k = _state_vectors(('state.slope', 'state.intercept'), state.slope, state.intercept)
  z = _apply_input('logits', logits, num_classes=k)
  q = jax.nn.sigmoid(z * jnp.asarray(state.slope, z.dtype) + jnp.asarray(state.intercept, z.dtype))
  return _normalise_rows(q) if normalize else q


# ----------------------------------------------------------------------------------------------
# Per-class isotonic regression.


class IsotonicState(NamedTuple):
  """Fitted per-class isotonic maps, piecewise linear through (inputs[k], outputs[k]).

  Rows are padded to a common length by repeating their last point; inputs outside a row's range
  map to its end values.

  Attributes:
    inputs: [K, M] non-decreasing knots x.
    outputs: [K, M] non-decreasing calibrated probabilities at the knots.
  """

  inputs: jax.Array
  outputs: jax.Array


def _isotonic_knots(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares non-decreasing fit of t on x (pool adjacent violators), as interpolation knots."""
  order = np.argsort(x, kind='stable')
  xs, ts = x[order], t[order]
  unique, start, count = np.unique(xs, return_index=True, return_counts=True)
  sums = np.add.reduceat(ts, start)
  # Blocks as (sum, weight, first unique index, last unique index); merge while decreasing.
  blocks: list[list[float]] = []
  for i in range(unique.size):
    blocks.append([sums[i], float(count[i]), i, i])
    while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] >= blocks[-1][0] * blocks[-2][1]:
      top = blocks.pop()
      blocks[-1][0] += top[0]
      blocks[-1][1] += top[1]
      blocks[-1][3] = top[3]
  # Merging equal means too ("≥") makes block values strictly increasing; each block is drawn from
  # its first to its last input, and linear interpolation joins consecutive blocks.
  knots_x, knots_y = [], []
  for total, weight, first, last in blocks:
    value = total / weight
    knots_x.append(unique[first])
    knots_y.append(value)
    if last > first:
      knots_x.append(unique[last])
      knots_y.append(value)
  return np.asarray(knots_x), np.asarray(knots_y)


def fit_isotonic(probs, labels) -> IsotonicState:
  """Fits one isotonic (non-decreasing) map per class on the one-vs-rest problems (Zadrozny & Elkan 2002).

  For class k the map minimises Σ_i (g_k(p_ik) − [y_i = k])² over non-decreasing g_k (pool adjacent
  violators, float64, exact); it is evaluated by linear interpolation between the fitted blocks and
  clipped to the end values outside the validation range, which is what scikit-learn's
  `IsotonicRegression(out_of_bounds='clip')` predicts. Isotonic maps overfit small validation sets;
  prefer temperature scaling below a few thousand examples.

  Args:
    probs: [N, K] floating validation probabilities (softmax, σ or 2σ; any finite per-class score
      works, as only its order within a class matters).
    labels: [N] integer labels in [0, K).

  Returns:
    `IsotonicState`.
  """
  x = _checks.host_float64('probs', probs, ndim=2)
  if x.shape[1] == 0:
    raise ValueError('probs has no classes (shape[1] == 0).')
  y = _checks.host_labels('labels', labels, size=x.shape[0], num_classes=x.shape[1], match='probs')
  knots = [_isotonic_knots(x[:, k], (y == k).astype(np.float64)) for k in range(x.shape[1])]
  width = max(2, max(kx.size for kx, _ in knots))
  pad = lambda a: np.concatenate([a, np.full(width - a.size, a[-1])])
  return IsotonicState(inputs=jnp.asarray(np.stack([pad(kx) for kx, _ in knots])),
                       outputs=jnp.asarray(np.stack([pad(ky) for _, ky in knots])))


def _interp_clipped(x, xp, fp):
  """Piecewise-linear interpolation, constant outside [xp[0], xp[-1]], safe for repeated knots."""
  i = jnp.clip(jnp.searchsorted(xp, x, side='right'), 1, xp.shape[0] - 1)
  x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
  dx = x1 - x0
  frac = jnp.where(dx > 0, (x - x0) / jnp.where(dx > 0, dx, 1.0), 1.0)
  value = y0 + jnp.clip(frac, 0.0, 1.0) * (y1 - y0)
  return jnp.where(x <= xp[0], fp[0], jnp.where(x >= xp[-1], fp[-1], value))


def apply_isotonic(state: IsotonicState, probs, *, normalize: bool = True) -> jax.Array:
  """Per-class isotonic probabilities g_k(probs_k); jit-able.

  Args:
    state: from `fit_isotonic`.
    probs: [..., K] floating probabilities of the kind the state was fitted on.
    normalize: divide each row by its sum (Zadrozny & Elkan 2002; Guo et al. 2017, section 4.2),
      a row of zeros becoming uniform. With False the rows are the K one-vs-rest estimates.

  Returns:
    [..., K] probabilities in [0, 1], in the input dtype promoted to at least float32.
  """
  normalize = _checks.boolean('normalize', normalize)
  if np.ndim(state.inputs) != 2 or np.shape(state.inputs) != np.shape(state.outputs):
    raise ValueError('state.inputs and state.outputs must both have shape [K, M], got '
                     f'{tuple(np.shape(state.inputs))} and {tuple(np.shape(state.outputs))}.')
  p = _apply_input('probs', probs, num_classes=np.shape(state.inputs)[0])
  xp, fp = jnp.asarray(state.inputs, p.dtype), jnp.asarray(state.outputs, p.dtype)
  flat = p.reshape(-1, p.shape[-1])
  q = jax.vmap(_interp_clipped, in_axes=(1, 0, 0), out_axes=1)(flat, xp, fp).reshape(p.shape)
  return _normalise_rows(q) if normalize else q


# ----------------------------------------------------------------------------------------------
# Calibration metrics.


def brier_score(probs, labels) -> float:
  """Multiclass Brier score: mean over examples of Σ_k (p_k − [y = k])².

  The sum over classes is Brier's (1950) original definition and lies in [0, 2]; some works divide
  it by K. For K = 2 it is twice scikit-learn's binary `brier_score_loss` on the positive class.

  Args:
    probs: [N, K] probabilities in [0, 1], rows summing to 1.
    labels: [N] integer labels in [0, K).

  Returns:
    Brier score as a Python float (lower is better).
  """
  p, y = _probs_and_labels(probs, labels, normalized=True)
  q = p.copy()
  q[np.arange(y.size), y] -= 1.0
  return float(np.mean(np.sum(q * q, axis=1)))


def negative_log_likelihood(probs, labels) -> float:
  """Mean negative log-likelihood −mean_i log p_{i, y_i}.

  A probability that underflowed to 0 is clipped to 1e-300 (an NLL of about 690.8 for that example)
  rather than giving inf; compute from logits (log-softmax) where that matters.

  Args:
    probs: [N, K] probabilities in [0, 1], rows summing to 1.
    labels: [N] integer labels in [0, K).

  Returns:
    NLL in nats as a Python float.
  """
  p, y = _probs_and_labels(probs, labels, normalized=True)
  return float(-np.mean(np.log(np.maximum(p[np.arange(y.size), y], _TINY))))


def _top_label(probs, labels) -> tuple[np.ndarray, np.ndarray]:
  p, y = _probs_and_labels(probs, labels, normalized=False)
  # argmax takes the first of tied maxima, as in ood_jax.metrics.
  return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def adaptive_calibration_error(probs, labels, *, num_bins: int = 15) -> float:
  """Top-label ECE with equal-mass bins (adaptive ECE; Nguyen & O'Connor 2015, Nixon et al. 2019).

  Examples are sorted by confidence max_k p_k (ascending, ties kept in input order by a stable
  sort) and cut into `num_bins` contiguous bins whose sizes differ by at most one, the first
  N mod num_bins bins holding one more (as `numpy.array_split`). Then
  ECE = Σ_b (n_b / N) |acc_b − conf_b| over non-empty bins (bins are empty only if N < num_bins).
  A run of tied confidences may be split between two bins; with heavy ties prefer the equal-width
  `ood_jax.metrics.expected_calibration_error`.

  Args:
    probs: [N, K] probabilities in [0, 1]; rows need not sum to 1 (one-vs-all).
    labels: [N] integer labels in [0, K).
    num_bins: number of bins.

  Returns:
    Adaptive ECE in [0, 1] as a Python float.
  """
  num_bins = _checks.positive_int('num_bins', num_bins)
  confidence, correct = _top_label(probs, labels)
  n = confidence.size
  order = np.argsort(confidence, kind='stable')
  size, extra = divmod(n, num_bins)
  sizes = np.full(num_bins, size) + (np.arange(num_bins) < extra)
  bins = np.repeat(np.arange(num_bins), sizes)
  gap = np.bincount(bins, weights=correct[order] - confidence[order], minlength=num_bins)
  return float(np.sum(np.abs(gap)) / n)


def _equal_width_bins(values: np.ndarray, num_bins: int) -> np.ndarray:
  # The binning of ood_jax.metrics: 1.0 falls in the last bin, b / num_bins in bin b.
  return np.clip(np.floor(values * num_bins), 0, num_bins - 1).astype(np.int64)


def classwise_calibration_error(probs, labels, *, num_bins: int = 15) -> float:
  """Classwise ECE (Kull et al. 2019; "static calibration error" in Nixon et al. 2019).

  classwise-ECE = (1 / K) Σ_k Σ_b (n_bk / N) |freq_bk − conf_bk|, where for each class k every
  example's p_ik is binned into equal-width bins (bin = clip(floor(p · num_bins), 0, num_bins − 1),
  as the top-label ECE), freq_bk is the fraction of bin b's examples with label k and conf_bk their
  mean p_ik.

  Args:
    probs: [N, K] probabilities in [0, 1]; rows need not sum to 1 (one-vs-all).
    labels: [N] integer labels in [0, K).
    num_bins: number of equal-width bins on [0, 1].

  Returns:
    Classwise ECE in [0, 1] as a Python float.
  """
  num_bins = _checks.positive_int('num_bins', num_bins)
  p, y = _probs_and_labels(probs, labels, normalized=False)
  n, k = p.shape
  target = (y[:, None] == np.arange(k)).astype(np.float64)
  cell = np.arange(k) * num_bins + _equal_width_bins(p, num_bins)  # [N, K] → (class, bin) cell
  gap = np.bincount(cell.ravel(), weights=(target - p).ravel(), minlength=k * num_bins)
  return float(np.sum(np.abs(gap)) / (n * k))


def maximum_calibration_error(probs, labels, *, num_bins: int = 15) -> float:
  """Top-label maximum calibration error (Naeini et al. 2015; Guo et al. 2017).

  MCE = max_b |acc_b − conf_b| over non-empty equal-width bins, binned exactly as
  `ood_jax.metrics.expected_calibration_error`.

  Args:
    probs: [N, K] probabilities in [0, 1]; rows need not sum to 1 (one-vs-all).
    labels: [N] integer labels in [0, K).
    num_bins: number of equal-width bins on [0, 1].

  Returns:
    MCE in [0, 1] as a Python float.
  """
  num_bins = _checks.positive_int('num_bins', num_bins)
  confidence, correct = _top_label(probs, labels)
  bins = _equal_width_bins(confidence, num_bins)
  counts = np.bincount(bins, minlength=num_bins)
  gap = np.bincount(bins, weights=correct - confidence, minlength=num_bins)
  nonempty = counts > 0
  return float(np.max(np.abs(gap[nonempty]) / counts[nonempty]))


# ----------------------------------------------------------------------------------------------
# Selective prediction.


def _selective(probs, labels, confidence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Confidences sorted descending, their tie-averaged cumulative error counts, and the errors.

  Returns:
    sorted confidence [N], expected error count among the i most confident examples [N] (i = 1..N),
    errors [N] (1.0 where argmax ≠ label, in input order).
  """
  top, correct = _top_label(probs, labels)
  if confidence is None:
    score = top
  else:
    score = _checks.host_float64('confidence', confidence, ndim=1)
    if score.shape != top.shape:
      raise ValueError(f'confidence must have shape {top.shape} to match probs, got {score.shape}.')
  errors = 1.0 - correct
  order = np.argsort(-score, kind='stable')
  score, err = score[order], errors[order]
  n = score.size
  cum = np.cumsum(err)
  # Tied scores are one threshold: within a run of m ties holding e errors, accepting j of them is
  # credited with j·e/m errors, the expectation over a uniformly random order of the ties. So the
  # curve does not depend on the input order, and it is exact at the end of every run.
  last = np.append(score[1:] != score[:-1], True)
  run = np.concatenate([[0], np.cumsum(last)[:-1]])  # run index of each position
  ends = np.flatnonzero(last)
  starts = np.concatenate([[0], ends[:-1] + 1])
  before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
  run_errors = cum[ends] - before
  run_sizes = ends - starts + 1
  j = np.arange(n) - starts[run] + 1
  expected = before[run] + j * run_errors[run] / run_sizes[run]
  return score, expected, errors


def risk_coverage_curve(probs, labels, *, confidence=None) -> dict[str, np.ndarray]:
  """Selective risk against coverage when abstaining on the least confident examples (Geifman & El-Yaniv 2017).

  Examples are accepted in decreasing order of confidence (max_k p_k unless `confidence` is given);
  point i (i = 1..N) accepts the i most confident: coverage i / N, risk = errors among them / i,
  an error being argmax_k p_k ≠ label. Ties are handled deterministically and independently of the
  input order: within a run of tied confidences the error count grows linearly across the run (the
  expected risk under a random order of the ties), exact at the run's end, which is the point
  "accept every example with confidence ≥ that value".

  Args:
    probs: [N, K] probabilities in [0, 1]; rows need not sum to 1 (one-vs-all).
    labels: [N] integer labels in [0, K).
    confidence: optional [N] floating ranking score (higher = more confident), e.g. an OOD score;
      predictions are still argmax_k probs.

  Returns:
    Dict with 'coverage' [N] (1/N … 1), 'risk' [N] selective risks, 'threshold' [N] the confidence
    of the i-th accepted example (non-increasing), all float64. `risk.mean()` is the AURC.
  """
  score, expected, _ = _selective(probs, labels, confidence)
  count = np.arange(1, score.size + 1, dtype=np.float64)
  return {'coverage': count / score.size, 'risk': expected / count, 'threshold': score}


def aurc(probs, labels, *, confidence=None) -> float:
  """Area under the risk-coverage curve (Geifman et al. 2019), the mean selective risk over coverages i / N.

  AURC = (1 / N) Σ_{i=1}^{N} risk_i with the curve of `risk_coverage_curve` (ties averaged). This is
  the discrete definition; libraries integrating the curve with trapezoids differ by O(1 / N).

  Args:
    probs: [N, K] probabilities in [0, 1]; rows need not sum to 1 (one-vs-all).
    labels: [N] integer labels in [0, K).
    confidence: optional [N] ranking score (see `risk_coverage_curve`).

  Returns:
    AURC in [0, 1] as a Python float (lower is better).
  """
  return float(np.mean(risk_coverage_curve(probs, labels, confidence=confidence)['risk']))


def excess_aurc(probs, labels, *, confidence=None) -> float:
  """E-AURC: AURC minus the AURC of the optimal ranking of the same predictions (Geifman et al. 2019).

  The optimal ranking accepts every correct prediction first: with E errors among N,
  AURC* = (1 / N) Σ_{i=N−E+1}^{N} (i − (N − E)) / i, computed exactly (the paper's continuous
  approximation is r̂ + (1 − r̂) log(1 − r̂) with r̂ = E / N). E-AURC ≥ 0 isolates the ranking
  quality from the error rate.

  Args:
    probs: [N, K] probabilities in [0, 1]; rows need not sum to 1 (one-vs-all).
    labels: [N] integer labels in [0, K).
    confidence: optional [N] ranking score (see `risk_coverage_curve`).

  Returns:
    E-AURC as a Python float (lower is better, 0 for a perfect ranking).
  """
  score, expected, errors = _selective(probs, labels, confidence)
  n = score.size
  count = np.arange(1, n + 1, dtype=np.float64)
  n_correct = n - int(round(errors.sum()))
  optimal = np.maximum(count - n_correct, 0.0) / count
  return float(np.mean(expected / count) - np.mean(optimal))


def accuracy_at_coverage(probs, labels, *, coverage: float = 0.95, confidence=None) -> float:
  """Selective accuracy on the most confident fraction `coverage` of the examples.

  Accepts the m most confident examples, m the smallest i with i / N ≥ coverage (so at least the
  requested fraction is covered), and returns 1 − risk_m of `risk_coverage_curve`. When the cut
  falls inside a run of tied confidences this is the expected accuracy over a random order of the
  ties.

  Args:
    probs: [N, K] probabilities in [0, 1]; rows need not sum to 1 (one-vs-all).
    labels: [N] integer labels in [0, K).
    coverage: fraction in (0, 1] of examples to keep; 0.95 gives "accuracy at 95 % coverage".
    confidence: optional [N] ranking score (see `risk_coverage_curve`).

  Returns:
    Accuracy in [0, 1] as a Python float.
  """
  if isinstance(coverage, (bool, np.bool_, str)) or np.ndim(coverage) != 0:
    raise TypeError(f'coverage must be a real scalar, got {coverage!r}.')
  coverage = float(coverage)
  if not 0.0 < coverage <= 1.0:
    raise ValueError(f'coverage must lie in (0, 1], got {coverage}.')
  curve = risk_coverage_curve(probs, labels, confidence=confidence)
  # Same float expression as the curve's coverage, so coverage = i / N selects exactly i examples.
  m = int(np.argmax(curve['coverage'] >= coverage))
  return float(1.0 - curve['risk'][m])
