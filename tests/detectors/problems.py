"""Shared data and float64 references of the feature-space detector tests (tests/detectors/test_*.py)."""

from __future__ import annotations

import jax
import numpy as np

from ood_jax import detectors

N, D, K = 240, 8, 4


def problem(seed=0, n=N, d=D, k=K):
  """Clustered features `[n, d]`, labels, a random head (w, b) and 20 test features near the data."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % k
  centres = 3.0 * rng.standard_normal((k, d))
  mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
  h = (centres[labels] + rng.standard_normal((n, d)) @ mix + 1.0).astype(np.float32)
  w = rng.standard_normal((d, k)).astype(np.float32)
  b = rng.standard_normal(k).astype(np.float32)
  test = (h[:20] + 2.0 * rng.standard_normal((20, d))).astype(np.float32)
  return h, labels, w, b, test


def batches(h, labels, sizes=(50, 7, 100)):
  """Unequal batches; the 7-row batch misses some classes."""
  out, start, i = [], 0, 0
  while start < len(h):
    size = sizes[i % len(sizes)]
    out.append({'features': h[start:start + size], 'labels': labels[start:start + size]})
    start, i = start + size, i + 1
  return out


def fit(name, h, labels, w, b, **hp):
  det = detectors.get(name)
  return det, det.fit(batches(h, labels), head=(w, b), num_classes=K, **hp)


def jit_score(det, state, features, **hp):
  return jax.jit(lambda s, f: det.score(s, {'features': f}, **hp))(state, features)


def ref_gaussian(h, labels, k):
  """Class means and the maximum-likelihood tied covariance, float64."""
  h = np.asarray(h, np.float64)
  means = np.stack([h[labels == c].mean(0) for c in range(k)])
  centred = h - means[labels]
  return means, centred.T @ centred / len(h)


def sq_maha(x, means, cov):
  """(x − μ_k)ᵀ Σ⁻¹ (x − μ_k) for every row and class, `[N, K]`, float64 by a linear solve."""
  diff = np.asarray(x, np.float64)[:, None, :] - means[None]
  return np.einsum('nkd,nkd->nk', diff, np.linalg.solve(cov, diff.reshape(-1, diff.shape[-1]).T).T.reshape(diff.shape))


def maps(seed, n, labels):
  """Two feature maps, `[n, 2, 2, 3]` and `[n, 5]`, shifted by the label."""
  rng = np.random.default_rng(seed)
  a = (rng.standard_normal((n, 2, 2, 3)) + labels[:, None, None, None]).astype(np.float32)
  b = (rng.standard_normal((n, 5)) - labels[:, None]).astype(np.float32)
  return {'block1': a, 'block2': b}
