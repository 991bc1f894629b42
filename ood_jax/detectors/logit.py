"""Logit and probability detectors, and the logit scores' arithmetic (`ood_jax.scores` re-exports it).

Scores (higher = more in-distribution), on logits z `[N, K]`, p = softmax(z):

* MSP: max_k p_k (Hendrycks & Gimpel 2017).
* Max-logit: max_k z_k (Hendrycks et al. 2022, "Scaling out-of-distribution detection for real-world
  settings").
* Energy: T·logsumexp(z / T) (Liu et al. 2020, eq. 5, negated free energy).
* Entropy: Σ_k p_k log p_k, the negative Shannon entropy (IsoMax's entropic score, Macêdo et al. 2021, eq. 7).
* Temperature-scaled MSP: max_k softmax(z / T)_k with T fitted by negative log-likelihood on held-out
  in-distribution data (Guo et al. 2017, "On calibration of modern neural networks", Section 4.2), by
  `ood_jax.calibration.fit_temperature`.
* GEN: −Σ_{j ≤ M} p_(j)^γ (1 − p_(j))^γ over the M largest probabilities (Liu, Lochman & Zach 2023,
  "GEN: Pushing the limits of softmax-based out-of-distribution detection", eq. 6).
* KL-matching: −min_k KL(p ‖ d_k) with templates d_k = mean softmax of the fitting examples predicted
  as class k (Hendrycks et al. 2022, Section 4).

* Weighted energy: log Σ_k w_k exp(z_k) with class weights w learned in training (Du et al. 2022, VOS, eq. 6);
  all-ones weights give the energy score.

`max_softmax`, `max_logit`, `entropic_score` and `energy` take `[..., K]` logits (they are
`ood_jax.scores`' logit scores); the registered detectors check `[N, K]` logits and name themselves in
their errors.
"""

from __future__ import annotations

import functools
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax import calibration
from ood_jax.detectors import _base as base
from ood_jax.detectors import registry

__all__ = [
    'KLMatchingState',
    'WeightedEnergyState',
    'energy',
    'entropic_score',
    'entropy',
    'fit_kl_matching',
    'fit_temperature_msp',
    'fit_weighted_energy',
    'gen',
    'kl_matching',
    'max_logit',
    'max_softmax',
    'msp',
    'temperature_msp',
    'weighted_energy',
]


# ------------------------------------------------------------------------------------------------
# Logit scores, `[..., K]` → `[...]` (the arithmetic of `ood_jax.scores`).
# ------------------------------------------------------------------------------------------------


def max_softmax(logits):
  """Maximum softmax probability (MSP), max_k softmax(z)_k.

  Computed as exp(max_k log_softmax(z)_k). `log_softmax` subtracts the maximum logit before
  anything else, so its largest entry is exactly −log Σ_k exp(z_k − max z): precise even for logits
  of ±1e4, where max z − logsumexp(z) would lose ~1e-3 to the rounding of two numbers near 1e4.

  Args:
    logits: `[..., num_classes]` floating logits.

  Returns:
    `[...]` scores in (0, 1], in at least float32.
  """
  return _max_softmax(base.any_logits(logits))


@jax.jit
def _max_softmax(z):
  return jnp.exp(jnp.max(jax.nn.log_softmax(base.compute(z), axis=-1), axis=-1))


def max_logit(logits):
  """Maximum logit, max_k z_k.

  For IsoMax / distance logits z_k = −‖f − p_k‖ this is the minimum distance score (MDS,
  Macêdo et al. 2021): minus the distance to the nearest prototype.

  Args:
    logits: `[..., num_classes]` floating logits.

  Returns:
    `[...]` scores, in at least float32.
  """
  return _max_logit(base.any_logits(logits))


@jax.jit
def _max_logit(z):
  return jnp.max(base.compute(z), axis=-1)


def entropic_score(logits):
  """Entropic score: negative entropy of softmax(z), Σ_k p_k log p_k (Macêdo et al. 2021, eq. 7).

  Pass the raw distance logits: the entropic scale E_s multiplies them in the IsoMax loss only and
  is removed at inference (Macêdo et al. 2021, Section 3).

  log p comes from `log_softmax`, so log p stays finite (≈ −2e4 for logits [1e4, −1e4]) while
  p = exp(log p) underflows to exactly 0, and p·log p = 0 as in the limit p → 0. Terms whose p is
  exactly zero are masked as well, so that a −inf logit (log p = −inf) contributes 0, not 0·(−inf).

  Args:
    logits: `[..., num_classes]` floating logits.

  Returns:
    `[...]` scores in [−log K, 0], in at least float32; 0 for a one-hot prediction.
  """
  return _entropic_score(base.any_logits(logits))


@jax.jit
def _entropic_score(z):
  log_p = jax.nn.log_softmax(base.compute(z), axis=-1)
  p = jnp.exp(log_p)
  # Mask log p itself (not only the product) so that the cotangent reaching a −inf log p is an
  # exact 0 rather than 0·inf.
  safe_log_p = jnp.where(p > 0, log_p, 0.0)
  return jnp.sum(p * safe_log_p, axis=-1)


def energy(logits, *, temperature=1.0):
  """Energy score (negative free energy), T·logsumexp(z / T) (Liu et al. 2020).

  The free energy is E(x) = −T·logsumexp(z / T); its negative is returned so that, like every
  score here, higher means more in-distribution.

  Args:
    logits: `[..., num_classes]` floating logits.
    temperature: T > 0. The Energy paper scores with T = 1. A Python or concrete T ≤ 0 raises
      ValueError; a traced one (a jit argument) gives NaN scores.

  Returns:
    `[...]` scores, in at least float32.
  """
  z = base.any_logits(logits)
  _checks.positive('temperature', temperature)
  return _energy(z, base.as_float(temperature))


@jax.jit
def _energy(z, temperature):
  z = base.compute(z)
  t = jnp.asarray(temperature, dtype=z.dtype)
  out = t * jax.nn.logsumexp(z / t, axis=-1)
  return base.traced_hyperparameter(out, 'temperature', temperature, lambda v: v > 0, '> 0')


# ------------------------------------------------------------------------------------------------
# Logit-only detectors (trivial fit).
# ------------------------------------------------------------------------------------------------


def _on_logits(kernel, detector):
  """`kernel` on `[N, K]` logits checked with errors naming `detector`; keeps the kernel's signature."""

  @functools.wraps(kernel)
  def score(logits, **hparams):
    return kernel(base.logits_arg(logits, detector=detector), **hparams)

  score.__name__ = score.__qualname__ = detector
  return score


msp = _on_logits(max_softmax, 'msp')
registry.register('msp', needs={'logits'}, score=msp, paper='Hendrycks & Gimpel 2017', year=2017)
registry.register('max_logit', needs={'logits'}, score=_on_logits(max_logit, 'max_logit'),
                  paper='Hendrycks et al. 2022', year=2022)
# T = 1, the paper's setting.
registry.register('energy', needs={'logits'}, score=_on_logits(energy, 'energy'), defaults={'temperature': 1.0},
                  paper='Liu et al. 2020', year=2020)
# pytorch-ood's `Entropy` reports the entropy itself; the negation keeps "higher = more in-distribution".
entropy = _on_logits(entropic_score, 'entropy')
registry.register('entropy', needs={'logits'}, score=entropy, paper='Softmax entropy (pytorch-ood `Entropy`)',
                  year=2021)


# ------------------------------------------------------------------------------------------------
# Temperature-scaled MSP.
# ------------------------------------------------------------------------------------------------


def fit_temperature_msp(batches, *, head=None, num_classes=None, min_temperature=0.01, max_temperature=100.0):
  """T minimising the NLL of softmax(z / T) on the batches: `ood_jax.calibration.fit_temperature` (Guo et al.
  2017, Section 4.2).

  The batches' logits and labels are gathered (float64, `[N, K]` in memory, as the peers' LBFGS holds
  them) and handed to the calibrator, whose safeguarded Newton in 1/T finds the minimiser to machine
  precision. Fit it on held-out in-distribution data: on training data an overfit network gives T < 1,
  and on perfectly separated data the NLL decreases all the way to `min_temperature` (warned).

  Args:
    batches: batches with 'logits' (or 'features' and `head`) and integer 'labels'.
    head: optional `(kernel, bias)` for batches without logits.
    num_classes: K, for the label-range check (default: the logits' width).
    min_temperature: lower bound on T, > 0.
    max_temperature: upper bound on T.

  Returns:
    `ood_jax.calibration.TemperatureState(temperature)`.
  """
  name = 'temperature_msp'
  head = None if head is None else base.as_head(head, detector=name)
  logits, labels = [], []
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    z = base.host_logits(batch, index, head, detector=name)
    k = num_classes or z.shape[1]
    base.check_dim('logits', z, k, index)
    logits.append(z)
    labels.append(base.host_labels(batch, index, k, z.shape[0], detector=name))
  if not logits or not sum(len(z) for z in logits):
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  state = calibration.fit_temperature(np.concatenate(logits), np.concatenate(labels),
                                      min_temperature=min_temperature, max_temperature=max_temperature)
  temperature = float(state.temperature)  # float32 unless x64: compare to the bound at that precision
  for bound, what in ((min_temperature, 'separated (the NLL keeps decreasing as T → 0)'),
                      (max_temperature, 'no better than uniform (the NLL keeps decreasing as T grows)')):
    if np.isclose(temperature, bound, rtol=1e-6, atol=0.0):
      warnings.warn(f'temperature_msp: the fitting logits are {what}; T stopped at its bound {bound}. Fit on '
                    f'held-out data, not on data the network has memorised.', stacklevel=3)
  return state


def temperature_msp(state: calibration.TemperatureState, logits):
  """max_k softmax(z / T)_k with the fitted T (Guo et al. 2017; MSP of the calibrated model)."""
  state = base.check_state(state, calibration.TemperatureState, detector='temperature_msp')
  return _temperature_msp(state, base.logits_arg(logits, detector='temperature_msp'))


@jax.jit
def _temperature_msp(state, z):
  z = base.compute(z)
  return _max_softmax(z / jnp.asarray(state.temperature, z.dtype))


registry.register('temperature_msp', needs={'logits'}, fit=fit_temperature_msp, score=temperature_msp,
                  defaults={'min_temperature': 0.01, 'max_temperature': 100.0},
                  fit_params=('min_temperature', 'max_temperature'), paper='Guo et al. 2017', year=2017)


# ------------------------------------------------------------------------------------------------
# GEN.
# ------------------------------------------------------------------------------------------------


def gen(logits, *, gamma=0.1, top_m=100):
  """GEN, generalised entropy over the top-M probabilities (Liu, Lochman & Zach 2023, eq. 6).

    G_γ(p) = Σ_{j=1..M} p_(j)^γ (1 − p_(j))^γ,   score = −G_γ(p),

  where p_(1) ≥ p_(2) ≥ … are the sorted softmax probabilities. Defaults γ = 0.1 and M = 100 are the
  paper's ImageNet setting (also OpenOOD's); M is clipped to K, so CIFAR-10 uses all 10 classes.

  Each term is exp(γ·(log p + log(1 − p))) in log space. log p comes from `log_softmax`. 1 − p_(1) of a
  confident prediction is below float32's resolution at 1 (for logits [30, 13, 0, …] it is 4e-8, and
  1 − p rounds to 0, which would drop the top term, a quarter of the score), so log(1 − p_(1)) is
  logsumexp of the other logits minus logsumexp of all of them; every other class has p ≤ ½, where
  log1p(−p) is exact to rounding. A probability that underflows to 0 contributes exactly 0, with no NaN.

  Args:
    logits: `[N, K]` floating logits.
    gamma: γ > 0 (static or traced).
    top_m: M ≥ 1, a Python int (it sets the top-k size).

  Returns:
    `[N]` scores in [−M·4^(−γ), 0], in at least float32.
  """
  z = base.logits_arg(logits, detector='gen')
  _checks.positive('gamma', gamma)
  top_m = min(_checks.positive_int('top_m', top_m), z.shape[-1])
  return _gen(z, base.as_float(gamma), top_m=top_m)


@functools.partial(jax.jit, static_argnames='top_m')
def _gen(z, gamma, *, top_m):
  z = base.compute(z)
  log_p, index = jax.lax.top_k(jax.nn.log_softmax(z, axis=-1), top_m)
  # log(1 − p_(1)) = logsumexp_{j ≠ top} z_j − logsumexp_j z_j, exact where 1 − p_(1) rounds to 0.
  others = jnp.where(jnp.arange(z.shape[-1]) == index[:, :1], -jnp.inf, z)
  log_rest_top = jax.nn.logsumexp(others, axis=-1) - jax.nn.logsumexp(z, axis=-1)
  log_rest = jnp.log1p(-jnp.exp(log_p)).at[:, 0].set(log_rest_top)
  return -jnp.sum(jnp.exp(jnp.asarray(gamma, z.dtype) * (log_p + log_rest)), axis=-1)


registry.register('gen', needs={'logits'}, score=gen, defaults={'gamma': 0.1, 'top_m': 100},
                  grid={'gamma': (0.01, 0.1, 0.5, 1.0, 2.0), 'top_m': (10, 50, 100, 200, 500, 1000)},
                  paper='Liu, Lochman & Zach 2023', year=2023)


# ------------------------------------------------------------------------------------------------
# KL-matching.
# ------------------------------------------------------------------------------------------------


class KLMatchingState(NamedTuple):
  """Class templates of KL-matching.

  Attributes:
    log_templates: `[K, K]` log d_k, row k = log of the mean softmax of examples assigned to class k;
      floored at log(float32 tiny) so that a zero template entry gives a large finite KL, not inf.
  """

  log_templates: jax.Array


def fit_kl_matching(batches, *, num_classes, head=None, use_labels=False):
  """Fits the KL-matching templates d_k (Hendrycks et al. 2022, Section 4), in one streamed pass.

    d_k = mean of softmax(z_i) over fitting examples with ŷ_i = argmax z_i = k.

  The paper and OpenOOD group by the predicted class (default); pytorch-ood groups by the true label
  (`use_labels=True`). A class no example is assigned to gets the one-hot template e_k, as OpenOOD
  does, which only a confidently-k prediction can match.

  Args:
    batches: batches with 'logits' (or 'features' and `head`), and 'labels' if `use_labels`.
    num_classes: K.
    head: optional `(kernel, bias)` for batches without logits.
    use_labels: group by 'labels' instead of the prediction.

  Returns:
    `KLMatchingState(log_templates [K, K])`.
  """
  name = 'kl_matching'
  num_classes = _checks.positive_int('num_classes', num_classes)
  head = None if head is None else base.as_head(head, detector=name)
  sums = np.zeros((num_classes, num_classes))
  counts = np.zeros(num_classes)
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    z = base.host_logits(batch, index, head, detector=name)
    base.check_dim('logits', z, num_classes, index)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    groups = (base.host_labels(batch, index, num_classes, z.shape[0], detector=name) if use_labels
              else np.argmax(z, axis=1))
    np.add.at(sums, groups, p)
    counts += np.bincount(groups, minlength=num_classes)
  if not counts.sum():
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  templates = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.eye(num_classes))
  tiny = np.finfo(np.float32).tiny
  return KLMatchingState(base.to_device(np.log(np.maximum(templates, tiny))))


def kl_matching(state: KLMatchingState, logits):
  """KL-matching score −min_k KL(p ‖ d_k) (Hendrycks et al. 2022).

  KL(p ‖ d_k) = Σ_j p_j log p_j − Σ_j p_j log d_kj, so the minimum over k is one `[N, K] × [K, K]`
  matrix product: score = max_k (p · log d_k) − Σ_j p_j log p_j. pytorch-ood compares each example
  with the template of its predicted class only; the paper (and OpenOOD) take the minimum over all
  templates, as here.

  Returns:
    `[N]` scores ≤ 0 (up to round-off), in at least float32.
  """
  state = base.check_state(state, KLMatchingState, detector='kl_matching')
  return _kl_matching(state, base.logits_arg(logits, detector='kl_matching', num_classes=state.log_templates.shape[0]))


@jax.jit
def _kl_matching(state, z):
  z = base.compute(z)
  log_p = jax.nn.log_softmax(z, axis=-1)
  p = jnp.exp(log_p)
  neg_entropy = jnp.sum(p * jnp.where(p > 0, log_p, 0.0), axis=-1)
  cross = jnp.dot(p, state.log_templates.astype(z.dtype).T, precision=jax.lax.Precision.HIGHEST)
  return jnp.max(cross, axis=-1) - neg_entropy


registry.register('kl_matching', needs={'logits'}, fit=fit_kl_matching, score=kl_matching,
                  defaults={'use_labels': False}, fit_params=('use_labels',), paper='Hendrycks et al. 2022',
                  year=2022)


# ------------------------------------------------------------------------------------------------
# Weighted energy (VOS).
# ------------------------------------------------------------------------------------------------


class WeightedEnergyState(NamedTuple):
  """The class weights of the weighted energy.

  Attributes:
    log_weights: `[K]` log max(w_k, 0) (−inf for a class whose weight is clipped to zero).
  """

  log_weights: jax.Array


def fit_weighted_energy(batches=None, *, num_classes=None, weights=None):
  """The weighted energy's state from its class weights; `batches` are unused (the weights are learned in training).

  Args:
    batches: unused.
    num_classes: K; with `weights=None` the weights are K ones (the plain energy score).
    weights: `[K]` class weights w (or a `[K, 1]` / `[1, K]` kernel, such as VOS's `Dense(1)` on the logits),
      e.g. from a VOS run; ReLU-clipped as VOS and pytorch-ood's `WeightedEBO` do. At least one must be > 0.

  Returns:
    `WeightedEnergyState(log_weights [K])`.
  """
  del batches
  name = 'weighted_energy'
  if weights is None:
    if num_classes is None:
      raise ValueError(f'detector {name!r} needs num_classes (for the default all-ones weights) or weights=[K].')
    w = np.ones(_checks.positive_int('num_classes', num_classes))
  else:
    w = _checks.host_float64('weights', weights, ndim=np.ndim(weights), allow_integer=True)
    if w.ndim == 2 and 1 in w.shape:
      w = w.reshape(-1)
    if w.ndim != 1 or w.size == 0:
      raise ValueError(f'weights must be [K] (or a [K, 1] kernel), got shape {np.shape(weights)}.')
    if num_classes is not None and w.size != num_classes:
      raise ValueError(f'weights have {w.size} entries but num_classes={num_classes}.')
  w = np.maximum(w, 0.0)
  if not np.any(w > 0):
    raise ValueError(f'detector {name!r}: every weight is <= 0 after the ReLU, so Σ_k w_k e^z_k = 0 and the '
                     f'score is -inf; got weights {w}.')
  with np.errstate(divide='ignore'):
    return WeightedEnergyState(base.to_device(np.log(w)))


def weighted_energy(state: WeightedEnergyState, logits):
  """Weighted energy score, log Σ_k max(w_k, 0)·exp(z_k) (Du et al. 2022, "VOS: Learning what you don't know by
  virtual outlier synthesis", eq. 6).

  VOS learns w (a `Dense(1)` on the exponentiated logits, ReLU-clipped) jointly with its uncertainty loss; a
  VOS run pins them, `detectors.get('weighted_energy', weights=w)`. With the default all-ones weights the score
  is the energy score exactly. Computed as logsumexp(z + log w), so large logits do not overflow. pytorch-ood's
  `WeightedEBO` returns the negation (an outlier score).

  Args:
    state: from `fit_weighted_energy`.
    logits: `[N, K]`.

  Returns:
    `[N]` scores.
  """
  state = base.check_state(state, WeightedEnergyState, detector='weighted_energy')
  return _weighted_energy(state, base.logits_arg(logits, detector='weighted_energy',
                                                 num_classes=state.log_weights.shape[0]))


@jax.jit
def _weighted_energy(state, z):
  z = base.compute(z)
  return jax.nn.logsumexp(z + state.log_weights.astype(z.dtype), axis=-1)


registry.register('weighted_energy', needs={'logits'}, fit=fit_weighted_energy, score=weighted_energy,
                  defaults={'weights': None}, fit_params=('weights',), paper='Du et al. 2022', year=2022)
