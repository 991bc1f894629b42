"""Tests for ood_jax.scores against independent float64 NumPy / SciPy / scikit-learn references."""

from __future__ import annotations

import functools
import zlib

import jax
from jax.experimental import checkify
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from scipy import special
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from ood_jax import scores


# ------------------------------------------------------------------------------------------------
# Float64 references, written without the library.
# ------------------------------------------------------------------------------------------------


def _ref_log_softmax(z):
  m = np.max(z, axis=-1, keepdims=True)
  shifted = z - m
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _ref_msp(z):
  return np.max(np.exp(_ref_log_softmax(z)), axis=-1)


def _ref_max_logit(z):
  return np.max(z, axis=-1)


def _ref_entropic(z):
  p = np.exp(_ref_log_softmax(z))
  return np.sum(special.xlogy(p, p), axis=-1)  # xlogy(0, 0) = 0.


def _ref_energy(z, temperature=1.0):
  return temperature * special.logsumexp(z / temperature, axis=-1)


def _ref_max_sigmoid(z):
  return np.max(special.expit(z), axis=-1)


def _ref_max_distance_sigmoid(z):
  return np.max(2.0 * special.expit(z), axis=-1)


def _ref_max_likelihood(z):
  return np.exp(np.max(z, axis=-1))


# (score function, reference, whether the logits must be <= 0).
LOGIT_SCORES = [
    (scores.max_softmax, _ref_msp, False),
    (scores.max_logit, _ref_max_logit, False),
    (scores.entropic_score, _ref_entropic, False),
    (scores.energy, _ref_energy, False),
    (scores.max_sigmoid, _ref_max_sigmoid, False),
    (scores.max_distance_sigmoid, _ref_max_distance_sigmoid, True),
    (scores.max_likelihood, _ref_max_likelihood, True),
]
LOGIT_IDS = [fn.__name__ for fn, _, _ in LOGIT_SCORES]


def _as_float64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Logit scores.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('fn,ref,nonpositive', LOGIT_SCORES, ids=LOGIT_IDS)
@pytest.mark.parametrize('shape', [(7, 5), (3, 4, 6), (9,)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_logit_score_matches_reference(fn, ref, nonpositive, shape, dtype):
  rng = np.random.default_rng(zlib.crc32(repr((fn.__name__, shape)).encode()))
  z = 3.0 * rng.standard_normal(shape)
  if nonpositive:
    z = -np.abs(z)
  logits = jnp.asarray(z, dtype=dtype)
  out = jax.jit(fn)(logits)
  assert out.shape == shape[:-1]
  # bfloat16 inputs are scored in float32, so the score of the bf16-rounded logits is exact to
  # float32 accuracy (a bf16 computation would be off by ~1e-2).
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref(_as_float64(logits)), rtol=2e-6, atol=2e-6)


def test_logit_scores_vmap():
  z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 5)), jnp.float32)
  for fn, _, _ in LOGIT_SCORES:
    np.testing.assert_allclose(jax.vmap(fn)(z), fn(z), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('temperature', [0.5, 1.0, 1000.0])
def test_energy_temperature(temperature):
  z = 4.0 * np.random.default_rng(1).standard_normal((6, 10))
  out = jax.jit(functools.partial(scores.energy, temperature=temperature))(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(out, _ref_energy(z, temperature), rtol=1e-5)
  # A traced temperature works too.
  out = jax.jit(lambda z, t: scores.energy(z, temperature=t))(jnp.asarray(z, jnp.float32), temperature)
  np.testing.assert_allclose(out, _ref_energy(z, temperature), rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_extreme_logits_are_finite_and_correct(dtype):
  big = jnp.asarray([[1e4, -1e4], [-1e4, -1e4], [1e4, 1e4]], dtype)
  # Entropic score: one-hot → 0 exactly (not NaN from 0·log 0), uniform → −log 2.
  ent = jax.jit(scores.entropic_score)(big)
  np.testing.assert_allclose(ent, [0.0, -np.log(2), -np.log(2)], atol=1e-6)
  np.testing.assert_allclose(jax.jit(scores.max_softmax)(big), [1.0, 0.5, 0.5], atol=1e-7)
  v = _as_float64(big)[0, 0]  # 1e4 rounds to 9984 in bfloat16.
  np.testing.assert_allclose(jax.jit(scores.energy)(big), [v, -v + np.log(2), v + np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(jax.jit(scores.max_sigmoid)(big), [1.0, 0.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(jax.jit(scores.max_logit)(big), [v, -v, v])

  dist = jnp.asarray([[0.0, -3.0], [-1e4, -1e4], [-1e-7, -1e4]], dtype)
  mds = jax.jit(scores.max_distance_sigmoid)(dist)
  assert np.all(np.isfinite(mds))
  np.testing.assert_allclose(mds, [1.0, 0.0, 1.0], atol=1e-6)
  lik = jax.jit(scores.max_likelihood)(dist)
  assert np.all(np.isfinite(lik))
  np.testing.assert_allclose(lik, [1.0, 0.0, 1.0], atol=1e-6)

  # Gradients stay finite at the extremes too (they are the training-time hazard).
  for fn in (scores.entropic_score, scores.energy, scores.max_softmax):
    grad = jax.grad(lambda z: jnp.sum(fn(z)))(big.astype(jnp.float32))
    assert np.all(np.isfinite(grad)), fn.__name__
  one_hot_grad = jax.grad(lambda z: jnp.sum(scores.entropic_score(z)))(big[:1].astype(jnp.float32))
  np.testing.assert_allclose(one_hot_grad, [[0.0, 0.0]], atol=1e-6)


def test_entropic_score_minus_inf_logit():
  # A −inf logit has p = 0 and log p = −inf; its term must be 0, in value and gradient.
  z = jnp.asarray([0.0, 0.0, -jnp.inf])
  np.testing.assert_allclose(scores.entropic_score(z), -np.log(2), rtol=1e-6)
  assert np.all(np.isfinite(jax.grad(scores.entropic_score)(z)[:2]))


def test_gradients_float64():
  with jax.enable_x64(True):
    z = jnp.asarray(2.0 * np.random.default_rng(2).standard_normal((4, 6)), jnp.float64)
    assert scores.entropic_score(z).dtype == jnp.float64
    check_grads(scores.entropic_score, (z,), order=1, modes=['rev'])
    check_grads(scores.energy, (z,), order=1, modes=['rev'])
    check_grads(lambda z: scores.energy(z, temperature=3.0), (z,), order=1, modes=['rev'])
    # Analytic check: d/dz Σ p log p = p ⊙ (log p − Σ p log p).
    log_p = _ref_log_softmax(np.asarray(z))
    p = np.exp(log_p)
    expected = p * (log_p - np.sum(p * log_p, axis=-1, keepdims=True))
    grad = jax.grad(lambda z: jnp.sum(scores.entropic_score(z)))(z)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('fn', [fn for fn, _, _ in LOGIT_SCORES], ids=LOGIT_IDS)
def test_logit_score_errors(fn):
  with pytest.raises(ValueError, match='logits'):
    fn(jnp.float32(1.0))  # Rank 0.
  with pytest.raises(TypeError, match='logits'):
    fn(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match='logits'):
    fn(jnp.ones((2, 0)))  # K = 0.


def test_energy_temperature_errors():
  with pytest.raises(ValueError, match='temperature'):
    scores.energy(jnp.ones((2, 3)), temperature=0.0)
  with pytest.raises(ValueError, match='temperature'):
    scores.energy(jnp.ones((2, 3)), temperature=-1.0)
  with pytest.raises(TypeError, match='temperature'):
    scores.energy(jnp.ones((2, 3)), temperature=np.ones(2))


def test_integer_logits_get_a_hint_about_labels():
  for fn, _, _ in LOGIT_SCORES:
    with pytest.raises(TypeError, match='integer arrays look like labels'):
      fn(np.array([[0, 1, 2]]))


def test_traced_energy_temperature_out_of_range_gives_nan():
  z = jnp.asarray(np.random.default_rng(30).standard_normal((5, 4)), jnp.float32)
  fn = jax.jit(lambda z, t: scores.energy(z, temperature=t))
  np.testing.assert_allclose(fn(z, 2.0), _ref_energy(np.asarray(z, np.float64), 2.0), rtol=1e-6)
  assert np.all(np.isnan(np.asarray(fn(z, 0.0)))) and np.all(np.isnan(np.asarray(fn(z, -1.0))))
  err, _ = jax.jit(checkify.checkify(lambda z, t: scores.energy(z, temperature=t)))(z, -1.0)
  assert 'temperature must be > 0' in err.get()


# ------------------------------------------------------------------------------------------------
# ODIN.
# ------------------------------------------------------------------------------------------------


def _linear_problem(seed=3, batch=11, dim=6, num_classes=4):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((dim, num_classes))
  b = rng.standard_normal(num_classes)
  x = rng.standard_normal((batch, dim))
  return x, w, b


def _ref_odin(x, w, b, temperature, epsilon):
  """ODIN for f(x) = xW + b with the gradient derived by hand:

  ∇ₓ log softmax(f(x)/T)_ŷ = (W[:, ŷ] − W softmax(f(x)/T)) / T.
  """
  s = np.exp(_ref_log_softmax((x @ w + b) / temperature))  # [B, K]
  y_hat = np.argmax(x @ w + b, axis=-1)
  grad = (w[:, y_hat].T - s @ w.T) / temperature  # [B, D]
  perturbed = x - epsilon * np.sign(-grad)
  return _ref_msp((perturbed @ w + b) / temperature), grad


@pytest.mark.parametrize('temperature,epsilon', [(1000.0, 0.0014), (2.0, 0.05), (1.0, 0.3)])
def test_odin_linear_model_matches_hand_gradient(temperature, epsilon):
  x, w, b = _linear_problem()
  expected, grad = _ref_odin(x, w, b, temperature, epsilon)
  # The reference sign must be unambiguous for the comparison to mean anything.
  assert np.min(np.abs(grad)) > 1e-6 / temperature
  wj, bj = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
  apply_fn = lambda inputs: inputs @ wj + bj
  odin = jax.jit(scores.odin, static_argnums=0)
  out = odin(apply_fn, jnp.asarray(x, jnp.float32), temperature=temperature, epsilon=epsilon)
  assert out.shape == (x.shape[0],)
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  # The perturbation does change the score (so the comparison above covers the gradient path):
  # confidence goes up for every example.
  base = _ref_msp((x @ w + b) / temperature)
  assert np.all(np.asarray(out) > base)


def test_odin_params_as_traced_argument():
  x, w, b = _linear_problem(seed=4)
  expected, _ = _ref_odin(x, w, b, 10.0, 0.01)

  def apply(params, inputs):
    return inputs @ params['w'] + params['b']

  fn = jax.jit(lambda params, inputs: scores.odin(functools.partial(apply, params), inputs,
                                                  temperature=10.0, epsilon=0.01))
  params = {'w': jnp.asarray(w, jnp.float32), 'b': jnp.asarray(b, jnp.float32)}
  np.testing.assert_allclose(fn(params, jnp.asarray(x, jnp.float32)), expected, rtol=1e-5)


def test_odin_epsilon_zero_is_temperature_scaling():
  x, w, b = _linear_problem(seed=5)
  logits = x @ w + b
  apply_fn = lambda inputs: inputs @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)
  xj = jnp.asarray(x, jnp.float32)
  expected = _ref_msp(logits / 1000.0)
  np.testing.assert_allclose(scores.odin(apply_fn, xj, epsilon=0.0), expected, rtol=1e-6)
  np.testing.assert_allclose(
      scores.max_softmax(jnp.asarray(logits / 1000.0, jnp.float32)), expected, rtol=1e-6)
  # A traced ε = 0 takes the gradient path and must agree.
  traced = jax.jit(lambda inputs, eps: scores.odin(apply_fn, inputs, epsilon=eps))(xj, 0.0)
  np.testing.assert_allclose(traced, expected, rtol=1e-6)


def test_odin_bfloat16_inputs_keep_small_perturbation():
  # ε = 1e-3 is below bfloat16's spacing near 1 (2⁻⁷); the perturbed input is formed in float32.
  x, w, b = _linear_problem(seed=6)
  x = np.asarray(jnp.asarray(x + 1.0, jnp.bfloat16).astype(jnp.float32), np.float64)
  expected, _ = _ref_odin(x, w, b, 1.0, 1e-3)
  apply_fn = lambda inputs: inputs @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)
  out = scores.odin(apply_fn, jnp.asarray(x, jnp.bfloat16), temperature=1.0, epsilon=1e-3)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  assert np.all(np.asarray(out) > _ref_msp(x @ w + b))


def test_odin_errors():
  apply_fn = lambda inputs: inputs @ jnp.ones((3, 2))
  x = jnp.ones((4, 3))
  with pytest.raises(TypeError, match='apply_fn'):
    scores.odin(None, x)
  with pytest.raises(TypeError, match='inputs'):
    scores.odin(apply_fn, jnp.ones((4, 3), jnp.int32))
  with pytest.raises(ValueError, match='temperature'):
    scores.odin(apply_fn, x, temperature=0.0)
  with pytest.raises(ValueError, match='epsilon'):
    scores.odin(apply_fn, x, epsilon=-0.1)
  with pytest.raises(ValueError, match='apply_fn'):
    scores.odin(lambda inputs: inputs[:, :0], x)  # No classes.


def test_odin_traced_hyperparameters_out_of_range_give_nan():
  x, w, b = _linear_problem(seed=7)
  apply_fn = lambda inputs: inputs @ jnp.asarray(w, jnp.float32) + jnp.asarray(b, jnp.float32)
  fn = jax.jit(lambda inputs, t, eps: scores.odin(apply_fn, inputs, temperature=t, epsilon=eps))
  xj = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(fn(xj, 2.0, 0.05), _ref_odin(x, w, b, 2.0, 0.05)[0], rtol=1e-5)
  assert np.all(np.isnan(np.asarray(fn(xj, 2.0, -0.05))))  # ε < 0 would lower the confidence instead
  assert np.all(np.isnan(np.asarray(fn(xj, -2.0, 0.05))))
  static_eps = jax.jit(lambda inputs, t: scores.odin(apply_fn, inputs, temperature=t, epsilon=0.0))
  assert np.all(np.isnan(np.asarray(static_eps(xj, 0.0))))


# ------------------------------------------------------------------------------------------------
# fit_gaussian / mahalanobis.
# ------------------------------------------------------------------------------------------------


def _gaussian_data(seed, num_classes=4, dim=6, offset=0.0):
  rng = np.random.default_rng(seed)
  sizes = [1, 50, 7, 100, 42]
  labels = [rng.integers(0, num_classes, size=n) for n in sizes]
  labels[2] = rng.integers(0, 2, size=sizes[2])  # This batch misses classes 2 and 3.
  labels[0][:] = 3  # A one-example batch of the class the third batch misses.
  labels = np.concatenate(labels)
  centres = 3.0 * rng.standard_normal((num_classes, dim))
  mix = rng.standard_normal((dim, dim))
  features = offset + centres[labels] + rng.standard_normal((labels.size, dim)) @ mix
  bounds = np.cumsum([0] + sizes)
  batches = [(features[lo:hi], labels[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
  return features, labels, batches


def _ref_gaussian(features, labels, num_classes):
  means = np.stack([features[labels == k].mean(axis=0) for k in range(num_classes)])
  centred = features - means[labels]
  cov = EmpiricalCovariance(assume_centered=True).fit(centred).covariance_
  return means, cov


def test_fit_gaussian_matches_sklearn_float32():
  features, labels, batches = _gaussian_data(seed=7, offset=1e4)
  means, cov = _ref_gaussian(features, labels, 4)
  gaussian = scores.fit_gaussian(iter(batches), num_classes=4)
  assert isinstance(gaussian, scores.Gaussian)
  assert gaussian.means.dtype == gaussian.covariance.dtype == gaussian.cholesky.dtype == jnp.float32
  assert gaussian.means.shape == (4, 6) and gaussian.covariance.shape == gaussian.cholesky.shape == (6, 6)
  # Means near 1e4 are exact to float32 spacing there (~1e-3); the covariance is O(1) and exact.
  np.testing.assert_allclose(gaussian.means, means, rtol=1e-7, atol=2e-3)
  np.testing.assert_allclose(gaussian.covariance, cov, rtol=1e-5, atol=1e-6)
  chol = np.asarray(gaussian.cholesky, np.float64)
  np.testing.assert_array_equal(np.triu(chol, k=1), 0.0)
  np.testing.assert_allclose(chol @ chol.T, cov, rtol=1e-5, atol=1e-5)


def test_fit_gaussian_float64_survives_large_offset():
  offset = 1e7
  features, labels, batches = _gaussian_data(seed=8, offset=offset)
  means, cov = _ref_gaussian(features, labels, 4)
  # The textbook one-pass formula E[ffᵀ] − Σ_k (n_k/N) μ_k μ_kᵀ loses everything at this offset,
  # so matching sklearn below is a real test of the streaming update.
  naive = features.T @ features / features.shape[0] - np.einsum(
      'k,ki,kj->ij', np.bincount(labels) / labels.size, means, means)
  assert np.max(np.abs(naive - cov)) > 1e-3
  with jax.enable_x64(True):
    gaussian = scores.fit_gaussian(batches, num_classes=4)
    assert gaussian.covariance.dtype == jnp.float64
    np.testing.assert_allclose(gaussian.means, means, rtol=1e-14)
    np.testing.assert_allclose(gaussian.covariance, cov, rtol=1e-7, atol=1e-7 * np.abs(cov).max())
    chol = np.asarray(gaussian.cholesky)
    np.testing.assert_allclose(chol @ chol.T, cov, rtol=1e-7, atol=1e-7 * np.abs(cov).max())


def test_fit_gaussian_jax_batches_and_ridge():
  features, labels, batches = _gaussian_data(seed=9)
  means, cov = _ref_gaussian(features, labels, 4)
  ridge = 0.1
  expected = cov + ridge * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])

  def jax_batches():  # A generator of device arrays, consumed once.
    for f, y in batches:
      yield jnp.asarray(f, jnp.float32), jnp.asarray(y, jnp.int32)

  gaussian = scores.fit_gaussian(jax_batches(), num_classes=4, ridge=ridge)
  np.testing.assert_allclose(gaussian.means, means, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gaussian.covariance, expected, rtol=1e-5, atol=1e-5)
  chol = np.asarray(gaussian.cholesky, np.float64)
  np.testing.assert_allclose(chol @ chol.T, expected, rtol=1e-5, atol=1e-5)


def test_fit_gaussian_errors():
  rng = np.random.default_rng(10)
  f, y = rng.standard_normal((20, 3)), np.arange(20) % 2
  with pytest.raises(ValueError, match='class 2'):
    scores.fit_gaussian([(f, y)], num_classes=3)
  with pytest.raises(ValueError, match='labels'):
    scores.fit_gaussian([(f, y + 1)], num_classes=2)
  with pytest.raises(ValueError, match='labels'):
    scores.fit_gaussian([(f, y - 1)], num_classes=2)
  with pytest.raises(TypeError, match='labels'):
    scores.fit_gaussian([(f, y.astype(np.float32))], num_classes=2)
  with pytest.raises(ValueError, match='labels'):
    scores.fit_gaussian([(f, y[:5])], num_classes=2)
  with pytest.raises(TypeError, match='features'):
    scores.fit_gaussian([(f.astype(np.int32), y)], num_classes=2)
  with pytest.raises(ValueError, match='features'):
    scores.fit_gaussian([(f[:, 0], y)], num_classes=2)
  with pytest.raises(ValueError, match='features'):
    scores.fit_gaussian([(f, y), (f[:, :2], y)], num_classes=2)
  with pytest.raises(ValueError, match='features'):
    scores.fit_gaussian([(np.where(f > 1, np.nan, f), y)], num_classes=2)
  with pytest.raises(ValueError, match='batches'):
    scores.fit_gaussian([], num_classes=2)
  with pytest.raises(ValueError, match='batches'):
    scores.fit_gaussian([(f[:0], y[:0])], num_classes=2)
  with pytest.raises(TypeError, match='batches'):
    scores.fit_gaussian([f], num_classes=2)
  with pytest.raises(ValueError, match='num_classes'):
    scores.fit_gaussian([(f, y)], num_classes=0)
  with pytest.raises(TypeError, match='num_classes'):
    scores.fit_gaussian([(f, y)], num_classes=2.0)
  with pytest.raises(ValueError, match='ridge'):
    scores.fit_gaussian([(f, y)], num_classes=2, ridge=-1.0)


def test_fit_gaussian_singular_covariance_suggests_ridge():
  rng = np.random.default_rng(11)
  # More dimensions than examples.
  f, y = rng.standard_normal((5, 8)), np.array([0, 1, 0, 1, 0])
  with pytest.raises(ValueError, match='ridge'):
    scores.fit_gaussian([(f, y)], num_classes=2)
  gaussian = scores.fit_gaussian([(f, y)], num_classes=2, ridge=1e-3)
  assert np.all(np.isfinite(gaussian.cholesky)) and np.all(np.diagonal(gaussian.cholesky) > 0)
  # A dead (constant) feature, as a ReLU unit that never fires.
  f = rng.standard_normal((50, 4))
  f[:, 2] = 0.0
  with pytest.raises(ValueError, match='ridge'):
    scores.fit_gaussian([(f, np.arange(50) % 3)], num_classes=3)


def test_fit_gaussian_accepts_arrays_a_pair_and_batches_alike():
  features, labels, batches = _gaussian_data(seed=15)
  means, cov = _ref_gaussian(features, labels, 4)
  fits = {
      'arrays': scores.fit_gaussian(features, labels, num_classes=4),
      'pair': scores.fit_gaussian((features, labels), num_classes=4),
      'list pair': scores.fit_gaussian([features, labels], num_classes=4),
      'jax arrays': scores.fit_gaussian(jnp.asarray(features, jnp.float32), jnp.asarray(labels), num_classes=4),
      'batches': scores.fit_gaussian(batches, num_classes=4),
  }
  for name, fit in fits.items():
    np.testing.assert_allclose(fit.means, means, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(fit.covariance, cov, rtol=1e-5, atol=1e-5, err_msg=name)
  usage = r'fit_gaussian\(features, labels, num_classes=K\)'
  with pytest.raises(TypeError, match='single array of shape .*no labels.*' + usage):
    scores.fit_gaussian(features, num_classes=4)
  with pytest.raises(TypeError, match='item 0 is a ndarray of shape' + r'.*\[\(features, labels\)\]'):
    scores.fit_gaussian([features], num_classes=4)
  with pytest.raises(TypeError, match='needs a features array'):
    scores.fit_gaussian(batches, labels, num_classes=4)


def test_mahalanobis_matches_explicit_inverse():
  rng = np.random.default_rng(12)
  k, d = 5, 7
  means = rng.standard_normal((k, d))
  a = rng.standard_normal((d, d))
  cov = a @ a.T + 0.5 * np.eye(d)
  gaussian = scores.Gaussian(jnp.asarray(means, jnp.float32), jnp.asarray(cov, jnp.float32),
                             jnp.asarray(np.linalg.cholesky(cov), jnp.float32))
  precision = np.linalg.inv(cov)
  for shape in [(13, d), (2, 3, d), (d,)]:
    f = rng.standard_normal(shape)
    diff = f[..., None, :] - means  # [..., K, D]
    expected = -np.min(np.einsum('...ki,ij,...kj->...k', diff, precision, diff), axis=-1)
    out = jax.jit(scores.mahalanobis)(jnp.asarray(f, jnp.float32), gaussian)
    assert out.shape == shape[:-1]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_fit_then_mahalanobis_end_to_end():
  features, labels, batches = _gaussian_data(seed=13)
  means, cov = _ref_gaussian(features, labels, 4)
  gaussian = scores.fit_gaussian(batches, num_classes=4)
  queries = np.random.default_rng(14).standard_normal((9, 6)) * 4
  diff = queries[:, None, :] - means
  expected = -np.min(np.einsum('nki,ij,nkj->nk', diff, np.linalg.inv(cov), diff), axis=-1)
  np.testing.assert_allclose(scores.mahalanobis(jnp.asarray(queries, jnp.float32), gaussian),
                             expected, rtol=1e-4)


def test_mahalanobis_errors():
  gaussian = scores.Gaussian(jnp.zeros((2, 3)), jnp.eye(3), jnp.eye(3))
  with pytest.raises(ValueError, match='features'):
    scores.mahalanobis(jnp.ones((4, 5)), gaussian)
  with pytest.raises(TypeError, match='features'):
    scores.mahalanobis(jnp.ones((4, 3), jnp.int32), gaussian)


# ------------------------------------------------------------------------------------------------
# KNN.
# ------------------------------------------------------------------------------------------------


def _unit(x):
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def _ref_knn(features, bank, k):
  """Brute force: the full [Q, M] distance matrix, sorted."""
  q, b = _unit(features), _unit(bank)
  dist = np.linalg.norm(q[:, None, :] - b[None, :, :], axis=-1)
  return -np.sort(dist, axis=1)[:, k - 1]


_jit_knn = jax.jit(scores.knn, static_argnames=('k', 'query_chunk_size', 'bank_chunk_size'))


@pytest.mark.parametrize('k', [1, 5, 53])
def test_knn_matches_brute_force_with_ragged_chunks(k):
  rng = np.random.default_rng(15)
  features, bank = rng.standard_normal((37, 8)), 5.0 * rng.standard_normal((53, 8))
  out = _jit_knn(jnp.asarray(features, jnp.float32), jnp.asarray(bank, jnp.float32), k=k,
                 query_chunk_size=8, bank_chunk_size=16)
  assert out.shape == (37,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _ref_knn(features, bank, k), atol=2e-5)
  # Default chunk sizes (larger than both sizes) give the same answer.
  default = scores.knn(jnp.asarray(features, jnp.float32), jnp.asarray(bank, jnp.float32), k=k)
  np.testing.assert_allclose(default, out, atol=1e-6)


def test_knn_matches_sklearn():
  rng = np.random.default_rng(16)
  features, bank = rng.standard_normal((20, 5)), rng.standard_normal((64, 5))
  nn = NearestNeighbors(n_neighbors=10).fit(_unit(bank))
  dist, _ = nn.kneighbors(_unit(features))
  out = scores.knn(jnp.asarray(features, jnp.float32), jnp.asarray(bank, jnp.float32), k=10,
                   query_chunk_size=7, bank_chunk_size=9)
  np.testing.assert_allclose(out, -dist[:, -1], atol=2e-5)


def test_knn_zero_vectors_duplicates_and_bfloat16():
  rng = np.random.default_rng(17)
  bank = rng.standard_normal((10, 4))
  bank[3] = 0.0
  features = np.concatenate([np.zeros((1, 4)), bank[:2], rng.standard_normal((3, 4))])
  out = scores.knn(jnp.asarray(features, jnp.float32), jnp.asarray(bank, jnp.float32), k=1,
                   query_chunk_size=4, bank_chunk_size=3)
  assert np.all(np.isfinite(out))
  # Zero vectors stay zero after normalisation, so distances are the true ones (as scikit-learn and
  # faiss give them): the zero query is at 0 from the zero bank row, exact duplicates at exactly 0.
  np.testing.assert_array_equal(out[:3], 0.0)
  np.testing.assert_allclose(out[3:], _ref_knn(features[3:], bank, 1), atol=2e-6)
  out = scores.knn(jnp.asarray(features, jnp.float32), jnp.asarray(bank, jnp.float32), k=2)
  np.testing.assert_allclose(out, _ref_knn(features, bank, 2), atol=2e-6)
  np.testing.assert_allclose(out[0], -1.0, atol=1e-6)  # the zero query's second neighbour: a unit row

  # A zero bank row is at distance 1 from every unit query.
  q = np.array([[1.0, 0.0, 0.0, 0.0]])
  zero_bank = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.0, 0.0], [2.0, -0.3, 0.0, 0.0]])
  out = scores.knn(jnp.asarray(q, jnp.float32), jnp.asarray(zero_bank, jnp.float32), k=3)
  np.testing.assert_allclose(out, _ref_knn(q, zero_bank, 3), atol=2e-6)
  np.testing.assert_allclose(out, -1.0, atol=1e-6)

  bank = np.delete(bank, 3, axis=0)
  bf_features, bf_bank = jnp.asarray(features[3:], jnp.bfloat16), jnp.asarray(bank, jnp.bfloat16)
  out = scores.knn(bf_features, bf_bank, k=2)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _ref_knn(_as_float64(bf_features), _as_float64(bf_bank), 2), atol=2e-6)


def test_knn_empty_queries():
  out = scores.knn(jnp.zeros((0, 3)), jnp.ones((4, 3)), k=2)
  assert out.shape == (0,)


def test_knn_errors():
  f, bank = jnp.ones((4, 3)), jnp.ones((6, 3))
  with pytest.raises(ValueError, match='k must'):
    scores.knn(f, bank, k=0)
  with pytest.raises(ValueError, match='k must'):
    scores.knn(f, bank, k=7)
  with pytest.raises(TypeError, match='k must'):
    scores.knn(f, bank, k=1.5)
  with pytest.raises(ValueError, match='bank'):
    scores.knn(f, jnp.ones((6, 4)), k=1)
  with pytest.raises(ValueError, match='bank'):
    scores.knn(f, jnp.ones((0, 3)), k=1)
  with pytest.raises(ValueError, match='features'):
    scores.knn(jnp.ones(3), bank, k=1)
  with pytest.raises(ValueError, match='bank'):
    scores.knn(f, jnp.ones((2, 6, 3)), k=1)
  with pytest.raises(TypeError, match='features'):
    scores.knn(jnp.ones((4, 3), jnp.int32), bank, k=1)
  with pytest.raises(TypeError, match='bank'):
    scores.knn(f, jnp.ones((6, 3), jnp.int32), k=1)
  with pytest.raises(ValueError, match='query_chunk_size'):
    scores.knn(f, bank, k=1, query_chunk_size=0)
  with pytest.raises(ValueError, match='bank_chunk_size'):
    scores.knn(f, bank, k=1, bank_chunk_size=0)
