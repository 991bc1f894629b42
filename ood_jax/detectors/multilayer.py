"""Layer-wise detectors: multi-layer Mahalanobis, Gram-matrix deviations and neuron activation coverage.

* Multi-layer Mahalanobis with input preprocessing (Lee et al. 2018, "A simple unified framework for
  detecting out-of-distribution samples and adversarial attacks", Algorithm 1): per-layer tied Gaussians on
  mean-pooled feature maps (fitted and scored with `ood_jax.detectors.gaussian`'s moments, factor and
  kernel), optional input preprocessing x̂ = x − ε·sign(∇ₓ D_ĉ(x)) (eq. 4), and logistic-regression layer
  weights fitted on validation ID vs OOD layer scores (Section 2.2).
* Gram matrices (Sastry & Oore 2020, "Detecting out-of-distribution examples with Gram matrices"): the
  class-wise range of every layer's higher-order Gram row sums on training data; a test input's score is
  minus its normalised deviation from the ranges of its predicted class.
* NAC-UE (Liu et al. 2024, "Neuron activation coverage: rethinking out-of-distribution detection and
  generalization"): histograms of the neuron states σ(α · h ⊙ ∂KL(u‖p)/∂h) of the penultimate features
  over training data; a test input's score is the average coverage of its states' bins.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import gaussian
from ood_jax.detectors import registry

__all__ = [
    'GramState',
    'MultiLayerState',
    'NACState',
    'fit_gram',
    'fit_layer_weights',
    'fit_multilayer',
    'fit_nac',
    'gram',
    'layer_scores',
    'mahalanobis_ensemble',
    'multilayer_mahalanobis',
    'nac',
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


# ----------------------------------------------------------------------------------------------
# Gram matrices (Sastry & Oore 2020).

# δ divides by |bound| + 1e-6: the authors' |bound + 1e-6| for the non-negative bounds of ReLU maps (a dead
# channel's bound of 0 divides by 1e-6), and never 0 for a negative bound.
_RANGE_EPS = 1e-6
_NORMALIZER_EPS = 1e-7  # Their guard on the expected deviation of a layer that no held-out row leaves.


class GramState(NamedTuple):
  """Class-wise ranges of the Gram row sums and every layer's expected deviation.

  Attributes:
    mins: per feature map (sorted-key order), `[K, P, C_l]`: the minimum over the training rows of each
      class of the row sums of G_p, p = 1..P.
    maxs: the maxima, likewise.
    normalizers: `[L]` mean layer deviation of the held-out training rows (+1e-7); ones when nothing
      was held out.
  """

  mins: tuple
  maxs: tuple
  normalizers: jax.Array


def _gram_rows(x, max_power, xp=jnp):
  """Row sums of the Gram matrices G_p = (F^p F^pᵀ)^{1/p}, p = 1..P, of `[N, ..., C]` maps: `[N, P, C]`.

  F is the C × S matrix of a map's channels over its S positions (S = 1 for `[N, C]` features) and the
  power is elementwise. Row c of F^p F^pᵀ sums to Σ_s F_cs^p T_s with T_s = Σ_j F_js^p, so the C × C
  matrix is never formed. As in the authors' code (and OpenOOD's), the p-th root is taken of the row sum,
  sign(r)·|r|^{1/p}. The sum is homogeneous of degree 2p in F, so F is divided by the map's largest
  |entry| and each channel by its own peak before the powers, and the scales are put back after the root:
  unscaled, p = 10 overflows float32 from activations of about 100. In a kernel the powers are a
  `lax.scan` (one compiled step, not P unrolled copies).
  """
  f = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, S, C]
  scale = xp.max(xp.abs(f), axis=(1, 2), keepdims=True)
  g = f / xp.where(scale > 0, scale, 1)
  peak = xp.max(xp.abs(g), axis=1, keepdims=True)  # [N, 1, C]
  peak = xp.where(peak > 0, peak, 1)
  h = g / peak

  def row_sums(g_p, h_p, p):  # g_p = g^p, h_p = h^p
    inner = xp.sum(h_p * xp.sum(g_p, axis=2, keepdims=True), axis=1)  # [N, C]
    return xp.sign(inner) * xp.abs(inner) ** (1.0 / p) * peak[:, 0] * scale[:, 0] ** 2

  if xp is np:
    rows, g_p, h_p = [], g, h
    for p in range(1, max_power + 1):
      rows.append(row_sums(g_p, h_p, p))
      g_p, h_p = g_p * g, h_p * h
    return np.stack(rows, axis=1)

  def step(carry, p):
    g_p, h_p = carry
    return (g_p * g, h_p * h), row_sums(g_p, h_p, p)

  _, rows = jax.lax.scan(step, (g, h), jnp.arange(1, max_power + 1, dtype=g.dtype))
  return jnp.moveaxis(rows, 0, 1)


def _deviation(rows, lo, hi, xp=jnp):
  """Σ over powers and channels of relu(lo − v)/|lo| + relu(v − hi)/|hi| (|·| + 1e-6), `[N]`."""
  below = xp.maximum(lo - rows, 0) / (xp.abs(lo) + _RANGE_EPS)
  above = xp.maximum(rows - hi, 0) / (xp.abs(hi) + _RANGE_EPS)
  return xp.sum(below + above, axis=(1, 2))


def fit_gram(batches, *, num_classes, max_power=10, holdout=0.1, seed=0, use_labels=False):
  """Class-wise ranges of the Gram row sums and the layers' expected deviations (Sastry & Oore 2020).

  Two streamed passes; memory is 2·K·P·Σ_l C_l numbers whatever the number of rows.

  1. Every training row that is not held out updates the running minimum and maximum of its class's
     Gram row sums (per layer, power and channel). Its class is the network's prediction, argmax of the
     logits (the paper and the authors' code); `use_labels=True` takes the label instead (OpenOOD v1.5).
     A class that no row falls in gets the range of all rows (otherwise its inputs would score −inf).
  2. The held-out rows (each row independently with probability `holdout`, drawn from `seed`) give every
     layer's expected deviation E[δ_l], by which scores divide that layer's deviation. The paper takes the
     expectation on validation data; like OpenOOD (10 % of the training rows) it is taken here from held-out
     training rows, so no test data is touched and the fit needs nothing but the training batches.
     `holdout=0` skips this pass and leaves the layers unnormalised.

  Args:
    batches: batches with 'feature_maps' (a dict of `[B, ..., C_l]` maps, read in sorted-key order, or a
      list in a fixed order) and 'logits' `[B, K]` ('labels' with `use_labels=True`); a list or a callable
      returning a fresh iterator (two passes when `holdout` > 0).
    num_classes: K.
    max_power: P, the powers 1..P: 10 as in the paper; OpenOOD's configuration uses 5.
    holdout: fraction of training rows held out for the normalisers, in [0, 1).
    seed: of the held-out draw.
    use_labels: ranges per label instead of per predicted class.

  Returns:
    A `GramState`.
  """
  name = 'gram'
  num_classes = _checks.positive_int('num_classes', num_classes)
  max_power = _checks.positive_int('max_power', max_power)
  use_labels = _checks.boolean('use_labels', use_labels)
  if isinstance(holdout, (bool, np.bool_, str)) or np.ndim(holdout) != 0 or not 0.0 <= float(holdout) < 1.0:
    raise ValueError(f'holdout must be a fraction in [0, 1), got {holdout!r}.')
  holdout = float(holdout)
  source = base.batch_source(batches, detector=name, passes=2 if holdout > 0 else 1)

  def read(index, batch, channels):
    if not isinstance(batch, Mapping) or batch.get('feature_maps') is None:
      raise ValueError(f'detector {name!r} needs "feature_maps" in every batch; batch {index} has none.')
    maps = _maps_list(batch['feature_maps'], name, None if channels is None else len(channels))
    rows = []
    for layer, m in enumerate(maps):
      key = f'feature map {layer}'
      m = base.host({key: m}, key, index, detector=name, ndim=None)
      if m.ndim < 2:
        raise ValueError(f'{key} (batch {index}) must be [B, ..., C], got shape {m.shape}.')
      if channels is not None:
        base.check_dim(key, m, channels[layer], index)
      if rows and m.shape[0] != rows[0].shape[0]:
        raise ValueError(f'the feature maps of batch {index} have different numbers of rows.')
      rows.append(_gram_rows(m, max_power, np))
    size = rows[0].shape[0]
    if use_labels:
      return rows, base.host_labels(batch, index, num_classes, size, detector=name)
    logits = base.host(batch, 'logits', index, detector=name)
    if logits.shape != (size, num_classes):
      raise ValueError(f'logits (batch {index}) must have shape [{size}, {num_classes}] (rows of the feature '
                       f'maps, num_classes), got {logits.shape}.')
    return rows, np.argmax(logits, axis=1)

  # Pass 1: running class-wise minima and maxima of the rows that are not held out.
  rng = np.random.default_rng(seed)
  mins = maxs = None
  seen = np.zeros(num_classes, bool)
  total = 0
  for index, batch in enumerate(source()):
    rows, classes = read(index, batch, None if mins is None else [m.shape[2] for m in mins])
    keep = rng.random(classes.shape[0]) >= holdout
    total += classes.shape[0]
    if mins is None:
      mins = [np.full((num_classes, max_power, r.shape[2]), np.inf) for r in rows]
      maxs = [np.full_like(m, -np.inf) for m in mins]
    for layer, r in enumerate(rows):
      np.minimum.at(mins[layer], classes[keep], r[keep])
      np.maximum.at(maxs[layer], classes[keep], r[keep])
    seen[classes[keep]] = True
  if not total:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  if not seen.any():
    raise ValueError(f'detector {name!r}: all {total} training rows were held out (holdout={holdout}); '
                     f'pass more rows or lower holdout.')
  for lo, hi in zip(mins, maxs):
    lo[~seen], hi[~seen] = lo[seen].min(axis=0), hi[seen].max(axis=0)

  # Pass 2: the expected deviation of each layer on the held-out rows (the same draws as pass 1).
  normalizers = np.ones(len(mins))
  if holdout > 0:
    rng = np.random.default_rng(seed)
    sums, count = np.zeros(len(mins)), 0
    for index, batch in enumerate(source()):
      rows, classes = read(index, batch, [m.shape[2] for m in mins])
      held = rng.random(classes.shape[0]) < holdout
      for layer, r in enumerate(rows):
        sums[layer] += _deviation(r[held], mins[layer][classes[held]], maxs[layer][classes[held]], np).sum()
      count += int(held.sum())
    if not count:
      raise ValueError(f'detector {name!r}: no training row was held out (holdout={holdout} of {total} rows); '
                       f'raise holdout, pass more rows, or set holdout=0 to leave the layers unnormalised.')
    normalizers = sums / count + _NORMALIZER_EPS
  return GramState(tuple(base.to_device(m) for m in mins), tuple(base.to_device(m) for m in maxs),
                   base.to_device(normalizers))


def gram(state: GramState, feature_maps, logits, *, divide_by_confidence=False):
  """Minus the normalised Gram deviation from the predicted class's ranges (Sastry & Oore 2020).

    δ_l(x) = Σ_p Σ_c relu(min_ĉ − v)/|min_ĉ| + relu(v − max_ĉ)/|max_ĉ|,   score = −Σ_l δ_l(x) / E[δ_l]

  with v the row sums of layer l's G_p (p = 1..P, channel c), ĉ = argmax of the logits, the ranges and the
  expected deviations E[δ_l] from `fit_gram`, and |·| + 1e-6 in the denominators (the authors' guard).
  Higher = more in-distribution; 0 inside every range.

  Args:
    state: from `fit_gram`.
    feature_maps: the maps the state was fitted on (dict in sorted-key order, or list).
    logits: `[N, K]`, for the predicted class (and the confidence).
    divide_by_confidence: divide the total deviation by the maximum softmax probability, as the authors'
      code and OpenOOD do; the paper's equation (default) does not.

  Returns:
    `[N]` scores ≤ 0.
  """
  name = 'gram'
  state = base.check_state(state, GramState, detector=name)
  maps = _maps_list(feature_maps, name, len(state.mins))
  maps = tuple(base.floating_arg('feature_maps', m, min_ndim=2) for m in maps)
  for layer, (m, lo) in enumerate(zip(maps, state.mins)):
    if m.shape[-1] != lo.shape[-1]:
      raise ValueError(f'feature map {layer} has {m.shape[-1]} channels; the fitted layer has {lo.shape[-1]}.')
  logits = base.logits_arg(logits, detector=name, num_classes=state.mins[0].shape[0])
  rows = sorted({m.shape[0] for m in maps} | {logits.shape[0]})
  if len(rows) > 1:
    raise ValueError(f'feature_maps and logits must have the same number of rows, got {rows}.')
  return _gram(state, maps, logits, _checks.boolean('divide_by_confidence', divide_by_confidence))


@jax.jit
def _gram(state, maps, logits, divide):
  # `divide` is traced (a select), so both conventions share one compilation.
  z = base.compute(logits)
  predicted = jnp.argmax(z, axis=-1)
  total = 0.0
  for layer, (m, lo, hi) in enumerate(zip(maps, state.mins, state.maxs)):
    rows = _gram_rows(base.compute(m), lo.shape[1])
    total = total + _deviation(rows, lo[predicted].astype(rows.dtype), hi[predicted].astype(rows.dtype)) / (
        state.normalizers[layer].astype(rows.dtype))
  return -jnp.where(divide, total / jnp.max(jax.nn.softmax(z, axis=-1), axis=-1), total)


registry.register('gram', needs={'feature_maps', 'logits'}, fit=fit_gram, score=gram,
                  defaults={'max_power': 10, 'holdout': 0.1, 'seed': 0, 'use_labels': False,
                            'divide_by_confidence': False},
                  fit_params=('max_power', 'holdout', 'seed', 'use_labels'), paper='Sastry & Oore 2020', year=2020)


# ----------------------------------------------------------------------------------------------
# Neuron activation coverage (Liu et al. 2024).


class NACState(NamedTuple):
  """Histograms of the training rows' neuron states (penultimate features).

  Attributes:
    head: the final layer, through which the states' KL gradient is taken.
    alpha: the sigmoid steepness α the histograms were built with (scores use the same).
    edges: `[M]` bin edges (the authors' thresholds).
    counts: `[M − 1, D]` training states per bin and neuron.
    num_rows: training rows in the histograms.
  """

  head: base.Head
  alpha: jax.Array
  edges: jax.Array
  counts: jax.Array
  num_rows: jax.Array


def _nac_edges(bins):
  """The authors' M thresholds on [0, 1.2]: M/2 − 1 points log_1000 of an even grid on [1, √1000] (covering
  [0, ½), sparse near 0) and their mirror images 1 − · (covering [½, 1], sparse near 1); the last is moved to
  1.01 so that a state of exactly 1 is counted, and 1.2 closes a final bin that no sigmoid reaches."""
  half = np.log(np.linspace(1.0, np.sqrt(1e3), bins // 2)) / np.log(1e3)
  edges = np.concatenate([half[:-1], (1.0 - half)[::-1]])
  edges[-1] += 1e-2
  return np.append(edges, 1.2)


def _nac_states(h, kernel, bias, alpha, xp=jnp):
  """σ(α · h ⊙ ∂KL(u‖softmax(hW + b))/∂h), `[N, D]`. Through the linear head the gradient is (p − u) Wᵀ:
  ∂KL(u‖p)/∂z = p − u for the logits z, as GradNorm uses it."""
  dot = np.matmul if xp is np else functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  z = dot(h, kernel) + bias
  p = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
  p = p / xp.sum(p, axis=-1, keepdims=True)
  grad = dot(p - 1.0 / z.shape[-1], kernel.T)
  return 0.5 + 0.5 * xp.tanh(0.5 * alpha * h * grad)  # σ(x) without exp overflow


def _histogram(states, edges):
  """`[M − 1, D]` counts of the states in [edges_i, edges_{i+1}) per neuron."""
  bins, dim = len(edges) - 1, states.shape[1]
  index = np.clip(np.searchsorted(edges, states, side='right') - 1, 0, bins - 1)
  return np.bincount((index * dim + np.arange(dim)).ravel(), minlength=bins * dim).reshape(bins, dim)


def fit_nac(batches, *, head, num_classes=None, sigmoid_alpha=100.0, bins=50, max_rows=1000, seed=0):
  """Histograms of the neuron states of (a uniform subsample of) the training rows (Liu et al. 2024).

  The authors build NAC from 1 000 training images (a class-balanced subset; OpenOOD's `valid_num`), and
  the coverage threshold O counts rows, so the sample size is part of the method: here the `max_rows`
  rows with the smallest uniform random keys are kept in one streamed pass (a uniform sample without
  replacement, as ReAct's fit does), at most `max_rows × D` numbers. `max_rows=None` histograms every
  row as it streams by (memory: the `[M − 1, D]` counts); O should then grow with the row count.

  Args:
    batches: batches with 'features' `[B, D]` (penultimate features; logits are recomputed from the head).
    head: `(kernel [D, K], bias [K])`.
    num_classes: optional K, checked against the head.
    sigmoid_alpha: the sigmoid's steepness α (the authors' `sig_alpha`): 100 in their CIFAR-10
      configuration, 50 for CIFAR-100, 3000 for ImageNet (penultimate layer).
    bins: M, the number of thresholds (M − 1 bins): 50 in every configuration of the authors.
    max_rows: the subsample size (1000, the authors' `valid_num`), or None for every row.
    seed: of the subsample.

  Returns:
    An `NACState`.
  """
  name = 'nac'
  head = base.as_head(head, detector=name)
  if num_classes is not None and head.bias.shape[0] != num_classes:
    raise ValueError(f'head has {head.bias.shape[0]} outputs but num_classes={num_classes}.')
  alpha = _checks.positive_real('sigmoid_alpha', sigmoid_alpha)
  bins = _checks.positive_int('bins', bins)
  if bins < 4 or bins % 2:
    raise ValueError(f'bins must be an even number >= 4 (the authors build M/2 thresholds per half), got {bins}.')
  if max_rows is not None:
    max_rows = _checks.positive_int('max_rows', max_rows)
  kernel, bias = np.asarray(head.kernel, np.float64), np.asarray(head.bias, np.float64)
  dim = kernel.shape[0]
  edges = _nac_edges(bins)
  counts = np.zeros((bins - 1, dim), np.int64)
  rng = np.random.default_rng(seed)
  kept, keys = np.zeros((0, dim), np.float32), np.zeros((0,))
  total = 0
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    features = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', features, dim, index)
    total += features.shape[0]
    if max_rows is None:
      counts += _histogram(_nac_states(features, kernel, bias, alpha, np), edges)
      continue
    batch_keys = rng.random(features.shape[0])
    if keys.size >= max_rows:  # only rows whose key beats the worst kept key can enter the sample
      enter = batch_keys < keys.max()
      features, batch_keys = features[enter], batch_keys[enter]
    kept, keys = np.concatenate([kept, features.astype(np.float32)]), np.concatenate([keys, batch_keys])
    if keys.size > max_rows:
      keep = np.argpartition(keys, max_rows - 1)[:max_rows]
      kept, keys = kept[keep], keys[keep]
  if not total:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  if max_rows is not None:
    counts = _histogram(_nac_states(kept.astype(np.float64), kernel, bias, alpha, np), edges)
  return NACState(head, base.to_device(alpha), base.to_device(edges), base.to_device(counts),
                  base.to_device(total if max_rows is None else kept.shape[0], np.int32))


def nac(state: NACState, features, *, min_count=50):
  """NAC-UE: the neurons' mean coverage of the bins their states fall in (Liu et al. 2024).

    s_d = σ(α · h_d · ∂KL(u‖softmax(Wᵀh + b))/∂h_d),   score = (1/D) Σ_d min(n_d(bin(s_d)) / O, 1)

  with n_d(i) the training states of neuron d in bin i (`fit_nac`) and O = `min_count`, the number of
  training states at which a bin counts as fully covered (the authors' O; the paper's PDF threshold r is
  O over the number of rows). Higher = more in-distribution, in [0, 1]. This is NAC-UE on the penultimate
  layer (`avgpool`, the default `layer_names` of the authors' configurations). Their reported numbers
  average the same score over avgpool and layer1–3, each with its own α, M and O; the intermediate
  layers' KL gradients need a backward pass through the network and are not implemented.

  Args:
    state: from `fit_nac`.
    features: `[N, D]` penultimate features.
    min_count: O > 0: 50 in the authors' CIFAR-10 and CIFAR-100 configurations, 10 for ImageNet; their
      CIFAR-10 sweep tries 10 and 50 (the grid). Traced: a grid compiles once.

  Returns:
    `[N]` scores in [0, 1].
  """
  state = base.check_state(state, NACState, detector='nac')
  h = base.features_arg(features, detector='nac', dim=state.head.kernel.shape[0])
  _checks.positive('min_count', min_count)
  return _nac(state, h, base.as_float(min_count))


@jax.jit
def _nac(state, h, min_count):
  h = base.compute(h)
  states = _nac_states(h, state.head.kernel.astype(h.dtype), state.head.bias.astype(h.dtype),
                       state.alpha.astype(h.dtype))
  bins = state.counts.shape[0]
  index = jnp.clip(jnp.searchsorted(state.edges.astype(h.dtype), states, side='right') - 1, 0, bins - 1)
  coverage = jnp.minimum(state.counts.astype(h.dtype) / min_count, 1.0)  # [M − 1, D]
  score = jnp.mean(coverage[index, jnp.arange(h.shape[1])], axis=-1)
  return base.traced_hyperparameter(score, 'min_count', min_count, lambda v: v > 0, '> 0')


# The authors' CIFAR-10 sweep of the penultimate layer (OpenOOD-style `postprocessor_sweep`): O only.
registry.register('nac', needs={'features', 'head'}, fit=fit_nac, score=nac,
                  defaults={'sigmoid_alpha': 100.0, 'bins': 50, 'max_rows': 1000, 'seed': 0, 'min_count': 50},
                  fit_params=('sigmoid_alpha', 'bins', 'max_rows', 'seed'), grid={'min_count': (10, 50)},
                  paper='Liu et al. 2024', year=2024)
