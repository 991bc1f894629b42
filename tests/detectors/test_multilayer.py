"""Tests for ood_jax.detectors.multilayer (Lee et al. 2018's multi-layer, input-preprocessed Mahalanobis; Sastry &
Oore 2020's Gram matrices; Liu et al. 2024's NAC-UE) against float64 NumPy references, scikit-learn's logistic
regression, a hand-derived gradient and finite differences."""

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


# Conventions (docs/detectors.md): Gram follows the paper (ranges per predicted class, −Σ_l δ_l/E[δ_l]) with
# OpenOOD's held-out normaliser, and reproduces OpenOOD v1.5's choices with use_labels=True and
# divide_by_confidence=True (both checked below). NAC-UE follows the authors' code (their thresholds, O as a
# count, 1 000 rows). pytorch-ood is not installed here; its Gram (−Δ/50 on channel-summed row sums, no
# normalisation) and NACUE (geometric bins, every row) differ by design, so no equality test is possible.


def _gram_rows_reference(x, max_power):
  """Row sums of G_p = (F^p F^pᵀ)^{1/p} (root of the row sum, as the authors' code) from the C × C
  matrices themselves, float64: `[N, P, C]`."""
  f = np.asarray(x, np.float64).reshape(len(x), -1, x.shape[-1]).transpose(0, 2, 1)  # [N, C, S]
  rows = []
  for p in range(1, max_power + 1):
    r = np.einsum('ncs,nds->ncd', f ** p, f ** p).sum(-1)
    rows.append(np.sign(r) * np.abs(r) ** (1.0 / p))
  return np.stack(rows, 1)


def _delta(v, lo, hi):
  """Sastry & Oore's δ summed over powers and channels, with the authors' |bound| + 1e-6."""
  return (np.maximum(lo - v, 0) / (np.abs(lo) + 1e-6) + np.maximum(v - hi, 0) / (np.abs(hi) + 1e-6)).sum((1, 2))


def test_gram_matches_float64_reference():
  # Three classes and a fourth that no training row is predicted as (it gets the range of all rows).
  rng = np.random.default_rng(7)
  n, k, power, holdout = 200, 4, 3, 0.25
  labels = np.arange(n) % 3
  maps = {key: np.abs(v) for key, v in problems.maps(2, n, labels).items()}
  logits = (rng.standard_normal((n, k)) + 2.0 * np.eye(k)[labels]).astype(np.float32)
  logits[:, 3] = -50.0
  batches = [{'feature_maps': {key: v[i:i + 64] for key, v in maps.items()}, 'logits': logits[i:i + 64],
              'labels': labels[i:i + 64]} for i in range(0, n, 64)]
  # The documented held-out draw: one uniform number per row, batch by batch, from `seed`.
  draws = np.random.default_rng(0)
  held = np.concatenate([draws.random(len(b['labels'])) < holdout for b in batches])
  test_maps = {key: 1.4 * np.abs(v) for key, v in problems.maps(3, 12, np.arange(12) % 3).items()}
  test_logits = rng.standard_normal((12, k)).astype(np.float32)
  test_logits[:2, 3] = 10.0  # predicted as the class without training rows
  train_rows = [_gram_rows_reference(maps[key], power) for key in ('block1', 'block2')]
  test_rows = [_gram_rows_reference(test_maps[key], power) for key in ('block1', 'block2')]
  det = detectors.get('gram')
  before = multilayer._gram._cache_size()  # pylint: disable=protected-access
  # Paper / authors' code: predicted classes, no division. OpenOOD v1.5: true labels, divided by the MSP.
  for use_labels, divide in ((False, False), (True, True)):
    state = det.fit(batches, num_classes=k, max_power=power, holdout=holdout, use_labels=use_labels)
    classes = labels if use_labels else logits.argmax(1)
    fit = ~held
    total = np.zeros(12)
    predicted = test_logits.argmax(1)
    for layer, (rows, trows) in enumerate(zip(train_rows, test_rows)):
      lo = np.stack([rows[fit & (classes == c)].min(0) if np.any(fit & (classes == c)) else rows[fit].min(0)
                     for c in range(k)])
      hi = np.stack([rows[fit & (classes == c)].max(0) if np.any(fit & (classes == c)) else rows[fit].max(0)
                     for c in range(k)])
      np.testing.assert_allclose(state.mins[layer], lo, rtol=1e-6)
      np.testing.assert_allclose(state.maxs[layer], hi, rtol=1e-6)
      norm = _delta(rows[held], lo[classes[held]], hi[classes[held]]).mean() + 1e-7
      np.testing.assert_allclose(np.asarray(state.normalizers)[layer], norm, rtol=1e-6)
      total += _delta(trows, lo[predicted], hi[predicted]) / norm
    if divide:
      z = test_logits.astype(np.float64)
      total /= (np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)).max(1)
    out = det.score(state, {'feature_maps': test_maps, 'logits': test_logits}, divide_by_confidence=divide)
    np.testing.assert_allclose(out, -total, rtol=2e-5, atol=1e-5)
    assert np.count_nonzero(total) >= 5  # half the test rows leave the ranges: the comparison is not 0 == 0
  # The two conventions share one compilation of the jitted kernel (the flag is traced); scoring inside a
  # caller's jit is covered by tests/detectors/test_registry.py's end-to-end test.
  assert multilayer._gram._cache_size() == before + 1  # pylint: disable=protected-access


def test_gram_rows_scaled_against_overflow_and_signed():
  # Activations of ~4000 at p = 6: unscaled, the p-th powers' products (~1e43) overflow float32.
  x = 1000.0 * np.abs(problems.maps(4, 6, np.arange(6) % 3)['block1'])
  rows = jax.jit(lambda m: multilayer._gram_rows(m, 6))(x)  # pylint: disable=protected-access
  np.testing.assert_allclose(rows, _gram_rows_reference(x, 6), rtol=2e-5)
  # Signed maps (odd powers give negative row sums), on the float64 fit path.
  labels = np.arange(30) % 3
  signed = problems.maps(5, 30, labels)
  state = multilayer.fit_gram([{'feature_maps': signed, 'labels': labels}], num_classes=3, max_power=4,
                              holdout=0.0, use_labels=True)
  ref = _gram_rows_reference(signed['block1'], 4)
  assert np.any(ref < 0)
  np.testing.assert_allclose(state.mins[0], np.stack([ref[labels == c].min(0) for c in range(3)]), rtol=1e-6)
  np.testing.assert_array_equal(state.normalizers, 1.0)  # holdout=0: unnormalised


def _nac_reference_edges(m):
  # The authors' thresholds: log_1000 of an even grid on [1, √1000] for [0, ½), mirrored for [½, 1].
  left = np.log(np.linspace(1.0, np.sqrt(1000.0), m // 2)) / np.log(1000.0)
  return np.r_[left[:-1], 1.0 - left[::-1][:-1], 1.01, 1.2]


def test_nac_matches_float64_reference_with_finite_difference_gradients():
  h, labels, w, b, test = problems.problem()
  alpha, m = 0.5, 10
  w64, b64 = w.astype(np.float64), b.astype(np.float64)

  def states(x):
    # ∂KL(u‖softmax(xW + b))/∂x by central differences, float64; then σ(α x ⊙ ∂KL/∂x).
    def kl(x):
      z = x @ w64 + b64
      logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
      return -np.log(z.shape[-1]) - logp.mean(-1)
    x = np.asarray(x, np.float64)
    eye = 1e-5 * np.eye(x.shape[1])
    grad = np.stack([(kl(x + e) - kl(x - e)) / 2e-5 for e in eye], axis=1)
    return 1.0 / (1.0 + np.exp(-alpha * x * grad))

  edges = _nac_reference_edges(m)
  s = states(h)
  counts = np.stack([((s >= lo) & (s < hi)).sum(0) for lo, hi in zip(edges[:-1], edges[1:])])
  det = detectors.get('nac')
  state = det.fit(problems.batches(h, labels), head=(w, b), sigmoid_alpha=alpha, bins=m, max_rows=None)
  np.testing.assert_array_equal(state.counts, counts)
  assert len(np.unique(np.argmax(s[:, :, None] < edges[None, None, 1:], -1))) > 3  # states spread over bins
  # A subsample at least as large as the data is the data; a smaller one holds max_rows rows per neuron.
  np.testing.assert_array_equal(det.fit(problems.batches(h, labels), head=(w, b), sigmoid_alpha=alpha, bins=m,
                                        max_rows=1000).counts, counts)
  small = det.fit(problems.batches(h, labels), head=(w, b), sigmoid_alpha=alpha, bins=m, max_rows=100)
  np.testing.assert_array_equal(np.asarray(small.counts).sum(0), 100)
  assert int(small.num_rows) == 100
  st = states(test)
  index = np.stack([np.searchsorted(edges, st[:, d], side='right') - 1 for d in range(st.shape[1])], 1)
  score = jax.jit(lambda s, x, o: det.score(s, {'features': x}, min_count=o))
  for o in (3.0, 50.0):  # min_count is traced: the grid compiles once
    ref = np.minimum(counts[index, np.arange(st.shape[1])] / o, 1.0).mean(1)
    np.testing.assert_allclose(score(state, test, o), ref, rtol=1e-6)
  assert score._cache_size() == 1  # pylint: disable=protected-access


def test_gram_and_nac_errors():
  labels = np.arange(40) % 2
  maps = problems.maps(6, 40, labels)
  logits = np.eye(2, dtype=np.float32)[labels] + 0.1
  batches = [{'feature_maps': maps, 'logits': logits}]
  gram = detectors.get('gram')
  state = gram.fit(batches, num_classes=2, max_power=2, holdout=0.5)
  with pytest.raises(TypeError, match='makes 2 passes'):
    gram.fit(iter(batches), num_classes=2)
  with pytest.raises(ValueError, match=r'holdout must be a fraction in \[0, 1\)'):
    gram.fit(batches, num_classes=2, holdout=1.0)
  with pytest.raises(ValueError, match="needs 'logits' in every batch"):
    gram.fit([{'feature_maps': maps, 'labels': labels}], num_classes=2)
  with pytest.raises(ValueError, match=r'logits \(batch 0\) must have shape \[40, 3\]'):
    gram.fit(batches, num_classes=3)
  with pytest.raises(ValueError, match="'gram' needs logits"):
    gram.score(state, {'feature_maps': maps})
  with pytest.raises(ValueError, match='fitted on 2'):
    gram.score(state, {'feature_maps': maps, 'logits': np.ones((40, 3), np.float32)})
  with pytest.raises(ValueError, match='feature map 1 has 4 channels; the fitted layer has 5'):
    gram.score(state, {'feature_maps': {**maps, 'block2': maps['block2'][:, :4]}, 'logits': logits})
  with pytest.raises(ValueError, match=r'same number of rows, got \[39, 40\]'):
    gram.score(state, {'feature_maps': maps, 'logits': logits[:39]})
  with pytest.raises(TypeError, match='divide_by_confidence must be a bool'):
    gram.score(state, {'feature_maps': maps, 'logits': logits}, divide_by_confidence=1)
  h, labels4, w, b, _ = problems.problem()
  nac = detectors.get('nac')
  with pytest.raises(ValueError, match='bins must be an even number >= 4'):
    nac.fit([{'features': h}], head=(w, b), bins=7)
  with pytest.raises(ValueError, match='sigmoid_alpha must be a finite number > 0'):
    nac.fit([{'features': h}], head=(w, b), sigmoid_alpha=0.0)
  state = nac.fit([{'features': h}], head=(w, b))
  with pytest.raises(ValueError, match='min_count must be > 0'):
    nac.score(state, {'features': h}, min_count=0)
  with pytest.raises(ValueError, match="features have dimension 3, but detector 'nac' was fitted on dimension 8"):
    nac.score(state, {'features': h[:, :3]})
  with pytest.raises(ValueError, match=r"'nac' needs the state returned by its fit \(NACState\)"):
    nac.score(gram.fit(batches, num_classes=2, holdout=0.0), {'features': h})
