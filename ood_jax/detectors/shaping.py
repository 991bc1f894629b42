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
* LTS (Djurisic, Liu & Nikolić 2024, "Logit scaling for out-of-distribution detection"): logits × S² with
  S = Σ r / Σ of the top (100 − p) % of r, r = max(h, 0) (p = 95); the features are left alone.
* AdaScale-A / -L (Regmi 2025, "AdaSCALE: Adaptive scaling for OOD detection"): SCALE (A) or LTS (L) with a
  per-example percentile in [75, 85] set by the ECDF of how strongly the largest activations react to a small
  input perturbation; without the model (the registered detectors) the perturbation is zero.
* DICE (Sun & Li 2022, eq. 3): W' = M ⊙ W keeping the top (1 − p) of the contributions
  V = h̄ ⊙ W (h̄ the mean training activation), p = 0.9.
* VRA (Xu et al. 2023, "VRA: Variational rectified activation", VRA-P): h' = 0 below the α-quantile,
  h + γ between the quantiles, β above the β-quantile (quantiles 60 % / 90 %, γ = 0, as the authors'
  CIFAR-10 command); OpenOOD's two-sided clip is an option.
* RankFeat (Song, Sebe & Wang 2022, eq. 3): subtract the rank-1 SVD component s₁u₁v₁ᵀ of each
  example's last feature map, pool, head, energy.

Percentile statistics come from one streamed pass that keeps a bounded uniform random subsample of
training rows (bottom-k random keys), so ReAct's and VRA's quantiles are exact for that subsample and
the fit never holds more than `max_rows` examples. ASH, SCALE, LTS and RankFeat need only the head;
AdaScale keeps a bounded subsample of one scalar per row.
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
    'AdaScaleState',
    'HeadState',
    'adascale',
    'adascale_perturbed_features',
    'ash',
    'dice',
    'fit_activations',
    'fit_adascale',
    'fit_head',
    'lts',
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
  """A 0/1 mask of each row's k largest entries, ties to the lower index (`lax.top_k`'s choice); k traced, a
  scalar or `[N]` (one count per row, as AdaScale's per-example percentile needs).

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
  room = jnp.reshape(k, (-1, 1)) - jnp.sum(above, axis=-1, keepdims=True)  # k: a scalar or one per row
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
# LTS and AdaScale: the SCALE ratio of ReLU features, per example.
# ------------------------------------------------------------------------------------------------


def _relu_ratio(h, k):
  """s₁/s₂ of r = max(h, 0): s₁ = Σ r, s₂ = the sum of each row's k largest r (k a scalar or `[N]`); 1 where
  s₂ = 0 (a row of dead units has nothing to scale)."""
  r = jnp.maximum(h, 0.0)
  s1 = jnp.sum(r, axis=-1)
  s2 = jnp.sum(_top_mask(r, k) * r, axis=-1)
  return jnp.where(s2 > 0, s1 / jnp.where(s2 > 0, s2, 1.0), 1.0)


def lts(state: HeadState, features, *, percentile=95.0):
  """LTS, logit scaling: energy of the logits multiplied by a per-example factor from the features.

    r = max(h, 0),  k = D − round(D·p/100),  S = (Σ_j r_j / Σ_{k largest} r_j)²,
    score = logsumexp(S·(Wᵀh + b))           (Djurisic, Liu & Nikolić 2024, "Logit scaling for OOD detection")

  The ratio is SCALE's (Xu et al. 2024) on ReLU features; LTS leaves the features alone and scales the
  logits by its square instead, as the authors' code does. Nothing is fitted but the head. p = 95 (the top 5 %)
  is pytorch-ood's default (`p=0.05`). pytorch-ood divides the logits by S ("temperature"); the paper and the
  authors' code multiply, as here (the rankings differ).

  Args:
    state: `HeadState` (from `fit_head`).
    features: `[N, D]` penultimate features.
    percentile: p in [0, 100], a Python number (it sets k; one compiled kernel serves every p).

  Returns:
    `[N]` scores.
  """
  state, h = _features_and_head(state, features, HeadState, 'lts')
  return _lts(state, h, _kept(h.shape[1], percentile))


@jax.jit
def _lts(state, h, k):
  h = base.compute(h)
  factor = _relu_ratio(h, k) ** 2
  return jax.nn.logsumexp(base.head_logits(h, state.head) * factor[:, None], axis=-1)


registry.register('lts', needs={'features', 'head'}, fit=fit_head, score=lts, defaults={'percentile': 95.0},
                  grid={'percentile': (*_PERCENTILES, 99)}, paper='Djurisic, Liu & Nikolić 2024', year=2024)


class AdaScaleState(NamedTuple):
  """AdaScale's fitted state.

  Attributes:
    head: the final layer.
    reference: `[n]` sorted Q′ of the fitting rows (a bounded uniform subsample), the ECDF's sample.
    k1: how many of the largest activations the correction term C_o sums (int32 scalar).
    k2: how many of the largest activations the shift term sums (int32 scalar).
    lmbda: λ, the shift term's weight.
  """

  head: base.Head
  reference: jax.Array
  k1: jax.Array
  k2: jax.Array
  lmbda: jax.Array


def _adascale_counts(dim, k1, k2):
  """k1 %, k2 % of D as counts: OpenOOD's int(D·k/100), at least one unit (a small D would otherwise sum none)."""
  counts = []
  for name, value in (('k1', k1), ('k2', k2)):
    _checks.positive(name, value)
    if float(value) > 100:
      raise ValueError(f'{name} is a percentage of the features and must be <= 100, got {value}.')
    counts.append(max(int(dim * float(value) / 100.0), 1))
  return counts


def _host_q(h, perturbed, c1, c2, lmbda):
  """Q′ = Σ_{c1 largest h} max(h̃, 0) + λ·Σ_{c2 largest h} |h − h̃| per row, float64 (ties to the lower index)."""
  order = np.argsort(-h, axis=1, kind='stable')
  top1, top2 = order[:, :c1], order[:, :c2]
  correction = np.take_along_axis(np.maximum(perturbed, 0.0), top1, axis=1).sum(1)
  shift = np.take_along_axis(np.abs(h - perturbed), top2, axis=1).sum(1)
  return correction + lmbda * shift


def fit_adascale(batches, *, head, num_classes=None, max_rows=5000, seed=0, k1=5.0, k2=1.0, lmbda=10.0):
  """AdaScale's reference sample: Q′ of in-distribution rows, whose ECDF sets each test example's percentile.

    Q′ = Σ_{j ∈ top-k1 % of h} max(h̃_j, 0) + λ Σ_{j ∈ top-k2 % of h} |h_j − h̃_j|      (Regmi 2025, eq. 5–7)

  h̃ are the features of the input perturbed by `adascale_perturbed_features` (the model's input gradient),
  read from each batch's 'perturbed_features' `[B, D]`. Batches without them use h̃ = h (no perturbation:
  Q′ is then the mass of the largest activations alone, the post-hoc variant the registry runs, since the
  evaluator holds features, not inputs); fit and score must agree on which. One streamed pass keeps a bounded
  uniform subsample of `max_rows` Q′ values (OpenOOD draws 5000 rows of the ID validation split).

  Args:
    batches: batches with 'features' and optionally 'perturbed_features'.
    head: `(kernel [D, K], bias [K])`.
    num_classes: optional K, checked against the head.
    max_rows: the subsample bound.
    seed: of the subsample.
    k1: percentage of units in the correction term (5, as OpenOOD and the paper).
    k2: percentage of units in the shift term (1).
    lmbda: λ ≥ 0 (10).

  Returns:
    An `AdaScaleState`.
  """
  name = 'adascale'
  head = base.as_head(head, detector=name)
  if num_classes is not None and head.bias.shape[0] != num_classes:
    raise ValueError(f'head has {head.bias.shape[0]} outputs but num_classes={num_classes}.')
  max_rows = _checks.positive_int('max_rows', max_rows)
  _checks.nonnegative('lmbda', lmbda)
  dim = head.kernel.shape[0]
  c1, c2 = _adascale_counts(dim, k1, k2)
  rng = np.random.default_rng(seed)
  kept, keys = np.zeros((0,)), np.zeros((0,))
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    h = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', h, dim, index)
    perturbed = h
    if batch.get('perturbed_features') is not None:
      perturbed = base.host(batch, 'perturbed_features', index, detector=name)
      if perturbed.shape != h.shape:
        raise ValueError(f"'perturbed_features' (batch {index}) have shape {perturbed.shape}, the features "
                         f'{h.shape}.')
    kept = np.concatenate([kept, _host_q(h, perturbed, c1, c2, float(lmbda))])
    keys = np.concatenate([keys, rng.random(h.shape[0])])
    if keys.size > max_rows:
      keep = np.argpartition(keys, max_rows - 1)[:max_rows]
      kept, keys = kept[keep], keys[keep]
  if not kept.size:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  return AdaScaleState(head, base.to_device(np.sort(kept)), base.to_device(c1, np.int32),
                       base.to_device(c2, np.int32), base.to_device(float(lmbda)))


def adascale(state: AdaScaleState, features, *, low=75.0, high=85.0, variant='a', perturbed_features=None):
  """AdaScale: SCALE with a per-example percentile, lower for examples whose large activations look OOD.

    q = Q′(h, h̃),  p = low + (1 − F̂(q))·(high − low),  k = D − round(D·p/100),
    c = Σ_j max(h_j, 0) / Σ_{k largest} max(h_j, 0),
    AdaScale-A: score = logsumexp(Wᵀ(h·e^c) + b);   AdaScale-L: score = logsumexp(c²·(Wᵀh + b))

  (Regmi 2025, "AdaSCALE: Adaptive scaling for OOD detection", Algorithm 1; F̂ the ECDF of the fitted Q′.)
  A large Q′ (OOD-like) gives a low percentile, so more activations count in the denominator and the scaling
  is weaker. Defaults follow OpenOOD's `adascale_a` / `adascale_l` configs: [low, high] = [75, 85],
  k1 = 5 %, k2 = 1 %, λ = 10. AdaScale-L with low = high = p is LTS at percentile p.

  Without `perturbed_features` (the registered detectors) h̃ = h: the post-hoc variant that needs no model.
  The paper's full method perturbs the input (`adascale_perturbed_features`), which needs the model; pass
  those features here and in the fit's batches.

  Args:
    state: from `fit_adascale`.
    features: `[N, D]`.
    low: the smallest percentile, in (0, 100).
    high: the largest percentile, in [low, 100).
    variant: 'a' (scale the activations) or 'l' (scale the logits).
    perturbed_features: optional `[N, D]` features of the perturbed inputs.

  Returns:
    `[N]` scores.
  """
  state, h = _features_and_head(state, features, AdaScaleState, 'adascale')
  perturbed = h if perturbed_features is None else base.features_arg(
      perturbed_features, detector='adascale', dim=h.shape[1], name='perturbed_features')
  if perturbed.shape != h.shape:
    raise ValueError(f'perturbed_features have shape {perturbed.shape}, the features {h.shape}.')
  for name, value in (('low', low), ('high', high)):
    if _checks.is_concrete(value) and not 0 < float(value) < 100:
      raise ValueError(f'{name} must lie in (0, 100), got {value}.')
  if _checks.is_concrete(low) and _checks.is_concrete(high) and float(low) > float(high):
    raise ValueError(f'low must be <= high, got low={low}, high={high}.')
  if variant not in ('a', 'l'):
    raise ValueError(f"variant must be 'a' or 'l', got {variant!r}.")
  return _adascale(state, h, perturbed, base.as_float(low), base.as_float(high), variant=variant)


@functools.partial(jax.jit, static_argnames='variant')
def _adascale(state, h, perturbed, low, high, *, variant):
  h = base.compute(h)
  perturbed = perturbed.astype(h.dtype)
  dim = h.shape[1]
  q = (jnp.sum(_top_mask(h, state.k1) * jnp.maximum(perturbed, 0.0), axis=-1)
       + state.lmbda.astype(h.dtype) * jnp.sum(_top_mask(h, state.k2) * jnp.abs(h - perturbed), axis=-1))
  reference = state.reference.astype(h.dtype)
  ecdf = jnp.searchsorted(reference, q, side='right').astype(h.dtype) / reference.shape[0]
  low, high = jnp.asarray(low, h.dtype), jnp.asarray(high, h.dtype)
  percentile = low + (1.0 - ecdf) * (high - low)
  k = jnp.clip(dim - jnp.round(dim * percentile / 100.0).astype(jnp.int32), 1, dim)
  c = _relu_ratio(h, k)
  if variant == 'a':
    return _energy(h * jnp.exp(c)[:, None], state.head)
  return jax.nn.logsumexp(base.head_logits(h, state.head) * (c ** 2)[:, None], axis=-1)


def adascale_perturbed_features(apply_fn, inputs, *, fraction=0.05, step=0.5):
  """AdaScale's perturbation: the features of x + step·sign(g)·m, g = ∇ₓ max_k z_k(x), m = 1 on each example's
  `fraction` of input entries with the smallest |g| (Regmi 2025, eq. 4; OpenOOD's `perturb`, o = 5 %, step 0.5).

  Perturbing where the prediction is least sensitive moves ID features little and OOD features more. The
  gradient of Σ_b max z(x_b) is per-example when examples do not interact (inference-mode BatchNorm).

  Args:
    apply_fn: inputs `[B, ...]` → a dict with 'logits' `[B, K]` and 'features' `[B, D]` (the adapter's extractor).
    inputs: `[B, ...]` floating inputs.
    fraction: o in [0, 1], the share of entries perturbed (int(o·size) of them, as OpenOOD).
    step: the perturbation's size, in the units of `inputs`.

  Returns:
    `[B, D]` features of the perturbed inputs.
  """
  if not callable(apply_fn):
    raise ValueError('adascale_perturbed_features needs apply_fn (inputs -> {"logits", "features"}).')
  x = _checks.floating('inputs', inputs, min_ndim=2)
  if not 0 <= float(fraction) <= 1:
    raise ValueError(f'fraction must lie in [0, 1], got {fraction}.')
  size = int(np.prod(x.shape[1:]))
  count = int(size * float(fraction))

  def total_max_logit(v):
    return jnp.sum(jnp.max(apply_fn(v)['logits'], axis=-1))

  x = x.astype(_checks.compute_dtype(x))
  grad = jax.grad(total_max_logit)(x).reshape(x.shape[0], size)
  mask = jnp.zeros_like(grad)
  if count:
    # The `count` smallest |g| per row (ties to the lower index): top_k of −|g|.
    index = jax.lax.top_k(-jnp.abs(grad), count)[1]
    mask = jax.vmap(lambda m, i: m.at[i].set(1.0))(mask, index)
  perturbed = x + jnp.asarray(step, x.dtype) * (jnp.sign(grad) * mask).reshape(x.shape)
  return apply_fn(perturbed)['features']


# OpenOOD's sweep of [low, high] (every pair has low < high); k1, k2, λ fixed at their configs' values.
_ADASCALE_FIT = {'max_rows': 5000, 'seed': 0, 'k1': 5.0, 'k2': 1.0, 'lmbda': 10.0}
for _variant in 'al':
  registry.register(f'adascale_{_variant}', needs={'features', 'head'}, fit=fit_adascale,
                    score=functools.partial(adascale, variant=_variant),
                    defaults={**_ADASCALE_FIT, 'low': 75.0, 'high': 85.0}, fit_params=tuple(_ADASCALE_FIT),
                    grid={'low': (60, 70, 75, 80), 'high': (85, 90, 95, 99)}, paper='Regmi 2025', year=2025)


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
