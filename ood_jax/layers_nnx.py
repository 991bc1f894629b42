"""NNX twins of the Linen logit layers in `ood_jax.layers`, for `flax.nnx` projects.

Import them as `from ood_jax import layers_nnx`, next to `from flax import nnx`: a module named `nnx`
would shadow `flax.nnx` in an import block, so this is their one home (the 0.1 path `ood_jax.layers.nnx`
is gone).

Same names, same parameter names, same arithmetic (they call the same pure functions). NNX
modules are built eagerly, so they take the input width up front, and the constructor reads like
the `nnx.Linear(in_features, out_features, rngs=...)` a head replaces:

  from flax import nnx
  from ood_jax import layers_nnx

  head = layers_nnx.DistanceLogits(256, 10, rngs=nnx.Rngs(0))            # as nnx.Linear(256, 10)
  head = layers_nnx.DistanceLogits(in_features=256, out_features=10, rngs=nnx.Rngs(0))
  head = layers_nnx.DistanceLogits(256, num_classes=10, rngs=nnx.Rngs(0))  # the same layer
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from ood_jax.layers.functional import _output_width
from ood_jax.layers.functional import cholesky_from_raw
from ood_jax.layers.functional import l2_normalize
from ood_jax.layers.functional import mahalanobis_logits
from ood_jax.layers.functional import negative_distances
from ood_jax.layers.functional import raw_from_cholesky

__all__ = ['DistanceLogits', 'MahalanobisLogits', 'ProjectionHead']

_NORMAL_INIT = nnx.initializers.normal(stddev=1.0)  # the Linen twin's default for the means


class DistanceLogits(nnx.Module):
  """IsoMax / distance-OvA head; param `prototypes` `[num_classes, in_features]`, zeros by default.

  K is `num_classes` or, as in `nnx.Linear`, `out_features` (one of the two).
  """

  def __init__(self, in_features: int, num_classes: int | None = None, *, rngs: nnx.Rngs,
               out_features: int | None = None, prototype_init=nnx.initializers.zeros, param_dtype=jnp.float32):
    num_classes = _output_width('DistanceLogits', num_classes, 'out_features', out_features)
    self.prototypes = nnx.Param(prototype_init(rngs.params(), (num_classes, in_features), param_dtype))

  def __call__(self, features):
    return negative_distances(features, self.prototypes[...])


class MahalanobisLogits(nnx.Module):
  """ICE head; params `means` `[K, D]` ~ N(0, 1) and `cholesky_raw` `[D, D]` (identity factor).

  K is `num_classes` or, as in `nnx.Linear`, `out_features` (one of the two). Train with clipped
  gradients (`optax.clip_by_global_norm(1.0)` first in the chain); `losses.ice_in` explains why.
  """

  def __init__(self, in_features: int, num_classes: int | None = None, *, rngs: nnx.Rngs,
               out_features: int | None = None, means_init=_NORMAL_INIT, param_dtype=jnp.float32):
    num_classes = _output_width('MahalanobisLogits', num_classes, 'out_features', out_features)
    self.means = nnx.Param(means_init(rngs.params(), (num_classes, in_features), param_dtype))
    self.cholesky_raw = nnx.Param(raw_from_cholesky(jnp.eye(in_features, dtype=param_dtype)))

  def cholesky(self) -> jax.Array:
    """The lower-triangular factor L with positive diagonal."""
    return cholesky_from_raw(self.cholesky_raw[...])

  def __call__(self, features):
    return mahalanobis_logits(features, self.means[...], self.cholesky())


class ProjectionHead(nnx.Module):
  """Dense → ReLU → Dense → L2-normalise; submodules `hidden` and `output` as in the Linen twin."""

  def __init__(self, in_features: int, hidden_dim: int, output_dim: int = 128, *, rngs: nnx.Rngs,
               dtype=None):
    self.hidden = nnx.Linear(in_features, hidden_dim, dtype=dtype, rngs=rngs)
    self.output = nnx.Linear(hidden_dim, output_dim, dtype=dtype, rngs=rngs)

  def __call__(self, features):
    x = self.output(jax.nn.relu(self.hidden(features)))
    return l2_normalize(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
