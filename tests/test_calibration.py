"""Tests for ood_jax.calibration against SciPy, scikit-learn, float64 NumPy loops and hand-computed values."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import special
from sklearn import isotonic
from sklearn import linear_model
from sklearn import metrics as skm

from ood_jax import calibration
from ood_jax import metrics


def _sample(seed: int, *, n: int, k: int, temperature: float, spread: float = 3.0):
  """Logits z ~ N(0, spread²) and labels drawn from softmax(z / temperature)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, k)) * spread
  p = special.softmax(z / temperature, axis=1)
  labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
  return z, labels


def _nll_at(z, labels, temperature) -> float:
  """Reference mean NLL of softmax(z / T), float64, via scipy.special.log_softmax."""
  logp = special.log_softmax(np.asarray(z, np.float64) / temperature, axis=1)
  return float(-np.mean(logp[np.arange(len(labels)), labels]))


def _onehot(labels, k):
  return np.eye(k)[np.asarray(labels)]


# ----------------------------------------------------------------------------------------------
# Temperature scaling.


@pytest.mark.parametrize('true_temperature', [2.5, 0.5])
def test_temperature_recovers_the_generating_temperature(true_temperature):
  z, labels = _sample(0, n=20000, k=10, temperature=true_temperature)
  fitted = float(calibration.fit_temperature(z, labels).temperature)
  assert fitted == pytest.approx(true_temperature, rel=0.03)


@pytest.mark.parametrize('seed, true_temperature', [(1, 2.5), (2, 1.0), (3, 0.3), (4, 7.0)])
def test_temperature_matches_scipy_bounded_minimisation(seed, true_temperature):
  z, labels = _sample(seed, n=3000, k=7, temperature=true_temperature, spread=2.0)
  ours = float(calibration.fit_temperature(z, labels).temperature)
  ref = optimize.minimize_scalar(lambda log_t: _nll_at(z, labels, np.exp(log_t)), bounds=(np.log(0.01), np.log(100.0)),
                                 method='bounded', options={'xatol': 1e-12})
  np.testing.assert_allclose(ours, np.exp(ref.x), rtol=2e-6)
  assert _nll_at(z, labels, ours) <= ref.fun + 1e-12
  # First-order optimality of the float64 reference objective at our T (central difference).
  h = 1e-5
  slope = (_nll_at(z, labels, ours * (1 + h)) - _nll_at(z, labels, ours * (1 - h))) / (2 * h)
  assert abs(slope) < 1e-6


@pytest.mark.parametrize('seed', range(6))
def test_temperature_never_worsens_validation_nll_and_keeps_accuracy(seed):
  rng = np.random.default_rng(100 + seed)
  n = int(rng.integers(2, 400))
  k = int(rng.integers(2, 12))
  z, labels = _sample(seed, n=n, k=k, temperature=float(rng.choice([0.2, 1.0, 4.0])), spread=float(rng.uniform(0.1, 8)))
  state = calibration.fit_temperature(z.astype(np.float32), labels)
  t = float(state.temperature)
  assert 0.01 <= t <= 100.0
  assert _nll_at(z.astype(np.float32), labels, t) <= _nll_at(z.astype(np.float32), labels, 1.0) + 1e-12
  probs = np.asarray(jax.jit(calibration.apply_temperature)(state, z.astype(np.float32)))
  np.testing.assert_array_equal(probs.argmax(axis=1), z.astype(np.float32).argmax(axis=1))


def test_temperature_bounds_are_reached_for_separable_and_anti_informative_logits():
  z, labels = _sample(5, n=500, k=4, temperature=1.0)
  separable = calibration.fit_temperature(z, z.argmax(axis=1))
  assert float(separable.temperature) == pytest.approx(0.01, rel=1e-6)
  inverted = calibration.fit_temperature(z, z.argmin(axis=1), min_temperature=0.1, max_temperature=50.0)
  assert float(inverted.temperature) == pytest.approx(50.0, rel=1e-6)
  # Constant rows: every T is optimal; the identity is kept.
  flat = calibration.fit_temperature(np.ones((10, 3)), np.arange(10) % 3)
  assert float(flat.temperature) == 1.0


def test_apply_temperature_matches_scipy_softmax_under_jit():
  z, labels = _sample(6, n=64, k=5, temperature=2.0)
  state = calibration.fit_temperature(z, labels)
  t = float(state.temperature)
  expected = special.softmax(z / t, axis=1)
  for fn in (calibration.apply_temperature, jax.jit(calibration.apply_temperature)):
    got = fn(state, jnp.asarray(z, jnp.float32))
    assert got.dtype == jnp.float32 and got.shape == z.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
  # Leading batch dimensions are fine.
  assert calibration.apply_temperature(state, jnp.zeros((2, 3, 5))).shape == (2, 3, 5)
  assert calibration.apply_temperature(state, jnp.zeros((2, 5), jnp.bfloat16)).dtype == jnp.float32


def test_isomax_entropic_scale_does_not_change_temperature_scaled_probabilities():
  # Distance logits z = -d; fitting on z or on 10 z spans the same family softmax(z / T).
  rng = np.random.default_rng(7)
  distances = np.abs(rng.normal(1.0, 0.3, size=(4000, 10)))
  # Labels drawn from softmax(E_s · z), E_s = 10: the distribution an IsoMax model is trained to fit.
  p = special.softmax(-10.0 * distances, axis=1)
  labels = (p.cumsum(axis=1) > rng.random((4000, 1))).argmax(axis=1)
  raw = calibration.fit_temperature(-distances, labels)
  scaled = calibration.fit_temperature(-10.0 * distances, labels)
  np.testing.assert_allclose(float(scaled.temperature), 10.0 * float(raw.temperature), rtol=1e-5)
  np.testing.assert_allclose(calibration.apply_temperature(raw, -distances),
                             calibration.apply_temperature(scaled, -10.0 * distances), atol=1e-5)
  assert float(raw.temperature) == pytest.approx(0.1, rel=0.1)
  # Raw IsoMax softmax is far less confident than the accuracy; calibrated it is close.
  raw_probs = special.softmax(-distances, axis=1)
  ece_raw = metrics.expected_calibration_error(raw_probs, labels)
  ece_ts = metrics.expected_calibration_error(np.asarray(calibration.apply_temperature(raw, -distances)), labels)
  assert ece_raw > 0.4 and ece_ts < 0.05


# ----------------------------------------------------------------------------------------------
# Vector scaling.


def _vector_reference(z, labels, l2=0.0):
  """Vector scaling by scipy.optimize.minimize (BFGS, analytic gradient), float64."""
  n, k = z.shape
  onehot = _onehot(labels, k)

  def objective(theta):
    w, b = theta[:k], theta[k:]
    s = z * w + b
    logp = special.log_softmax(s, axis=1)
    value = -np.sum(onehot * logp) / n + 0.5 * l2 * (np.sum((w - 1) ** 2) + np.sum(b ** 2))
    r = np.exp(logp) - onehot
    grad = np.concatenate([(r * z).sum(0) / n + l2 * (w - 1), r.sum(0) / n + l2 * b])
    return value, grad

  res = optimize.minimize(objective, np.concatenate([np.ones(k), np.zeros(k)]), jac=True, method='BFGS',
                          options={'gtol': 1e-11, 'maxiter': 10000})
  return res.x[:k], res.x[k:] - res.x[k:].mean(), res.fun


@pytest.mark.parametrize('l2', [0.0, 0.05])
def test_vector_scaling_matches_scipy_and_reduces_nll(l2):
  rng = np.random.default_rng(8)
  z, labels = _sample(8, n=3000, k=5, temperature=1.0)
  z = z * np.array([0.3, 1.0, 2.0, 0.7, 1.5]) + np.array([1.0, -0.5, 0.0, 0.2, 0.0])  # miscalibrate per class
  z = z + rng.normal(size=(z.shape[0], 1))  # row shifts change nothing
  state = calibration.fit_vector_scaling(z, labels, l2=l2)
  w_ref, b_ref, value_ref = _vector_reference(z, labels, l2=l2)
  np.testing.assert_allclose(np.asarray(state.scale), w_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(state.bias), b_ref, atol=1e-4)
  probs = np.asarray(jax.jit(calibration.apply_vector_scaling)(state, z), np.float64)
  assert abs(np.mean(np.asarray(state.bias))) < 1e-6
  ours = skm.log_loss(labels, probs / probs.sum(1, keepdims=True), labels=range(5))
  uncalibrated = skm.log_loss(labels, special.softmax(z, axis=1), labels=range(5))
  assert ours < uncalibrated - 0.05
  if l2 == 0.0:
    assert ours == pytest.approx(value_ref, rel=1e-5)


def test_vector_scaling_never_worse_than_identity_on_small_or_separable_data():
  z, _ = _sample(9, n=40, k=3, temperature=1.0)
  labels = z.argmax(axis=1)  # separable: the NLL decreases without bound
  state = calibration.fit_vector_scaling(z, labels, max_iterations=20)
  probs = np.asarray(calibration.apply_vector_scaling(state, z), np.float64)
  assert np.all(np.isfinite(probs))
  assert skm.log_loss(labels, probs / probs.sum(1, keepdims=True)) <= _nll_at(z, labels, 1.0)


# ----------------------------------------------------------------------------------------------
# Per-class Platt scaling.


def test_platt_matches_sklearn_logistic_regression_per_class():
  rng = np.random.default_rng(10)
  n, k = 2000, 4
  labels = rng.integers(0, k, n)
  # One-vs-all logits: informative but miscalibrated per class.
  z = rng.normal(size=(n, k)) + 2.5 * _onehot(labels, k) * np.array([1.0, 0.5, 2.0, 1.5]) - 1.0
  state = calibration.fit_platt(z, labels)
  for c in range(k):
    ref = linear_model.LogisticRegression(C=1e12, tol=1e-12, max_iter=100000).fit(z[:, c:c + 1], labels == c)
    np.testing.assert_allclose(float(state.slope[c]), ref.coef_[0, 0], rtol=1e-4)
    np.testing.assert_allclose(float(state.intercept[c]), ref.intercept_[0], rtol=1e-4, atol=1e-5)
  expected = special.expit(z * np.asarray(state.slope) + np.asarray(state.intercept))
  for fn in (calibration.apply_platt, jax.jit(calibration.apply_platt, static_argnames='normalize')):
    np.testing.assert_allclose(np.asarray(fn(state, z)), expected, rtol=1e-5, atol=1e-7)
    normalised = np.asarray(fn(state, z, normalize=True))
    np.testing.assert_allclose(normalised, expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_platt_smoothed_targets_match_scipy_and_stay_finite_when_separable():
  rng = np.random.default_rng(11)
  n, k = 300, 3
  labels = rng.integers(0, k, n)
  z = 4.0 * _onehot(labels, k) - 2.0 + 0.1 * rng.normal(size=(n, k))  # perfectly separable
  state = calibration.fit_platt(z, labels, smoothed_targets=True)
  for c in range(k):
    positive = labels == c
    n_pos = positive.sum()
    t = np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n - n_pos + 2))

    def bce(theta, c=c, t=t):
      u = theta[0] * z[:, c] + theta[1]
      return np.mean(np.logaddexp(0, u) - t * u)

    ref = optimize.minimize(bce, [0.0, 0.0], method='Nelder-Mead', options={'xatol': 1e-10, 'fatol': 1e-14,
                                                                          'maxiter': 20000})
    np.testing.assert_allclose([float(state.slope[c]), float(state.intercept[c])], ref.x, rtol=1e-5, atol=1e-6)
    assert bce([float(state.slope[c]), float(state.intercept[c])]) <= ref.fun + 1e-12


def test_platt_never_worse_than_the_models_own_sigmoid():
  # σ(z) is calibrated by construction, far from Platt's start a = 0: a fit stopped after a few
  # Newton steps is worse than the identity and must fall back to it.
  rng = np.random.default_rng(12)
  u = rng.normal(size=2000) * 6.0
  labels = (rng.random(2000) > special.expit(u)).astype(int)  # P(y = 0) = σ(u)
  z = np.stack([u, -u], axis=1)
  t = _onehot(labels, 2)

  def per_class_nll(a, b):
    q = special.expit(z * a + b)
    return -np.mean(t * np.log(q) + (1 - t) * np.log1p(-q), axis=0)

  identity = per_class_nll(np.ones(2), np.zeros(2))
  early = calibration.fit_platt(z, labels, max_iterations=1)
  np.testing.assert_array_equal(np.asarray(early.slope), [1.0, 1.0])
  np.testing.assert_array_equal(np.asarray(early.intercept), [0.0, 0.0])
  converged = calibration.fit_platt(z, labels)
  assert np.all(per_class_nll(np.asarray(converged.slope), np.asarray(converged.intercept)) <= identity)
  np.testing.assert_allclose(np.asarray(converged.slope), 1.0, atol=0.05)


# ----------------------------------------------------------------------------------------------
# Per-class isotonic regression.


@pytest.mark.parametrize('rounding', [None, 2])
def test_isotonic_matches_sklearn_per_class(rounding):
  rng = np.random.default_rng(13)
  z, labels = _sample(13, n=800, k=3, temperature=0.6)
  probs = special.softmax(z, axis=1)
  if rounding is not None:
    probs = np.round(probs, rounding)  # heavy ties
  state = calibration.fit_isotonic(probs, labels)
  test = np.concatenate([probs[:50], rng.random((50, 3)), np.array([[0.0, 0.5, 1.0]])])
  raw = np.asarray(jax.jit(calibration.apply_isotonic, static_argnames='normalize')(state, test, normalize=False))
  for c in range(3):
    ref = isotonic.IsotonicRegression(out_of_bounds='clip').fit(probs[:, c], labels == c)
    np.testing.assert_allclose(raw[:, c], ref.predict(test[:, c]), atol=2e-6)
  normalised = np.asarray(calibration.apply_isotonic(state, test))
  np.testing.assert_allclose(normalised.sum(axis=1), 1.0, rtol=1e-6)


def test_isotonic_degenerate_classes_and_padding():
  # Class 2 never occurs (all-zero map), class 0 has one distinct input: padding and zero rows.
  probs = np.array([[0.5, 0.2, 0.3], [0.5, 0.7, 0.3], [0.5, 0.1, 0.4], [0.5, 0.9, 0.1]])
  labels = np.array([0, 1, 0, 1])
  state = calibration.fit_isotonic(probs, labels)
  q = np.asarray(calibration.apply_isotonic(state, probs, normalize=False))
  np.testing.assert_allclose(q[:, 0], 0.5)
  np.testing.assert_allclose(q[:, 1], [0.0, 1.0, 0.0, 1.0])
  np.testing.assert_allclose(q[:, 2], 0.0)
  np.testing.assert_allclose(np.asarray(calibration.apply_isotonic(state, np.array([[0.5, 0.1, 0.2]]))),
                             [[1.0, 0.0, 0.0]])
  # A row that every class maps to 0 becomes uniform when normalised.
  both = calibration.fit_isotonic(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]))
  np.testing.assert_allclose(np.asarray(calibration.apply_isotonic(both, np.array([[0.1, 0.05]]))), [[0.5, 0.5]])


# ----------------------------------------------------------------------------------------------
# Brier score and NLL.


def test_brier_hand_computed_and_binary_sklearn():
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
  # (0.3² + 0.2² + 0.1²) + (0.1² + 0.7² + 0.6²) = 0.14 + 0.86
  assert calibration.brier_score(probs, [0, 1]) == pytest.approx(0.5, abs=1e-15)
  assert calibration.brier_score(np.eye(3), [0, 1, 2]) == 0.0
  assert calibration.brier_score(np.eye(3), [1, 2, 0]) == 2.0
  rng = np.random.default_rng(14)
  p1 = rng.random(200)
  y = (rng.random(200) < p1).astype(int)
  two = np.stack([1 - p1, p1], axis=1)
  assert calibration.brier_score(two, y) == pytest.approx(2 * skm.brier_score_loss(y, p1), rel=1e-12)


def test_brier_and_nll_match_float64_loops_and_sklearn():
  rng = np.random.default_rng(15)
  probs = rng.dirichlet(np.ones(6), size=300).astype(np.float32)
  labels = rng.integers(0, 6, 300)
  loop = 0.0
  for row, label in zip(probs.astype(np.float64), labels):
    loop += sum((row[c] - (c == label)) ** 2 for c in range(6))
  assert calibration.brier_score(probs, labels) == pytest.approx(loop / 300, rel=1e-12)
  p64 = probs.astype(np.float64)
  assert calibration.negative_log_likelihood(probs, labels) == pytest.approx(
      -np.mean(np.log(p64[np.arange(300), labels])), rel=1e-12)
  assert calibration.negative_log_likelihood(probs, labels) == pytest.approx(
      skm.log_loss(labels, p64 / p64.sum(1, keepdims=True), labels=range(6)), rel=1e-5)
  # An underflowed true-class probability is clipped, not inf.
  assert calibration.negative_log_likelihood(np.array([[1.0, 0.0]]), [1]) == pytest.approx(-np.log(1e-300))


# ----------------------------------------------------------------------------------------------
# ECE variants.


def test_adaptive_ece_hand_computed():
  # Confidences (top-label) with correctness; sorted ascending: .55(1) .6(0) | .7(1) .8(0) | .9(1) .95(1).
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.55, 0.45], [0.05, 0.95]])
  labels = np.array([0, 0, 0, 1, 1, 1])
  # correct: .9 yes, .8 no, .7 yes, .6 yes, .55 no, .95 yes  → sorted: .55(0) .6(1) | .7(1) .8(0) | .9(1) .95(1)
  expected = (2 * abs(0.5 - 0.575) + 2 * abs(0.5 - 0.75) + 2 * abs(1.0 - 0.925)) / 6
  assert calibration.adaptive_calibration_error(probs, labels, num_bins=3) == pytest.approx(expected, abs=1e-15)
  # N = 6, 4 bins: sizes 2, 2, 1, 1.
  expected4 = (2 * abs(0.5 - 0.575) + 2 * abs(0.5 - 0.75) + abs(1 - 0.9) + abs(1 - 0.95)) / 6
  assert calibration.adaptive_calibration_error(probs, labels, num_bins=4) == pytest.approx(expected4, abs=1e-15)
  # One bin: |accuracy − mean confidence|; more bins than examples: one example per bin.
  conf = probs.max(1)
  correct = (probs.argmax(1) == labels)
  assert calibration.adaptive_calibration_error(probs, labels, num_bins=1) == pytest.approx(
      abs(correct.mean() - conf.mean()), abs=1e-15)
  assert calibration.adaptive_calibration_error(probs, labels, num_bins=50) == pytest.approx(
      np.mean(np.abs(correct - conf)), abs=1e-15)


@pytest.mark.parametrize('seed, num_bins', [(0, 15), (1, 7), (2, 10)])
def test_adaptive_ece_matches_numpy_loop(seed, num_bins):
  rng = np.random.default_rng(seed)
  n = 1003
  probs = rng.dirichlet(np.ones(4) * 0.5, size=n)
  labels = rng.integers(0, 4, n)
  conf = probs.max(1)
  correct = probs.argmax(1) == labels
  order = sorted(range(n), key=lambda i: conf[i])
  total = 0.0
  for chunk in np.array_split(np.array(order), num_bins):
    total += len(chunk) / n * abs(np.mean(correct[chunk]) - np.mean(conf[chunk]))
  assert calibration.adaptive_calibration_error(probs, labels, num_bins=num_bins) == pytest.approx(total, rel=1e-12)


def test_classwise_ece_and_mce_hand_computed():
  probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
  labels = np.array([0, 1, 1, 1])
  # 2 bins [0, .5), [.5, 1]. Class 0: bin1 {.9(y=1), .6(0)} → 2·|.5 − .75|; bin0 {.3(0), .2(0)} → 2·|0 − .25|.
  # Class 1: bin0 {.1(0), .4(1)} → 2·|.5 − .25|; bin1 {.7(1), .8(1)} → 2·|1 − .75|.
  expected = ((0.5 + 0.5) / 4 + (0.5 + 0.5) / 4) / 2
  assert calibration.classwise_calibration_error(probs, labels, num_bins=2) == pytest.approx(expected, abs=1e-15)
  # MCE, top-label, 2 bins: all confidences ≥ .5 → one bin: acc 3/4, conf (.9 + .6 + .7 + .8)/4 = .75.
  assert calibration.maximum_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.0, abs=1e-15)
  # 10 bins: {.9: correct} |1 − .9|, {.6: wrong} |0 − .6|, {.7} |1 − .7|, {.8} |1 − .8| → max .6.
  assert calibration.maximum_calibration_error(probs, labels, num_bins=10) == pytest.approx(0.6, abs=1e-15)


@pytest.mark.parametrize('seed', range(3))
def test_classwise_ece_and_mce_match_loops_and_metrics(seed):
  rng = np.random.default_rng(20 + seed)
  n, k, num_bins = 500, 5, 15
  probs = rng.dirichlet(np.ones(k), size=n)
  probs[:5] = np.eye(k)  # confidence exactly 1 lands in the last bin
  labels = rng.integers(0, k, n)
  total = 0.0
  for c in range(k):
    for b in range(num_bins):
      lo, hi = b / num_bins, (b + 1) / num_bins
      members = [i for i in range(n) if lo <= probs[i, c] < hi or (b == num_bins - 1 and probs[i, c] == 1.0)]
      if members:
        total += len(members) / n * abs(np.mean(labels[members] == c) - np.mean(probs[members, c]))
  got = calibration.classwise_calibration_error(probs, labels, num_bins=num_bins)
  assert got == pytest.approx(total / k, rel=1e-10)
  diagram = metrics.reliability_diagram(probs, labels, num_bins=num_bins)
  nonempty = diagram['counts'] > 0
  mce = np.max(np.abs(diagram['accuracy'] - diagram['confidence'])[nonempty])
  assert calibration.maximum_calibration_error(probs, labels, num_bins=num_bins) == pytest.approx(mce, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Selective prediction.


def _aurc_loop(conf, correct) -> tuple[float, list[float]]:
  """Per-example AURC in float64 for a given order (no ties): accept the i most confident."""
  order = sorted(range(len(conf)), key=lambda i: -conf[i])
  risks = [sum(1 - correct[j] for j in order[:i]) / i for i in range(1, len(conf) + 1)]
  return float(np.mean(risks)), risks


def test_aurc_and_eaurc_hand_computed():
  # Confidences .9, .8, .7, .6 with correctness 1, 0, 1, 0 (labels chosen so argmax matches).
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
  labels = np.array([0, 1, 1, 0])
  curve = calibration.risk_coverage_curve(probs, labels)
  np.testing.assert_allclose(curve['coverage'], [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(curve['risk'], [0.0, 0.5, 1 / 3, 0.5])
  np.testing.assert_allclose(curve['threshold'], [0.9, 0.8, 0.7, 0.6])
  assert calibration.aurc(probs, labels) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4, abs=1e-15)
  optimal = (1 / 3 + 2 / 4) / 4
  assert calibration.excess_aurc(probs, labels) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4 - optimal, abs=1e-15)
  # Perfect ranking: E-AURC = 0; accuracy at full coverage = accuracy.
  good = calibration.excess_aurc(probs, labels, confidence=np.array([4.0, 1.0, 3.0, 2.0]))
  assert good == pytest.approx(0.0, abs=1e-15)
  assert calibration.accuracy_at_coverage(probs, labels, coverage=1.0) == 0.5
  assert calibration.accuracy_at_coverage(probs, labels, coverage=0.5) == 0.5
  assert calibration.accuracy_at_coverage(probs, labels, coverage=0.25) == 1.0
  assert calibration.accuracy_at_coverage(probs, labels, coverage=0.3) == 0.5  # needs 2 of 4


@pytest.mark.parametrize('seed', range(3))
def test_aurc_matches_float64_loop_without_ties(seed):
  rng = np.random.default_rng(30 + seed)
  n = 200
  probs = rng.dirichlet(np.ones(5), size=n)
  labels = np.where(rng.random(n) < 0.7, probs.argmax(1), rng.integers(0, 5, n))
  conf = probs.max(1)
  correct = (probs.argmax(1) == labels).astype(float)
  ref, risks = _aurc_loop(conf, correct)
  assert calibration.aurc(probs, labels) == pytest.approx(ref, rel=1e-12)
  np.testing.assert_allclose(calibration.risk_coverage_curve(probs, labels)['risk'], risks, rtol=1e-12)
  errors = int(n - correct.sum())
  optimal = np.mean([max(0, i - (n - errors)) / i for i in range(1, n + 1)])
  assert calibration.excess_aurc(probs, labels) == pytest.approx(ref - optimal, rel=1e-10, abs=1e-15)
  m = int(np.ceil(0.95 * n))
  assert calibration.accuracy_at_coverage(probs, labels) == pytest.approx(1 - risks[m - 1], rel=1e-12)
  permutation = rng.permutation(n)
  assert calibration.aurc(probs[permutation], labels[permutation]) == pytest.approx(ref, rel=1e-12)


def test_aurc_ties_equal_the_average_over_all_tie_orders():
  # Confidences with two tie runs; the reference enumerates every order of the tied examples.
  conf = np.array([0.9, 0.7, 0.7, 0.7, 0.5, 0.5])
  correct = np.array([1, 0, 1, 1, 0, 1])
  probs = np.stack([conf, 1 - conf], axis=1)
  labels = np.where(correct == 1, 0, 1)
  runs = [[0], [1, 2, 3], [4, 5]]
  curves = []
  for orders in itertools.product(*(itertools.permutations(r) for r in runs)):
    ranked = [i for run in orders for i in run]
    curves.append([np.sum(1 - correct[ranked[:i]]) / i for i in range(1, 7)])
  expected = np.mean(curves, axis=0)
  curve = calibration.risk_coverage_curve(probs, labels)
  np.testing.assert_allclose(curve['risk'], expected, rtol=1e-12)
  assert calibration.aurc(probs, labels) == pytest.approx(expected.mean(), rel=1e-12)
  for permutation in ([5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3]):
    assert calibration.aurc(probs[permutation], labels[permutation]) == pytest.approx(expected.mean(), rel=1e-12)
  # 50 % → 3 examples: the 0.9 one and 2 of the 3 tied at 0.7 (1 error among them): 2/3 expected errors.
  assert calibration.accuracy_at_coverage(probs, labels, coverage=0.5) == pytest.approx(1 - (2 / 3) / 3, rel=1e-12)


def test_accuracy_at_95_percent_coverage_counts_exactly():
  n = 100
  conf = np.linspace(0.99, 0.5, n)
  correct = np.ones(n, dtype=int)
  correct[95:] = 0  # the 5 least confident are wrong
  correct[10] = 0
  probs = np.stack([conf, 1 - conf], axis=1)
  labels = np.where(correct == 1, 0, 1)
  assert calibration.accuracy_at_coverage(probs, labels) == pytest.approx(94 / 95, abs=1e-15)
  assert calibration.accuracy_at_coverage(probs, labels, coverage=0.96) == pytest.approx(94 / 96, abs=1e-15)


# ----------------------------------------------------------------------------------------------
# Inputs.


def test_metrics_accept_jax_arrays_and_low_precision():
  rng = np.random.default_rng(40)
  probs = rng.dirichlet(np.ones(4), size=100)
  labels = rng.integers(0, 4, 100)
  low = jnp.asarray(probs, jnp.bfloat16)
  cast = np.asarray(low, np.float64)
  assert calibration.brier_score(low, jnp.asarray(labels)) == pytest.approx(
      calibration.brier_score(cast / cast.sum(1, keepdims=True), labels), abs=0.05)
  assert calibration.aurc(low, labels) == pytest.approx(calibration.aurc(cast, labels), abs=1e-12)


def _tracer_call(fn, *args):
  out = []
  jax.jit(lambda *a: out.append(fn(*a)) or 0.0)(*args)


BAD = [
    (calibration.brier_score, dict(probs=np.full((2, 3), 0.5), labels=[0, 1]), ValueError, 'sum to 1'),
    (calibration.negative_log_likelihood, dict(probs=np.full((2, 2), 0.4), labels=[0, 1]), ValueError, 'sum to 1'),
    (calibration.brier_score, dict(probs=np.ones(3) / 3, labels=[0]), ValueError, 'probs must have rank 2'),
    (calibration.brier_score, dict(probs=np.zeros((0, 3)), labels=np.zeros(0, int)), ValueError, 'probs is empty'),
    (calibration.brier_score, dict(probs=np.eye(3), labels=[0, 1, 3]), ValueError, r'labels must lie in \[0, 3\)'),
    (calibration.brier_score, dict(probs=np.eye(3), labels=[0, 1]), ValueError, r'labels must have shape \(3,\)'),
    (calibration.brier_score, dict(probs=np.eye(3), labels=[0.0, 1.0, 2.0]), TypeError, 'labels must have an integer'),
    (calibration.aurc, dict(probs=np.eye(2, dtype=bool), labels=[0, 1]), TypeError, 'probs must have a floating'),
    (calibration.aurc, dict(probs=np.eye(2) * 2, labels=[0, 1]), ValueError, r'probs must lie in \[0, 1\]'),
    (calibration.aurc, dict(probs=np.array([[np.nan, 1.0]]), labels=[0]), ValueError, 'probs contains NaN'),
    (calibration.aurc, dict(probs=np.eye(2), labels=[0, 1], confidence=np.ones(3)), ValueError, 'confidence'),
    (calibration.accuracy_at_coverage, dict(probs=np.eye(2), labels=[0, 1], coverage=0.0), ValueError, 'coverage'),
    (calibration.accuracy_at_coverage, dict(probs=np.eye(2), labels=[0, 1], coverage='1'), TypeError, 'coverage'),
    (calibration.adaptive_calibration_error, dict(probs=np.eye(2), labels=[0, 1], num_bins=0), ValueError,
     'num_bins'),
    (calibration.classwise_calibration_error, dict(probs=np.eye(2), labels=[0, 1], num_bins=2.0), TypeError,
     'num_bins'),
    (calibration.fit_temperature, dict(logits=np.zeros((0, 3)), labels=np.zeros(0, int)), ValueError,
     'logits is empty'),
    (calibration.fit_temperature, dict(logits=np.array([[0.0, np.inf]]), labels=[0]), ValueError,
     'logits contains inf'),
    (calibration.fit_temperature, dict(logits=np.array([[0.0, np.nan]]), labels=[0]), ValueError,
     'logits contains NaN'),
    (calibration.fit_temperature, dict(logits=np.zeros((2, 1)), labels=[0, 0]), ValueError, 'at least 2 classes'),
    (calibration.fit_temperature, dict(logits=np.zeros((2, 2), int), labels=[0, 0]), TypeError,
     'logits must have a floating'),
    (calibration.fit_temperature, dict(logits=np.zeros((2, 2)), labels=[0, 2]), ValueError, 'labels must lie'),
    (calibration.fit_temperature, dict(logits=np.zeros((2, 2)), labels=[0, 1], min_temperature=2.0,
                                       max_temperature=1.0), ValueError, 'min_temperature must be <'),
    (calibration.fit_temperature, dict(logits=np.zeros((2, 2)), labels=[0, 1], min_temperature=0.0), ValueError,
     'min_temperature'),
    (calibration.fit_vector_scaling, dict(logits=np.zeros((2, 2)), labels=[0, 1], l2=-1.0), ValueError, 'l2'),
    (calibration.fit_vector_scaling, dict(logits=np.zeros(2), labels=[0, 1]), ValueError, 'logits must have rank 2'),
    (calibration.fit_platt, dict(logits=np.zeros((2, 2)), labels=[0, 1], smoothed_targets=1), TypeError,
     'smoothed_targets'),
    (calibration.fit_isotonic, dict(probs=np.zeros((2, 0)), labels=[0, 0]), ValueError, 'no classes'),
]


@pytest.mark.parametrize('fn, kwargs, error, match', BAD)
def test_bad_inputs_raise_naming_the_argument(fn, kwargs, error, match):
  with pytest.raises(error, match=match):
    fn(**kwargs)


def test_apply_errors_and_tracers():
  state = calibration.fit_temperature(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [0, 1, 1])
  with pytest.raises(ValueError, match='logits contains NaN or inf'):
    calibration.apply_temperature(state, np.array([[np.inf, 0.0]]))
  with pytest.raises(TypeError, match='logits must have a floating'):
    calibration.apply_temperature(state, np.array([[1, 0]]))
  vector = calibration.fit_vector_scaling(np.eye(3), [0, 1, 2], max_iterations=2)
  with pytest.raises(ValueError, match=r'shape \[\.\.\., 3\]'):
    calibration.apply_vector_scaling(vector, np.zeros((2, 4)))
  with pytest.raises(ValueError, match='one length'):
    calibration.apply_platt(calibration.PlattState(jnp.ones(3), jnp.zeros(2)), np.zeros((1, 3)))
  with pytest.raises(TypeError, match='normalize'):
    calibration.apply_isotonic(calibration.fit_isotonic(np.eye(2), [0, 1]), np.eye(2), normalize=None)
  with pytest.raises(TypeError, match='tracer'):
    _tracer_call(calibration.fit_temperature, jnp.zeros((2, 2)), jnp.array([0, 1]))
  with pytest.raises(TypeError, match='tracer'):
    _tracer_call(calibration.brier_score, jnp.eye(2), jnp.array([0, 1]))
  # States are pytrees: they pass through jit as arguments.
  leaves = jax.tree_util.tree_leaves(vector)
  assert len(leaves) == 2
