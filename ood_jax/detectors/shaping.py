"""Activation-shaping detectors: reshape the penultimate features (or the head), then score by energy.

All of them end in the energy score logsumexp(W'ᵀh' + b') (Liu et al. 2020) of modified features h' or
weights W'. Features are the penultimate activations h `[N, D]` that feed the final affine layer
(kernel W `[D, K]`, bias b `[K]`).

* ReAct (Sun, Guo & Li 2021, eq. 1): h' = min(h, c), c = the p-th percentile of ID activations (p = 90).
* ASH-P / ASH-B / ASH-S (Djurisic et al. 2023, Section 3): per example, zero all but the largest
  (100 − p) % of the activations (p = 90), then keep them (P), set them to s₁/k (B), or scale them by
  exp(s₁/s₂) (S), where s₁ = Σ h and s₂ = Σ of the kept activations.
* SCALE (Xu et al. 2024, "Scaling for training time and post-hoc out-of-distribution detection
  enhancement", eq. 4): h' = h·exp(s₁/s₂) with s₂ from the top (100 − p) % (p = 85); nothing pruned.
* DICE (Sun & Li 2022, eq. 3): W' = M ⊙ W keeping the top (1 − p) of the contributions
  V = h̄ ⊙ W (h̄ the mean training activation), p = 0.9.
* VRA (Xu et al. 2023, "VRA: Variational rectified activation", VRA-P): h' = 0 below the α-quantile,
  h + γ between the quantiles, β above the β-quantile (quantiles 60 % / 90 %, γ = 0, as the authors'
  CIFAR-10 command); OpenOOD's two-sided clip is an option.
* RankFeat (Song, Sebe & Wang 2022, eq. 3): subtract the rank-1 SVD component s₁u₁v₁ᵀ of each
  example's last feature map, pool, head, energy.

Percentile statistics come from one streamed pass that keeps a bounded uniform random subsample of
training rows (bottom-k random keys), so ReAct's and VRA's quantiles are exact for that subsample and
the fit never holds more than `max_rows` examples. ASH, SCALE and RankFeat need only the head.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import registry

__all__ = [
    'ActivationState',
    'HeadState',
    'ash',
    'dice',
    'fit_activations',
    'fit_head',
    'rankfeat',
    'react',
    'scale',
    'vra',
]

# Levels at which fitted quantiles are tabulated: global ones every 0.1 %, per-unit ones every 0.5 %;
# scoring interpolates linearly between them, so any percentile is available without refitting.
_GLOBAL_LEVELS = np.linspace(0.0, 100.0, 1001)
_UNIT_LEVELS = np.linspace(0.0, 100.0, 201)


class HeadState(NamedTuple):
  """The final layer, all that ASH, SCALE and RankFeat need."""

  head: base.Head


class ActivationState(NamedTuple):
  """Training-activation statistics of ReAct, DICE and VRA.

  Attributes:
    head: the final layer.
    mean: `[D]` mean activation h̄ (exact, float64 sum).
    quantiles: `[1001]` quantiles of all activations pooled, at 0, 0.1, …, 100 %.
    unit_quantiles: `[201, D]` per-unit quantiles at 0, 0.5, …, 100 %.
    num_rows: how many training rows the quantiles were computed from.
  """

  head: base.Head
  mean: jax.Array
  quantiles: jax.Array
  unit_quantiles: jax.Array
  num_rows: jax.Array


def fit_head(batches=None, *, head, num_classes=None):
  """State of the detectors that need only the head (ASH, SCALE, RankFeat); `batches` are unused."""
  del batches
  head = base.as_head(head, detector='ash')
  if num_classes is not None and head.bias.shape[0] != num_classes:
    raise ValueError(f'head has {head.bias.shape[0]} outputs but num_classes={num_classes}.')
  return HeadState(head)


def fit_activations(batches, *, head, num_classes=None, max_rows=10_000, seed=0):
  """One streamed pass: exact mean activation, quantiles from a bounded uniform row subsample.

  ReAct and VRA read quantiles of ID activations; the peers concatenate every activation and call
  `np.percentile`. Here each row gets a uniform random key and the `max_rows` rows with the smallest
  keys are kept (a uniform sample without replacement, "bottom-k sampling"), so memory is bounded by
  `max_rows × D` whatever the dataset size, and with no more than `max_rows` rows the quantiles are
  exact. With 10 000 rows of 512 units the pooled 90th percentile has a sampling error of ~0.01 % in
  probability; per-unit quantiles ~0.3 %.

  Args:
    batches: batches with 'features' `[B, D]` (logits are not needed).
    head: `(kernel [D, K], bias [K])`.
    num_classes: optional K, checked against the head.
    max_rows: the subsample bound.
    seed: of the subsample.

  Returns:
    An `ActivationState`.
  """
  name = 'react'
  head = base.as_head(head, detector=name)
  if num_classes is not None and head.bias.shape[0] != num_classes:
    raise ValueError(f'head has {head.bias.shape[0]} outputs but num_classes={num_classes}.')
  max_rows = _checks.positive_int('max_rows', max_rows)
  dim = head.kernel.shape[0]
  rng = np.random.default_rng(seed)
  total = np.zeros(dim)
  count = 0
  kept = np.zeros((0, dim), np.float32)
  keys = np.zeros((0,))
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    features = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', features, dim, index)
    total += features.sum(axis=0)
    count += features.shape[0]
    batch_keys = rng.random(features.shape[0])
    if keys.size >= max_rows:
      # Only rows whose key beats the current worst kept key can enter the sample.
      enter = batch_keys < keys.max()
      features, batch_keys = features[enter], batch_keys[enter]
    kept = np.concatenate([kept, features.astype(np.float32)])
    keys = np.concatenate([keys, batch_keys])
    if keys.size > max_rows:
      keep = np.argpartition(keys, max_rows - 1)[:max_rows]
      kept, keys = kept[keep], keys[keep]
  if not count:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  kept = kept.astype(np.float64)
  return ActivationState(
      head=head,
      mean=base.to_device(total / count),
      quantiles=base.to_device(np.percentile(kept, _GLOBAL_LEVELS)),
      unit_quantiles=base.to_device(np.percentile(kept, _UNIT_LEVELS, axis=0)),
      num_rows=base.to_device(kept.shape[0], np.int32))


def _percentile_value(name, percentile):
  _checks.nonnegative(name, percentile)
  if _checks.is_concrete(percentile) and float(percentile) > 100:
    raise ValueError(f'{name} must lie in [0, 100], got {percentile}.')
  return percentile


def _features_and_head(state, features, cls, detector):
  state = base.check_state(state, cls, detector=detector)
  features = base.features_arg(features, detector=detector, dim=state.head.kernel.shape[0])
  return state, features


def _energy(features, head, temperature=1.0):
  """T·logsumexp((Wᵀh + b) / T), traced inside each detector's kernel."""
  t = jnp.asarray(temperature, features.dtype)
  return t * jax.nn.logsumexp(base.head_logits(features, head) / t, axis=-1)


# ------------------------------------------------------------------------------------------------
# ReAct.
# ------------------------------------------------------------------------------------------------


def react(state: ActivationState, features, *, percentile=90.0, temperature=1.0):
  """ReAct: energy of the head on min(h, c), c = the `percentile`-th percentile of ID activations.

    score = T·logsumexp((W ᵀ min(h, c) + b) / T)                (Sun, Guo & Li 2021, eq. 1 and 4)

  Default p = 90 and T = 1 are the paper's. The percentile is pooled over all units and examples, as
  the paper and both peers compute it; the peers estimate it on the ID validation split, here on
  whatever batches were fitted.

  Args:
    state: from `fit_activations`.
    features: `[N, D]` penultimate activations.
    percentile: p in [0, 100] (may be traced).
    temperature: energy temperature T > 0.

  Returns:
    `[N]` scores.
  """
  state, h = _features_and_head(state, features, ActivationState, 'react')
  _percentile_value('percentile', percentile)
  return _react(state, h, base.as_float(percentile), base.as_float(temperature))


@jax.jit
def _react(state, h, percentile, temperature):
  h = base.compute(h)
  c = jnp.interp(jnp.asarray(percentile, h.dtype), jnp.asarray(_GLOBAL_LEVELS, h.dtype),
                 state.quantiles.astype(h.dtype))
  return _energy(jnp.minimum(h, c), state.head, temperature)


# The activation subsample of `fit_activations` bounds the fit's memory; ReAct's percentile grid.
_ACTIVATION_FIT = {'max_rows': 10_000, 'seed': 0}
registry.register('react', needs={'features', 'head'}, fit=fit_activations, score=react,
                  defaults={**_ACTIVATION_FIT, 'percentile': 90.0, 'temperature': 1.0},
                  fit_params=tuple(_ACTIVATION_FIT), grid={'percentile': (85, 90, 95, 99)},
                  paper='Sun, Guo & Li 2021', year=2021)


# ------------------------------------------------------------------------------------------------
# ASH and SCALE.
# ------------------------------------------------------------------------------------------------


def _kept(dim, percentile):
  """k = D − round(D·p / 100), the number of activations ASH / SCALE keep (k ≥ 1), from a concrete p."""
  if not _checks.is_concrete(percentile):
    raise TypeError('percentile of ASH / SCALE sets the number of kept activations and must be a '
                    'Python number, not a traced value.')
  _percentile_value('percentile', percentile)
  # The peers' rounding: k = n − round(n·p/100); at least one activation survives.
  return max(dim - int(np.round(dim * float(percentile) / 100.0)), 1)


def _top_mask(h, k):
  """A 0/1 mask of each row's k largest entries, ties to the lower index (`lax.top_k`'s choice); k traced.

  Not `h >= kth value`: ReLU features tie at 0, and ASH-B must spread s₁ over exactly k positions. Every
  entry above the k-th largest value is kept, and of the entries equal to it the first ones in index order
  until k are kept. The k-th largest value is found by a radix select on order-preserving unsigned keys
  (one compare-and-count per bit, far cheaper than sorting every row on XLA:CPU), with k traced, so one
  kernel serves every percentile.
  """
  bits = jnp.finfo(h.dtype).bits
  uint = jnp.dtype(f'uint{bits}')
  u = jax.lax.bitcast_convert_type(h, uint)
  sign = jnp.asarray(1 << (bits - 1), uint)
  u = jnp.where(u & sign, ~u, u | sign)  # IEEE order → unsigned order: negatives flipped, positives above them

  def bit(i, kth):  # the largest key with at least k entries ≥ it, built from the top bit down
    candidate = kth | jnp.left_shift(jnp.asarray(1, uint), (bits - 1 - i).astype(uint))
    return jnp.where(jnp.sum(u >= candidate[:, None], axis=-1) >= k, candidate, kth)

  kth = jax.lax.fori_loop(0, bits, bit, jnp.zeros(h.shape[0], uint))[:, None]
  above = u > kth
  tied = u == kth
  room = k - jnp.sum(above, axis=-1, keepdims=True)
  return (above | (tied & (jnp.cumsum(tied, axis=-1) <= room))).astype(h.dtype)


def ash(state: HeadState, features, *, percentile=90.0, variant='s'):
  """ASH: prune each example's activations below its own p-th percentile, reshape, then energy.

    s₁ = Σ_j h_j,  k = D − round(D·p/100),  m = 1 on the k largest h_j,
    ASH-P: h' = m ⊙ h;  ASH-B: h' = m·s₁/k;  ASH-S: h' = m ⊙ h · exp(s₁ / Σ_j m_j h_j)

  (Djurisic et al. 2023, Section 3.1; p = 90 as OpenOOD's default, the paper's ImageNet ASH-S
  setting; OpenOOD registers ASH-B.) Applied here to the pooled penultimate features, which is where
  the paper and OpenOOD apply it for ResNet-50 / CIFAR ResNet-18. The method assumes non-negative
  (post-ReLU) activations; where the kept sum is not positive ASH-S uses scale 1.

  Args:
    state: `HeadState` (from `fit_head`).
    features: `[N, D]`.
    percentile: p in [0, 100], a Python number (it sets k).
    variant: 'p', 'b' or 's'.

  Returns:
    `[N]` scores.
  """
  state, h = _features_and_head(state, features, HeadState, 'ash')
  if variant not in ('p', 'b', 's'):
    raise ValueError(f"variant must be 'p', 'b' or 's', got {variant!r}.")
  return _ash(state, h, _kept(h.shape[1], percentile), variant=variant)


@functools.partial(jax.jit, static_argnames='variant')
def _ash(state, h, k, *, variant):
  h = base.compute(h)
  mask = _top_mask(h, k)
  s1 = jnp.sum(h, axis=-1, keepdims=True)
  if variant == 'p':
    shaped = mask * h
  elif variant == 'b':
    shaped = mask * (s1 / jnp.asarray(k, h.dtype))
  else:
    s2 = jnp.sum(mask * h, axis=-1, keepdims=True)
    ratio = jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), 1.0)
    shaped = mask * h * jnp.exp(ratio)
  return _energy(shaped, state.head)


# OpenOOD's percentile grid for ASH and SCALE.
_PERCENTILES = (65, 70, 75, 80, 85, 90, 95)
for _variant in 'pbs':
  registry.register(f'ash_{_variant}', needs={'features', 'head'}, fit=fit_head,
                    score=functools.partial(ash, variant=_variant), defaults={'percentile': 90.0},
                    grid={'percentile': _PERCENTILES}, paper='Djurisic et al. 2023', year=2023)


def scale(state: HeadState, features, *, percentile=85.0):
  """SCALE: h' = h·exp(s₁/s₂), s₂ = sum of the top (100 − p) % activations, then energy.

  (Xu et al. 2024, eq. 4; p = 85 as the paper's ImageNet setting and OpenOOD's default.) Unlike
  ASH-S nothing is pruned: the whole feature vector is rescaled.

  Returns:
    `[N]` scores.
  """
  state, h = _features_and_head(state, features, HeadState, 'scale')
  return _scale(state, h, _kept(h.shape[1], percentile))


@jax.jit
def _scale(state, h, k):
  h = base.compute(h)
  mask = _top_mask(h, k)
  s1 = jnp.sum(h, axis=-1, keepdims=True)
  s2 = jnp.sum(mask * h, axis=-1, keepdims=True)
  ratio = jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), 1.0)
  return _energy(h * jnp.exp(ratio), state.head)


registry.register('scale', needs={'features', 'head'}, fit=fit_head, score=scale, defaults={'percentile': 85.0},
                  grid={'percentile': _PERCENTILES}, paper='Xu et al. 2024', year=2024)


# ------------------------------------------------------------------------------------------------
# DICE.
# ------------------------------------------------------------------------------------------------


def dice(state: ActivationState, features, *, sparsity=0.9):
  """DICE: energy with the head's weights sparsified by their mean contribution.

    V = h̄ ⊙ W (V_dk = h̄_d W_dk),  M = 1 on the top ⌈(1 − p)·D·K⌉ entries of V,
    score = logsumexp((M ⊙ W)ᵀh + b)                                  (Sun & Li 2022, eq. 3–4)

  p = 0.9 is the paper's CIFAR setting (OpenOOD's `p: 90`); the top-k is global over the matrix as
  in the paper and both peers. p = 0 keeps every weight and gives the energy score exactly (the peers'
  strict `contrib > percentile` would drop the minimum entry). Ties at the threshold are kept.

  Args:
    state: from `fit_activations` (uses the mean activation h̄).
    features: `[N, D]`.
    sparsity: p in [0, 1).

  Returns:
    `[N]` scores.
  """
  state, h = _features_and_head(state, features, ActivationState, 'dice')
  if not _checks.is_concrete(sparsity):
    raise TypeError('sparsity of DICE must be a Python number, not a traced value.')
  if not 0 <= float(sparsity) < 1:
    raise ValueError(f'sparsity must lie in [0, 1), got {sparsity}.')
  keep = max(int(np.ceil((1.0 - float(sparsity)) * state.head.kernel.size)), 1)
  return _dice(state, h, keep)


@jax.jit
def _dice(state, h, keep):
  h = base.compute(h)
  kernel = state.head.kernel.astype(h.dtype)
  contrib = state.mean.astype(h.dtype)[:, None] * kernel
  # A full sort is cheaper than top_k with k in the hundreds of thousands (ImageNet: 2 M entries).
  threshold = jnp.sort(contrib.reshape(-1))[contrib.size - keep]
  masked = base.Head(jnp.where(contrib >= threshold, kernel, 0.0), state.head.bias)
  return _energy(h, masked)


registry.register('dice', needs={'features', 'head'}, fit=fit_activations, score=dice,
                  defaults={**_ACTIVATION_FIT, 'sparsity': 0.9}, fit_params=tuple(_ACTIVATION_FIT),
                  grid={'sparsity': (0.3, 0.5, 0.7, 0.9)}, paper='Sun & Li 2022', year=2022)


# ------------------------------------------------------------------------------------------------
# VRA.
# ------------------------------------------------------------------------------------------------


def vra(state: ActivationState, features, *, low=60.0, high=90.0, gamma=0.0, per_unit=True,
        below='zero'):
  """VRA-P: suppress low and high activations, shift the middle ones, then energy.

    h' = 0 if h < α;  h + γ if α ≤ h ≤ β;  β if h > β                 (Xu et al. 2023, VRA-P)

  α, β are the `low`-th / `high`-th percentiles of ID activations. Defaults follow the authors'
  released CIFAR-10 command (60 / 90, γ = 0, quantiles per unit as their code's
  `torch.quantile(feat, q, dim=0)`); their "VRA+" uses γ = 0.6 with 60 / 95. OpenOOD's `vra`
  postprocessor instead clips both ends, h' = clip(h, α, β), with pooled percentiles 10 / 90:
  pass `below='clip', per_unit=False, low=10`.

  Args:
    state: from `fit_activations`.
    features: `[N, D]`.
    low: percentile of α in [0, 100].
    high: percentile of β in [0, 100], ≥ low.
    gamma: shift γ of the kept band.
    per_unit: per-unit (True) or pooled (False) percentiles.
    below: 'zero' (the paper) or 'clip' (OpenOOD).

  Returns:
    `[N]` scores.
  """
  state, h = _features_and_head(state, features, ActivationState, 'vra')
  _percentile_value('low', low)
  _percentile_value('high', high)
  if _checks.is_concrete(low) and _checks.is_concrete(high) and float(low) > float(high):
    raise ValueError(f'low must be <= high, got low={low}, high={high}.')
  if below not in ('zero', 'clip'):
    raise ValueError(f"below must be 'zero' or 'clip', got {below!r}.")
  return _vra(state, h, base.as_float(low), base.as_float(high), base.as_float(gamma), per_unit=bool(per_unit),
              below=below)


@functools.partial(jax.jit, static_argnames=('per_unit', 'below'))
def _vra(state, h, low, high, gamma, *, per_unit, below):
  h = base.compute(h)
  if per_unit:
    levels = jnp.asarray(_UNIT_LEVELS, h.dtype)
    table = state.unit_quantiles.astype(h.dtype)
    interp = jax.vmap(jnp.interp, in_axes=(None, None, 1))
    alpha = interp(jnp.asarray(low, h.dtype), levels, table)
    beta = interp(jnp.asarray(high, h.dtype), levels, table)
  else:
    levels = jnp.asarray(_GLOBAL_LEVELS, h.dtype)
    alpha = jnp.interp(jnp.asarray(low, h.dtype), levels, state.quantiles.astype(h.dtype))
    beta = jnp.interp(jnp.asarray(high, h.dtype), levels, state.quantiles.astype(h.dtype))
  low_value = jnp.zeros_like(h) if below == 'zero' else jnp.broadcast_to(alpha, h.shape)
  shaped = jnp.where(h < alpha, low_value, jnp.where(h > beta, beta, h + jnp.asarray(gamma, h.dtype)))
  return _energy(shaped, state.head)


registry.register('vra', needs={'features', 'head'}, fit=fit_activations, score=vra,
                  defaults={**_ACTIVATION_FIT, 'low': 60.0, 'high': 90.0, 'gamma': 0.0, 'per_unit': True,
                            'below': 'zero'},
                  fit_params=tuple(_ACTIVATION_FIT),
                  grid={'low': (50, 60, 65, 70), 'high': (80, 85, 90, 95, 99), 'gamma': (0.0, 0.3, 0.6)},
                  paper='Xu et al. 2023', year=2023)


# ------------------------------------------------------------------------------------------------
# RankFeat.
# ------------------------------------------------------------------------------------------------


def rankfeat(state: HeadState, feature_maps, *, temperature=1.0, map_name=None):
  """RankFeat: remove each example's rank-1 feature-map component, pool, head, energy.

    X ∈ R^{HW×C},  X' = X − s₁u₁v₁ᵀ,  h' = mean over positions of X',
    score = T·logsumexp((Wᵀh' + b) / T)                           (Song, Sebe & Wang 2022, eq. 3)

  Applied to the last feature map before global average pooling (the paper's "Block 4"), so the rest
  of the network is exactly pooling and the head; the paper's Block 3 + 4 fusion needs the middle of
  the network and is not offered. Exact SVD (`jnp.linalg.svd`), not the paper's power-iteration
  approximation; T = 1 as the paper.

  Args:
    state: `HeadState`.
    feature_maps: `[N, H, W, C]` map whose spatial mean is the head's input `[N, C]`, or a dict holding
      it (its only entry, or the one named `map_name`).
    temperature: T > 0.
    map_name: key of the map in a dict of several.

  Returns:
    `[N]` scores.
  """
  state = base.check_state(state, HeadState, detector='rankfeat')
  if isinstance(feature_maps, dict):
    if map_name is not None:
      if map_name not in feature_maps:
        raise ValueError(f'map_name {map_name!r} is not among the feature maps {sorted(feature_maps)}.')
      feature_maps = feature_maps[map_name]
    elif len(feature_maps) == 1:
      feature_maps = next(iter(feature_maps.values()))
    else:
      raise ValueError(f"detector 'rankfeat' got {len(feature_maps)} feature maps {sorted(feature_maps)}; "
                       f'pass map_name= to choose the one before global pooling.')
  if feature_maps is None:
    raise ValueError("detector 'rankfeat' needs feature_maps [N, H, W, C] (the map before pooling).")
  x = base.floating_arg('feature_maps', feature_maps, ndim=4)
  if x.shape[3] != state.head.kernel.shape[0]:
    raise ValueError(f'feature_maps have {x.shape[3]} channels but the head takes {state.head.kernel.shape[0]} '
                     f'features.')
  return _rankfeat(state, x, base.as_float(temperature))


@jax.jit
def _rankfeat(state, x, temperature):
  x = base.compute(x)
  n, hgt, wid, c = x.shape
  flat = x.reshape(n, hgt * wid, c)
  u, s, vt = jnp.linalg.svd(flat, full_matrices=False)
  rank1 = s[:, 0, None, None] * u[:, :, :1] * vt[:, :1, :]
  pooled = jnp.mean(flat - rank1, axis=1)
  return _energy(pooled, state.head, temperature)


registry.register('rankfeat', needs={'feature_maps', 'head'}, fit=fit_head, score=rankfeat,
                  defaults={'temperature': 1.0, 'map_name': None}, paper='Song, Sebe & Wang 2022', year=2022)
