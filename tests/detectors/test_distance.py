"""Tests for ood_jax.detectors.distance against float64 NumPy references written from the papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special
from sklearn.linear_model import LogisticRegression

from ood_jax import detectors
from ood_jax.detectors import distance

N, D, K = 240, 8, 4


def _problem(seed=0, n=N, d=D, k=K):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % k
  centres = 3.0 * rng.standard_normal((k, d))
  mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
  h = (centres[labels] + rng.standard_normal((n, d)) @ mix + 1.0).astype(np.float32)
  w = rng.standard_normal((d, k)).astype(np.float32)
  b = rng.standard_normal(k).astype(np.float32)
  test = (h[:20] + 2.0 * rng.standard_normal((20, d))).astype(np.float32)
  return h, labels, w, b, test


def _batches(h, labels, sizes=(50, 7, 100)):
  """Unequal batches; the 7-row batch misses some classes."""
  out, start, i = [], 0, 0
  while start < len(h):
    size = sizes[i % len(sizes)]
    out.append({'features': h[start:start + size], 'labels': labels[start:start + size]})
    start, i = start + size, i + 1
  return out


def _fit(name, h, labels, w, b, **hp):
  det = detectors.get(name)
  return det, det.fit(_batches(h, labels), head=(w, b), num_classes=K, **hp)


def _jit_score(det, state, features, **hp):
  return jax.jit(lambda s, f: det.score(s, features=f, **hp))(state, features)


def _ref_gaussian(h, labels, k):
  h = np.asarray(h, np.float64)
  means = np.stack([h[labels == c].mean(0) for c in range(k)])
  centred = h - means[labels]
  return means, centred.T @ centred / len(h)


def _sq_maha(x, means, cov):
  diff = np.asarray(x, np.float64)[:, None, :] - means[None]
  return np.einsum('nkd,nkd->nk', diff, np.linalg.solve(cov, diff.reshape(-1, diff.shape[-1]).T).T.reshape(diff.shape))


def test_mahalanobis_matches_reference():
  h, labels, w, b, test = _problem()
  det, state = _fit('mahalanobis', h, labels, w, b, ridge=0.0)
  means, cov = _ref_gaussian(h, labels, K)
  np.testing.assert_allclose(_jit_score(det, state, test), -_sq_maha(test, means, cov).min(1), rtol=2e-5)


def test_rmds_matches_reference():
  h, labels, w, b, test = _problem(seed=1)
  det, state = _fit('rmds', h, labels, w, b, ridge=0.0)
  means, cov = _ref_gaussian(h, labels, K)
  h64 = h.astype(np.float64)
  mean0 = h64.mean(0)
  cov0 = (h64 - mean0).T @ (h64 - mean0) / len(h64)
  ref = np.max(-_sq_maha(test, means, cov) + _sq_maha(test, mean0[None], cov0), axis=1)
  # RMDS is a difference of two squared distances of up to ~4e3: float32 leaves ~1e-4 absolute.
  np.testing.assert_allclose(_jit_score(det, state, test), ref, rtol=1e-5, atol=1e-3)


def _maps(seed, n, labels):
  rng = np.random.default_rng(seed)
  a = (rng.standard_normal((n, 2, 2, 3)) + labels[:, None, None, None]).astype(np.float32)
  b = (rng.standard_normal((n, 5)) - labels[:, None]).astype(np.float32)
  return {'block1': a, 'block2': b}


def test_multilayer_layer_scores_and_logistic_weights():
  labels = np.arange(200) % 3
  maps = _maps(2, 200, labels)
  batches = [{'feature_maps': {k: v[i:i + 64] for k, v in maps.items()}, 'labels': labels[i:i + 64]}
             for i in range(0, 200, 64)]
  det = detectors.get('mahalanobis_multilayer')
  state = det.fit(batches, num_classes=3, ridge=0.0)
  test = _maps(3, 10, np.arange(10) % 3)
  layer = distance.layer_scores(state, test)
  for i, key in enumerate(('block1', 'block2')):
    pooled = maps[key].reshape(200, -1, maps[key].shape[-1]).mean(1)
    means, cov = _ref_gaussian(pooled, labels, 3)
    test_pooled = test[key].reshape(10, -1, test[key].shape[-1]).mean(1)
    np.testing.assert_allclose(layer[:, i], -_sq_maha(test_pooled, means, cov).min(1), rtol=2e-5)
  # Uniform weights until fitted.
  np.testing.assert_allclose(jax.jit(lambda s, m: det.score(s, feature_maps=m))(state, test), layer.mean(1),
                             rtol=1e-5)
  # Unpenalised logistic regression equals scikit-learn's maximum-likelihood fit.
  rng = np.random.default_rng(4)
  id_s = rng.standard_normal((80, 2)) + [1.0, 0.5]
  ood_s = rng.standard_normal((60, 2)) * [1.0, 2.0]
  fitted = distance.fit_layer_weights(state, id_s, ood_s, l2=0.0)
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
  state = distance.fit_multilayer([{'feature_maps': [(x_train @ a).astype(np.float32)], 'labels': labels}],
                                  num_classes=3)
  means, cov = _ref_gaussian(x_train @ a, labels, 3)
  x = rng.standard_normal((7, 6))
  f = x @ a
  nearest = _sq_maha(f, means, cov).argmin(1)
  grad = 2.0 * (np.linalg.solve(cov, (f - means[nearest]).T).T) @ a.T
  x_hat = x - 0.01 * np.sign(grad)
  ref = -_sq_maha(x_hat @ a, means, cov).min(1)
  apply_fn = lambda inputs: {'feature_maps': [inputs @ jnp.asarray(a, jnp.float32)]}
  det = detectors.get('mahalanobis_ensemble')
  out = jax.jit(lambda s, x: det.score(s, inputs=x, apply_fn=apply_fn, noise=0.01))(state, x.astype(np.float32))
  np.testing.assert_allclose(out, ref, rtol=1e-4)
  # Preprocessing moves towards the nearest class: the score never drops.
  plain = distance.layer_scores(state, [f.astype(np.float32)])[:, 0]
  assert np.all(np.asarray(out) >= np.asarray(plain) - 1e-4)


def test_knn_matches_brute_force():
  h, labels, w, b, test = _problem(seed=6)
  det, state = _fit('knn', h, labels, w, b)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  dist = np.linalg.norm(unit(test.astype(np.float64))[:, None] - unit(h.astype(np.float64))[None], axis=-1)
  for k in (1, 5):
    np.testing.assert_allclose(_jit_score(det, state, test, k=k), -np.sort(dist, 1)[:, k - 1], rtol=1e-4, atol=1e-5)
  # k beyond the bank is clipped to it: the farthest entry.
  np.testing.assert_allclose(det.score(state, features=test, k=10_000), -dist.max(1), rtol=1e-4, atol=1e-5)


def _ref_vim(h, w, b, test, dim):
  h, test = h.astype(np.float64), test.astype(np.float64)
  w, b = w.astype(np.float64), b.astype(np.float64)
  u = -np.linalg.pinv(w.T) @ b
  vals, vecs = np.linalg.eig((h - u).T @ (h - u) / len(h))
  null = vecs[:, np.argsort(-vals.real)[dim:]].real
  alpha = (h @ w + b).max(1).mean() / np.linalg.norm((h - u) @ null, axis=1).mean()
  resid = np.linalg.norm((test - u) @ null, axis=1)
  return special.logsumexp(test @ w + b, axis=1) - alpha * resid, -resid


def test_vim_and_residual_match_reference():
  h, labels, w, b, test = _problem(seed=7)
  det, state = _fit('vim', h, labels, w, b)
  for dim in (None, 2, 6):
    vim_ref, res_ref = _ref_vim(h, w, b, test, 4 if dim is None else dim)
    np.testing.assert_allclose(_jit_score(det, state, test, dim=dim), vim_ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(detectors.get('residual').score(state, features=test, dim=dim), res_ref,
                               rtol=2e-4, atol=2e-4)


def test_vim_residual_is_zero_inside_the_principal_subspace():
  rng = np.random.default_rng(8)
  w, b = rng.standard_normal((D, K)), rng.standard_normal(K)
  u = -np.linalg.pinv(w.T) @ b
  basis = np.linalg.qr(rng.standard_normal((D, 3)))[0]
  # Training features: a dominant 3-d subspace around u plus small isotropic noise (so α is finite).
  h = u + (rng.standard_normal((300, 3)) * [5.0, 3.0, 2.0]) @ basis.T + 0.05 * rng.standard_normal((300, D))
  det = detectors.get('vim')
  state = det.fit([{'features': h.astype(np.float32)}], head=(w.astype(np.float32), b.astype(np.float32)))
  # The fitted principal subspace recovers the planted one.
  fitted = np.asarray(state.basis, np.float64)[:, :3]
  np.testing.assert_allclose(np.linalg.svd(fitted.T @ basis)[1], 1.0, atol=1e-3)
  # Test features inside the fitted subspace: zero residual, and ViM equals the energy score.
  test = (u + rng.standard_normal((10, 3)) @ fitted.T).astype(np.float32)
  res = detectors.get('residual').score(state, features=test, dim=3)
  np.testing.assert_allclose(res, 0.0, atol=1e-4)
  assert 1.0 < float(state.alpha[3]) < 1e4
  np.testing.assert_allclose(det.score(state, features=test, dim=3),
                             special.logsumexp(test.astype(np.float64) @ w + b, axis=1), rtol=1e-4, atol=1e-2)
  # Outside it (dim = 2 leaves the third planted direction in the residual) the score drops below energy.
  assert np.all(np.asarray(det.score(state, features=test, dim=2)) <
                special.logsumexp(test.astype(np.float64) @ w + b, axis=1))


def test_she_matches_reference():
  h, labels, w, b, test = _problem(seed=9)
  det, state = _fit('she', h, labels, w, b)
  pred = np.argmax(h.astype(np.float64) @ w + b, axis=1)
  patterns = []
  for c in range(K):
    correct = (labels == c) & (pred == c)
    patterns.append(h[correct].mean(0) if correct.any() else h[labels == c].mean(0))
  patterns = np.stack(patterns).astype(np.float64)
  test_pred = np.argmax(test.astype(np.float64) @ w + b, axis=1)
  ref = np.sum(test * patterns[test_pred], axis=1)
  np.testing.assert_allclose(_jit_score(det, state, test), ref, rtol=1e-4)


def test_nnguide_matches_reference():
  h, labels, w, b, test = _problem(seed=10)
  det, state = _fit('nnguide', h, labels, w, b, fraction=1.0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  h64, t64 = h.astype(np.float64), test.astype(np.float64)
  bank = unit(h64) * special.logsumexp(h64 @ w + b, axis=1)[:, None]
  sims = unit(t64) @ bank.T
  for k in (1, 10):
    ref = special.logsumexp(t64 @ w + b, axis=1) * np.sort(sims, 1)[:, ::-1][:, :k].mean(1)
    np.testing.assert_allclose(_jit_score(det, state, test, k=k), ref, rtol=1e-4, atol=1e-4)
  small = det.fit(_batches(h, labels), head=(w, b), fraction=0.25, seed=1)
  assert 20 < small.bank.shape[0] < 100  # A Bernoulli(0.25) subset of 240 rows.


def test_fdbd_and_nci_match_reference():
  h, labels, w, b, test = _problem(seed=11)
  det, state = _fit('fdbd', h, labels, w, b)
  h64, t64, w64 = h.astype(np.float64), test.astype(np.float64), w.astype(np.float64)
  mu = h64.mean(0)
  z = t64 @ w64 + b
  pred = z.argmax(1)
  ref_boundary = np.array([np.mean([abs(z[i, pred[i]] - z[i, j]) / np.linalg.norm(w64[:, pred[i]] - w64[:, j])
                                    for j in range(K) if j != pred[i]]) for i in range(len(t64))])
  np.testing.assert_allclose(_jit_score(det, state, test),
                             ref_boundary / np.linalg.norm(t64 - mu, axis=1), rtol=1e-5)
  np.testing.assert_allclose(_jit_score(det, state, test, normalizer='norm'),
                             ref_boundary / np.linalg.norm(t64, axis=1), rtol=1e-5)
  nci = detectors.get('nci')
  nci_state = nci.fit(_batches(h, labels), head=(w, b), num_classes=K)
  centred = t64 - mu
  ref = (np.sum(w64[:, pred].T * centred, axis=1) / np.linalg.norm(centred, axis=1)
         + 0.01 * np.abs(t64).sum(1))
  np.testing.assert_allclose(_jit_score(nci, nci_state, test, alpha=0.01), ref, rtol=1e-5)


def test_neco_matches_reference():
  h, labels, w, b, test = _problem(seed=12)
  det, state = _fit('neco', h, labels, w, b)
  h64, t64 = h.astype(np.float64), test.astype(np.float64)
  mu, sd = h64.mean(0), h64.std(0)
  # Principal directions from the SVD of the centred data (not from a covariance eigendecomposition).
  vt = np.linalg.svd(h64 - mu, full_matrices=False)[2]
  for dim in (None, 3):
    d = K if dim is None else dim
    ref = np.linalg.norm(t64 @ vt[:d].T, axis=1) / np.linalg.norm(t64, axis=1)
    np.testing.assert_allclose(_jit_score(det, state, test, dim=dim), ref, rtol=1e-4)
  z = (t64 - mu) / sd
  vt_std = np.linalg.svd((h64 - mu) / sd, full_matrices=False)[2]
  ref = np.linalg.norm(z @ vt_std[:3].T, axis=1) / np.linalg.norm(z, axis=1) * (t64 @ w + b).max(1)
  np.testing.assert_allclose(_jit_score(det, state, test, dim=3, standardize=True, use_max_logit=True), ref,
                             rtol=1e-4)


def test_streaming_fit_is_batch_invariant():
  h, labels, w, b, test = _problem(seed=13)
  one = distance.fit_rmds([{'features': h, 'labels': labels}], num_classes=K)
  many = distance.fit_rmds(_batches(h, labels, sizes=(3, 41, 1)), num_classes=K)
  np.testing.assert_allclose(distance.rmds(one, test), distance.rmds(many, test), rtol=1e-5)
  # Features around 1e4 keep their precision: the fit never forms E[hhᵀ] − μμᵀ.
  offset = 1e4
  shifted = distance.fit_rmds([{'features': h.astype(np.float64) + offset, 'labels': labels}], num_classes=K)
  np.testing.assert_allclose(shifted.cholesky, one.cholesky, rtol=1e-4, atol=1e-5)


def test_errors():
  h, labels, w, b, test = _problem()
  det, state = _fit('vim', h, labels, w, b)
  with pytest.raises(ValueError, match="'vim' needs features"):
    det.score(state, logits=test @ w)
  with pytest.raises(ValueError, match='SubspaceState'):
    det.score((), features=test)
  with pytest.raises(ValueError, match='dimension 3'):
    det.score(state, features=test[:, :3])
  with pytest.raises(TypeError, match='passes'):
    det.fit(iter(_batches(h, labels)), head=(w, b))
  with pytest.raises(ValueError, match=r'dim must lie in \[0, 8\]'):
    det.score(state, features=test, dim=9)
  maha = detectors.get('mahalanobis')
  with pytest.raises(ValueError, match='no examples'):
    maha.fit([{'features': h[:4], 'labels': np.zeros(4, int)}], num_classes=K)
  with pytest.raises(ValueError, match='singular'):
    distance.fit_rmds([{'features': np.zeros((20, 3), np.float32), 'labels': np.arange(20) % 2}], num_classes=2)
  with pytest.raises(ValueError, match="needs 'labels'"):
    distance.fit_rmds([{'features': h}], num_classes=K)
  with pytest.raises(ValueError, match='fitted on 2 feature maps'):
    labels3 = np.arange(200) % 3
    ml = distance.fit_multilayer([{'feature_maps': _maps(2, 200, labels3), 'labels': labels3}], num_classes=3)
    distance.layer_scores(ml, [np.ones((2, 3), np.float32)])
  with pytest.raises(ValueError, match='shape'):
    distance.fit_layer_weights(ml, np.ones((5, 3)), np.ones((5, 2)))
