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
