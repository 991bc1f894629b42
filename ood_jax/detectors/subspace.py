"""Subspace detectors: ViM, Residual, NECO and pNML, scores from the principal subspace of the features.

On penultimate features h `[N, D]` and the final layer (W `[D, K]`, b `[K]`), higher = more in-distribution:

* ViM (Wang et al. 2022, "ViM: Out-of-distribution with virtual-logit matching", eq. 6–9): energy minus
  α·‖residual of h − u outside the principal subspace‖, u = −(Wᵀ)⁺b.
* Residual (same paper): −‖residual‖.
* NECO (Ammar et al. 2024, "NECO: NEural Collapse based out-of-distribution detection", eq. 6):
  ‖P_d h‖ / ‖h‖, P_d the projection on the d leading principal components.
* pNML (Bibas, Feder & Hassner 2021, "Single layer predictive normalized maximum likelihood for
  out-of-distribution detection"): −regret of the single-layer pNML learner, from x⊤(X⊤X)⁺x, the
  projection of the test feature on the training features' span, and the model's probabilities.

Fits stream in float64 on the host (NECO's covariance with `ood_jax.detectors.gaussian.ClassMoments`);
eigenvectors come from `eigh`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import gaussian
from ood_jax.detectors import registry

__all__ = [
    'PCAState',
    'PNMLState',
    'SubspaceState',
    'fit_neco',
    'fit_pnml',
    'fit_subspace',
    'neco',
    'pnml',
    'residual',
    'vim',
    'vim_default_dim',
]


# ------------------------------------------------------------------------------------------------
# ViM and Residual.
# ------------------------------------------------------------------------------------------------


class SubspaceState(NamedTuple):
  """Principal subspace of ViM / Residual around the origin u = −(Wᵀ)⁺b.

  Attributes:
    head: the final layer.
    origin: `[D]` u.
    basis: `[D, D]` eigenvectors of E[(h − u)(h − u)ᵀ] as columns, eigenvalues descending.
    eigenvalues: `[D]` descending.
    alpha: `[D + 1]` α_d = mean training max-logit / mean training residual norm outside the first d
      components, for every d (so the principal dimension is a scoring-time choice).
  """

  head: base.Head
  origin: jax.Array
  basis: jax.Array
  eigenvalues: jax.Array
  alpha: jax.Array


def vim_default_dim(feature_dim: int) -> int:
  """ViM's principal dimension rule (Wang et al. 2022, Section 4): 1 000 for D ≥ 1 500, 512 for
  D ≥ 768, else D/2 (256 for CIFAR's 512-d ResNet-18 features, OpenOOD's CIFAR setting)."""
  if feature_dim >= 1500:
    return 1000
  if feature_dim >= 768:
    return 512
  return max(feature_dim // 2, 1)


def fit_subspace(batches, *, head):
  """Two streamed passes: E[(h − u)(h − u)ᵀ] and mean max-logit, then mean residual norms.

  Pass 1 sums (h − u)(h − u)ᵀ and max_k z_k in float64 (u is known from the head, so this second
  moment is a plain sum, the peers' `EmpiricalCovariance(assume_centered=True)` on h − u); `eigh`
  gives the basis. Pass 2 accumulates ‖(h − u)ᵀV_{d:}‖ for every d at once from the tail cumulative
  sums of the squared coordinates, so α is known for every principal dimension. The batches must be
  re-iterable (a list or a callable).

  Returns:
    `SubspaceState`.
  """
  name = 'vim'
  head = base.as_head(head, detector=name)
  source = base.batch_source(batches, detector=name, passes=2)
  w = np.asarray(head.kernel, np.float64)
  b = np.asarray(head.bias, np.float64)
  dim = w.shape[0]
  origin = -np.linalg.pinv(w.T) @ b
  second = np.zeros((dim, dim))
  max_logit_sum = 0.0
  count = 0
  for index, batch in enumerate(source()):
    h = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', h, dim, index)
    c = h - origin
    second += c.T @ c
    max_logit_sum += (h @ w + b).max(axis=1).sum()
    count += h.shape[0]
  if not count:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  eigenvalues, vectors = np.linalg.eigh(second / count)
  eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
  residual_sum = np.zeros(dim + 1)
  for index, batch in enumerate(source()):
    coords = (base.host(batch, 'features', index, detector=name) - origin) @ vectors
    tail = np.cumsum(np.square(coords)[:, ::-1], axis=1)[:, ::-1]  # tail[:, d] = Σ_{j ≥ d} c_j².
    residual_sum[:dim] += np.sqrt(tail).sum(axis=0)
  mean_residual = residual_sum / count
  with np.errstate(divide='ignore'):
    alpha = np.where(mean_residual > 0, (max_logit_sum / count) / np.where(mean_residual > 0, mean_residual, 1),
                     0.0)
  return SubspaceState(head, base.to_device(origin), base.to_device(vectors), base.to_device(eigenvalues),
                       base.to_device(alpha))


def _principal_dim(h, dim, detector):
  """The principal dimension checked on the host: `vim_default_dim(D)` for None, an int in [0, D] (or a tracer)."""
  dim = vim_default_dim(h.shape[1]) if dim is None else dim
  if isinstance(dim, (bool, np.bool_, float, np.floating)):
    raise TypeError(f'dim must be an integer, got {type(dim).__name__}.')
  if _checks.is_concrete(dim) and not 0 <= int(dim) <= h.shape[1]:
    raise ValueError(f'dim must lie in [0, {h.shape[1]}] for detector {detector!r}, got {dim}.')
  return base.as_int(dim)


def _residual_norm(state, h, dim):
  """‖(h − u)ᵀ V_{dim:}‖, with `dim` traced (a mask, not a slice: one kernel for every dimension)."""
  coords = jnp.dot(h - state.origin.astype(h.dtype), state.basis.astype(h.dtype),
                   precision=jax.lax.Precision.HIGHEST)
  outside = jnp.arange(h.shape[1]) >= dim
  return jnp.sqrt(jnp.sum(jnp.where(outside, jnp.square(coords), 0.0), axis=-1))


def vim(state: SubspaceState, features, *, dim=None):
  """ViM: logsumexp(z) − α‖(h − u)ᵀ V_{⊥}‖ (Wang et al. 2022, eq. 6–9, in energy form).

  The paper's score is the softmax probability of the virtual logit l₀ = α‖x^{P⊥}‖ against the class
  logits, p₀ = σ(l₀ − logsumexp(z)), with lower p₀ = more in-distribution; −p₀ is a decreasing
  function of l₀ − logsumexp(z), so logsumexp(z) − l₀ (what the authors' code and both peers return)
  ranks examples identically and is returned here. α = mean training max-logit / mean training
  residual norm (paper eq. 8). `dim` (the principal dimension) defaults to `vim_default_dim(D)`.

  Args:
    state: from `fit_subspace`.
    features: `[N, D]`.
    dim: principal dimension in [0, D], a Python int or a traced integer.

  Returns:
    `[N]` scores.
  """
  state = base.check_state(state, SubspaceState, detector='vim')
  h = base.features_arg(features, detector='vim', dim=state.origin.shape[0])
  return _vim(state, h, _principal_dim(h, dim, 'vim'))


@jax.jit
def _vim(state, h, dim):
  h = base.compute(h)
  energy = jax.nn.logsumexp(base.head_logits(h, state.head), axis=-1)
  return energy - state.alpha.astype(h.dtype)[dim] * _residual_norm(state, h, dim)


# The principal dimension is a scoring-time choice (α is stored for every d); OpenOOD's grid.
registry.register('vim', needs={'features', 'head'}, fit=fit_subspace, score=vim, defaults={'dim': None},
                  grid={'dim': (None, 64, 128, 256, 512, 1000)}, paper='Wang et al. 2022', year=2022)


def residual(state: SubspaceState, features, *, dim=None):
  """Residual: −‖(h − u)ᵀ V_{⊥}‖, the norm outside the `dim` leading components (Wang et al. 2022)."""
  state = base.check_state(state, SubspaceState, detector='residual')
  h = base.features_arg(features, detector='residual', dim=state.origin.shape[0])
  return _residual(state, h, _principal_dim(h, dim, 'residual'))


@jax.jit
def _residual(state, h, dim):
  return -_residual_norm(state, base.compute(h), dim)


registry.register('residual', needs={'features', 'head'}, fit=fit_subspace, score=residual, defaults={'dim': None},
                  grid={'dim': (None, 64, 128, 256, 512, 1000)}, paper='Wang et al. 2022', year=2022)


# ------------------------------------------------------------------------------------------------
# NECO.
# ------------------------------------------------------------------------------------------------


class PCAState(NamedTuple):
  """Principal components of the training features (NECO).

  Attributes:
    head: the final layer.
    mean: `[D]` training mean.
    scale: `[D]` training standard deviation (1 where a unit is constant).
    basis: `[D, D]` eigenvectors of the covariance (columns, eigenvalues descending).
    standardized_basis: `[D, D]` the same for the standardised features (the authors' code).
  """

  head: base.Head
  mean: jax.Array
  scale: jax.Array
  basis: jax.Array
  standardized_basis: jax.Array


def fit_neco(batches, *, head):
  """Streamed mean and covariance (one class, Chan merge), then `eigh`, for NECO's PCA."""
  name = 'neco'
  head = base.as_head(head, detector=name)
  dim = head.kernel.shape[0]
  moments = gaussian.ClassMoments(1)
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    h = base.host(batch, 'features', index, detector=name)
    base.check_dim('features', h, dim, index)
    moments.update(h, np.zeros(h.shape[0], np.int64))
  moments.check(f'detector {name!r}')
  cov = moments.within_covariance()
  cov = 0.5 * (cov + cov.T)
  std = np.sqrt(np.maximum(np.diag(cov), 0.0))
  std = np.where(std > 0, std, 1.0)
  vectors = np.linalg.eigh(cov)[1][:, ::-1]
  std_vectors = np.linalg.eigh(cov / std[:, None] / std[None, :])[1][:, ::-1]
  return PCAState(head, base.to_device(moments.means[0]), base.to_device(std), base.to_device(vectors),
                  base.to_device(std_vectors))


def neco(state: PCAState, features, *, dim=None, standardize=False, use_max_logit=False):
  """NECO: ‖P_d h‖ / ‖h‖ (Ammar et al. 2024, eq. 6), optionally × max-logit.

  P_d projects on the d leading principal components of the training features. The paper's equation
  uses h itself (default); the authors' released code standardises h first (z = (h − μ)/σ, then
  ‖P_d z‖/‖z‖: `standardize=True`) and multiplies by the max logit for ViT / DeiT
  (`use_max_logit=True`). The paper tunes d per model; the default here is d = K (the number of
  classes, the dimension of the neural-collapse simplex plus its offset), clipped to D.

  Returns:
    `[N]` scores in [0, 1] (times the max logit if requested).
  """
  state = base.check_state(state, PCAState, detector='neco')
  h = base.features_arg(features, detector='neco', dim=state.mean.shape[0])
  d = state.head.bias.shape[0] if dim is None else _checks.positive_int('dim', dim)
  return _neco(state, h, min(d, h.shape[1]), bool(standardize), use_max_logit=bool(use_max_logit))


@functools.partial(jax.jit, static_argnames='use_max_logit')
def _neco(state, h, d, standardize, *, use_max_logit):
  # d and standardize are traced (a mask and a select), so NECO's tuning grid compiles once.
  h = base.compute(h)
  x = jnp.where(standardize, (h - state.mean.astype(h.dtype)) / state.scale.astype(h.dtype), h)
  basis = jnp.where(standardize, state.standardized_basis, state.basis).astype(h.dtype)
  coords = jnp.dot(x, basis, precision=jax.lax.Precision.HIGHEST)
  proj = jnp.where(jnp.arange(h.shape[1]) < d, coords, 0.0)
  out = jnp.linalg.norm(proj, axis=-1) / jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-12)
  if use_max_logit:
    out = out * jnp.max(base.head_logits(h, state.head), axis=-1)
  return out


registry.register('neco', needs={'features', 'head'}, fit=fit_neco, score=neco,
                  defaults={'dim': None, 'standardize': False, 'use_max_logit': False},
                  grid={'dim': (None, 16, 32, 64, 128, 256), 'standardize': (False, True)},
                  paper='Ammar et al. 2024', year=2024)


# ------------------------------------------------------------------------------------------------
# pNML.
# ------------------------------------------------------------------------------------------------


class PNMLState(NamedTuple):
  """The eigen-decomposition of the training correlation X⊤X of x = [1, h/‖h‖] (or h/‖h‖ without the bias).

  Attributes:
    basis: `[D', D']` eigenvectors (columns) of X⊤X, D' = D + 1 with the bias entry.
    inverse_eigenvalues: `[D']` 1/λ for the eigenvalues above the cut-off, 0 for the others: x⊤(X⊤X)⁺x is
      Σ (v⊤x)²/λ.
    null: `[D']` 1 for the eigenvalues at or below the cut-off (the null space of X⊤X), 0 for the others:
      ‖x_⊥‖² = Σ_null (v⊤x)², the energy of x outside the span of the training features.
    bias: the entries prepended to h/‖h‖: `[1]` ones with the bias, `[0]` without (a shape, so the kernel
      needs no flag).
  """

  basis: jax.Array
  inverse_eigenvalues: jax.Array
  null: jax.Array
  bias: jax.Array


def _pnml_rows(h, bias, xp):
  """[bias, h/‖h‖]: the authors normalise the features and prepend the constant 1."""
  unit = h / xp.maximum(xp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  return xp.concatenate([xp.broadcast_to(bias.astype(unit.dtype), (unit.shape[0], bias.shape[0])), unit], axis=1)


def fit_pnml(batches, *, bias=True, rcond=None):
  """X⊤X of the normalised training features, streamed in float64, and its eigen-decomposition
  (Bibas, Feder & Hassner 2021).

  The pseudo-inverse keeps the eigenvalues above rcond·λ_max; rcond=None is D'·eps (float64), the
  matrix-rank tolerance (the authors call `numpy.linalg.pinv`, cut-off 1e-15, which keeps round-off
  eigenvalues when D' exceeds the number of training examples).

  Args:
    batches: batches with 'features' `[B, D]`.
    bias: prepend the constant 1 as the authors do (pytorch-ood does not).
    rcond: relative eigenvalue cut-off, or None.

  Returns:
    `PNMLState`.
  """
  name = 'pnml'
  bias = np.ones(1) if _checks.boolean('bias', bias) else np.zeros(0)
  gram, dim, count = None, None, 0
  for index, batch in enumerate(base.batch_source(batches, detector=name)()):
    h = base.host(batch, 'features', index, detector=name)
    dim = base.check_dim('features', h, dim, index)
    x = _pnml_rows(h, bias, np)
    gram = x.T @ x if gram is None else gram + x.T @ x
    count += h.shape[0]
  if not count:
    raise ValueError(f'detector {name!r}: batches yielded no examples.')
  size = gram.shape[0]
  rcond = size * np.finfo(np.float64).eps if rcond is None else float(_checks.nonnegative('rcond', rcond))
  eigenvalues, vectors = np.linalg.eigh(0.5 * (gram + gram.T))
  kept = eigenvalues > rcond * max(eigenvalues[-1], 0.0)
  inverse = np.where(kept, 1.0 / np.where(kept, eigenvalues, 1.0), 0.0)
  return PNMLState(base.to_device(vectors), base.to_device(inverse), base.to_device((~kept).astype(np.float64)),
                   base.to_device(bias))


def pnml(state: PNMLState, features, *, logits):
  """−regret of the single-layer pNML learner (Bibas, Feder & Hassner 2021), higher = in-distribution.

  With x the normalised test feature (with its bias entry), p the model's softmax probabilities and
  g = max(‖x_⊥‖², x⊤(X⊤X)⁺x / (1 + x⊤(X⊤X)⁺x)) (‖x_⊥‖² the part of x outside the training span), the
  regret is log Σ_c p_c / (p_c + (1 − p_c)·p_c^g), divided by log K as in the authors' code (so it lies in
  [0, 1]). pytorch-ood returns the regret itself (higher = OOD), computes p from the head applied to the
  normalised features and drops ‖x_⊥‖² and the bias entry; here p is the model's own prediction, as in the
  paper and the authors' code. Each term is written 1/(1 + exp(log(1 − p_c) + (g − 1) log p_c)), so a
  probability that underflows gives its limit instead of 0/0.

  Args:
    state: from `fit_pnml`.
    features: `[N, D]`.
    logits: `[N, K]`, K ≥ 2.

  Returns:
    `[N]` scores in [−1, 0].
  """
  state = base.check_state(state, PNMLState, detector='pnml')
  h = base.features_arg(features, detector='pnml', dim=state.basis.shape[0] - state.bias.shape[0])
  z = base.logits_arg(logits, detector='pnml')
  if z.shape[0] != h.shape[0]:
    raise ValueError(f'logits have {z.shape[0]} rows but features have {h.shape[0]}.')
  if z.shape[1] < 2:
    raise ValueError(f'pnml needs at least 2 classes (its regret is normalised by log K), got logits {z.shape}.')
  return _pnml(state, h, z)


@jax.jit
def _pnml(state, h, logits):
  h = base.compute(h)
  x = _pnml_rows(h, state.bias, jnp)
  coords = jnp.square(jnp.dot(x, state.basis.astype(h.dtype), precision=jax.lax.Precision.HIGHEST))
  inside = jnp.sum(coords * state.inverse_eigenvalues.astype(h.dtype), axis=-1)
  outside = jnp.sum(coords * state.null.astype(h.dtype), axis=-1)
  g = jnp.maximum(outside, inside / (1.0 + inside))[:, None]
  log_p = jax.nn.log_softmax(base.compute(logits).astype(h.dtype), axis=-1)
  log_rest = jnp.log1p(-jnp.exp(log_p))  # log(1 − p_c)
  terms = jax.nn.sigmoid(-(log_rest + (g - 1.0) * log_p))
  return -jnp.log(jnp.sum(terms, axis=-1)) / jnp.log(float(logits.shape[1]))


registry.register('pnml', needs={'features', 'logits'}, fit=fit_pnml, score=pnml, defaults={'bias': True},
                  fit_params=('bias',), paper='Bibas, Feder & Hassner 2021', year=2021)
