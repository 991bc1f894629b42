"""Tests for ood_jax.detectors.subspace (ViM, Residual, NECO) against float64 NumPy references written from
the papers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import special

from ood_jax import detectors
from tests.detectors import problems

D, K = problems.D, problems.K


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
  h, labels, w, b, test = problems.problem(seed=7)
  det, state = problems.fit('vim', h, labels, w, b)
  for dim in (None, 2, 6):
    vim_ref, res_ref = _ref_vim(h, w, b, test, 4 if dim is None else dim)
    np.testing.assert_allclose(problems.jit_score(det, state, test, dim=dim), vim_ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(detectors.get('residual').score(state, {'features': test}, dim=dim), res_ref,
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
  res = detectors.get('residual').score(state, {'features': test}, dim=3)
  np.testing.assert_allclose(res, 0.0, atol=1e-4)
  assert 1.0 < float(state.alpha[3]) < 1e4
  np.testing.assert_allclose(det.score(state, {'features': test}, dim=3),
                             special.logsumexp(test.astype(np.float64) @ w + b, axis=1), rtol=1e-4, atol=1e-2)
  # Outside it (dim = 2 leaves the third planted direction in the residual) the score drops below energy.
  assert np.all(np.asarray(det.score(state, {'features': test}, dim=2)) <
                special.logsumexp(test.astype(np.float64) @ w + b, axis=1))


def test_grid_drops_principal_dimensions_of_d_and_more():
  """dim ≥ D leaves no residual (ViM = energy, Residual = 0, NECO = 1): the tuning grid must not offer it."""
  h, labels, w, b, test = problems.problem(seed=7)
  det, state = problems.fit('vim', h, labels, w, b)
  energy = special.logsumexp(test.astype(np.float64) @ w + b, axis=1)
  np.testing.assert_allclose(problems.jit_score(det, state, test, dim=D), energy, rtol=1e-5, atol=1e-5)
  for name in ('vim', 'residual', 'neco'):
    grid = detectors.get(name).grid_for(feature_dim=64)['dim']
    assert grid[0] is None and all(d < 64 for d in grid[1:]), (name, grid)
  assert detectors.get('vim').grid_for(feature_dim=64)['dim'] == (None,)  # OpenOOD's grid starts at 64
  assert detectors.get('neco').grid_for(feature_dim=64)['dim'] == (None, 16, 32)
  assert detectors.get('vim').grid_for(feature_dim=8)['dim'] == (None,)


def test_neco_matches_reference():
  h, labels, w, b, test = problems.problem(seed=12)
  det, state = problems.fit('neco', h, labels, w, b)
  h64, t64 = h.astype(np.float64), test.astype(np.float64)
  mu, sd = h64.mean(0), h64.std(0)
  # Principal directions from the SVD of the centred data (not from a covariance eigendecomposition).
  vt = np.linalg.svd(h64 - mu, full_matrices=False)[2]
  for dim in (None, 3):
    d = K if dim is None else dim
    ref = np.linalg.norm(t64 @ vt[:d].T, axis=1) / np.linalg.norm(t64, axis=1)
    np.testing.assert_allclose(problems.jit_score(det, state, test, dim=dim), ref, rtol=1e-4)
  z = (t64 - mu) / sd
  vt_std = np.linalg.svd((h64 - mu) / sd, full_matrices=False)[2]
  ref = np.linalg.norm(z @ vt_std[:3].T, axis=1) / np.linalg.norm(z, axis=1) * (t64 @ w + b).max(1)
  np.testing.assert_allclose(problems.jit_score(det, state, test, dim=3, standardize=True, use_max_logit=True), ref,
                             rtol=1e-4)


def test_errors():
  h, labels, w, b, test = problems.problem()
  det, state = problems.fit('vim', h, labels, w, b)
  with pytest.raises(ValueError, match="'vim' needs features"):
    det.score(state, {'logits': test @ w})
  with pytest.raises(ValueError, match='SubspaceState'):
    det.score((), {'features': test})
  with pytest.raises(ValueError, match='dimension 3'):
    det.score(state, {'features': test[:, :3]})
  with pytest.raises(TypeError, match='passes'):
    det.fit(iter(problems.batches(h, labels)), head=(w, b))
  with pytest.raises(ValueError, match=r'dim must lie in \[0, 8\]'):
    det.score(state, {'features': test}, dim=9)


# ------------------------------------------------------------------------------------------------
# pNML.
# ------------------------------------------------------------------------------------------------


def _ref_pnml(train, test, logits, *, bias, rcond):
  """The single-layer pNML regret (Bibas, Feder & Hassner 2021), authors' normalisation and bias entry, float64."""
  def rows(x):
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.hstack([np.ones((len(x), 1)), x]) if bias else x

  x_train, x = rows(train), rows(test)
  gram = x_train.T @ x_train
  parallel = np.linalg.pinv(gram, rcond=rcond)
  bot = np.eye(len(gram)) - parallel @ gram
  x_par = np.einsum('nd,de,ne->n', x, parallel, x)
  x_bot = np.einsum('nd,de,ne->n', x, bot, x)
  g = np.maximum(x_bot, x_par / (1 + x_par))[:, None]
  p = special.softmax(logits.astype(np.float64), axis=1)
  regret = np.log(np.sum(p / (p + (1 - p) * p ** g), axis=1)) / np.log(p.shape[1])
  return -regret, x_bot


def test_pnml_matches_reference():
  h, labels, w, b, test = problems.problem(seed=23)
  logits = test @ w + b
  det = detectors.get('pnml')
  # Full rank (N > D + 1), and rank deficient (5 training rows in D + 1 = 9 dimensions), with and without bias.
  for train, bias in ((h, True), (h[:5], True), (h[:5], False)):
    state = det.fit([{'features': train}], bias=bias)
    ref, x_bot = _ref_pnml(train, test, logits, bias=bias, rcond=(h.shape[1] + bias) * np.finfo(np.float64).eps)
    got = jax.jit(lambda s, f, z: det.score(s, {'features': f, 'logits': z}))(state, test, logits)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert (x_bot.max() > 0.1) == (len(train) == 5)  # the orthogonal part matters off the training span
  with pytest.raises(ValueError, match='at least 2 classes'):
    det.score(state, {'features': test, 'logits': logits[:, :1]})
  with pytest.raises(ValueError, match='logits have 20 rows but features have 3'):
    det.score(state, {'features': test[:3], 'logits': logits})
