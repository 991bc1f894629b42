"""Tests for ood_jax.detectors.prototypes (SHE, fDBD, NCI, OpenMax, CARef, CADRef) against float64 NumPy references
written from the papers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ood_jax import detectors
from ood_jax.detectors import prototypes
from tests.detectors import problems

K = problems.K


def test_she_matches_reference():
  h, labels, w, b, test = problems.problem(seed=9)
  det, state = problems.fit('she', h, labels, w, b)
  pred = np.argmax(h.astype(np.float64) @ w + b, axis=1)
  patterns = []
  for c in range(K):
    correct = (labels == c) & (pred == c)
    patterns.append(h[correct].mean(0) if correct.any() else h[labels == c].mean(0))
  patterns = np.stack(patterns).astype(np.float64)
  test_pred = np.argmax(test.astype(np.float64) @ w + b, axis=1)
  ref = np.sum(test * patterns[test_pred], axis=1)
  np.testing.assert_allclose(problems.jit_score(det, state, test), ref, rtol=1e-4)


def test_fdbd_and_nci_match_reference():
  h, labels, w, b, test = problems.problem(seed=11)
  det, state = problems.fit('fdbd', h, labels, w, b)
  h64, t64, w64 = h.astype(np.float64), test.astype(np.float64), w.astype(np.float64)
  mu = h64.mean(0)
  z = t64 @ w64 + b
  pred = z.argmax(1)
  ref_boundary = np.array([np.mean([abs(z[i, pred[i]] - z[i, j]) / np.linalg.norm(w64[:, pred[i]] - w64[:, j])
                                    for j in range(K) if j != pred[i]]) for i in range(len(t64))])
  np.testing.assert_allclose(problems.jit_score(det, state, test),
                             ref_boundary / np.linalg.norm(t64 - mu, axis=1), rtol=1e-5)
  np.testing.assert_allclose(problems.jit_score(det, state, test, normalizer='norm'),
                             ref_boundary / np.linalg.norm(t64, axis=1), rtol=1e-5)
  nci = detectors.get('nci')
  nci_state = nci.fit(problems.batches(h, labels), head=(w, b), num_classes=K)
  centred = t64 - mu
  ref = (np.sum(w64[:, pred].T * centred, axis=1) / np.linalg.norm(centred, axis=1)
         + 0.01 * np.abs(t64).sum(1))
  np.testing.assert_allclose(problems.jit_score(nci, nci_state, test, alpha=0.01), ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# OpenMax.
# ------------------------------------------------------------------------------------------------


def _weibull_log_likelihood(x, shape, scale):
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return stats.weibull_min.logpdf(x, shape, scale=scale).sum()


def test_weibull_fit_is_the_maximum_likelihood_of_scipy():
  from scipy import stats  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  samples = stats.weibull_min.rvs(2.5, scale=3.0, size=(2, 30), random_state=1)
  tail = np.sort(rng.gamma(3.0, size=20)) + 2.0
  libmr = tail - tail.min() + 10000.0  # libMR's FitHigh translation: very large shapes
  for x in (*samples, libmr):
    shape, scale = prototypes.fit_weibull(x)
    ref_shape, _, ref_scale = stats.weibull_min.fit(x, floc=0)
    np.testing.assert_allclose([shape[0], scale[0]], [ref_shape, ref_scale], rtol=2e-5)
    # The likelihood equation is solved to machine precision: at least as likely as scipy's optimum.
    assert _weibull_log_likelihood(x, shape[0], scale[0]) >= _weibull_log_likelihood(x, ref_shape, ref_scale) - 1e-9
  # Padded rows (a class with a short tail) fit their valid entries only; equal values give a step.
  shape, scale = prototypes.fit_weibull(np.stack([samples[0], np.r_[samples[1][:10], np.ones(20)]]),
                                        np.stack([np.ones(30, bool), np.arange(30) < 10]))
  np.testing.assert_allclose([shape[1], scale[1]], [x[0] for x in prototypes.fit_weibull(samples[1][:10])])
  assert prototypes.fit_weibull(np.full(4, 3.0))[0][0] >= 1e12


def _openmax_problem(seed=0, n=200, k=K):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % k
  logits = (4.0 * np.eye(k)[labels] + 1.5 * rng.standard_normal((n, k))).astype(np.float32)
  test = (np.eye(k)[rng.integers(0, k, 12)] * rng.uniform(0, 6, (12, 1)) + rng.standard_normal((12, k)))
  return logits, labels, test.astype(np.float32)


def _openmax_reference(logits, labels, test, *, tailsize, alpha, eu, cos):
  """Bendale & Boult 2016, Algorithms 1–2, float64, with scipy's Weibull fit of libMR's shifted tail."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  z, t = logits.astype(np.float64), test.astype(np.float64)
  k = z.shape[1]

  def dist(v, mu):
    return eu * np.linalg.norm(v - mu, axis=-1) + cos * (1 - v @ mu / (np.linalg.norm(v, axis=-1) * np.linalg.norm(mu)))

  cdfs = []
  correct = z.argmax(1) == labels
  for c in range(k):
    members = z[(labels == c) & correct]
    mu = members.mean(0)
    tail = np.sort(dist(members, mu))[-tailsize:]
    shape, _, scale = stats.weibull_min.fit(tail - tail.min() + 10000.0, floc=0)
    cdfs.append(stats.weibull_min.cdf(dist(t, mu) - tail.min() + 10000.0, shape, scale=scale))
  w = np.stack(cdfs, 1)
  scores = []
  for v, wv in zip(t, w):
    omega = np.zeros(k)
    omega[np.argsort(-v)[:alpha]] = (alpha - np.arange(alpha)) / alpha
    revised = np.r_[np.sum(v * omega * wv), v * (1 - omega * wv)]
    scores.append(-np.exp(revised[0]) / np.exp(revised).sum())
  return np.array(scores)


def test_openmax_matches_reference():
  logits, labels, test = _openmax_problem()
  train = [{'logits': logits[i:i + 64], 'labels': labels[i:i + 64]} for i in range(0, len(logits), 64)]
  det = detectors.get('openmax')
  score = jax.jit(lambda s, z, a: det.score(s, {'logits': z}, alpha=a))  # alpha traced: one compilation
  for distance, eu, cos in (('euclidean', 1.0, 0.0), ('eucos', 1 / 200, 1.0)):
    state = det.fit(train, tailsize=8, distance=distance)
    for alpha in (2, K):
      ref = _openmax_reference(logits, labels, test, tailsize=8, alpha=alpha, eu=eu, cos=cos)
      assert ref.min() < -0.05 and ref.max() > -0.05  # some outliers and some inliers
      np.testing.assert_allclose(score(state, test, alpha), ref, atol=2e-4)
  # pytorch-ood's sign is the opposite (P(unknown) as outlier score) and its alpha is clipped to K alike.
  np.testing.assert_allclose(det.score(state, {'logits': test}, alpha=50), det.score(state, {'logits': test}, alpha=K))


def test_openmax_errors():
  logits, labels, _ = _openmax_problem()
  det = detectors.get('openmax')
  with pytest.raises(ValueError, match='distance must be one of'):
    det.fit([{'logits': logits, 'labels': labels}], distance='manhattan')
  with pytest.raises(ValueError, match='class 3 has no examples'):
    det.fit([{'logits': logits, 'labels': labels % 3}])
  with pytest.raises(TypeError, match='makes 2 passes'):
    det.fit(iter([{'logits': logits, 'labels': labels}]))
  state = det.fit([{'logits': logits, 'labels': labels}])
  with pytest.raises(ValueError, match='alpha must be a number >= 1'):
    det.score(state, {'logits': logits}, alpha=0)
  with pytest.raises(ValueError, match='fitted on 4'):
    det.score(state, {'logits': logits[:, :3]})


# ------------------------------------------------------------------------------------------------
# CARef and CADRef.
# ------------------------------------------------------------------------------------------------


def _cadref_reference(h, fit_logits, test, w, b):
  """Ling et al. 2025 in float64: class means by predicted class (the global mean for a class never predicted),
  CARef's −‖h − μ_ŷ‖₁/‖h‖₁, and CADRef's −(E_p/S(z) + E_n/S̄) for each confidence S (the authors' code)."""
  h, fit_logits, t = (np.asarray(x, np.float64) for x in (h, fit_logits, test))
  fit_pred = fit_logits.argmax(1)
  means = np.stack([h[fit_pred == c].mean(0) if (fit_pred == c).any() else h.mean(0) for c in range(K)])

  def confidences(z):
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    rest = p @ (1 - np.eye(K))  # 1 − p_j as the others' mass: 1 − p cancels for p_j ≈ 1, even in float64
    order = np.argsort(-p, axis=1)[:, :max(10, K // 10)]  # M = 10 > K: every class
    top, top_rest = np.take_along_axis(p, order, 1), np.take_along_axis(rest, order, 1)
    return {'energy': np.log(np.exp(z).sum(1)), 'gen': 1 / np.sum(top ** 0.1 * top_rest ** 0.1, axis=1),
            'max_logit': z.max(1), 'msp': p.max(1)}

  z = t @ w.astype(np.float64) + b
  pred = z.argmax(1)
  relative = t - means[pred]
  l1 = np.abs(t).sum(1)
  caref = -np.abs(relative).sum(1) / l1
  sign = np.sign(w.astype(np.float64)[:, pred].T)
  e_p = np.where(sign * relative > 0, np.abs(relative), 0).sum(1) / l1
  e_n = np.where(sign * relative < 0, np.abs(relative), 0).sum(1) / l1
  np.testing.assert_allclose(e_p + e_n, -caref)  # the decomposition is exact (no zero weight)
  train, here = confidences(fit_logits), confidences(z)
  return caref, {s: -(e_p / here[s] + e_n / train[s].mean()) for s in here}, pred


def test_caref_and_cadref_match_reference():
  # ŷ and the means come from the batches' logits when they have them; there class 3 never wins, so its mean
  # falls back to the global one, which test rows predicted as 3 (by the head) then use.
  h, _, w, b, test = problems.problem(seed=14)
  fit_logits = h.astype(np.float64) @ w + b - np.array([0.0, 0.0, 0.0, 100.0])
  train = [{'features': h[i:i + 100], 'logits': fit_logits[i:i + 100].astype(np.float32)} for i in range(0, 240, 100)]
  caref_ref, cadref_ref, pred = _cadref_reference(h, fit_logits, test, w, b)
  assert (pred == 3).sum() >= 3
  caref, cadref = detectors.get('caref'), detectors.get('cadref')
  state = caref.fit(train, head=(w, b), num_classes=K)
  np.testing.assert_allclose(problems.jit_score(caref, state, test), caref_ref, rtol=1e-5)
  np.testing.assert_allclose(problems.jit_score(cadref, state, test), cadref_ref['energy'], rtol=1e-5)
  before = prototypes._cadref._cache_size()  # pylint: disable=protected-access
  for score in cadref.grid['logit_score']:
    logits = test.astype(np.float64) @ w + b  # given logits replace the head's
    np.testing.assert_allclose(cadref.score(state, {'features': test, 'logits': logits.astype(np.float32)},
                                            logit_score=score), cadref_ref[score], rtol=1e-5, err_msg=score)
  assert prototypes._cadref._cache_size() <= before + 1  # pylint: disable=protected-access  (S is traced)
  # pytorch-ood's CARef and CADRef return these scores negated (outlier scores), with the same predicted-class
  # means, global-mean fallback, 1e-12 clamp of ‖h‖₁ and S̄ from the fitting data; its default S is energy too.


def test_caref_errors():
  h, labels, w, b, test = problems.problem(seed=14)
  caref, cadref = detectors.get('caref'), detectors.get('cadref')
  with pytest.raises(ValueError, match='no examples'):
    caref.fit([], head=(w, b))
  with pytest.raises(ValueError, match='num_classes=3'):
    caref.fit(problems.batches(h, labels), head=(w, b), num_classes=3)
  with pytest.raises(ValueError, match='3 rows for 4 features'):
    caref.fit([{'features': h[:4], 'logits': h[:3, :K]}], head=(w, b))
  state = caref.fit(problems.batches(h, labels), head=(w, b))
  with pytest.raises(ValueError, match='logit_score must be one of'):
    cadref.score(state, {'features': test}, logit_score='entropy')
  with pytest.raises(ValueError, match='fitted on dimension 8'):
    caref.score(state, {'features': test[:, :5]})
  with pytest.raises(ValueError, match='fitted on 4'):
    cadref.score(state, {'features': test, 'logits': test[:, :3]})
  with pytest.raises(ValueError, match='logits have 2 rows but features 20'):
    caref.score(state, {'features': test, 'logits': test[:2, :K]})
  with pytest.raises(ValueError, match='CARefState'):
    cadref.score((), {'features': test})
