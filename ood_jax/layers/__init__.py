"""Logit layers for distance-based OOD detection: pure functions and thin Linen modules.

* `negative_distances` / `DistanceLogits`: IsoMax (Macêdo et al. 2021, eq. 5) and distance one-vs-all
  (Padhy et al. 2020) logits, −‖f − p_k‖₂ to learned prototypes initialised at zero.
* `mahalanobis_logits` / `MahalanobisLogits`: the ICE head (Wu et al. 2022, eq. 0.11),
  h_k = −(f − m_k)ᵀ(LLᵀ)⁻¹(f − m_k) with a trainable Cholesky factor L.
* `ProjectionHead`: the contrastive projection MLP of SupCon / ReweightOOD (Regmi et al. 2024), output on
  the unit sphere.
* Heads of OpenOOD v1.5's training baselines, whose training and inference outputs differ (they take
  `train=`): `FeatureNormDense` (T2FNorm, Regmi et al. 2023), `ConfidenceBranch` (ConfBranch, DeVries &
  Taylor 2018; `confidence_branch_logits`), `GodinHead` (G-ODIN, Hsu et al. 2020; `cosine_logits`) and
  `RotationHead` (RotPred, Hendrycks et al. 2019: class logits and an auxiliary 4-way rotation head).

* Heads with a memory of past batches in 'batch_stats' (`ood_jax.layers.synthesis` has their arithmetic):
  `VirtualOutlierHead` (VOS, Du et al. 2022), `NPOSHead` (NPOS, Tao et al. 2023) and
  `PrototypeProjectionHead` (CIDER, Ming et al. 2023).

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
from ood_jax.layers.synthesis import class_gaussians
from ood_jax.layers.synthesis import ema_prototypes
from ood_jax.layers.synthesis import enqueue
from ood_jax.layers.synthesis import kth_neighbour_distance
from ood_jax.layers.synthesis import npos_outliers
from ood_jax.layers.synthesis import virtual_outliers
from ood_jax.layers.synthesis import weighted_logsumexp

__all__ = [
    'ConfidenceBranch',
    'DistanceLogits',
    'FeatureNormDense',
    'GodinHead',
    'MahalanobisLogits',
    'NPOSHead',
    'ProjectionHead',
    'PrototypeProjectionHead',
    'RotationHead',
    'cholesky_factor',
    'cholesky_from_raw',
    'confidence_branch_logits',
    'cosine_logits',
    'l2_normalize',
    'mahalanobis_logits',
    'negative_distances',
    'raw_from_cholesky',
    'VirtualOutlierHead',
    'class_gaussians',
    'ema_prototypes',
    'enqueue',
    'kth_neighbour_distance',
    'npos_outliers',
    'virtual_outliers',
    'weighted_logsumexp',
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


class RotationHead(nn.Module):
  """RotPred head (Hendrycks, Mazeika, Kadavath & Song 2019): class logits and 4-way rotation logits.

  Two affine maps of the pooled features, as OpenOOD's `RotNet` (`fc` and `rot_fc`): 'kernel' `[D, K]` and
  'bias' `[K]` of the classes (as `nn.Dense`, so the class layer reads like a dense head's) and
  'rotation_kernel' `[D, 4]`, 'rotation_bias' `[4]` of the auxiliary head that predicts which quarter turn
  (0°, 90°, 180°, 270°) the image was given.

  Returns:
    With train=True, `[B, K + 4]`: the class logits, then the rotation logits (`methods.rotation` splits
    them). With train=False, the `[B, K]` class logits, so every logit score and detector reads the
    classifier; the rotation logits are sown as 'intermediates'/.../'rotation_logits' (read them with
    `model.apply(..., mutable='intermediates')`, as `detectors.rotation.model_apply_fn` does for the
    RotPred score).

  Attributes:
    num_classes: K.
    num_rotations: outputs of the rotation head, 4 (quarter turns).
  """

  num_classes: int
  num_rotations: int = 4

  def __post_init__(self):
    _checks.positive_int('num_classes', self.num_classes)
    _checks.positive_int('num_rotations', self.num_rotations)
    super().__post_init__()

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    features = _checks.floating('features', features, min_ndim=1)
    kernel, bias = _dense_params(self, features, self.num_classes)
    rotation_kernel, rotation_bias = _dense_params(self, features, self.num_rotations, prefix='rotation_')
    logits = features @ kernel + bias
    rotation_logits = features @ rotation_kernel + rotation_bias
    if train:
      return jnp.concatenate([logits, rotation_logits], axis=-1)
    self.sow('intermediates', 'rotation_logits', rotation_logits)
    return logits


def _feature_queue(module, num_classes, size, dim):
  """The per-class feature queue of VOS / NPOS as 'batch_stats' variables (`enqueue` documents them)."""
  queue = module.variable('batch_stats', 'queue', jnp.zeros, (num_classes, size, dim), jnp.float32)
  module.variable('batch_stats', 'count', jnp.zeros, (num_classes,), jnp.int32)
  module.variable('batch_stats', 'pointer', jnp.zeros, (num_classes,), jnp.int32)
  module.variable('batch_stats', 'steps', jnp.zeros, (), jnp.int32)
  return jax.lax.stop_gradient(queue.value)


class VirtualOutlierHead(nn.Module):
  """VOS head (Du, Wang, Cai & Li 2022): class logits, a feature queue, virtual outliers, an uncertainty logit.

  Parameters: 'kernel', 'bias' of the classes (as `nn.Dense`); 'energy_weight' `[K]`, the weights w of the
  negative weighted energy log Σ_k max(w_k, 0)·exp(z_k) (`weighted_logsumexp`), uniform in [0, 1) at
  initialisation like the reference's `torch.nn.init.uniform_`; 'uncertainty_kernel' `[1, 2]` and
  'uncertainty_bias' `[2]`, the logistic regression φ on it (the reference's `Linear(1, 2)`), whose logit
  difference s = φ₁ − φ₀ is the in-distribution-vs-outlier logit (two-class cross-entropy = logistic loss of s).
  State ('batch_stats'): 'queue' `[K, S, D]`, 'count' `[K]`, 'pointer' `[K]` (see `enqueue`) and 'steps', the
  training steps taken. The head reads the queue; `methods.synthesis` writes it after the forward pass (the
  head does not see labels).

  Returns:
    With train=False, the `[B, K]` class logits. With train=True, `[B + K·select, K + 1]`: the rows of the
    batch, then the virtual outliers drawn from the queue (`virtual_outliers`, from the 'dropout' key), each
    with its class logits (the outliers through the same affine layer, as the reference's `fc`) and, last,
    its uncertainty logit s.

  Attributes:
    num_classes: K.
    queue_size: S, features kept per class (1000 in VOS and OpenOOD).
    num_samples: draws per class per step (10 000).
    select: outliers kept per class per step (1).
    ridge: added to the shared covariance's diagonal (1e-4).
  """

  num_classes: int
  queue_size: int = 1000
  num_samples: int = 10000
  select: int = 1
  ridge: float = 1e-4

  def __post_init__(self):
    for name in ('num_classes', 'queue_size', 'num_samples', 'select'):
      _checks.positive_int(name, getattr(self, name))
    if self.select > self.num_samples:
      raise ValueError(f'select ({self.select}) must be <= num_samples ({self.num_samples}).')
    _checks.positive_real('ridge', self.ridge)
    super().__post_init__()

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    features = _checks.floating('features', features, ndim=2)
    kernel, bias = _dense_params(self, features, self.num_classes)
    energy_weight = self.param('energy_weight', nn.initializers.uniform(1.0), (self.num_classes,), jnp.float32)
    lr_kernel = self.param('uncertainty_kernel', nn.initializers.lecun_normal(), (1, 2), jnp.float32)
    lr_bias = self.param('uncertainty_bias', nn.initializers.zeros, (2,), jnp.float32)
    queue = _feature_queue(self, self.num_classes, self.queue_size, features.shape[-1])
    logits = features @ kernel + bias
    if not train:
      return logits
    outliers = virtual_outliers(queue, self.make_rng('dropout'), num_samples=self.num_samples,
                                select=self.select, ridge=self.ridge)
    rows = jnp.concatenate([logits, outliers @ kernel + bias], axis=0)
    phi = weighted_logsumexp(rows, energy_weight)[:, None] * lr_kernel + lr_bias  # [N, 2]
    return jnp.concatenate([rows, (phi[:, 1] - phi[:, 0])[:, None]], axis=-1)


class PrototypeProjectionHead(nn.Module):
  """CIDER head (Ming, Sun, Dia & Li 2023): `ProjectionHead` unit embeddings and class prototypes as state.

  Submodule 'projection' (`ProjectionHead`, Dense(D) → ReLU → Dense(E) → normalise, as CIDER's and OpenOOD's
  'mlp' head). State ('batch_stats'): 'prototypes' `[K, E]`, zeros until a class is seen, moved by
  `ema_prototypes` in the method's update (`methods.prototypes`). Returns the `[B, E]` embeddings in training
  and inference alike.

  Attributes:
    num_classes: K.
    output_dim: E (128).
  """

  num_classes: int
  output_dim: int = 128

  def __post_init__(self):
    _checks.positive_int('num_classes', self.num_classes)
    _checks.positive_int('output_dim', self.output_dim)
    super().__post_init__()

  @nn.compact
  def __call__(self, features):
    features = _checks.floating('features', features, ndim=2)
    self.variable('batch_stats', 'prototypes', jnp.zeros, (self.num_classes, self.output_dim), jnp.float32)
    return ProjectionHead(hidden_dim=features.shape[-1], output_dim=self.output_dim, name='projection')(features)


class NPOSHead(nn.Module):
  """NPOS head (Tao, Du, Zhu & Li 2023): unit embeddings and prototypes (as CIDER), a feature queue, outliers
  synthesised from it and a binary in-distribution-vs-outlier MLP on the penultimate features.

  Submodules: 'projection' (`ProjectionHead`, OpenOOD's `NPOSNet.head`), 'mlp_hidden' and 'mlp_output'
  (Dense(E) → ReLU → Dense(1), OpenOOD's `NPOSNet.mlp`). State: 'queue', 'count', 'pointer', 'steps' (as
  `VirtualOutlierHead`) and 'prototypes' `[K, E]` (as `PrototypeProjectionHead`), written by
  `methods.synthesis`.

  Returns:
    With train=False, the `[B, E]` unit embeddings (an embedding model: it is scored by KNN on the backbone
    features). With train=True, `[B + K·pick·keep, E + 1]`: the batch's embeddings, then zeros for the outliers
    (`npos_outliers`, from the 'dropout' key), each row ending with its MLP logit.

  Attributes:
    num_classes: K.
    output_dim: E (128).
    queue_size: S (1000 in OpenOOD's recipe).
    neighbours: the k of the k-NN distance (`npos_outliers`' k, 300).
    boundary, pick, num_candidates, noise, keep: `npos_outliers`'.
  """

  num_classes: int
  output_dim: int = 128
  queue_size: int = 1000
  neighbours: int = 300
  boundary: int = 200
  pick: int = 2
  num_candidates: int = 600
  noise: float = 0.1
  keep: int = 200

  def __post_init__(self):
    for name in ('num_classes', 'output_dim', 'queue_size', 'neighbours', 'boundary', 'pick', 'num_candidates',
                 'keep'):
      _checks.positive_int(name, getattr(self, name))
    for name, bound in (('neighbours', 'queue_size'), ('boundary', 'queue_size'), ('pick', 'boundary'),
                        ('keep', 'num_candidates')):
      if getattr(self, name) > getattr(self, bound):
        raise ValueError(f'{name} ({getattr(self, name)}) must be <= {bound} ({getattr(self, bound)}).')
    _checks.positive_real('noise', self.noise)
    super().__post_init__()

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    features = _checks.floating('features', features, ndim=2)
    self.variable('batch_stats', 'prototypes', jnp.zeros, (self.num_classes, self.output_dim), jnp.float32)
    queue = _feature_queue(self, self.num_classes, self.queue_size, features.shape[-1])
    embeddings = ProjectionHead(hidden_dim=features.shape[-1], output_dim=self.output_dim,
                                name='projection')(features)
    hidden = nn.Dense(self.output_dim, name='mlp_hidden')
    output = nn.Dense(1, name='mlp_output')
    mlp = lambda x: output(nn.relu(hidden(x)))[:, 0]
    if not train:
      if self.is_initializing():
        mlp(features)  # create the MLP's parameters
      return embeddings
    outliers = npos_outliers(queue, self.make_rng('dropout'), k=self.neighbours, boundary=self.boundary, pick=self.pick,
                             num_candidates=self.num_candidates, noise=self.noise, keep=self.keep)
    rows = jnp.concatenate([embeddings, jnp.zeros((outliers.shape[0], self.output_dim), embeddings.dtype)])
    scores = mlp(jnp.concatenate([features, outliers.astype(features.dtype)], axis=0))
    return jnp.concatenate([rows, scores[:, None]], axis=-1)
