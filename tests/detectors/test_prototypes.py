"""Tests for ood_jax.detectors.prototypes (SHE, fDBD, NCI) against float64 NumPy references written from the
papers."""

from __future__ import annotations

import numpy as np

from ood_jax import detectors
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
