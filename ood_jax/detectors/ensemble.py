"""Stochastic and ensemble detectors: MC-dropout and deep ensembles.

Both produce M sets of logits z^(m) `[M, N, K]` for the same inputs: M dropout masks of one network
(Gal & Ghahramani 2016, "Dropout as a Bayesian approximation") or M independently trained networks
(Lakshminarayanan, Pritzel & Blundell 2017, "Simple and scalable predictive uncertainty estimation
using deep ensembles"). With p^(m) = softmax(z^(m)) and p̄ = (1/M) Σ_m p^(m), the scores (higher = more
in-distribution) are

* `mean_msp`: max_k p̄_k, the confidence of the predictive distribution;
* `predictive_entropy`: −H(p̄) = Σ_k p̄_k log p̄_k;
* `mutual_information`: −I = −(H(p̄) − (1/M) Σ_m H(p^(m))), the negated BALD mutual information
  between the prediction and the model (Houlsby et al. 2011; Gal, Islam & Ghahramani 2017, eq. 2).

p̄ is averaged in probability space (log-mean-exp of log-probabilities), as the papers define the
predictive distribution; OpenOOD's `dropout` postprocessor averages logits instead.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import registry
from ood_jax.detectors import shaping

__all__ = [
    'feature_dropout_logits',
    'mc_dropout',
    'mc_dropout_features',
    'mc_dropout_logits',
    'mean_msp',
    'mutual_information',
    'predictive_entropy',
]


def _members(member_logits, detector):
  if member_logits is None:
    raise ValueError(f'detector {detector!r} needs member_logits [M, N, K] (one set of logits per '
                     f'ensemble member or dropout sample).')
  z = base.floating_arg('member_logits', member_logits, ndim=3)
  _checks.nonempty('member_logits', z, axis=0)
  _checks.nonempty('member_logits', z, axis=-1)
  return z


def _log_mean_probs(z):
  z = base.compute(z)
  log_p = jax.nn.log_softmax(z, axis=-1)
  return log_p, jax.nn.logsumexp(log_p, axis=0) - jnp.log(jnp.asarray(z.shape[0], z.dtype))


def _neg_entropy(log_p):
  p = jnp.exp(log_p)
  return jnp.sum(p * jnp.where(p > 0, log_p, 0.0), axis=-1)


def mean_msp(member_logits):
  """max_k p̄_k over M members `[M, N, K]` → `[N]`."""
  return _mean_msp(_members(member_logits, 'ensemble'))


@jax.jit
def _mean_msp(z):
  _, log_mean = _log_mean_probs(z)
  return jnp.exp(jnp.max(log_mean, axis=-1))


def predictive_entropy(member_logits):
  """−H(p̄) = Σ_k p̄_k log p̄_k over M members `[M, N, K]` → `[N]` in [−log K, 0]."""
  return _predictive_entropy(_members(member_logits, 'ensemble_entropy'))


@jax.jit
def _predictive_entropy(z):
  return _neg_entropy(_log_mean_probs(z)[1])


def mutual_information(member_logits):
  """Negated mutual information −(H(p̄) − mean_m H(p^(m))) `[M, N, K]` → `[N]`, ≤ 0 (0 when members agree)."""
  return _mutual_information(_members(member_logits, 'ensemble_mi'))


@jax.jit
def _mutual_information(z):
  log_p, log_mean = _log_mean_probs(z)
  # I ≥ 0 by Jensen; clip the round-off so agreeing members score exactly 0, not +1e-8.
  info = jnp.mean(_neg_entropy(log_p), axis=0) - _neg_entropy(log_mean)
  return -jnp.maximum(info, 0.0)


def mc_dropout(stochastic_apply_fn: Callable, inputs, rng=None, *, num_samples=10, reduce=mean_msp):
  """`reduce` (a member score above) of `num_samples` dropout samples (`mc_dropout_logits`); rng 0 if None."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return reduce(mc_dropout_logits(stochastic_apply_fn, inputs, rng, num_samples=num_samples))


for _suffix, _reduce in (('', mean_msp), ('_entropy', predictive_entropy), ('_mi', mutual_information)):
  registry.register(f'ensemble{_suffix}', needs={'members'}, score=_reduce,
                    paper='Lakshminarayanan, Pritzel & Blundell 2017', year=2017)
  registry.register(f'mc_dropout{_suffix}', needs={'model'}, score=functools.partial(mc_dropout, reduce=_reduce),
                    defaults={'num_samples': 10}, paper='Gal & Ghahramani 2016', year=2016)


def mc_dropout_logits(apply_fn: Callable, inputs, rng, *, num_samples=10):
  """T stochastic forward passes, batched by `jax.vmap` over T dropout keys → `[T, N, K]`.

  Args:
    apply_fn: `(inputs, rng) -> logits [N, K]` (or a dict with 'logits'), with dropout on, e.g.
      `lambda x, r: model.apply(variables, x, train=True, rngs={'dropout': r})` for a network without
      BatchNorm, or one whose BatchNorm is kept in inference mode while dropout samples.
    inputs: `[N, ...]`.
    rng: a PRNG key; sample t uses `fold_in(rng, t)`.
    num_samples: T ≥ 1 (Gal & Ghahramani use T = 10 … 100; OpenOOD's default 5).

  Returns:
    `[T, N, K]` logits.
  """
  if not callable(apply_fn):
    raise ValueError("detector 'mc_dropout' needs apply_fn (inputs, rng) -> logits.")
  num_samples = _checks.positive_int('num_samples', num_samples)
  keys = jax.vmap(lambda t: jax.random.fold_in(rng, t))(jnp.arange(num_samples))

  def one(key):
    out = apply_fn(inputs, key)
    return out['logits'] if isinstance(out, dict) else out

  return jax.vmap(one)(keys)


def feature_dropout_logits(state: shaping.HeadState, features, rng, *, rate=0.5, num_samples=5):
  """OpenOOD's `dropout` postprocessor: dropout (rate p, inverted scaling) on the penultimate features,
  then the head, T times → `[T, N, K]` (defaults p = 0.5, T = 5 as OpenOOD). Needs no model."""
  state, h, rate, num_samples = _dropout_args(state, features, rate, num_samples)
  return _feature_dropout_logits(state, h, rng, rate, num_samples=num_samples)


def _dropout_args(state, features, rate, num_samples):
  state = base.check_state(state, shaping.HeadState, detector='mc_dropout_features')
  h = base.features_arg(features, detector='mc_dropout_features', dim=state.head.kernel.shape[0])
  if not 0 <= float(rate) < 1:
    raise ValueError(f'rate must lie in [0, 1), got {rate}.')
  return state, h, float(rate), _checks.positive_int('num_samples', num_samples)


@functools.partial(jax.jit, static_argnames='num_samples')
def _feature_dropout_logits(state, h, rng, rate, *, num_samples):
  h = base.compute(h)
  # A None rng is key 0, made here so that no eager PRNG computation runs outside the kernel.
  rng = jax.random.PRNGKey(0) if rng is None else rng
  keys = jax.vmap(lambda t: jax.random.fold_in(rng, t))(jnp.arange(num_samples))

  def one(key):
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return base.head_logits(jnp.where(keep, h / (1.0 - rate), 0.0), state.head)

  return jax.vmap(one)(keys)


def mc_dropout_features(state: shaping.HeadState, features, rng=None, *, rate=0.5, num_samples=5):
  """MSP of the mean softmax over `feature_dropout_logits` samples (OpenOOD's `dropout`); rng 0 if None."""
  state, h, rate, num_samples = _dropout_args(state, features, rate, num_samples)
  return _mc_dropout_features(state, h, rng, rate, num_samples=num_samples)


@functools.partial(jax.jit, static_argnames='num_samples')
def _mc_dropout_features(state, h, rng, rate, *, num_samples):
  return _mean_msp(_feature_dropout_logits(state, h, rng, rate, num_samples=num_samples))


registry.register('mc_dropout_features', needs={'features', 'head'}, fit=shaping.fit_head, score=mc_dropout_features,
                  defaults={'rate': 0.5, 'num_samples': 5}, paper='Gal & Ghahramani 2016 (OpenOOD feature dropout)',
                  year=2016)
