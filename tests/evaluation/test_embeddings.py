"""Tests for ood_jax.evaluation.embeddings against brute-force NumPy and scikit-learn references."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from ood_jax.evaluation import embeddings as embedding_eval
from ood_jax import metrics


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clusters(rng, num_per_class, centres, noise):
  """Gaussian clusters around `centres` [K, D]; returns float32 features [K·n, D] and labels."""
  labels = np.repeat(np.arange(len(centres)), num_per_class)
  features = centres[labels] + noise * rng.normal(size=(len(labels), centres.shape[1]))
  return features.astype(np.float32), labels


def _id_and_ood(seed=0, num_classes=4, dim=16, num_train=100, num_test=40):
  """In-distribution classes around e_0..e_{K-1} (scaled, as backbone features are), and OOD points
  around directions orthogonal to all of them. Every score here looks at directions only (features
  are normalised), so "far away" means a different direction, not a larger norm."""
  rng = np.random.default_rng(seed)
  centres = 5.0 * np.eye(dim)[:num_classes]
  train = _clusters(rng, num_train, centres, 0.5)
  test = _clusters(rng, num_test, centres, 0.5)
  ood_centres = 5.0 * np.eye(dim)[num_classes:2 * num_classes]
  ood, _ = _clusters(rng, num_test, ood_centres, 0.5)
  return train, test, ood


# ------------------------------------------------------------------------------------------------
# extract
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------


def test_probe_separates_linearly_separable_data():
  rng = np.random.default_rng(1)
  features, labels = _clusters(rng, 50, 3.0 * np.eye(8)[:5], 0.3)
  weights, bias = embedding_eval.linear_probe(features, labels, num_classes=5)
  assert weights.shape == (8, 5) and bias.shape == (5,)
  assert weights.dtype == np.float32 and bias.dtype == np.float32
  probs = embedding_eval.probe_probabilities(features, weights, bias)
  assert np.mean(np.argmax(probs, axis=1) == labels) == 1.0


def test_probe_matches_sklearn_logistic_regression():
  # Overlapping classes, so that the optimum is interior and the predictions are not all trivial.
  rng = np.random.default_rng(2)
  num_classes, dim = 4, 20
  features, labels = _clusters(rng, 150, rng.normal(size=(num_classes, dim)), 1.5)
  features += 2.0  # A common offset, as ReLU features have; the probe centres internally.
  test, _ = _clusters(rng, 100, rng.normal(size=(num_classes, dim)), 1.5)
  weight_decay = 1e-3

  weights, bias = embedding_eval.linear_probe(features, labels, num_classes=num_classes,
                                              weight_decay=weight_decay)
  probs = embedding_eval.probe_probabilities(test, weights, bias)

  # Same objective: scikit-learn minimises C·Σ CE + ‖W‖²/2, i.e. ours scaled by 1 / λ.
  reference = LogisticRegression(C=1.0 / (len(labels) * weight_decay), tol=1e-10, max_iter=10_000)
  reference.fit(_unit(features), labels)
  want = reference.predict_proba(_unit(test))
  assert 0.6 < np.mean(reference.predict(_unit(features)) == labels) < 1.0
  assert np.mean(np.argmax(probs, axis=1) == np.argmax(want, axis=1)) > 0.98
  np.testing.assert_allclose(probs, want, atol=1e-3)
  np.testing.assert_allclose(weights, reference.coef_.T, atol=1e-3 * np.abs(reference.coef_).max())


def test_probe_probabilities_are_the_softmax_of_the_normalised_features():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(7, 5)).astype(np.float32)
  weights = rng.normal(size=(5, 3)).astype(np.float32)
  bias = rng.normal(size=3).astype(np.float32)
  logits = _unit(features) @ weights + bias
  want = np.exp(logits - logits.max(axis=1, keepdims=True))
  want /= want.sum(axis=1, keepdims=True)
  probs = embedding_eval.probe_probabilities(features, weights, bias)
  assert probs.dtype == np.float32
  np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
  # Only the direction of a feature matters.
  np.testing.assert_allclose(embedding_eval.probe_probabilities(10 * features, weights, bias), probs, rtol=1e-5)


def test_probe_on_a_tiny_problem_is_deterministic():
  features = np.array([[1.0, 0.1], [0.9, -0.2], [-0.1, 1.0], [0.2, 0.8]], np.float32)
  labels = np.array([0, 0, 1, 1])
  first = embedding_eval.linear_probe(features, labels, num_classes=2)
  second = embedding_eval.linear_probe(features, labels, num_classes=2)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])
  probs = embedding_eval.probe_probabilities(features, *first)
  np.testing.assert_array_equal(np.argmax(probs, axis=1), labels)


def test_probe_stops_once_float32_cannot_improve_and_warns_at_the_step_limit(caplog):
  rng = np.random.default_rng(7)
  features, labels = _clusters(rng, 100, rng.normal(size=(3, 10)), 1.0)
  # tolerance 0 is never met: only the stall rule can end the run before the step limit.
  with caplog.at_level(logging.INFO, logger='ood_jax.evaluation.embeddings'):
    embedding_eval.linear_probe(features, labels, num_classes=3, tolerance=0.0, steps=1000)
  steps = int(re.search(r'linear probe: (\d+) of at most 1000', caplog.text).group(1))
  assert steps < 200
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

  caplog.clear()
  with caplog.at_level(logging.INFO, logger='ood_jax.evaluation.embeddings'):
    embedding_eval.linear_probe(features, labels, num_classes=3, steps=2)
  assert [r.levelno for r in caplog.records] == [logging.WARNING]
  assert 'linear probe: 2 of at most 2' in caplog.text


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(train_labels=np.array([0, 1, 2])), ValueError, r'lie in \[0, 2\)'),
    (dict(train_labels=np.array([0, 1])), ValueError, r'shape \(3,\)'),
    (dict(train_labels=np.array([0.0, 1.0, 1.0])), TypeError, 'integer'),
    (dict(train_features=np.ones((3, 2), np.int32)), TypeError, 'floating'),
    (dict(train_features=np.array([[1.0, np.nan]] * 3)), ValueError, 'NaN'),
    (dict(train_features=np.ones((3,), np.float32)), ValueError, r'\[N, D\]'),
    (dict(num_classes=0), ValueError, 'num_classes'),
    (dict(steps=0), ValueError, 'steps'),
    (dict(weight_decay=-1.0), ValueError, 'weight_decay'),
])
def test_probe_errors(kwargs, error, match):
  args = dict(train_features=np.ones((3, 2), np.float32), train_labels=np.array([0, 1, 1]), num_classes=2)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    embedding_eval.linear_probe(**args)


def test_probe_probabilities_rejects_mismatched_weights():
  with pytest.raises(ValueError, match=r'shape \(4, K\)'):
    embedding_eval.probe_probabilities(np.ones((2, 4), np.float32), np.ones((3, 2)), np.ones(2))
  with pytest.raises(ValueError, match=r'bias \(K,\)'):
    embedding_eval.probe_probabilities(np.ones((2, 4), np.float32), np.ones((4, 2)), np.ones(3))


# ------------------------------------------------------------------------------------------------
# Feature scores
# ------------------------------------------------------------------------------------------------


def _brute_force_scores(train, labels, test, *, num_classes, k, ridge):
  """KNN from the full distance matrix and Mahalanobis with an explicit inverse, in float64."""
  train_u, test_u = _unit(train), _unit(test)
  distances = np.linalg.norm(test_u[:, None, :] - train_u[None, :, :], axis=-1)
  knn = -np.sort(distances, axis=1)[:, k - 1]
  means = np.stack([train_u[labels == c].mean(axis=0) for c in range(num_classes)])
  centred = train_u - means[labels]
  covariance = centred.T @ centred / len(labels)
  covariance += ridge * np.trace(covariance) / covariance.shape[0] * np.eye(covariance.shape[0])
  precision = np.linalg.inv(covariance)
  diff = test_u[:, None, :] - means[None, :, :]
  mahalanobis = -np.min(np.einsum('nkd,de,nke->nk', diff, precision, diff), axis=1)
  return knn, mahalanobis


@pytest.mark.parametrize('ridge', [0.0, 1e-2])
def test_feature_scores_match_brute_force(ridge):
  rng = np.random.default_rng(4)
  num_classes, dim = 3, 8
  # 9000 training rows: fit_gaussian is fed three chunks, the last one partial.
  train, labels = _clusters(rng, 3000, rng.normal(size=(num_classes, dim)), 1.0)
  test = rng.normal(size=(50, dim)).astype(np.float32)
  got = embedding_eval.feature_scores(train, labels, test, num_classes=num_classes, k=7, ridge=ridge)
  knn, mahalanobis = _brute_force_scores(train, labels, test, num_classes=num_classes, k=7, ridge=ridge)
  assert set(got) == {'knn', 'mahalanobis'}
  assert got['knn'].dtype == np.float64 and got['knn'].shape == (50,)
  np.testing.assert_allclose(got['knn'], knn, atol=1e-5)
  np.testing.assert_allclose(got['mahalanobis'], mahalanobis, rtol=1e-4)


def test_feature_scores_separate_far_away_points():
  (train, labels), (test, _), ood = _id_and_ood()
  got_in = embedding_eval.feature_scores(train, labels, test, num_classes=4, k=10)
  got_out = embedding_eval.feature_scores(train, labels, ood, num_classes=4, k=10)
  for score in ('knn', 'mahalanobis'):
    assert metrics.OOD_METRICS['auroc'](got_in[score], got_out[score]) > 0.999, score


def test_feature_scores_reject_k_above_the_training_set_size():
  features = np.ones((5, 3), np.float32) + np.eye(5, 3, dtype=np.float32)
  with pytest.raises(ValueError, match=r'training examples \(5\), got k=6.*eval\.knn_k'):
    embedding_eval.feature_scores(features, np.array([0, 0, 1, 1, 1]), features, num_classes=2, k=6)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(test_features=np.ones((2, 4), np.float32)), ValueError, 'test_features have dimension 4'),
    (dict(train_labels=np.array([0, 0, 0, 0, 0])), ValueError, 'class 1 has no examples'),
    (dict(num_classes=2, train_labels=np.array([0, 1, 2, 1, 0])), ValueError, r'lie in \[0, 2\)'),
    (dict(k=0), ValueError, 'k must be >= 1'),
])
def test_feature_scores_errors(kwargs, error, match):
  rng = np.random.default_rng(5)
  features = rng.normal(size=(5, 3)).astype(np.float32)
  args = dict(train_features=features, train_labels=np.array([0, 1, 1, 0, 1]), test_features=features,
              num_classes=2, k=2, ridge=1e-3)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    embedding_eval.feature_scores(**args)


# ------------------------------------------------------------------------------------------------
# Embedding statistics
# ------------------------------------------------------------------------------------------------


def test_embedding_statistics_match_explicit_loops():
  rng = np.random.default_rng(6)
  num_classes = 3
  embeddings = rng.normal(size=(30, 5)).astype(np.float32)
  labels = np.arange(30) % num_classes
  got = embedding_eval.embedding_statistics(embeddings, labels, num_classes=num_classes)

  units = _unit(embeddings)  # The statistics live on the unit sphere.
  centroids = [np.mean([u for u, y in zip(units, labels) if y == c], axis=0) for c in range(num_classes)]
  radius = [max(np.linalg.norm(u - centroids[c]) for u, y in zip(units, labels) if y == c)
            for c in range(num_classes)]
  cosines = [centroids[a] @ centroids[b] / (np.linalg.norm(centroids[a]) * np.linalg.norm(centroids[b]))
             for a in range(num_classes) for b in range(num_classes) if a != b]
  assert set(got) == {'mes_radius_mean', 'mes_radius', 'dispersion_mean'}
  assert isinstance(got['mes_radius'], list) and len(got['mes_radius']) == num_classes
  np.testing.assert_allclose(got['mes_radius'], radius, rtol=1e-5)
  np.testing.assert_allclose(got['mes_radius_mean'], np.mean(radius), rtol=1e-5)
  np.testing.assert_allclose(got['dispersion_mean'], np.mean(cosines), rtol=1e-5, atol=1e-6)


def test_embedding_statistics_need_every_class():
  with pytest.raises(ValueError, match='no example of class 2'):
    embedding_eval.embedding_statistics(np.eye(4, dtype=np.float32), np.array([0, 1, 0, 1]), num_classes=3)


# ------------------------------------------------------------------------------------------------
# evaluate_embeddings
# ------------------------------------------------------------------------------------------------


def test_evaluate_embeddings_builds_the_results_block():
  (train, train_labels), (test, test_labels), ood = _id_and_ood()
  # Embeddings: any per-example vectors; the projection head would give unit ones.
  extracted = lambda f, y=None: {'features': f, 'embeddings': f[:, :8], **({} if y is None else {'labels': y})}
  results = embedding_eval.evaluate_embeddings(
      extracted(train, train_labels), extracted(test, test_labels),
      {'far': extracted(ood), 'same': extracted(test)}, num_classes=4, k=10)

  json.dumps(results)  # Ready for results.json as it is.
  idm = results['in_distribution']
  assert idm['num_examples'] == len(test_labels)
  assert idm['accuracy'] == 1.0
  assert set(idm) == {'num_examples', 'reliability', 'mes_radius_mean', 'mes_radius', 'dispersion_mean',
                      *metrics.CLASSIFICATION_METRICS}
  assert idm == {**idm, **embedding_eval.embedding_statistics(test[:, :8], test_labels, num_classes=4)}
  assert set(results['ood']) == {'far', 'same'}
  for score in ('knn', 'mahalanobis'):
    assert set(results['ood']['far'][score]) == set(metrics.OOD_METRICS)
    assert results['ood']['far'][score]['auroc'] > 0.999
    assert results['ood']['same'][score]['auroc'] == 0.5  # Identical sets: every score ties.


def test_evaluate_embeddings_names_the_bad_set():
  (train, train_labels), (test, test_labels), _ = _id_and_ood()
  train_set = {'features': train, 'labels': train_labels}
  test_set = {'features': test, 'embeddings': test, 'labels': test_labels}
  with pytest.raises(ValueError, match=r"ood\['svhn'\]\['features'\] must have shape \[M, 16\]"):
    embedding_eval.evaluate_embeddings(train_set, test_set, {'svhn': {'features': test[:, :3]}}, num_classes=4,
                                       k=10)
  with pytest.raises(ValueError, match=r"test lacks \['embeddings'\]"):
    embedding_eval.evaluate_embeddings(train_set, train_set, {}, num_classes=4, k=10)
