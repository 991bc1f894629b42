"""Tests for ood_jax.detectors.shaping against float64 NumPy references written from the papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ood_jax import detectors
from ood_jax.detectors import shaping

N, D, K = 120, 20, 5


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  h = np.maximum(rng.standard_normal((N, D)) + 0.3, 0.0).astype(np.float32)  # ReLU-like, with zeros.
  w = rng.standard_normal((D, K)).astype(np.float32)
  b = rng.standard_normal(K).astype(np.float32)
  test = np.maximum(rng.standard_normal((15, D)) * 1.5 + 0.3, 0.0).astype(np.float32)
  return h, w, b, test


def _batches(h, size=32):
  return [{'features': h[i:i + size]} for i in range(0, len(h), size)]


def _energy(h, w, b):
  return special.logsumexp(np.asarray(h, np.float64) @ w.astype(np.float64) + b, axis=-1)


def _fit(name, h, w, b, **hp):
  det = detectors.get(name)
  return det, det.fit(_batches(h), head=(w, b), num_classes=K, **hp)


def _jit_score(det, state, features, **hp):
  return jax.jit(lambda s, f: det.score(s, {'features': f}, **hp))(state, features)


def test_react_matches_reference_and_clip_above_everything_is_energy():
  h, w, b, test = _problem()
  det, state = _fit('react', h, w, b)
  c = np.percentile(h.astype(np.float64), 90)  # Exact: max_rows exceeds the 120 rows.
  np.testing.assert_allclose(_jit_score(det, state, test), _energy(np.minimum(test, c), w, b), rtol=1e-5)
  # p = 100 clips at the largest training activation; test activations below it are untouched.
  below = np.minimum(test, h.max())
  np.testing.assert_allclose(_jit_score(det, state, below, percentile=100.0), _energy(below, w, b), rtol=1e-5)
  np.testing.assert_allclose(_jit_score(det, state, test, percentile=37.5),
                             _energy(np.minimum(test, np.percentile(h, 37.5)), w, b), rtol=1e-5)


def test_activation_subsample_is_bounded_and_uniform():
  rng = np.random.default_rng(1)
  h = rng.exponential(size=(5000, 4)).astype(np.float32)
  w, b = np.ones((4, 2), np.float32), np.zeros(2, np.float32)
  state = shaping.fit_activations(_batches(h, 512), head=(w, b), max_rows=800, seed=3)
  assert int(state.num_rows) == 800
  np.testing.assert_allclose(state.mean, h.astype(np.float64).mean(0), rtol=1e-6)  # The mean is exact.
  # The 90th percentile of Exp(1) is log 10; an 800 × 4 uniform subsample gets within a few percent.
  np.testing.assert_allclose(float(np.interp(90, np.linspace(0, 100, 1001), state.quantiles)), np.log(10),
                             rtol=0.06)


def _ref_ash(x, p, variant):
  x = np.asarray(x, np.float64)
  k = max(x.shape[1] - int(np.round(x.shape[1] * p / 100)), 1)
  out = np.zeros_like(x)
  for i, row in enumerate(x):
    top = np.argsort(-row, kind='stable')[:k]
    s1 = row.sum()
    if variant == 'p':
      out[i, top] = row[top]
    elif variant == 'b':
      out[i, top] = s1 / k
    elif variant == 's':
      out[i, top] = row[top] * np.exp(s1 / row[top].sum())
    else:  # SCALE: keep everything, rescale by the same factor.
      out[i] = row * np.exp(s1 / row[top].sum())
  return out


@pytest.mark.parametrize('variant', ['p', 'b', 's'])
def test_ash_matches_reference(variant):
  h, w, b, test = _problem(seed=2)
  test = test + 0.01 * np.arange(D)  # Distinct values, so the kept set is unambiguous.
  det, state = _fit(f'ash_{variant}', h, w, b)
  for p in (90.0, 65.0):
    np.testing.assert_allclose(_jit_score(det, state, test, percentile=p),
                               _energy(_ref_ash(test, p, variant), w, b), rtol=2e-5)


def test_ash_b_spreads_the_sum_over_exactly_k_positions_with_ties():
  # Nine zeros tie below the single 4.0; with p = 80, k = 2: ASH-B must put s₁/k = 2 on the 4.0 and on
  # exactly one zero. Units 1..9 share a weight row, so whichever zero is kept the logits are [2, 2];
  # a threshold mask (h >= k-th value) would keep all nine zeros and give logit 18 for class 1.
  h = np.zeros((1, 10), np.float32)
  h[0, 0] = 4.0
  w = np.zeros((10, 2), np.float32)
  w[0, 0], w[1:, 1] = 1.0, 1.0
  state = shaping.fit_head(head=(w, np.zeros(2, np.float32)))
  out = shaping.ash(state, h, percentile=80.0, variant='b')
  np.testing.assert_allclose(out, [2.0 + np.log(2.0)], rtol=1e-6)


def test_top_mask_selects_what_top_k_selects_for_every_k():
  """The radix-select mask (k traced, one kernel for every percentile) keeps exactly `lax.top_k`'s entries: the
  largest k, ties to the lower index, with zeros, signed zeros, negatives and repeated values."""
  rng = np.random.default_rng(9)
  h = np.round(rng.standard_normal((64, 12)), 1).astype(np.float32)  # many repeated values
  h[:20] = np.maximum(h[:20], 0.0)  # ReLU rows: ties at zero
  h[20:24, :6] = -0.0
  h[24] = 1.5
  mask = jax.jit(shaping._top_mask)  # pylint: disable=protected-access
  for k in range(1, 13):
    index = np.asarray(jax.lax.top_k(h, k)[1])
    want = np.zeros_like(h)
    np.put_along_axis(want, index, 1.0, axis=1)
    np.testing.assert_array_equal(mask(h, k), want, err_msg=f'k={k}')


def test_scale_matches_reference():
  h, w, b, test = _problem(seed=3)
  test = test + 0.01 * np.arange(D)
  det, state = _fit('scale', h, w, b)
  np.testing.assert_allclose(_jit_score(det, state, test), _energy(_ref_ash(test, 85.0, 'scale'), w, b), rtol=2e-5)


def _ref_dice(h, w, b, test, sparsity):
  contrib = h.astype(np.float64).mean(0)[:, None] * w
  k = int(np.ceil((1 - sparsity) * contrib.size))
  threshold = np.sort(contrib.ravel())[::-1][k - 1]
  masked = np.where(contrib >= threshold, w, 0.0)
  return special.logsumexp(test.astype(np.float64) @ masked + b, axis=-1), masked


def test_dice_matches_reference_and_zero_sparsity_is_energy():
  h, w, b, test = _problem(seed=4)
  det, state = _fit('dice', h, w, b)
  for sparsity in (0.9, 0.5):
    ref, masked = _ref_dice(h, w, b, test, sparsity)
    assert np.count_nonzero(masked) == int(np.ceil((1 - sparsity) * D * K))
    np.testing.assert_allclose(_jit_score(det, state, test, sparsity=sparsity), ref, rtol=1e-5)
  np.testing.assert_allclose(det.score(state, {'features': test}, sparsity=0.0), _energy(test, w, b), rtol=1e-5)


def test_vra_matches_reference():
  h, w, b, test = _problem(seed=5)
  det, state = _fit('vra', h, w, b)
  lo, hi = np.percentile(h.astype(np.float64), 60, axis=0), np.percentile(h.astype(np.float64), 90, axis=0)
  t = test.astype(np.float64)
  ref = np.where(t < lo, 0.0, np.where(t > hi, hi, t + 0.3))
  np.testing.assert_allclose(_jit_score(det, state, test, gamma=0.3), _energy(ref, w, b), rtol=1e-5)
  # OpenOOD's variant: pooled percentiles, clip at both ends.
  lo, hi = np.percentile(h.astype(np.float64), 10), np.percentile(h.astype(np.float64), 90)
  out = _jit_score(det, state, test, low=10.0, per_unit=False, below='clip')
  np.testing.assert_allclose(out, _energy(np.clip(t, lo, hi), w, b), rtol=1e-5)


def test_rankfeat_matches_reference():
  rng = np.random.default_rng(6)
  maps = rng.standard_normal((4, 3, 3, D)).astype(np.float32)
  _, w, b, _ = _problem()
  det = detectors.get('rankfeat')
  state = det.fit(head=(w, b))
  out = jax.jit(lambda s, m: det.score(s, {'feature_maps': {'backbone': m}}))(state, maps)
  ref = []
  for m in maps.astype(np.float64):
    x = m.reshape(9, D)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    ref.append((x - s[0] * np.outer(u[:, 0], vt[0])).mean(0))
  np.testing.assert_allclose(out, _energy(np.stack(ref), w, b), rtol=1e-4, atol=1e-5)


def test_errors():
  h, w, b, test = _problem()
  det, state = _fit('react', h, w, b)
  with pytest.raises(ValueError, match="'react' needs features"):
    det.score(state, {'logits': test @ w})
  with pytest.raises(ValueError, match='dimension'):
    det.score(state, {'features': test[:, :5]})
  with pytest.raises(ValueError, match='ActivationState'):
    shaping.react((), test)
  with pytest.raises(ValueError, match='needs the final layer'):
    det.fit(_batches(h), num_classes=K)
  with pytest.raises(ValueError, match=r'\[0, 100\]'):
    det.score(state, {'features': test}, percentile=101.0)
  with pytest.raises(ValueError, match='no hyperparameter'):
    det.score(state, {'features': test}, sparsity=0.5)
  with pytest.raises(ValueError, match='sparsity'):
    shaping.dice(state, test, sparsity=1.0)
  with pytest.raises(ValueError, match='map_name'):
    shaping.rankfeat(shaping.fit_head(head=(w, b)), {'a': np.ones((1, 2, 2, D)), 'b': np.ones((1, 2, 2, D))})
  with pytest.raises(ValueError, match='channels'):
    shaping.rankfeat(shaping.fit_head(head=(w, b)), np.ones((1, 2, 2, 3), np.float32))


def _ref_relu_ratio(x, k):
  """Σ r / Σ of the k largest r, r = max(x, 0), one row; float64."""
  r = np.maximum(np.asarray(x, np.float64), 0.0)
  return r.sum() / np.sort(r)[::-1][:k].sum()


def _ref_lts(x, w, b, p):
  x = np.asarray(x, np.float64)
  k = max(x.shape[1] - int(np.round(x.shape[1] * p / 100)), 1)
  factor = np.array([_ref_relu_ratio(row, k) for row in x]) ** 2
  return special.logsumexp(factor[:, None] * (x @ w.astype(np.float64) + b), axis=-1)


def test_lts_matches_reference():
  """Logits × (Σ r / Σ top-k r)², r = ReLU(h) (Djurisic, Liu & Nikolić 2024, the authors' code). pytorch-ood's `LTS`
  divides the logits by this factor instead of multiplying (its p = 0.05 is the percentile 95 default here)."""
  h, w, b, test = _problem(seed=7)
  test = test - 0.3 + 0.01 * np.arange(D)  # some negative features: the ReLU matters
  det, state = _fit('lts', h, w, b)
  score = jax.jit(lambda s, f, p: det.score(s, {'features': f}, percentile=p), static_argnums=2)
  for p in (95.0, 65.0):
    np.testing.assert_allclose(score(state, test, p), _ref_lts(test, w, b, p), rtol=2e-5)


def _ref_adascale(h_fit, ht_fit, x, xt, w, b, low, high, variant, k1=5.0, k2=1.0, lmbda=10.0):
  """AdaScale (Regmi 2025, Algorithm 1) in float64: Q′, its ECDF over the fitted rows, the per-example percentile."""
  d = x.shape[1]
  c1, c2 = max(int(d * k1 / 100), 1), max(int(d * k2 / 100), 1)

  def q(a, at):
    out = []
    for row, prow in zip(np.asarray(a, np.float64), np.asarray(at, np.float64)):
      order = np.argsort(-row, kind='stable')
      out.append(np.maximum(prow[order[:c1]], 0).sum() + lmbda * np.abs(row - prow)[order[:c2]].sum())
    return np.array(out)

  reference = q(h_fit, ht_fit)
  ecdf = np.array([(reference <= v).mean() for v in q(x, xt)])
  percentile = low + (1 - ecdf) * (high - low)
  x = np.asarray(x, np.float64)
  ratio = np.array([_ref_relu_ratio(row, min(max(d - int(np.round(d * p / 100)), 1), d))
                    for row, p in zip(x, percentile)])
  if variant == 'a':
    return special.logsumexp((x * np.exp(ratio)[:, None]) @ w + b, axis=-1)
  return special.logsumexp(ratio[:, None] ** 2 * (x @ w + b), axis=-1)


def test_adascale_matches_reference_with_and_without_the_perturbation():
  h, w, b, test = _problem(seed=8)
  rng = np.random.default_rng(8)
  test = np.concatenate([h[:10], test]) + 0.01 * np.arange(D)  # ID-like rows too: ECDF values across [0, 1]
  h_t = (h + 0.3 * rng.standard_normal(h.shape)).astype(np.float32)
  test_t = (test + 0.3 * rng.standard_normal(test.shape)).astype(np.float32)
  # The registered, post-hoc AdaScale-A: no perturbation (h̃ = h); the percentile range is traced (one compile).
  det, state = _fit('adascale_a', h, w, b)
  score = jax.jit(lambda s, f, lo, hi: det.score(s, {'features': f}, low=lo, high=hi))
  for low, high in ((75.0, 85.0), (60.0, 99.0)):
    np.testing.assert_allclose(score(state, test, low, high), _ref_adascale(h, h, test, test, w, b, low, high, 'a'),
                               rtol=2e-5)
  # The paper's method (AdaScale-L here): fitted and scored with the perturbed inputs' features.
  state = shaping.fit_adascale([{'features': h, 'perturbed_features': h_t}], head=(w, b))
  np.testing.assert_allclose(shaping.adascale(state, test, perturbed_features=test_t, variant='l'),
                             _ref_adascale(h, h_t, test, test_t, w, b, 75.0, 85.0, 'l'), rtol=2e-5)
  # AdaScale-L with a fixed percentile is LTS.
  np.testing.assert_allclose(shaping.adascale(state, test, low=80.0, high=80.0, variant='l', perturbed_features=test),
                             shaping.lts(shaping.fit_head(head=(w, b)), test, percentile=80.0), rtol=1e-6)
  with pytest.raises(ValueError, match='low must be <= high'):
    shaping.adascale(state, test, low=90.0, high=80.0)
  with pytest.raises(ValueError, match=r'\(0, 100\)'):
    shaping.adascale(state, test, high=100.0)
  with pytest.raises(ValueError, match='perturbed_features have dimension'):
    shaping.adascale(state, test, perturbed_features=test[:, :3])
  with pytest.raises(ValueError, match='k1 is a percentage'):
    shaping.fit_adascale(_batches(h), head=(w, b), k1=150.0)


def test_adascale_perturbation_matches_a_hand_derived_gradient():
  """x + 0.5·sign(g) on the 5 % … of entries with the smallest |g|, g = ∇ₓ max_k z_k, for a ReLU layer and a head."""
  rng = np.random.default_rng(9)
  a = rng.standard_normal((20, D)).astype(np.float32)
  _, w, b, _ = _problem()
  x = rng.standard_normal((6, 20)).astype(np.float32)

  def apply_fn(v):
    f = jax.nn.relu(v @ jnp.asarray(a))
    return {'features': f, 'logits': f @ jnp.asarray(w) + jnp.asarray(b)}

  out = jax.jit(lambda v: shaping.adascale_perturbed_features(apply_fn, v, fraction=0.25, step=0.5))(x)
  pre = x.astype(np.float64) @ a
  feats = np.maximum(pre, 0)
  top = (feats @ w + b).argmax(1)
  grad = ((pre > 0) * w[:, top].T) @ a.T  # ∂ z_ŷ / ∂x = A (1[xA > 0] ⊙ W_ŷ)
  moved = x.astype(np.float64).copy()
  for i, g in enumerate(grad):
    idx = np.argsort(np.abs(g), kind='stable')[:5]  # int(20 · 0.25) entries
    moved[i, idx] += 0.5 * np.sign(g[idx])
  np.testing.assert_allclose(out, np.maximum(moved @ a, 0), rtol=1e-5, atol=1e-5)
