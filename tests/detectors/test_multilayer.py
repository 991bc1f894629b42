"""Tests for ood_jax.detectors.multilayer (Lee et al. 2018's multi-layer, input-preprocessed Mahalanobis)
against float64 NumPy references, scikit-learn's logistic regression and a hand-derived gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ood_jax import detectors
from ood_jax.detectors import multilayer
from tests.detectors import problems


def test_multilayer_layer_scores_and_logistic_weights():
  labels = np.arange(200) % 3
  maps = problems.maps(2, 200, labels)
  batches = [{'feature_maps': {k: v[i:i + 64] for k, v in maps.items()}, 'labels': labels[i:i + 64]}
             for i in range(0, 200, 64)]
  det = detectors.get('mahalanobis_multilayer')
  state = det.fit(batches, num_classes=3, ridge=0.0)
  test = problems.maps(3, 10, np.arange(10) % 3)
  layer = multilayer.layer_scores(state, test)
  for i, key in enumerate(('block1', 'block2')):
    pooled = maps[key].reshape(200, -1, maps[key].shape[-1]).mean(1)
    means, cov = problems.ref_gaussian(pooled, labels, 3)
    test_pooled = test[key].reshape(10, -1, test[key].shape[-1]).mean(1)
    np.testing.assert_allclose(layer[:, i], -problems.sq_maha(test_pooled, means, cov).min(1), rtol=2e-5)
  # Uniform weights until fitted.
  np.testing.assert_allclose(jax.jit(lambda s, m: det.score(s, {'feature_maps': m}))(state, test), layer.mean(1),
                             rtol=1e-5)
  # Unpenalised logistic regression equals scikit-learn's maximum-likelihood fit.
  rng = np.random.default_rng(4)
  id_s = rng.standard_normal((80, 2)) + [1.0, 0.5]
  ood_s = rng.standard_normal((60, 2)) * [1.0, 2.0]
  fitted = multilayer.fit_layer_weights(state, id_s, ood_s, l2=0.0)
  ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(
      np.concatenate([id_s, ood_s]), np.r_[np.ones(80), np.zeros(60)])
  np.testing.assert_allclose(fitted.weights, ref.coef_[0], rtol=1e-4)
  np.testing.assert_allclose(fitted.bias, ref.intercept_[0], rtol=1e-4, atol=1e-6)


def test_input_preprocessing_matches_hand_gradient():
  # A linear "network": one map f = x A. ∇ₓ MD_c(x) = 2 A Σ⁻¹ (f − μ_c), so x̂ = x − ε sign(that).
  rng = np.random.default_rng(5)
  a = rng.standard_normal((6, 4))
  labels = np.arange(120) % 3
  x_train = rng.standard_normal((120, 6)) + labels[:, None]
  state = multilayer.fit_multilayer([{'feature_maps': [(x_train @ a).astype(np.float32)], 'labels': labels}],
                                    num_classes=3)
  means, cov = problems.ref_gaussian(x_train @ a, labels, 3)
  x = rng.standard_normal((7, 6))
  f = x @ a
  nearest = problems.sq_maha(f, means, cov).argmin(1)
  grad = 2.0 * (np.linalg.solve(cov, (f - means[nearest]).T).T) @ a.T
  x_hat = x - 0.01 * np.sign(grad)
  ref = -problems.sq_maha(x_hat @ a, means, cov).min(1)
  apply_fn = lambda inputs: {'feature_maps': [inputs @ jnp.asarray(a, jnp.float32)]}
  det = detectors.get('mahalanobis_ensemble')
  out = jax.jit(lambda s, x: det.score(s, {'inputs': x, 'apply_fn': apply_fn}, noise=0.01))(state,
                                                                                           x.astype(np.float32))
  np.testing.assert_allclose(out, ref, rtol=1e-4)
  # Preprocessing moves towards the nearest class: the score never drops.
  plain = multilayer.layer_scores(state, [f.astype(np.float32)])[:, 0]
  assert np.all(np.asarray(out) >= np.asarray(plain) - 1e-4)


def test_errors():
  labels3 = np.arange(200) % 3
  ml = multilayer.fit_multilayer([{'feature_maps': problems.maps(2, 200, labels3), 'labels': labels3}], num_classes=3)
  with pytest.raises(ValueError, match='fitted on 2 feature maps'):
    multilayer.layer_scores(ml, [np.ones((2, 3), np.float32)])
  with pytest.raises(ValueError, match='shape'):
    multilayer.fit_layer_weights(ml, np.ones((5, 3)), np.ones((5, 2)))
  with pytest.raises(ValueError, match='runs the model'):
    detectors.get('mahalanobis_ensemble').score(ml, {'feature_maps': problems.maps(3, 4, np.arange(4) % 3)})
