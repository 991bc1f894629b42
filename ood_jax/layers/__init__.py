"""Logit layers for distance-based OOD detection: pure functions and thin Linen modules.

* `negative_distances` / `DistanceLogits`: IsoMax (Macêdo et al. 2021, eq. 5) and distance one-vs-all
  (Padhy et al. 2020) logits, −‖f − p_k‖₂ to learned prototypes initialised at zero.
* `mahalanobis_logits` / `MahalanobisLogits`: the ICE head (Wu et al. 2022, eq. 0.11),
  h_k = −(f − m_k)ᵀ(LLᵀ)⁻¹(f − m_k) with a trainable Cholesky factor L.
* `ProjectionHead`: the contrastive projection MLP of SupCon / ReweightOOD (Regmi et al. 2024), output on
  the unit sphere.
* Heads of OpenOOD v1.5's training baselines, whose training and inference outputs differ (they take
  `train=`): `FeatureNormDense` (T2FNorm, Regmi et al. 2023), `ConfidenceBranch` (ConfBranch, DeVries &
  Taylor 2018; `confidence_branch_logits`) and `GodinHead` (G-ODIN, Hsu et al. 2020; `cosine_logits`).

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
from ood_jax.layers.functional import confidence_branch_logits
from ood_jax.layers.functional import cosine_logits
from ood_jax.layers.functional import l2_normalize
from ood_jax.layers.functional import mahalanobis_logits
from ood_jax.layers.functional import negative_distances
from ood_jax.layers.functional import _output_width
from ood_jax.layers.functional import raw_from_cholesky

__all__ = [
    'ConfidenceBranch',
    'DistanceLogits',
    'FeatureNormDense',
    'GodinHead',
    'MahalanobisLogits',
    'ProjectionHead',
    'cholesky_factor',
    'cholesky_from_raw',
    'confidence_branch_logits',
    'cosine_logits',
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
    prototype_init: initialiser of the `[K, D]` 'prototypes' parameter; zeros as in Macêdo et al. 2021.
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
    output_dim: embedding dimension, 128 in ReweightOOD (Regmi et al. 2024) and SupCon (Khosla et al. 2020).
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


def _dense_params(module, features, num_classes, prefix=''):
  """nn.Dense's 'kernel' `[D, K]` (LeCun normal) and 'bias' `[K]` (zeros), so checkpoints interchange."""
  kernel = module.param(prefix + 'kernel', nn.initializers.lecun_normal(), (jnp.shape(features)[-1], num_classes),
                        jnp.float32)
  return kernel, module.param(prefix + 'bias', nn.initializers.zeros, (num_classes,), jnp.float32)


class FeatureNormDense(nn.Module):
  """T2FNorm head (Regmi et al. 2023): a dense layer on features scaled to norm 1/τ during training.

  Training: W·(h/‖h‖)/τ + b. Inference: W·h/τ + b, the raw features, as the paper evaluates and as
  OpenOOD's `forward_ood_inference` does for models trained from scratch (its /τ only rescales the
  logits). The pooled features the classifier returns stay h, so feature detectors see the raw ones.

  Parameters 'kernel' and 'bias' as `nn.Dense`'s (same initialisers).

  Attributes:
    num_classes: K.
    temperature: τ > 0; 0.1 in OpenOOD's T2FNorm recipe.
  """

  num_classes: int
  temperature: float = 0.1

  def __post_init__(self):
    _checks.positive_int('num_classes', self.num_classes)
    _checks.positive_real('temperature', self.temperature)
    super().__post_init__()

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    features = _checks.floating('features', features, min_ndim=1)
    kernel, bias = _dense_params(self, features, self.num_classes)
    h = l2_normalize(features) if train else features
    return (h / self.temperature) @ kernel + bias


class ConfidenceBranch(nn.Module):
  """ConfBranch head (DeVries & Taylor 2018): class logits z and a confidence logit s, c = σ(s).

  Parameters: 'kernel', 'bias' of the classes (as `nn.Dense`) and 'confidence_kernel' `[D, 1]`,
  'confidence_bias' `[1]` of the confidence branch, both on the pooled features (OpenOOD's ConfBranchNet).

  The loss weight λ of −log c is training state, so it lives here as the variable
  'batch_stats'/'weight' (checkpointed, resumed and guarded against non-finite steps with the batch
  statistics): after every training step λ ← λ/1.01 when the budget β exceeds the batch's mean −log c,
  else λ ← λ/0.99, which drives the confidence loss towards β (the paper's budget; the update of the
  authors' and OpenOOD's code).

  Returns:
    With train=True, `[B, K + 2]`: z, s and the λ of this step (before its update), which
    `losses.confidence_branch` weighs −log c with. With train=False, `[B, K]`
    `confidence_branch_logits(z, s)`: softmax gives p and logsumexp gives log c, the ConfBranch score.

  Attributes:
    num_classes: K.
    budget: β > 0, 0.3 in OpenOOD's recipe.
    weight: initial λ ≥ 0, 0.1 in OpenOOD's recipe.
  """

  num_classes: int
  budget: float = 0.3
  weight: float = 0.1

  def __post_init__(self):
    _checks.positive_int('num_classes', self.num_classes)
    _checks.positive_real('budget', self.budget)
    _checks.nonnegative('weight', self.weight)
    super().__post_init__()

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    features = _checks.floating('features', features, min_ndim=1)
    kernel, bias = _dense_params(self, features, self.num_classes)
    confidence_kernel, confidence_bias = _dense_params(self, features, 1, prefix='confidence_')
    logits = features @ kernel + bias
    confidence = (features @ confidence_kernel + confidence_bias)[..., 0]
    weight = self.variable('batch_stats', 'weight', lambda: jnp.asarray(self.weight, jnp.float32))
    if not train:
      return confidence_branch_logits(logits, confidence)
    current = weight.value
    if self.is_mutable_collection('batch_stats') and not self.is_initializing():
      confidence_loss = jnp.mean(jax.nn.softplus(-jax.lax.stop_gradient(confidence)))  # mean −log c
      weight.value = jnp.where(self.budget > confidence_loss, current / 1.01, current / 0.99)
    lam = jnp.broadcast_to(current, confidence.shape)
    return jnp.concatenate([logits, confidence[..., None], lam[..., None]], axis=-1)


class GodinHead(nn.Module):
  """G-ODIN head (Hsu et al. 2020, "Generalized ODIN"): dividend / divisor logits h_i(f)/g(f).

  h_i = cos(f, w_i) (`cosine_logits`, the paper's h^C and OpenOOD's default; parameter 'kernel' `[D, K]`,
  He-normal as OpenOOD), g = σ(BN(Linear(f))) a scalar per example (modules 'divisor' and 'divisor_bn',
  BatchNorm with PyTorch's defaults). Training uses the quotients h/g as logits; inference returns the
  dividends h, whose maximum is the G-ODIN score (as OpenOOD's `inference=True`).

  Attributes:
    num_classes: K.
  """

  num_classes: int

  def __post_init__(self):
    _checks.positive_int('num_classes', self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    features = _checks.floating('features', features, min_ndim=1)
    kernel = self.param('kernel', nn.initializers.he_normal(), (jnp.shape(features)[-1], self.num_classes),
                        jnp.float32)
    h = cosine_logits(features, kernel)
    g = nn.Dense(1, name='divisor')(features)
    g = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='divisor_bn')(g)
    return h / jax.nn.sigmoid(g) if train else h
