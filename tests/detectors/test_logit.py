"""Tests for ood_jax.detectors.logit against float64 NumPy / SciPy references written from the papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import special
from scipy import stats

from ood_jax import calibration
from ood_jax import detectors
from ood_jax import scores
from ood_jax.detectors import logit


def _softmax(z):
  return special.softmax(np.asarray(z, np.float64), axis=-1)


def _problem(seed=0, n=40, k=6, scale=3.0):
  rng = np.random.default_rng(seed)
  z = scale * rng.standard_normal((n, k))
  labels = np.argmax(z + 2.0 * rng.standard_normal((n, k)), axis=1)
  return z.astype(np.float32), labels


def _batches(z, labels, size=16):
  return [{'logits': z[i:i + size], 'labels': labels[i:i + size]} for i in range(0, len(z), size)]


def _ref_gen(z, gamma, m):
  p = np.sort(_softmax(z), axis=-1)[:, ::-1][:, :m]
  return -np.sum(p ** gamma * (1 - p) ** gamma, axis=-1)


@pytest.mark.parametrize('name,ref', [
    ('msp', lambda z: _softmax(z).max(-1)),
    ('max_logit', lambda z: z.max(-1)),
    ('energy', lambda z: special.logsumexp(z, axis=-1)),
    ('entropy', lambda z: np.sum(special.xlogy(_softmax(z), _softmax(z)), axis=-1)),
    ('gen', lambda z: _ref_gen(z, 0.1, 6)),
])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_logit_detectors_match_reference(name, ref, dtype):
  z, _ = _problem()
  logits = jnp.asarray(z, dtype)
  det = detectors.get(name)
  state = det.fit()
  out = jax.jit(lambda s, z: det.score(s, {'logits': z}))(state, logits)
  assert out.shape == (40,) and out.dtype == jnp.float32
  exact = np.asarray(logits.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(out, ref(exact), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('gamma,top_m', [(0.5, 3), (2.0, 100)])
def test_gen_hyperparameters(gamma, top_m):
  z, _ = _problem(seed=1)
  out = jax.jit(lambda z: logit.gen(z, gamma=gamma, top_m=top_m))(z)
  np.testing.assert_allclose(out, _ref_gen(z.astype(np.float64), gamma, min(top_m, 6)), rtol=1e-5, atol=1e-6)
  # One-hot predictions (p = 1 and p = 0 entries) have zero generalised entropy, not NaN.
  sharp = logit.gen(jnp.asarray([[1e4, -1e4, -1e4]]), gamma=gamma, top_m=top_m)
  np.testing.assert_allclose(sharp, [0.0], atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gen_keeps_the_top_class_term_of_confident_predictions(dtype):
  """1 − p_(1) below float32's resolution at 1 (4e-8 for [30, 13, 0, …]) must not round the top term away."""
  z = np.zeros((4, 10), np.float32)
  z[0, :2] = [30, 13]  # the paper's equation in float64 gives −0.764; 1 − p rounded to 0 gave −0.581
  z[1, :3] = [40, 20, 5]
  z[2, :2] = [20, 18]
  z[3] = np.linspace(-3, 3, 10)
  logits = jnp.asarray(z, dtype)
  exact = np.asarray(logits.astype(jnp.float32), np.float64)
  p = np.sort(_softmax(exact), axis=-1)[:, ::-1]
  # 1 − p_j as the sum of the other probabilities: no cancellation, so exact in float64 however confident.
  rest = np.stack([np.delete(p, j, axis=1).sum(axis=1) for j in range(10)], axis=1)
  ref = -np.sum(p ** 0.1 * rest ** 0.1, axis=-1)
  out = jax.jit(lambda z: detectors.get('gen').score((), {'logits': z}))(logits)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  np.testing.assert_allclose(out[0], -0.764, atol=1e-3)
  np.testing.assert_allclose(out, _ref_gen(exact, 0.1, 10), rtol=1e-5)  # the equation as written, float64


def test_energy_temperature():
  z, _ = _problem(seed=2)
  out = detectors.get('energy').score((), {'logits': z}, temperature=3.0)
  np.testing.assert_allclose(out, 3.0 * special.logsumexp(z.astype(np.float64) / 3.0, axis=-1), rtol=1e-6)


def test_temperature_scaling_matches_scipy_minimiser():
  z, labels = _problem(seed=3, n=300, k=5, scale=4.0)  # Overconfident: the optimum is T > 1.
  z64 = z.astype(np.float64)

  def nll(t):
    log_p = z64 / t - special.logsumexp(z64 / t, axis=1, keepdims=True)
    return -np.sum(log_p[np.arange(len(z64)), labels])

  best = optimize.minimize_scalar(nll, bounds=(0.05, 20.0), method='bounded', options={'xatol': 1e-8}).x
  det = detectors.get('temperature_msp')
  state = det.fit(_batches(z, labels, size=64), num_classes=5)
  assert best > 1.2
  np.testing.assert_allclose(float(state.temperature), best, rtol=3e-3)
  # One temperature fit in the library: the calibrator's, on the gathered logits.
  assert isinstance(state, calibration.TemperatureState)
  assert float(state.temperature) == float(calibration.fit_temperature(z, labels).temperature)
  out = jax.jit(lambda s, z: det.score(s, {'logits': z}))(state, z)
  t = float(state.temperature)
  np.testing.assert_allclose(out, _softmax(z64 / t).max(-1), rtol=1e-5)
  # From features and the head, or a one-shot iterator (the fit is one pass): the same fit.
  rng = np.random.default_rng(7)
  h = rng.standard_normal((300, 3)).astype(np.float32)
  w, b = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
  noisy = np.argmax(h @ w + b + rng.standard_normal((300, 5)), axis=1)
  from_head = det.fit([{'features': h, 'labels': noisy}], head=(w, b))
  want = calibration.fit_temperature(h.astype(np.float64) @ w + b, noisy)
  np.testing.assert_allclose(float(from_head.temperature), float(want.temperature), rtol=1e-6)
  assert float(det.fit(iter(_batches(z, labels))).temperature) == float(state.temperature)


def test_temperature_bounds_are_hyperparameters_and_a_separable_set_warns():
  det = detectors.get('temperature_msp')
  assert det.defaults == {'min_temperature': 0.01, 'max_temperature': 100.0}
  assert det.fit_params == ('min_temperature', 'max_temperature')
  z, labels = _problem(seed=8, n=50, k=3)
  separable = [{'logits': z, 'labels': np.argmax(z, axis=1)}]  # every example right, by a margin
  with pytest.warns(UserWarning, match='separated.*bound 0.05'):
    state = det.fit(separable, min_temperature=0.05)
  assert float(state.temperature) == pytest.approx(0.05)
  # Probabilities still rank like MSP at the bound: the score is temperature-scaled MSP, not NaN.
  assert np.all(np.isfinite(np.asarray(det.score(state, {'logits': z}))))
  with pytest.raises(ValueError, match='min_temperature'):
    det.fit(separable, min_temperature=2.0, max_temperature=1.0)


def _ref_kl_matching(fit_z, z, k):
  p_fit = _softmax(fit_z)
  pred = p_fit.argmax(1)
  templates = np.stack([p_fit[pred == c].mean(0) if np.any(pred == c) else np.eye(k)[c] for c in range(k)])
  p = _softmax(z)
  tiny = np.finfo(np.float32).tiny
  return np.array([-min(stats.entropy(pi, np.maximum(t, tiny)) for t in templates) for pi in p])


def test_kl_matching_matches_reference():
  fit_z, labels = _problem(seed=4, n=200, k=4)
  z, _ = _problem(seed=5, n=30, k=4)
  det = detectors.get('kl_matching')
  state = det.fit(_batches(fit_z, labels, size=37), num_classes=4)
  out = jax.jit(lambda s, z: det.score(s, {'logits': z}))(state, z)
  np.testing.assert_allclose(out, _ref_kl_matching(fit_z.astype(np.float64), z.astype(np.float64), 4),
                             rtol=2e-5, atol=2e-6)
  # A template's own mean softmax is at KL 0 from itself: the maximum score.
  template = np.exp(np.asarray(state.log_templates[0], np.float64))
  assert float(logit.kl_matching(state, jnp.log(jnp.asarray(template[None], jnp.float32)))[0]) > -1e-5


def test_kl_matching_empty_class_and_labels():
  z = np.array([[5.0, 0.0, 0.0], [4.0, 1.0, 0.0], [0.0, 3.0, 0.0]], np.float32)
  labels = np.array([0, 2, 1])
  state = logit.fit_kl_matching([{'logits': z, 'labels': labels}], num_classes=3)
  # Class 2 is never predicted: its template is one-hot, so only a confident class-2 prediction matches.
  np.testing.assert_allclose(np.exp(state.log_templates[2]), [0, 0, 1], atol=1e-30)
  assert np.all(np.isfinite(np.asarray(logit.kl_matching(state, z))))
  by_label = logit.fit_kl_matching([{'logits': z, 'labels': labels}], num_classes=3, use_labels=True)
  np.testing.assert_allclose(np.exp(by_label.log_templates[2]), _softmax(z[1:2])[0], rtol=1e-6)


def test_fit_from_features_and_head():
  rng = np.random.default_rng(6)
  h = rng.standard_normal((50, 3)).astype(np.float32)
  w, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  labels = rng.integers(0, 4, 50)
  from_logits = logit.fit_kl_matching([{'logits': h @ w + b, 'labels': labels}], num_classes=4)
  from_features = logit.fit_kl_matching([{'features': h, 'labels': labels}], num_classes=4, head=(w, b))
  np.testing.assert_allclose(from_logits.log_templates, from_features.log_templates, rtol=1e-5, atol=1e-5)


def test_errors():
  z, labels = _problem()
  with pytest.raises(ValueError, match='logits'):
    detectors.get('msp').score((), {'features': z})
  with pytest.raises(ValueError, match='rank 2'):
    logit.msp(z[0])
  with pytest.raises(ValueError, match='fit'):
    logit.temperature_msp((), z)
  state = logit.fit_kl_matching(_batches(z, labels), num_classes=6)
  with pytest.raises(ValueError, match='fitted on 6'):
    logit.kl_matching(state, z[:, :5])
  with pytest.raises(ValueError, match=r'lie in \[0, 3\)'):
    logit.fit_kl_matching([{'logits': z[:, :3], 'labels': labels}], num_classes=3, use_labels=True)
  with pytest.raises(ValueError, match='needs "logits"'):
    logit.fit_kl_matching([{'labels': labels}], num_classes=6)
  with pytest.raises(ValueError, match='no examples'):
    logit.fit_kl_matching([], num_classes=6)
  with pytest.raises(ValueError, match='no examples'):
    logit.fit_temperature_msp([])
  with pytest.raises(ValueError, match='gamma'):
    logit.gen(z, gamma=0.0)


@pytest.mark.parametrize('name,kernel', [('msp', 'max_softmax'), ('max_logit', 'max_logit'), ('energy', 'energy'),
                                         ('entropy', 'entropic_score')])
def test_logit_detectors_are_the_scores_arithmetic(name, kernel):
  assert getattr(scores, kernel) is getattr(logit, kernel)
  z, _ = _problem(seed=9)
  det = jax.jit(lambda z: detectors.get(name).score((), {'logits': z}))
  np.testing.assert_array_equal(det(z), jax.jit(getattr(scores, kernel))(z))


def test_weighted_energy_matches_reference_and_all_ones_is_energy():
  """log Σ_k max(w_k, 0) e^{z_k} (VOS, eq. 6) in float64; pytorch-ood's `WeightedEBO` is the negation, and
  clips the weights with a ReLU as here."""
  z, _ = _problem(seed=7, k=4, scale=20.0)  # large logits: a naive Σ w e^z overflows float32
  weights = np.array([0.5, 0.0, 2.0, -1.0])
  det = detectors.get('weighted_energy', weights=weights)
  state = det.fit(num_classes=4)
  score = jax.jit(lambda s, x: det.score(s, {'logits': x}))
  ref = special.logsumexp(z.astype(np.float64), b=np.maximum(weights, 0.0), axis=-1)
  np.testing.assert_allclose(score(state, z), ref, rtol=1e-6)
  # A [K, 1] kernel (VOS's Dense(1)) is the same weights.
  np.testing.assert_allclose(score(logit.fit_weighted_energy(weights=weights[:, None]), z), ref, rtol=1e-6)
  plain = detectors.get('weighted_energy')
  np.testing.assert_allclose(score(plain.fit(num_classes=4), z), logit.energy(z), rtol=1e-6)
  with pytest.raises(ValueError, match='every weight is <= 0'):
    logit.fit_weighted_energy(weights=[0.0, -1.0])
  with pytest.raises(ValueError, match='num_classes=3'):
    logit.fit_weighted_energy(weights=weights, num_classes=3)
  with pytest.raises(ValueError, match='needs num_classes'):
    plain.fit()
  with pytest.raises(ValueError, match='fitted on 4'):
    plain.score(state, {'logits': z[:, :3]})
