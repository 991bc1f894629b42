"""Multi-layer Mahalanobis with input preprocessing (Lee et al. 2018, "A simple unified framework for
detecting out-of-distribution samples and adversarial attacks", Algorithm 1).

Per-layer tied Gaussians on mean-pooled feature maps (fitted and scored with `ood_jax.detectors.gaussian`'s
moments, factor and kernel), optional input preprocessing x̂ = x − ε·sign(∇ₓ D_ĉ(x)) (eq. 4), and
logistic-regression layer weights fitted on validation ID vs OOD layer scores (Section 2.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import gaussian
from ood_jax.detectors import registry

__all__ = [
    'MultiLayerState',
    'fit_layer_weights',
    'fit_multilayer',
    'layer_scores',
    'mahalanobis_ensemble',
    'multilayer_mahalanobis',
    'perturbed_layer_scores',
]


class MultiLayerState(NamedTuple):
  """Per-layer tied Gaussians and the logistic-regression layer weights.

  Attributes:
    layers: tuple of `ood_jax.detectors.gaussian.GaussianState`, one per feature map (sorted-key order).
    weights: `[L]` layer weights (1/L each until `fit_layer_weights`).
    bias: scalar bias of the logistic regression (0 until fitted).
  """

  layers: tuple
  weights: jax.Array
  bias: jax.Array


def _maps_list(feature_maps, detector, num_layers=None):
  if feature_maps is None:
    raise ValueError(f'detector {detector!r} needs feature_maps (a dict or list of per-layer maps).')
  # Dicts are read in sorted-key order: `jax.jit` returns dicts with sorted keys, so fit-time and
  # score-time maps line up whichever way they were produced.
  maps = ([feature_maps[k] for k in sorted(feature_maps)] if isinstance(feature_maps, Mapping)
          else list(feature_maps))
  if not maps:
    raise ValueError(f'detector {detector!r} needs at least one feature map; got none.')
  if num_layers is not None and len(maps) != num_layers:
    raise ValueError(f'detector {detector!r} was fitted on {num_layers} feature maps, got {len(maps)}.')
  return maps


def _pool(x, xp=jnp):
  """Mean over every axis between the batch and the channel axis (Lee et al.'s "mean" feature)."""
  return x if x.ndim == 2 else xp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def fit_multilayer(batches, *, num_classes, ridge=0.0):
  """Per-layer tied Gaussians on mean-pooled feature maps, in one streamed pass (Lee et al. 2018).

  Args:
    batches: batches with 'feature_maps' (a dict of `[B, ..., C_l]` maps, read in sorted-key order,
      or a list in a fixed order) and 'labels'.
    num_classes: K.
    ridge: relative shrinkage of every covariance (early layers are often rank-deficient).

  Returns:
    `MultiLayerState` with uniform weights.
  """
  name = 'mahalanobis_multilayer'
  num_classes = _checks.positive_int('num_classes', num_classes)
  moments = None
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    if not isinstance(batch, Mapping) or batch.get('feature_maps') is None:
      raise ValueError(f'detector {name!r} needs "feature_maps" in every batch; batch {index} has none.')
    maps = _maps_list(batch['feature_maps'], name, None if moments is None else len(moments))
    if moments is None:
      moments = [gaussian.ClassMoments(num_classes) for _ in maps]
    labels = None
    for layer, m in enumerate(maps):
      pooled = _pool(base.host({'map': m}, 'map', index, detector=name, ndim=None), np)
      if labels is None:
        labels = base.host_labels(batch, index, num_classes, pooled.shape[0], detector=name)
      if moments[layer].means is not None:
        base.check_dim(f'feature map {layer}', pooled, moments[layer].means.shape[1], index)
      moments[layer].update(pooled, labels)
  if moments is None:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  dtype = base.out_dtype()
  states = []
  for layer, m in enumerate(moments):
    m.check(f'detector {name!r}')
    fitted = gaussian.factor(m.within_covariance(), float(ridge), what=f'layer-{layer}', count=int(m.counts.sum()))
    states.append(gaussian.whiten(gaussian.Gaussian(m.means, *fitted), dtype=dtype))
  num_layers = len(states)
  return MultiLayerState(tuple(states), base.to_device(np.full((num_layers,), 1.0 / num_layers), dtype),
                         base.to_device(np.zeros(()), dtype))


def layer_scores(state: MultiLayerState, feature_maps):
  """Per-layer Mahalanobis confidences −min_k MD_k, `[N, L]`, without input preprocessing."""
  return _layer_scores(*_checked_maps(state, feature_maps))


def _checked_maps(state, feature_maps):
  state = base.check_state(state, MultiLayerState, detector='mahalanobis_multilayer')
  maps = _maps_list(feature_maps, 'mahalanobis_multilayer', len(state.layers))
  maps = tuple(base.floating_arg('feature_maps', m, min_ndim=2) for m in maps)
  for m, layer in zip(maps, state.layers):
    channels = layer.gaussian.cholesky.shape[0]
    if m.shape[-1] != channels:
      raise ValueError(f'a feature map has {m.shape[-1]} channels; the fitted layer has {channels}.')
  return state, maps


@jax.jit
def _layer_scores(state, maps):
  return jnp.stack([jnp.max(gaussian.class_scores(layer, base.compute(_pool(m))), axis=-1)
                    for m, layer in zip(maps, state.layers)], axis=-1)


def perturbed_layer_scores(state: MultiLayerState, apply_fn: Callable, inputs, *, noise=0.0014):
  """Per-layer confidences after Lee et al.'s input preprocessing (2018, eq. 4), `[N, L]`.

    ĉ_l = argmin_k MD_k^l(x),  x̂_l = x − ε·sign(∇ₓ MD_ĉ^l(x)),  score_l = −min_k MD_k^l(x̂_l)

  One backward and one extra forward pass per layer, each batched: the gradient of the batch sum is
  the per-example gradient when examples do not interact (inference-mode BatchNorm, no dropout), as
  in `ood_jax.scores.odin`. ε is in the units of `inputs`; the reference code perturbs normalised
  images by ε/std, i.e. ε in [0, 1] pixel units, so let `apply_fn` normalise inside to match it.

  Args:
    state: from `fit_multilayer`.
    apply_fn: inputs `[N, ...]` → a dict with 'feature_maps' (as fitted), e.g. from
      `ood_jax.detectors.adapter.feature_extractor`.
    inputs: `[N, ...]` floating inputs.
    noise: ε ≥ 0; 0.0014 is OpenOOD's default (Lee et al. tune it over {0, 0.0005, 0.001, 0.0014,
      0.002, 0.005, 0.01}).

  Returns:
    `[N, L]` layer scores.
  """
  state = base.check_state(state, MultiLayerState, detector='mahalanobis_ensemble')
  if not callable(apply_fn):
    raise ValueError("detector 'mahalanobis_ensemble' needs apply_fn (inputs -> {'feature_maps': ...}).")
  inputs = _checks.floating('inputs', inputs, min_ndim=1)
  _checks.nonnegative('noise', noise)
  dtype = _checks.compute_dtype(inputs)
  x = inputs.astype(dtype)

  def layer_confidence(x, layer):
    maps = _maps_list(apply_fn(x)['feature_maps'], 'mahalanobis_ensemble', len(state.layers))
    return gaussian.class_scores(state.layers[layer], _pool(maps[layer]).astype(dtype))

  out = []
  for layer in range(len(state.layers)):
    def nearest_distance(x, layer=layer):
      neg = layer_confidence(x, layer)
      nearest = jnp.argmax(jax.lax.stop_gradient(neg), axis=-1)
      return -jnp.sum(jnp.take_along_axis(neg, nearest[:, None], axis=-1))

    grad = jax.grad(nearest_distance)(x)
    x_hat = x - jnp.asarray(noise, dtype) * jnp.sign(grad)
    out.append(jnp.max(layer_confidence(x_hat, layer), axis=-1))
  return jnp.stack(out, axis=-1)


def fit_layer_weights(state: MultiLayerState, id_scores, ood_scores, *, l2=1e-4, max_iter=100):
  """Logistic-regression layer weights on validation layer scores (Lee et al. 2018, Section 2.2).

  P(in | s) = σ(wᵀs + b) is fitted by Newton's method (IRLS) in float64 on standardised columns with
  an L2 penalty `l2`·‖w‖² (the reference uses scikit-learn's `LogisticRegressionCV`); the returned
  state scores wᵀs + b, the logit of P(in), so higher = more in-distribution.

  Args:
    state: from `fit_multilayer`.
    id_scores: `[N, L]` layer scores of validation in-distribution inputs (`layer_scores` or
      `perturbed_layer_scores`).
    ood_scores: `[M, L]` layer scores of validation OOD (or adversarial) inputs.
    l2: L2 penalty ≥ 0 on the standardised weights.
    max_iter: Newton iterations.

  Returns:
    A `MultiLayerState` with fitted `weights` and `bias`.
  """
  state = base.check_state(state, MultiLayerState, detector='mahalanobis_ensemble')
  num_layers = len(state.layers)
  pos = np.asarray(id_scores, np.float64)
  neg = np.asarray(ood_scores, np.float64)
  for what, arr in (('id_scores', pos), ('ood_scores', neg)):
    if arr.ndim != 2 or arr.shape[1] != num_layers or not arr.shape[0]:
      raise ValueError(f'{what} must have shape [N, {num_layers}] with N > 0, got {arr.shape}.')
  x = np.concatenate([pos, neg])
  y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
  mu, sigma = x.mean(axis=0), x.std(axis=0)
  sigma = np.where(sigma > 0, sigma, 1.0)
  design = np.concatenate([(x - mu) / sigma, np.ones((len(x), 1))], axis=1)
  theta = np.zeros(num_layers + 1)
  penalty = np.full(num_layers + 1, float(l2) * len(x))
  penalty[-1] = 0.0  # The intercept is not penalised.
  for _ in range(max_iter):
    p = 1.0 / (1.0 + np.exp(-design @ theta))
    grad = design.T @ (p - y) + penalty * theta
    hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-12 * np.eye(num_layers + 1)
    step = np.linalg.solve(hess, grad)
    theta -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  weights = theta[:-1] / sigma
  bias = theta[-1] - np.sum(theta[:-1] * mu / sigma)
  return state._replace(weights=base.to_device(weights), bias=base.to_device(bias))


def _combine(state: MultiLayerState, s):
  return s @ state.weights.astype(s.dtype) + state.bias.astype(s.dtype)


def multilayer_mahalanobis(state: MultiLayerState, feature_maps):
  """Σ_l w_l·score_l + b on the feature maps, no preprocessing (the 'mahalanobis_multilayer' score)."""
  return _multilayer(*_checked_maps(state, feature_maps))


@jax.jit
def _multilayer(state, maps):
  return _combine(state, _layer_scores(state, maps))


registry.register('mahalanobis_multilayer', needs={'feature_maps'}, fit=fit_multilayer, score=multilayer_mahalanobis,
                  defaults={'ridge': 1e-6}, fit_params=('ridge',), paper='Lee et al. 2018', year=2018)


def mahalanobis_ensemble(state: MultiLayerState, apply_fn, inputs, *, noise=0.0014):
  """Σ_l w_l·score_l(x̂_l) + b: the full Lee et al. (2018) detector with input preprocessing."""
  return _combine(state, perturbed_layer_scores(state, apply_fn, inputs, noise=noise))


# Lee et al.'s noise grid.
registry.register('mahalanobis_ensemble', needs={'feature_maps', 'model'}, fit=fit_multilayer,
                  score=mahalanobis_ensemble, defaults={'ridge': 1e-6, 'noise': 0.0014}, fit_params=('ridge',),
                  grid={'noise': (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)}, paper='Lee et al. 2018',
                  year=2018)
