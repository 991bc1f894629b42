"""Tests for ood_jax.detectors.gaussian (Mahalanobis, RMDS) against float64 NumPy references written from the
papers, and the `ood_jax.scores` doors into its fit and kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax import detectors
from ood_jax import layers
from ood_jax import scores
from ood_jax.detectors import gaussian
from tests.detectors import problems

K = problems.K


def test_mahalanobis_matches_reference():
  h, labels, w, b, test = problems.problem()
  det, state = problems.fit('mahalanobis', h, labels, w, b, ridge=0.0)
  means, cov = problems.ref_gaussian(h, labels, K)
  np.testing.assert_allclose(problems.jit_score(det, state, test), -problems.sq_maha(test, means, cov).min(1),
                             rtol=2e-5)


def test_rmds_matches_reference():
  h, labels, w, b, test = problems.problem(seed=1)
  det, state = problems.fit('rmds', h, labels, w, b, ridge=0.0)
  means, cov = problems.ref_gaussian(h, labels, K)
  h64 = h.astype(np.float64)
  mean0 = h64.mean(0)
  cov0 = (h64 - mean0).T @ (h64 - mean0) / len(h64)
  ref = np.max(-problems.sq_maha(test, means, cov) + problems.sq_maha(test, mean0[None], cov0), axis=1)
  # RMDS is a difference of two squared distances of up to ~4e3: float32 leaves ~1e-4 absolute.
  np.testing.assert_allclose(problems.jit_score(det, state, test), ref, rtol=1e-5, atol=1e-3)


def test_streaming_fit_is_batch_invariant():
  h, labels, w, b, test = problems.problem(seed=13)
  one = gaussian.fit_rmds([{'features': h, 'labels': labels}], num_classes=K)
  many = gaussian.fit_rmds(problems.batches(h, labels, sizes=(3, 41, 1)), num_classes=K)
  np.testing.assert_allclose(gaussian.rmds(one, test), gaussian.rmds(many, test), rtol=1e-5)
  # Features around 1e4 keep their precision: the fit never forms E[hhᵀ] − μμᵀ.
  offset = 1e4
  shifted = gaussian.fit_rmds([{'features': h.astype(np.float64) + offset, 'labels': labels}], num_classes=K)
  np.testing.assert_allclose(shifted.classes.gaussian.cholesky, one.classes.gaussian.cholesky, rtol=1e-4, atol=1e-5)


def test_errors():
  h, labels, _, _, _ = problems.problem()
  maha = detectors.get('mahalanobis')
  with pytest.raises(ValueError, match='no examples'):
    maha.fit([{'features': h[:4], 'labels': np.zeros(4, int)}], num_classes=K)
  with pytest.raises(ValueError, match='singular'):
    gaussian.fit_rmds([{'features': np.zeros((20, 3), np.float32), 'labels': np.arange(20) % 2}], num_classes=2)
  with pytest.raises(ValueError, match="needs 'labels'"):
    gaussian.fit_rmds([{'features': h}], num_classes=K)
  with pytest.raises(ValueError, match='GaussianState'):
    maha.score((), {'features': h})
  with pytest.raises(ValueError, match='dimension 3'):
    maha.score(maha.fit(problems.batches(h, labels), num_classes=K), {'features': h[:, :3]})


# ------------------------------------------------------------------------------------------------
# One fit and one kernel: `scores.fit_gaussian` / `scores.mahalanobis` are doors into them.
# ------------------------------------------------------------------------------------------------


def test_scores_doors_equal_the_detector_kernel_exactly():
  h, labels, _, _, test = problems.problem(seed=2)
  fitted = scores.fit_gaussian(h, labels, num_classes=K, ridge=1e-6)
  from_batches = gaussian.fit_gaussian(problems.batches(h, labels), num_classes=K, ridge=1e-6)
  for a, b in zip(fitted, from_batches):
    np.testing.assert_array_equal(a, b)
  kernel = jax.jit(lambda g, f: jnp.max(gaussian.class_scores(gaussian.whiten(g), f), axis=-1))
  np.testing.assert_array_equal(jax.jit(scores.mahalanobis)(test, fitted), kernel(fitted, test))
  # The detector whitens its float64 moments before the float32 cast: the same numbers to float32 rounding.
  det = detectors.get('mahalanobis')
  state = det.fit(problems.batches(h, labels), num_classes=K)
  np.testing.assert_array_equal(state.gaussian.cholesky, fitted.cholesky)
  np.testing.assert_allclose(det.score(state, {'features': test}), scores.mahalanobis(test, fitted), rtol=1e-6)


def test_kernel_equals_the_explicit_difference_of_the_logit_layer():
  h, labels, _, _, test = problems.problem(seed=3)
  fitted = scores.fit_gaussian(h, labels, num_classes=K)
  explicit = jnp.max(layers.mahalanobis_logits(test, fitted.means, fitted.cholesky), axis=-1)
  np.testing.assert_allclose(scores.mahalanobis(test, fitted), explicit, rtol=2e-5)


def test_singular_message_is_shared_by_the_fit_and_the_door():
  f = np.zeros((20, 3), np.float32)
  y = np.arange(20) % 2
  with pytest.raises(ValueError, match=r'singular.*20 examples, dim 3.*ridge=1e-6'):
    scores.fit_gaussian(f, y, num_classes=2)
  with pytest.raises(ValueError, match=r'singular.*20 examples, dim 3.*ridge=1e-6'):
    detectors.get('mahalanobis').fit({'features': f, 'labels': y}, num_classes=2, ridge=0.0)


# ------------------------------------------------------------------------------------------------
# The class-conditional Gaussian mixture (GMM).
# ------------------------------------------------------------------------------------------------


def _mixture_log_density(x, means, cov, log_weights):
  """log Σ_j W_j N(x; μ_j, Σ), float64, from scipy's Gaussian log-density."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  logs = np.stack([stats.multivariate_normal(m, cov).logpdf(np.asarray(x, np.float64)) for m in means], axis=1)
  logs = logs + log_weights
  top = logs.max(1, keepdims=True)
  return top[:, 0] + np.log(np.exp(logs - top).sum(1))


def test_gmm_one_mixture_matches_sklearn_from_the_same_initialisation():
  # class_conditional=False is OpenOOD's configuration: sklearn GaussianMixture(covariance_type='tied').
  from sklearn.mixture import GaussianMixture  # pylint: disable=import-outside-toplevel
  h, labels, _, _, test = problems.problem(seed=3)
  kwargs = dict(class_conditional=False, num_components=3, reduce_dim=None)
  with jax.enable_x64(True):
    init = gaussian.fit_gmm(problems.batches(h, labels), max_iter=0, **kwargs)
    state = gaussian.fit_gmm(problems.batches(h, labels), tol=1e-8, **kwargs)
    fitted = [np.asarray(x, np.float64) for x in (state.components.gaussian.means + state.offset,
                                                  state.components.gaussian.covariance, state.log_weights)]
  ref = GaussianMixture(3, covariance_type='tied', tol=1e-8, max_iter=100,
                        means_init=np.asarray(init.components.gaussian.means + init.offset),
                        weights_init=np.exp(np.asarray(init.log_weights)),
                        precisions_init=np.linalg.inv(np.asarray(init.components.gaussian.covariance)))
  ref.fit(h.astype(np.float64))
  assert ref.converged_ and ref.n_iter_ > 2  # EM did move away from the initialisation
  np.testing.assert_allclose(fitted[0], ref.means_, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(fitted[1], ref.covariances_, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(np.exp(fitted[2]), ref.weights_, rtol=1e-9)
  # The score is the mixture's log-density: sklearn's score_samples and the formula.
  det = detectors.get('gmm')
  state32 = jax.tree.map(lambda x: np.asarray(x, np.float32), state)
  got = problems.jit_score(det, state32, test)
  np.testing.assert_allclose(got, ref.score_samples(test.astype(np.float64)), rtol=2e-5)
  np.testing.assert_allclose(got, _mixture_log_density(test, *fitted), rtol=2e-5)


def _reference_class_em(h, labels, means, weights, cov, iters, reg):
  """Labelled EM for per-class mixtures with one tied covariance, float64, all data in memory."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  h = h.astype(np.float64)
  means, weights, cov = means.copy(), weights.copy(), cov.copy()
  for _ in range(iters):
    scatter = np.zeros_like(cov)
    for k in range(means.shape[0]):
      x = h[labels == k]
      logs = np.stack([stats.multivariate_normal(m, cov).logpdf(x) for m in means[k]], 1) + np.log(weights[k])
      r = np.exp(logs - logs.max(1, keepdims=True))
      r /= r.sum(1, keepdims=True)
      weights[k] = r.sum(0) / len(x)
      means[k] = (r.T @ x) / r.sum(0)[:, None]
      for c in range(means.shape[1]):
        diff = x - means[k, c]
        scatter += (r[:, c:c + 1] * diff).T @ diff
    cov = scatter / len(h) + reg * np.eye(h.shape[1])
  return means, weights, cov


def test_gmm_class_conditional_em_and_score_match_reference():
  h, labels, _, _, test = problems.problem(seed=4)
  c, iters = 2, 4
  kwargs = dict(num_classes=K, num_components=c, reduce_dim=None, reg_covar=1e-6)
  with jax.enable_x64(True):
    init = gaussian.fit_gmm(problems.batches(h, labels), max_iter=0, **kwargs)
    state = gaussian.fit_gmm(problems.batches(h, labels), max_iter=iters, tol=0.0, **kwargs)
    priors = np.bincount(labels) / len(labels)
    init_means = np.asarray(init.components.gaussian.means + init.offset).reshape(K, c, -1)
    init_weights = np.exp(np.asarray(init.log_weights)).reshape(K, c) / priors[:, None]
    means, weights, cov = _reference_class_em(h, labels, init_means, init_weights,
                                              np.asarray(init.components.gaussian.covariance), iters, 1e-6)
    np.testing.assert_allclose(np.asarray(state.components.gaussian.means + state.offset).reshape(K, c, -1), means,
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(state.components.gaussian.covariance), cov, rtol=1e-9, atol=1e-9)
    log_weights = np.log(priors[:, None] * weights).reshape(-1)
    np.testing.assert_allclose(np.asarray(state.log_weights), log_weights, rtol=1e-9, atol=1e-12)
  assert np.abs(means - init_means).max() > 1e-3  # the iterations moved the means
  det = detectors.get('gmm')
  state32 = jax.tree.map(lambda x: np.asarray(x, np.float32), state)
  np.testing.assert_allclose(problems.jit_score(det, state32, test),
                             _mixture_log_density(test, means.reshape(K * c, -1), cov, log_weights), rtol=2e-5)


def test_gmm_reduces_by_pca_and_checks_its_arguments():
  from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel
  h, labels, _, _, _ = problems.problem(seed=5)
  state = gaussian.fit_gmm(problems.batches(h, labels), num_classes=K, num_components=1, reduce_dim=3)
  axes = PCA(3).fit(h.astype(np.float64)).components_
  np.testing.assert_allclose(np.abs(axes @ np.asarray(state.projection, np.float64)), np.eye(3), atol=1e-5)
  assert state.components.gaussian.means.shape == (K, 3)
  with pytest.raises(ValueError, match='class 0 has 2 examples, fewer than num_components=3'):
    gaussian.fit_gmm([{'features': h[:8], 'labels': labels[:8]}], num_classes=K)
  with pytest.raises(ValueError, match='pass num_classes'):
    gaussian.fit_gmm([{'features': h, 'labels': labels}])
  with pytest.raises(ValueError, match='max_iter must be an int >= 0'):
    gaussian.fit_gmm([{'features': h, 'labels': labels}], num_classes=K, max_iter=-1)
  with pytest.raises(TypeError, match='makes 2 passes'):
    gaussian.fit_gmm(iter([{'features': h, 'labels': labels}]), num_classes=K)
  with pytest.raises(ValueError, match='GMMState'):
    detectors.get('gmm').score((), {'features': h})
