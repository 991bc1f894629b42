"""Logit layers for distance-based OOD detection: pure functions and thin Linen modules.

* `negative_distances` / `DistanceLogits`: IsoMax (paper 000, eq. 5) and distance one-vs-all
  (paper 002) logits, −‖f − p_k‖₂ to learned prototypes initialised at zero.
* `mahalanobis_logits` / `MahalanobisLogits`: the ICE head (paper 001, eq. 0.11),
  h_k = −(f − m_k)ᵀ(LLᵀ)⁻¹(f − m_k) with a trainable Cholesky factor L.
* `ProjectionHead`: the contrastive projection MLP of SupCon / ReweightOOD (paper 003), output on
  the unit sphere.

The modules only own parameters; all arithmetic lives in the pure functions so that Linen and the
NNX twins compute exactly the same thing. Import the twins as `from ood_jax import layers_nnx`: that
name sits beside `from flax import nnx` without shadowing it.

Constructor names follow the Flax layer a head replaces: `DistanceLogits(features=10)` reads like
the `nn.Dense(features=10)` it stands in for, and `num_classes=` means the same; the NNX twins take
`(in_features, out_features)` like `nnx.Linear`. Passing both spellings is a TypeError.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.layers.functional import cholesky_factor
from ood_jax.layers.functional import cholesky_from_raw
from ood_jax.layers.functional import l2_normalize
from ood_jax.layers.functional import mahalanobis_logits
from ood_jax.layers.functional import negative_distances
from ood_jax.layers.functional import _output_width
from ood_jax.layers.functional import raw_from_cholesky

__all__ = [
    'DistanceLogits',
    'MahalanobisLogits',
    'ProjectionHead',
    'cholesky_factor',
    'cholesky_from_raw',
    'l2_normalize',
    'mahalanobis_logits',
    'negative_distances',
    'raw_from_cholesky',
]


def _identity_raw(key, shape, dtype=jnp.float32):
  del key
  return raw_from_cholesky(jnp.eye(shape[0], dtype=dtype))


class DistanceLogits(nn.Module):
  """IsoMax / distance-OvA head: `negative_distances(features, prototypes)`.

  A drop-in for the last `nn.Dense` of a classifier: `nn.Dense(features=10)` becomes
  `DistanceLogits(features=10)` (or `DistanceLogits(num_classes=10)`, or `DistanceLogits(10)`).

  Attributes:
    num_classes: K.
    prototype_init: initialiser of the `[K, D]` 'prototypes' parameter; zeros as in paper 000.
    param_dtype: dtype of the parameter.
    features: K under `nn.Dense`'s name; give this or `num_classes`, not both.
  """

  num_classes: int | None = None
  prototype_init: nn.initializers.Initializer = nn.initializers.zeros
  param_dtype: jnp.dtype = jnp.float32
  features: int | None = None

  def __post_init__(self):
    _output_width(type(self).__name__, self.num_classes, 'features', self.features)  # fail at construction
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    num_classes = _output_width(type(self).__name__, self.num_classes, 'features', self.features)
    prototypes = self.param('prototypes', self.prototype_init,
                            (num_classes, jnp.shape(features)[-1]), self.param_dtype)
    return negative_distances(features, prototypes)


class MahalanobisLogits(nn.Module):
  """ICE head: `mahalanobis_logits(features, means, cholesky_from_raw(cholesky_raw))`.

  Parameters: 'means' `[K, D]` and 'cholesky_raw' `[D, D]` (unconstrained; the factor is
  `cholesky_from_raw(cholesky_raw)`, initialised to the identity). Read the factor L (Σ = LLᵀ) with
  `module.apply(variables, method='cholesky')` or `cholesky_factor(variables['params'])`, as the NNX
  twin's `.cholesky()`.

  Train it with clipped gradients (`optax.clip_by_global_norm(1.0)` before the optimiser): the
  squared distances grow quadratically with the features and an unclipped ICE run diverges within
  a few steps (`losses.ice_in` explains).

  Attributes:
    num_classes: K.
    means_init: initialiser of the class means; N(0, 1) so classes start apart.
    param_dtype: dtype of the parameters.
    features: K under `nn.Dense`'s name; give this or `num_classes`, not both.
  """

  num_classes: int | None = None
  means_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)
  param_dtype: jnp.dtype = jnp.float32
  features: int | None = None

  def __post_init__(self):
    _output_width(type(self).__name__, self.num_classes, 'features', self.features)  # fail at construction
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    d = jnp.shape(features)[-1]
    num_classes = _output_width(type(self).__name__, self.num_classes, 'features', self.features)
    means = self.param('means', self.means_init, (num_classes, d), self.param_dtype)
    raw = self.param('cholesky_raw', _identity_raw, (d, d), self.param_dtype)
    return mahalanobis_logits(features, means, cholesky_from_raw(raw))

  def cholesky(self) -> jax.Array:
    """The factor L of a bound module: `module.apply(variables, method='cholesky')`."""
    return cholesky_from_raw(self.get_variable('params', 'cholesky_raw'))


class ProjectionHead(nn.Module):
  """Contrastive projection head: Dense → ReLU → Dense → L2-normalise (SupCon, ReweightOOD).

  Attributes:
    hidden_dim: width of the hidden layer (the backbone's feature width in SupCon).
    output_dim: embedding dimension, 128 in papers 003 and SupCon.
    dtype: computation dtype of the Dense layers (e.g. bfloat16); normalisation runs in float32.
  """

  hidden_dim: int
  output_dim: int = 128
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, features):
    _checks.floating('features', features, min_ndim=1)
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name='hidden')(features)
    x = nn.relu(x)
    x = nn.Dense(self.output_dim, dtype=self.dtype, name='output')(x)
    return l2_normalize(x.astype(_checks.compute_dtype(x)))
