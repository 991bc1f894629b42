"""The arithmetic of the logit layers, as pure functions; Linen modules and NNX twins call these.

Exported as `ood_jax.layers.<name>`: see that package's docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks


def _safe_sqrt(x):
  # sqrt'(0) is infinite, and at initialisation every feature sits exactly on the zero prototype.
  # The double `where` keeps both the value and the gradient finite: d‖v‖ at v = 0 is taken as 0,
  # a valid subgradient of the norm.
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _check_features_and_centres(features, centres, centres_name):
  features = _checks.floating('features', features, min_ndim=1)
  centres = _checks.floating(centres_name, centres, ndim=2)
  if features.shape[-1] != centres.shape[-1]:
    raise ValueError(
        f'features have dimension {features.shape[-1]} but {centres_name} have dimension '
        f'{centres.shape[-1]} (shape {tuple(centres.shape)}).')
  return features, centres


def negative_distances(features, prototypes):
  """Negative Euclidean (non-squared) distances to prototypes, the IsoMax logits.

  logits_k = −‖f − p_k‖₂ (Macêdo et al. 2021, eq. 5). The gradient is finite where f = p_k, which is the
  state of every example at initialisation (zero prototypes, and zero features after a ReLU).

  The difference f − p_k is formed explicitly rather than through ‖f‖² − 2f·p + ‖p‖², which
  cancels catastrophically exactly in the small-distance regime IsoMax starts in.

  Args:
    features: `[..., D]` floating features.
    prototypes: `[K, D]` floating prototypes.

  Returns:
    `[..., K]` logits ≤ 0, in the promoted dtype of the inputs (at least float32).
  """
  features, prototypes = _check_features_and_centres(features, prototypes, 'prototypes')
  return _negative_distances(features, prototypes)


# The [..., K, D] differences below are fused into the reduction by XLA and never materialised,
# but only under jit: the cores are jitted so eager calls (e.g. scoring 10⁴ × 100 × 512) stay
# within memory too.
@jax.jit
def _negative_distances(features, prototypes):
  dtype = _checks.compute_dtype(features, prototypes)
  diff = features.astype(dtype)[..., None, :] - prototypes.astype(dtype)
  return -_safe_sqrt(jnp.sum(jnp.square(diff), axis=-1))


def mahalanobis_logits(features, means, cholesky):
  """ICE Mahalanobis logits, h_k = −(f − m_k)ᵀ (LLᵀ)⁻¹ (f − m_k) (Wu et al. 2022, eq. 0.11).

  With Σ = LLᵀ, (f − m)ᵀΣ⁻¹(f − m) = ‖L⁻¹f − L⁻¹m‖², so features and means are whitened by one
  triangular solve each (N + K solves, never an inverse) and compared by squared distance.

  Args:
    features: `[..., D]` floating features.
    means: `[K, D]` class means.
    cholesky: `[D, D]` lower-triangular factor L with positive diagonal. Only the lower triangle
      is read; a non-positive diagonal entry makes Σ singular (checked when concrete).

  Returns:
    `[..., K]` logits ≤ 0 in the promoted dtype of the inputs (at least float32).
  """
  features, means = _check_features_and_centres(features, means, 'means')
  cholesky = _checks.floating('cholesky', cholesky, ndim=2)
  d = features.shape[-1]
  if cholesky.shape != (d, d):
    raise ValueError(f'cholesky must have shape {(d, d)} to match the features, got {tuple(cholesky.shape)}.')
  value = _checks.host_value(cholesky)
  if value is not None and not np.all(np.diagonal(value) > 0):
    raise ValueError('cholesky must have a strictly positive diagonal (a lower-triangular Cholesky factor).')
  return _mahalanobis_logits(features, means, cholesky)


@jax.jit
def _mahalanobis_logits(features, means, cholesky):
  d = features.shape[-1]
  dtype = _checks.compute_dtype(features, means, cholesky)
  lower = cholesky.astype(dtype)
  batch_shape = features.shape[:-1]
  flat = features.astype(dtype).reshape(-1, d)
  white_f = jax.scipy.linalg.solve_triangular(lower, flat.T, lower=True).T  # [N, D]
  white_m = jax.scipy.linalg.solve_triangular(lower, means.astype(dtype).T, lower=True).T  # [K, D]
  sq = jnp.sum(jnp.square(white_f[:, None, :] - white_m[None, :, :]), axis=-1)
  return -sq.reshape(*batch_shape, means.shape[0])


def cholesky_from_raw(raw):
  """Maps an unconstrained `[D, D]` matrix to a Cholesky factor: strict lower part + softplus diagonal.

  The strict upper triangle of `raw` is ignored, so L is lower triangular with a positive diagonal
  for any `raw`, and gradient steps can never leave the set of valid factors.
  """
  diag = jax.nn.softplus(jnp.diagonal(raw))
  return jnp.tril(raw, k=-1) + jnp.diag(diag)


def raw_from_cholesky(cholesky):
  """Inverse of `cholesky_from_raw` on valid factors (positive diagonal)."""
  diag = jnp.diagonal(cholesky)
  inv_softplus = diag + jnp.log(-jnp.expm1(-diag))  # log(exp(d) − 1), stable for small and large d
  return jnp.tril(cholesky, k=-1) + jnp.diag(inv_softplus)


def cholesky_factor(head) -> jax.Array:
  """The Cholesky factor L of a Mahalanobis head (ICE), Linen or NNX: `cholesky_from_raw(cholesky_raw)`.

  Accepts what a user has at hand: the head's parameters `{'means': ..., 'cholesky_raw': ...}`
  (e.g. `variables['params']['head']` of a `models.Classifier`), a variables dict
  `{'params': {...}}` of a bare `MahalanobisLogits`, or an NNX `MahalanobisLogits` module.
  Linen users can also call `MahalanobisLogits(...).apply(variables, method='cholesky')`; the NNX twin
  has `.cholesky()`.

  Returns:
    `[D, D]` lower-triangular factor with a positive diagonal; Σ = LLᵀ is the shared covariance.
  """
  raw = getattr(head, 'cholesky_raw', None)
  if raw is not None:  # an NNX module: its nnx.Param holds the array
    return cholesky_from_raw(raw[...])
  if hasattr(head, 'get') and 'cholesky_raw' not in head and 'params' in head:
    head = head['params']
  if not hasattr(head, 'get') or 'cholesky_raw' not in head:
    keys = sorted(head) if hasattr(head, 'keys') else type(head).__name__
    raise ValueError(f"cholesky_factor needs a Mahalanobis head's parameters (a mapping with 'cholesky_raw', "
                     f"e.g. variables['params']['head']) or an NNX MahalanobisLogits; got {keys}.")
  return cholesky_from_raw(jnp.asarray(head['cholesky_raw']))


def _output_width(owner: str, num_classes, alias_name: str, alias) -> int:
  """K from `num_classes=` or its Flax spelling (`features=` as nn.Dense, `out_features=` as nnx.Linear)."""
  if num_classes is not None and alias is not None:
    raise TypeError(f'{owner}: pass num_classes= or {alias_name}= (the same number under its Flax name), '
                    f'not both; got num_classes={num_classes!r}, {alias_name}={alias!r}.')
  width = alias if num_classes is None else num_classes
  if width is None:
    raise TypeError(f'{owner} needs the number of classes: num_classes= (or {alias_name}=, as in Flax).')
  return _checks.positive_int('num_classes' if num_classes is not None else alias_name, width)


def l2_normalize(x, *, axis=-1, eps=1e-12):
  """x / max(‖x‖, eps): unit vectors with a finite value and gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def confidence_branch_logits(logits, confidence_logits):
  """Inference logits of a ConfBranch model (DeVries & Taylor 2018): log softmax(z) + log σ(s).

  One `[..., K]` array that carries both outputs: its softmax is the class prediction p = softmax(z)
  (the constant log c cancels) and its logsumexp, the energy score, is log c, the paper's OOD score.
  So accuracy, calibration (softmax(ℓ/T) = softmax(log p / T)) and every logit score work on it unchanged.

  Args:
    logits: `[..., K]` class logits z.
    confidence_logits: `[...]` confidence logits s, c = σ(s).
  """
  z = _checks.floating('logits', logits, min_ndim=1)
  s = _checks.floating('confidence_logits', confidence_logits)
  dtype = _checks.compute_dtype(z, s)
  return jax.nn.log_softmax(z.astype(dtype), axis=-1) - jax.nn.softplus(-s.astype(dtype))[..., None]


def cosine_logits(features, kernel):
  """Cosine similarities cos(f, w_k) `[..., K]` of features `[..., D]` and the columns of kernel `[D, K]`.

  The dividend h_i of G-ODIN's cosine head h^C (Hsu et al. 2020, Sec. 3.2): both sides normalised, no
  bias, so h_i ∈ [−1, 1].
  """
  features = _checks.floating('features', features, min_ndim=1)
  kernel = _checks.floating('kernel', kernel, ndim=2)
  if features.shape[-1] != kernel.shape[0]:
    raise ValueError(f'features have dimension {features.shape[-1]} but kernel has {kernel.shape[0]} rows.')
  return l2_normalize(features) @ l2_normalize(kernel, axis=0)
