"""Evaluation of contrastive models (SupCon, ReweightOOD; Regmi et al. 2024) from their features.

A contrastive model is backbone → features → projection head → unit embeddings, with no classifier,
so it is evaluated the way Regmi et al. 2024 do:

* accuracy with a linear probe: multinomial logistic regression trained on the frozen backbone
  features (`linear_probe`, `probe_probabilities`);
* OOD detection with the KNN and Mahalanobis detectors (`ood_jax.detectors`) on the backbone
  features, fitted on the training set (`feature_scores`);
* embedding quality with the MES radius (eq. 4) and the centroid dispersion (eq. 5) of the unit
  embeddings (`embedding_statistics`).

`evaluate_embeddings` turns the training, test and OOD sets' outputs of `ood_jax.trainer.inference.run`
(names 'embeddings', 'features') into a results block shaped like the evaluator's.

Feature space. Every feature-based step works on L2-normalised backbone features, u = f / ‖f‖:
KNN normalises inside its kernel anyway; the probe and the Mahalanobis fit normalise here, for
both fitting and scoring. The contrastive losses act on directions only, so the norm of a
contrastive backbone's features is an unconstrained nuisance (SSD+, KNN+ and CIDER score
normalised features for this reason, and Mahalanobis++ shows that normalising helps Mahalanobis
on every kind of model). Normalised inputs also make the probe's weight decay and the
convergence tolerance mean the same thing for every backbone. OpenOOD's MDS postprocessor uses
the raw features instead, so its Mahalanobis numbers are not directly comparable.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from ood_jax import _checks
from ood_jax import detectors
from ood_jax import layers
from ood_jax import metrics

__all__ = [
    'embedding_statistics',
    'evaluate_embeddings',
    'feature_scores',
    'linear_probe',
    'probe_probabilities',
]

# Rows per chunk when streaming the training features into the detectors' fits: the Mahalanobis
# float64 scatter update then needs a few tens of MB, whatever the size of the training set.
_FIT_CHUNK = 4096

_HIGHEST = jax.lax.Precision.HIGHEST

# L-BFGS steps without a new best objective value after which the probe counts as converged.
_PATIENCE = 10

_LOG = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Shared argument checks.
# ------------------------------------------------------------------------------------------------


def _features(name: str, features) -> np.ndarray:
  """Validated non-empty, finite `[N, D]` features as a host float32 array (checked on the host)."""
  if np.ndim(features) != 2 or 0 in np.shape(features):
    raise ValueError(f'{name} must be a non-empty [N, D] array, got shape {np.shape(features)}.')
  return _checks.host_float64(name, features, ndim=2).astype(np.float32)


def _labels(name: str, labels, num_examples: int, num_classes: int, features_name: str) -> np.ndarray:
  return _checks.host_labels(name, labels, size=num_examples, match=features_name,
                             num_classes=num_classes).astype(np.int32)


def _check_dims(name: str, features: np.ndarray, train_features: np.ndarray, train_name: str) -> None:
  if features.shape[1] != train_features.shape[1]:
    raise ValueError(f'{name} have dimension {features.shape[1]} but {train_name} have dimension '
                     f'{train_features.shape[1]}.')


@jax.jit
def _normalize(features):
  return layers.l2_normalize(features)


# ------------------------------------------------------------------------------------------------
# Linear probe.
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _fit_probe(inputs, labels, weight_decay, max_steps, tolerance, *, num_classes):
  """Full-batch L-BFGS on mean cross-entropy + (λ/2)‖W‖²; returns (params, steps, ‖∇‖)."""

  def objective(params):
    logits = jnp.dot(inputs, params['weights'], precision=_HIGHEST) + params['bias']
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    # The bias is not penalised, as in scikit-learn: only W's scale trades off against the fit.
    return cross_entropy + 0.5 * weight_decay * jnp.sum(jnp.square(params['weights']))

  optimizer = optax.lbfgs()
  # Reuses the value and gradient that the line search already computed at the accepted point.
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state, best_value, stale_steps = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    new_value = otu.tree_get(state, 'value')
    improved = new_value < best_value
    return (optax.apply_updates(params, updates), state, jnp.minimum(new_value, best_value),
            jnp.where(improved, 0, stale_steps + 1))

  def keep_going(carry):
    _, state, _, stale_steps = carry
    count = otu.tree_get(state, 'count')
    # The state holds the gradient at the current parameters (after the first step).
    small_gradient = otu.tree_norm(otu.tree_get(state, 'grad')) < tolerance
    # Once the objective is flat to float32 resolution its value only flips by an ulp, and the
    # line searches grow to ~17 evaluations per step (~1.3 s instead of ~0.05 s on 50 000 × 512,
    # measured): stop when the best value has not improved for `_PATIENCE` steps.
    stalled = stale_steps >= _PATIENCE
    return (count == 0) | ((count < max_steps) & ~small_gradient & ~stalled)

  # Zero is the natural start of a convex problem: no randomness, so the probe is deterministic.
  params = {'weights': jnp.zeros((inputs.shape[1], num_classes), inputs.dtype),
            'bias': jnp.zeros((num_classes,), inputs.dtype)}
  carry = (params, optimizer.init(params), jnp.asarray(jnp.inf, inputs.dtype), jnp.int32(0))
  params, state, _, _ = jax.lax.while_loop(keep_going, step, carry)
  return params, otu.tree_get(state, 'count'), otu.tree_norm(otu.tree_get(state, 'grad'))


def linear_probe(train_features, train_labels, *, num_classes: int, steps: int = 1000,
                 weight_decay: float = 1e-4, tolerance: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """Multinomial logistic regression on frozen, L2-normalised features (the linear evaluation of Regmi et al. 2024).

  Minimises (1/N) Σ_i CE(softmax(W ᵀu_i + b), y_i) + (λ/2)‖W‖² over u_i = f_i / ‖f_i‖ with
  full-batch L-BFGS (`optax.lbfgs`, zoom line search) from W = 0, b = 0, jitted, until the gradient
  norm drops below `tolerance`, the objective stops improving (10 steps without a new best value:
  flat to float32 resolution), or after `steps` iterations. The problem is strictly convex in W, so
  this is the minimiser of scikit-learn's `LogisticRegression(C=1 / (N·λ))` on the same unit
  features (its bias, also unpenalised, is determined up to the softmax's common shift). No data
  augmentation and no randomness: the result is a deterministic function of the features.

  The optimisation runs on u_i − ū (ū the mean unit feature) and folds the centring into the bias
  afterwards (b ← b − ūᵀW): ReLU features share a large common direction, which would otherwise
  dominate the Hessian and slow L-BFGS down. The returned probe therefore applies to unit features
  as they are; `probe_probabilities` normalises and applies it.

  Cost: 50 000 × 512 features, 10 classes converge in ~30 L-BFGS steps, a few seconds on 2 CPU
  cores; a step costs two [N, D] × [D, K] products plus those of its line search.

  Args:
    train_features: `[N, D]` floating backbone features (normalised here).
    train_labels: `[N]` integer labels in [0, num_classes).
    num_classes: K >= 1.
    steps: maximum number of L-BFGS iterations, >= 1.
    weight_decay: λ >= 0 on the mean-loss scale. The default 1e-4 is C = 0.2 in scikit-learn's
      convention at N = 50 000; with λ = 0 and separable data the weights grow until `steps`.
    tolerance: stop once the gradient's global L2 norm is below this (float32 reaches ~1e-7).

  Returns:
    `(weights [D, K], bias [K])` float32 NumPy arrays, for unit-normalised features.
  """
  num_classes = _checks.positive_int('num_classes', num_classes)
  steps = _checks.positive_int('steps', steps)
  _checks.nonnegative('weight_decay', weight_decay)
  _checks.nonnegative('tolerance', tolerance)
  features = _features('train_features', train_features)
  labels = _labels('train_labels', train_labels, features.shape[0], num_classes, 'train_features')
  units = _normalize(features)
  centre = jnp.mean(units, axis=0)
  params, count, grad_norm = _fit_probe(units - centre, labels, np.float32(weight_decay), np.int32(steps),
                                        np.float32(tolerance), num_classes=num_classes)
  count, grad_norm = int(count), float(grad_norm)
  # Only the step limit is worth a warning: a stall is convergence as far as float32 can tell.
  log = _LOG.warning if count >= steps and grad_norm >= tolerance else _LOG.info
  log('linear probe: %d of at most %d L-BFGS steps, gradient norm %.3g (tolerance %.3g).', count, steps,
      grad_norm, tolerance)
  weights = np.asarray(params['weights'], np.float32)
  bias = np.asarray(params['bias'] - jnp.dot(centre, params['weights'], precision=_HIGHEST), np.float32)
  return weights, bias


@jax.jit
def _probe_probabilities(features, weights, bias):
  logits = jnp.dot(layers.l2_normalize(features), weights, precision=_HIGHEST) + bias
  return jax.nn.softmax(logits, axis=-1)


def probe_probabilities(features, weights, bias) -> np.ndarray:
  """Softmax probabilities of a `linear_probe` on features, normalised as the probe was trained.

  Args:
    features: `[N, D]` floating backbone features (raw; normalised here).
    weights: `[D, K]` probe weights.
    bias: `[K]` probe bias.

  Returns:
    `[N, K]` float32 NumPy probabilities, rows summing to 1.
  """
  features = _features('features', features)
  weights = np.asarray(weights, np.float32)
  bias = np.asarray(bias, np.float32)
  if weights.ndim != 2 or weights.shape[0] != features.shape[1] or bias.shape != weights.shape[1:]:
    raise ValueError(f'weights must have shape ({features.shape[1]}, K) and bias (K,) for features of '
                     f'dimension {features.shape[1]}, got {weights.shape} and {bias.shape}.')
  return np.asarray(_probe_probabilities(features, weights, bias), np.float32)


# ------------------------------------------------------------------------------------------------
# OOD scores.
# ------------------------------------------------------------------------------------------------


def _chunks(features: np.ndarray, labels: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
  for start in range(0, features.shape[0], _FIT_CHUNK):
    yield {'features': features[start:start + _FIT_CHUNK], 'labels': labels[start:start + _FIT_CHUNK]}


def feature_scores(train_features, train_labels, test_features, *, num_classes: int, k: int,
                   ridge: float = 1e-6) -> dict[str, np.ndarray]:
  """KNN and Mahalanobis scores of test features against the training features (higher = more ID).

  * 'knn': `detectors.get('knn')` with every training feature in its bank, −‖u − u_(k)‖ to the k-th
    nearest normalised training feature (Sun et al. 2022).
  * 'mahalanobis': `detectors.get('mahalanobis')`, class means and one shared covariance fitted on
    the normalised training features, streamed in chunks of 4096 rows; test features are normalised
    the same way (see the module docstring).

  Args:
    train_features: `[N, D]` floating backbone features of the training set.
    train_labels: `[N]` integer labels in [0, num_classes); every class must occur.
    test_features: `[M, D]` floating features to score.
    num_classes: K.
    k: the KNN neighbour, 1 <= k <= N (config `eval.knn_k`; 100 for CIFAR-10, 300 for CIFAR-100).
    ridge: relative shrinkage of the covariance (the detector's `ridge`): Σ + ridge·(tr Σ / D)·I.
      The default 1e-6 moves distances by ~1e-6 relative, but keeps Σ invertible when some
      features are constant (dead ReLU units), where the exact estimate is singular.

  Returns:
    Dict with 'knn' and 'mahalanobis', `[M]` float64 NumPy scores.

  Raises:
    ValueError: k larger than the training set, mismatched shapes, labels out of range, a class
      without training examples, non-finite features.
  """
  num_classes = _checks.positive_int('num_classes', num_classes)
  k = _checks.positive_int('k', k)
  train = _features('train_features', train_features)
  labels = _labels('train_labels', train_labels, train.shape[0], num_classes, 'train_features')
  test = _features('test_features', test_features)
  _check_dims('test_features', test, train, 'train_features')
  if k > train.shape[0]:
    raise ValueError(f'KNN needs k <= the number of training examples ({train.shape[0]}), got k={k}; '
                     f'lower the config field eval.knn_k.')
  train_units = np.asarray(_normalize(train))
  knn, mahalanobis = detectors.get('knn'), detectors.get('mahalanobis')
  bank = knn.fit(lambda: _chunks(train_units, labels))
  gaussian = mahalanobis.fit(lambda: _chunks(train_units, labels), num_classes=num_classes, ridge=ridge)
  return {
      'knn': np.asarray(knn.score(bank, {'features': test}, k=k), np.float64),
      'mahalanobis': np.asarray(mahalanobis.score(gaussian, {'features': _normalize(test)}), np.float64),
  }


# ------------------------------------------------------------------------------------------------
# Embedding statistics.
# ------------------------------------------------------------------------------------------------


def embedding_statistics(embeddings, labels, *, num_classes: int) -> dict[str, Any]:
  """MES radius (Regmi et al. 2024, eq. 4) and centroid dispersion (eq. 5) of L2-normalised embeddings.

  The embeddings are normalised first (a no-op for `ProjectionHead` outputs, which are unit
  vectors already), because both statistics are defined on the unit sphere.

  Args:
    embeddings: `[N, E]` floating embeddings.
    labels: `[N]` integer labels; every class in [0, num_classes) must occur.
    num_classes: K >= 2.

  Returns:
    Dict with 'mes_radius_mean' (float, mean over classes; smaller is better), 'mes_radius' (list
    of K floats) and 'dispersion_mean' (float, mean cosine similarity of distinct class centroids,
    as in `metrics.centroid_dispersion`).
  """
  units = np.asarray(_normalize(_features('embeddings', embeddings)))
  radius = metrics.mes_radius(units, labels, num_classes=num_classes)
  dispersion = metrics.centroid_dispersion(units, labels, num_classes=num_classes)
  return {
      'mes_radius_mean': float(radius.mean()),
      'mes_radius': radius.tolist(),
      'dispersion_mean': dispersion['mean'],
  }


# ------------------------------------------------------------------------------------------------
# Everything.
# ------------------------------------------------------------------------------------------------


def _extracted(name: str, data: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> None:
  missing = [key for key in keys if key not in data]
  if missing:
    raise ValueError(f'{name} lacks {missing}; pass the dict returned by inference.run() (with labels for '
                     f'the training and test sets).')


def evaluate_embeddings(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                        ood: Mapping[str, Mapping[str, np.ndarray]], *, num_classes: int, k: int,
                        ridge: float = 1e-6, probe_steps: int = 1000,
                        probe_weight_decay: float = 1e-4) -> dict[str, Any]:
  """Results of a contrastive model from extracted features, shaped like the evaluator's.

  The linear probe and both scores are fitted on `train`. In-distribution metrics come from the
  probe's probabilities on `test` (`metrics.classification_metrics`), the embedding statistics from
  the test embeddings, and each OOD set is compared with `test` by `metrics.ood_metrics`. The test
  and OOD features are scored in one call, so the Gaussian is fitted once.

  Args:
    train: `inference.run` output of the training set (unaugmented): 'features', 'labels'.
    test: `inference.run` output of the in-distribution test set: 'features', 'embeddings', 'labels'.
    ood: OOD set name → `inference.run` output with 'features'.
    num_classes: K >= 2.
    k: the KNN neighbour (config `eval.knn_k`).
    ridge: covariance shrinkage of the Mahalanobis score (`feature_scores`).
    probe_steps: maximum L-BFGS iterations of the probe (`linear_probe`).
    probe_weight_decay: λ of the probe (`linear_probe`).

  Returns:
    `{'in_distribution': {'num_examples', 'accuracy', 'nll', 'ece', 'reliability', 'mes_radius_mean',
    'mes_radius', 'dispersion_mean'}, 'ood': {name: {'knn': {metric: value}, 'mahalanobis': {...}}}}`
    with the metrics of `metrics.OOD_METRICS`; JSON-serialisable.
  """
  _extracted('train', train, ('features', 'labels'))
  _extracted('test', test, ('features', 'embeddings', 'labels'))
  for name, data in ood.items():
    _extracted(f'ood[{name!r}]', data, ('features',))
  dim = np.shape(train['features'])[-1]
  named = [('test', test['features'])] + [(f'ood[{name!r}]', data['features']) for name, data in ood.items()]
  for name, features in named:
    # Checked per set: the sets are concatenated below, where a mismatch would lose the set's name.
    if np.ndim(features) != 2 or np.shape(features)[1] != dim:
      raise ValueError(f"{name}['features'] must have shape [M, {dim}] like the training features, got "
                       f'{np.shape(features)}.')

  weights, bias = linear_probe(train['features'], train['labels'], num_classes=num_classes, steps=probe_steps,
                               weight_decay=probe_weight_decay)
  probs = probe_probabilities(test['features'], weights, bias)
  in_distribution = {
      'num_examples': int(len(test['labels'])),
      **metrics.classification_metrics(probs, np.asarray(test['labels'])),
      **embedding_statistics(test['embeddings'], test['labels'], num_classes=num_classes),
  }

  names = list(ood)
  sets = [features for _, features in named]
  all_scores = feature_scores(train['features'], train['labels'], np.concatenate(sets),
                              num_classes=num_classes, k=k, ridge=ridge)
  bounds = np.cumsum([len(s) for s in sets])[:-1]
  per_set = {score: np.split(values, bounds) for score, values in all_scores.items()}
  results_ood = {
      name: {score: metrics.ood_metrics(per_set[score][0], per_set[score][i + 1]) for score in per_set}
      for i, name in enumerate(names)
  }
  return {'in_distribution': in_distribution, 'ood': results_ood}
