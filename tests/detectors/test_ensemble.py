"""Tests for ood_jax.detectors.ensemble against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ood_jax import detectors
from ood_jax.detectors import ensemble
from ood_jax.detectors import shaping


def _members(seed=0, m=5, n=11, k=4):
  return (2.0 * np.random.default_rng(seed).standard_normal((m, n, k))).astype(np.float32)


def _ref(z):
  p = special.softmax(z.astype(np.float64), axis=-1)
  mean = p.mean(0)
  h_mean = -np.sum(special.xlogy(mean, mean), -1)
  h_each = -np.sum(special.xlogy(p, p), -1).mean(0)
  return mean.max(-1), -h_mean, -(h_mean - h_each)


@pytest.mark.parametrize('index,name', [(0, 'ensemble'), (1, 'ensemble_entropy'), (2, 'ensemble_mi')])
def test_ensemble_scores_match_reference(index, name):
  z = _members()
  det = detectors.get(name)
  out = jax.jit(lambda z: det.score((), {'member_logits': z}))(z)
  np.testing.assert_allclose(out, _ref(z)[index], rtol=1e-5, atol=1e-6)


def test_identical_members_have_zero_mutual_information():
  z = np.repeat(_members(m=1), 4, axis=0)
  np.testing.assert_allclose(ensemble.mutual_information(z), 0.0, atol=1e-6)
  # ... and the predictive entropy is the single model's entropic score.
  p = special.softmax(z[0].astype(np.float64), axis=-1)
  np.testing.assert_allclose(ensemble.predictive_entropy(z), np.sum(special.xlogy(p, p), -1), rtol=1e-5)


def test_mc_dropout_matches_a_loop_over_keys():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 3)).astype(np.float32)
  w = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)

  def stochastic(inputs, key):
    keep = jax.random.bernoulli(key, 0.7, inputs.shape)
    return jnp.where(keep, inputs / 0.7, 0.0) @ w

  key = jax.random.PRNGKey(3)
  members = ensemble.mc_dropout_logits(stochastic, x, key, num_samples=7)
  loop = np.stack([stochastic(x, jax.random.fold_in(key, t)) for t in range(7)])
  np.testing.assert_allclose(members, loop, rtol=1e-6)
  det = detectors.get('mc_dropout_mi')
  score = lambda x, r: det.score((), {'inputs': x, 'stochastic_apply_fn': stochastic, 'rng': r}, num_samples=7)
  out = jax.jit(score)(x, key)
  np.testing.assert_allclose(out, _ref(loop)[2], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(out) < 0)  # Different masks disagree: positive mutual information.


def test_feature_dropout_without_dropout_is_msp():
  rng = np.random.default_rng(2)
  h = rng.standard_normal((8, 5)).astype(np.float32)
  w, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
  det = detectors.get('mc_dropout_features')
  state = det.fit(head=(w, b))
  out = jax.jit(lambda s, f: det.score(s, {'features': f}, rate=0.0, num_samples=3))(state, h)
  np.testing.assert_allclose(out, special.softmax(h.astype(np.float64) @ w + b, axis=1).max(1), rtol=1e-5)
  members = jax.jit(lambda s, f, r: ensemble.feature_dropout_logits(s, f, r, rate=0.5, num_samples=4))(
      state, h, jax.random.PRNGKey(0))
  assert members.shape == (4, 8, 3) and not np.allclose(members[0], members[1])


def test_errors():
  with pytest.raises(ValueError, match='member_logits'):
    detectors.get('ensemble').score((), {'logits': np.ones((2, 3), np.float32)})
  with pytest.raises(ValueError, match='rank 3'):
    ensemble.mean_msp(np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match='apply_fn'):
    ensemble.mc_dropout_logits(None, np.ones((2, 3)), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='rate'):
    ensemble.feature_dropout_logits(shaping.fit_head(head=(np.ones((3, 2)), np.ones(2))), np.ones((1, 3)),
                                    jax.random.PRNGKey(0), rate=1.0)
