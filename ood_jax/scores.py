"""Post-hoc OOD scores: every score is "higher = more in-distribution" (confidence-like).

Logit scores map `[..., K]` logits to `[...]` scores:

* `max_softmax`: maximum softmax probability, MSP (Hendrycks & Gimpel 2017; "MPS" in paper 000).
* `max_logit`: max_k z_k; on IsoMax distance logits this is the minimum distance score (MDS, paper 000).
* `entropic_score`: negative entropy Σ_k p_k log p_k of softmax(z) (IsoMax, paper 000, eq. 7).
* `energy`: negative free energy T·logsumexp(z / T) (Liu et al. 2020; paper 001).
* `max_sigmoid`, `max_distance_sigmoid`: one-vs-all confidences σ(z) and 2σ(z) (paper 002).
* `max_likelihood`: ICE confidence exp(max_k h_k) on Mahalanobis logits (paper 001).

Scores that need more than logits:

* `odin`: temperature scaling plus one signed-gradient input perturbation (Liang et al. 2018).
* `fit_gaussian` / `mahalanobis`: class means and one shared covariance fitted by streaming over
  training features, then −min_k Mahalanobis distance (Lee et al. 2018; paper 003).
* `knn`: −distance to the k-th nearest normalised training feature (Sun et al. 2022; paper 003),
  computed in chunks so that the query × bank similarity matrix is never materialised.

Logit scores compute in at least float32 (`_checks.compute_dtype`), so bfloat16 logits give
float32 scores; they are pure, jit- and vmap-safe, and work in log space so that logits of ±1e4
never produce a NaN.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, NamedTuple

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax import layers

__all__ = [
    'Gaussian',
    'energy',
    'entropic_score',
    'fit_gaussian',
    'knn',
    'mahalanobis',
    'max_distance_sigmoid',
    'max_likelihood',
    'max_logit',
    'max_sigmoid',
    'max_softmax',
    'odin',
]


def _logits(logits, name='logits'):
  """Validates `[..., K]` logits with K >= 1 and casts them to the compute dtype."""
  dtype = getattr(logits, 'dtype', None)
  if dtype is None:
    logits = np.asarray(logits)
    dtype = logits.dtype
  if jnp.issubdtype(dtype, jnp.integer):
    # Integer arrays are labels: the usual mistake is an argument order copied from elsewhere.
    raise TypeError(f'{name} must have a floating dtype, got {dtype}: integer arrays look like labels, '
                    f'and scores take floating [..., num_classes] logits (model outputs).')
  logits = _checks.floating(name, logits, min_ndim=1)
  _checks.nonempty(name, logits, axis=-1)
  return logits.astype(_checks.compute_dtype(logits))


def _traced_hyperparameter(values, name, value, ok, requirement):
  """NaN scores (and a checkify check) when a traced hyperparameter breaks its range.

  Concrete values are checked eagerly with a ValueError and pass through unchanged; a traced one
  cannot be read, so a bad value makes every score NaN, which the metrics then reject loudly.
  `jax.experimental.checkify.checkify` turns it into an error message (the check is free
  otherwise).
  """
  if _checks.is_concrete(value):
    return values
  good = ok(jnp.asarray(value))
  checkify.check(good, f'{name} must be {requirement}, got {{value}}.', value=value, debug=True)
  return jnp.where(good, values, jnp.asarray(jnp.nan, values.dtype))


# ------------------------------------------------------------------------------------------------
# Logit scores.
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
  return jnp.exp(jnp.max(jax.nn.log_softmax(_logits(logits), axis=-1), axis=-1))


def max_logit(logits):
  """Maximum logit, max_k z_k.

  For IsoMax / distance logits z_k = −‖f − p_k‖ this is the minimum distance score (MDS,
  paper 000): minus the distance to the nearest prototype.

  Args:
    logits: `[..., num_classes]` floating logits.

  Returns:
    `[...]` scores, in at least float32.
  """
  return jnp.max(_logits(logits), axis=-1)


def entropic_score(logits):
  """Entropic score: negative entropy of softmax(z), Σ_k p_k log p_k (paper 000, eq. 7).

  Pass the raw distance logits: the entropic scale E_s multiplies them in the IsoMax loss only and
  is removed at inference (paper 000, Section 3).

  log p comes from `log_softmax`, so log p stays finite (≈ −2e4 for logits [1e4, −1e4]) while
  p = exp(log p) underflows to exactly 0, and p·log p = 0 as in the limit p → 0. Terms whose p is
  exactly zero are masked as well, so that a −inf logit (log p = −inf) contributes 0, not 0·(−inf).

  Args:
    logits: `[..., num_classes]` floating logits.

  Returns:
    `[...]` scores in [−log K, 0], in at least float32; 0 for a one-hot prediction.
  """
  log_p = jax.nn.log_softmax(_logits(logits), axis=-1)
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
  z = _logits(logits)
  _checks.positive('temperature', temperature)
  t = jnp.asarray(temperature, dtype=z.dtype)
  scores = t * jax.nn.logsumexp(z / t, axis=-1)
  return _traced_hyperparameter(scores, 'temperature', temperature, lambda v: v > 0, '> 0')


def max_sigmoid(logits):
  """One-vs-all confidence, max_k σ(z_k) (paper 002).

  σ is increasing, so max_k σ(z_k) = σ(max_k z_k): one sigmoid per example instead of K.

  Args:
    logits: `[..., num_classes]` floating one-vs-all logits.

  Returns:
    `[...]` scores in [0, 1], in at least float32.
  """
  return jax.nn.sigmoid(max_logit(logits))


def max_distance_sigmoid(logits):
  """Distance one-vs-all confidence, max_k 2σ(z_k) for distance logits z_k = −d_k ≤ 0 (paper 002).

  p_k = 2σ(−d_k) ∈ (0, 1] is 1 on the prototype and decays to 0 far from it. Logits must be
  ≤ 0 (negative distances); positive logits would give values above 1 and are not clipped.

  Args:
    logits: `[..., num_classes]` negative distances.

  Returns:
    `[...]` scores in [0, 1] (exactly 1 at logit 0, a finite ~0 at logit −1e4), in at least float32.
  """
  return 2.0 * jax.nn.sigmoid(max_logit(logits))


def max_likelihood(logits):
  """ICE confidence, exp(max_k h_k) for Mahalanobis logits h_k ≤ 0 (paper 001).

  exp(h_k) is the unnormalised Gaussian likelihood of class k; the maximum is 1 at a class mean.
  It ranks examples exactly as `max_logit` does, but in float32 it underflows to 0 once
  max h < −87, where all such examples tie; rank with `max_logit` when distances are large.

  Args:
    logits: `[..., num_classes]` ICE logits h_k = −(f − m_k)ᵀΣ⁻¹(f − m_k) ≤ 0, e.g. from
      `ood_jax.layers.mahalanobis_logits`.

  Returns:
    `[...]` scores in [0, 1], in at least float32.
  """
  return jnp.exp(max_logit(logits))


# ------------------------------------------------------------------------------------------------
# ODIN.
# ------------------------------------------------------------------------------------------------


def odin(apply_fn: Callable[[jax.Array], jax.Array], inputs, *, temperature=1000.0, epsilon=0.0014):
  """ODIN score: temperature-scaled MSP of a gradient-perturbed input (Liang et al. 2018, eq. 2).

    ŷ = argmax_k f_k(x),  x̃ = x − ε·sign(−∇ₓ log S_ŷ(x; T)),  score = max_k S_k(x̃; T),

  with S(x; T) = softmax(f(x) / T). The perturbation raises the temperature-scaled confidence, and
  raises it more for in-distribution inputs.

  The gradient is taken of Σ_b log S_ŷ_b(x_b; T), the sum over the batch: when examples do not
  interact inside `apply_fn`, its gradient with respect to x_b is exactly the per-example gradient,
  so one backward pass serves the whole batch. That independence requires inference-mode layers:
  BatchNorm with running averages (`use_running_average=True` / `train=False`) and dropout off;
  with batch statistics every example's gradient would leak into the others'. Cost: one forward
  and backward pass, then one extra forward pass (no extra pass when ε = 0, pure temperature
  scaling).

  Units of ε: the perturbation is added to `inputs` exactly as passed. The reference code
  perturbs normalised images by ε/std per channel, i.e. by ε in [0, 1] pixel units; to match it,
  let `apply_fn` take [0, 1] pixels and normalise inside. Like the paper, sign(0) = 0 (the reference
  code maps a zero gradient to +1; exact zeros are rare in practice).

  Jitting: with a hashable `apply_fn`, `jax.jit(odin, static_argnums=0)` works. To keep parameters
  as traced arguments rather than constants baked into the compiled code, jit a wrapper instead:
  `jax.jit(lambda v, x: odin(functools.partial(model.apply, v), x))`.

  Args:
    apply_fn: maps `inputs` `[batch, ...]` to logits `[batch, num_classes]`, for example
      `functools.partial(model.apply, variables, train=False)`.
    inputs: `[batch, ...]` floating inputs.
    temperature: T > 0; 1000 as in the paper.
    epsilon: perturbation magnitude ε ≥ 0; 0.0014 as the paper's CIFAR-10 DenseNet setting.
      Python or concrete values out of range (T ≤ 0, ε < 0) raise ValueError; traced ones (jit
      arguments, e.g. in a hyperparameter sweep) cannot be read and give NaN scores instead. A
      traced ε = 0 takes the gradient path and returns the same scores as ε = 0.

  Returns:
    `[batch]` scores in (0, 1], in at least float32. The perturbed inputs are formed in at least
    float32, because ε is below bfloat16's resolution near 1.
  """
  if not callable(apply_fn):
    raise TypeError(f'apply_fn must be callable, got {type(apply_fn).__name__}.')
  inputs = _checks.floating('inputs', inputs, min_ndim=1)
  _checks.positive('temperature', temperature)
  _checks.nonnegative('epsilon', epsilon)

  def scaled_logits(x):
    logits = _logits(apply_fn(x), name='apply_fn(inputs)')
    return logits / jnp.asarray(temperature, dtype=logits.dtype)

  if _checks.is_concrete(epsilon) and float(epsilon) == 0:
    # Without a perturbation ODIN is temperature scaling; skip the useless backward pass.
    scores = max_softmax(scaled_logits(inputs))
    return _traced_hyperparameter(scores, 'temperature', temperature, lambda v: v > 0, '> 0')

  def total_log_msp(x):
    log_probs = jax.nn.log_softmax(scaled_logits(x), axis=-1)
    # The predicted class is chosen outside the differentiated path (argmax has no gradient), so
    # ties cannot split the gradient between classes the way a max reduction would.
    predicted = jnp.argmax(jax.lax.stop_gradient(log_probs), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, predicted[..., None], axis=-1))

  grad = jax.grad(total_log_msp)(inputs)
  dtype = _checks.compute_dtype(inputs)
  eps = jnp.asarray(epsilon, dtype=dtype)
  # x − ε·sign(−∇ log S) = x + ε·sign(∇ log S).
  perturbed = inputs.astype(dtype) + eps * jnp.sign(grad).astype(dtype)
  scores = max_softmax(scaled_logits(perturbed))
  scores = _traced_hyperparameter(scores, 'temperature', temperature, lambda v: v > 0, '> 0')
  return _traced_hyperparameter(scores, 'epsilon', epsilon, lambda v: v >= 0, '>= 0')


# ------------------------------------------------------------------------------------------------
# Mahalanobis.
# ------------------------------------------------------------------------------------------------


class Gaussian(NamedTuple):
  """Class-conditional Gaussians with one shared covariance, as fitted by `fit_gaussian`.

  A NamedTuple, hence a pytree: pass it through `jax.jit` like any other argument.

  Attributes:
    means: `[num_classes, dim]` class means.
    covariance: `[dim, dim]` shared covariance (including the ridge, if any).
    cholesky: `[dim, dim]` lower-triangular factor L with LLᵀ = covariance.
  """

  means: jax.Array
  covariance: jax.Array
  cholesky: jax.Array


def _host_batch(index, batch, num_classes, dim):
  """Validates one `(features, labels)` batch on the host; returns float64 / int64 NumPy arrays."""
  try:
    features, labels = batch
  except (TypeError, ValueError):
    shape = f' of shape {tuple(batch.shape)}' if hasattr(batch, 'shape') else ''
    raise TypeError(f'batches must yield (features, labels) pairs; item {index} is a '
                    f'{type(batch).__name__}{shape}. {_FIT_GAUSSIAN_USAGE}') from None
  # `x.dtype or ...` would misfire: NumPy dtypes have len() 0 and are falsy.
  features_dtype = getattr(features, 'dtype', None)
  if features_dtype is None:
    features_dtype = np.asarray(features).dtype
  if not jnp.issubdtype(features_dtype, jnp.floating):
    raise TypeError(f'features (batch {index}) must have a floating dtype, got {features_dtype}.')
  labels_dtype = getattr(labels, 'dtype', None)
  if labels_dtype is None:
    labels_dtype = np.asarray(labels).dtype
  if not jnp.issubdtype(labels_dtype, jnp.integer):
    raise TypeError(f'labels (batch {index}) must have an integer dtype, got {labels_dtype}.')
  # np.asarray pulls device arrays to the host; float64 keeps the moment sums exact enough.
  features = np.asarray(features).astype(np.float64)
  labels = np.asarray(labels).astype(np.int64)
  if features.ndim != 2:
    raise ValueError(f'features (batch {index}) must have rank 2 [batch, dim], got shape {features.shape}.')
  if labels.shape != features.shape[:1]:
    raise ValueError(f'labels (batch {index}) must have shape {features.shape[:1]} to match the '
                     f'features, got {labels.shape}.')
  if dim is not None and features.shape[1] != dim:
    raise ValueError(f'features (batch {index}) have dimension {features.shape[1]}, but earlier '
                     f'batches have dimension {dim}.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels (batch {index}) must lie in [0, {num_classes}) (num_classes), got '
                     f'values in [{labels.min()}, {labels.max()}].')
  if not np.all(np.isfinite(features)):
    raise ValueError(f'features (batch {index}) contain NaN or inf.')
  return features, labels, features_dtype


_FIT_GAUSSIAN_USAGE = ('Pass fit_gaussian(features, labels, num_classes=K) for whole arrays, or an iterable of '
                       '(features, labels) batches such as [(features, labels)] or a generator.')


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def fit_gaussian(batches: Iterable | jax.Array | np.ndarray, labels=None, *, num_classes: int,
                 ridge: float = 0.0) -> Gaussian:
  """Fits class means and one shared (tied) covariance by streaming over batches (Lee et al. 2018).

    μ_k = mean of the features of class k,
    Σ = (1/N) Σ_k Σ_{i: y_i = k} (f_i − μ_k)(f_i − μ_k)ᵀ        (maximum likelihood),

  the estimate of `sklearn.covariance.EmpiricalCovariance` on class-centred features.

  Batches are consumed one at a time on the host in float64, so memory stays at one batch plus
  O(num_classes·dim + dim²) (50 000 × 512 features never sit in memory at once). Each batch is
  centred on its own per-class means and merged into the running statistics with the pairwise
  update of Chan et al. (1979), M₂ ← M₂ + M₂ᵇ + (n·nᵇ / (n + nᵇ))·δδᵀ per class. Nothing is
  ever computed as E[ffᵀ] − μμᵀ, so a large common offset (features around 1e4) or
  well-separated classes cost no precision to cancellation.

  Three spellings, the same fit:

    fit_gaussian(features, labels, num_classes=K)           # whole arrays
    fit_gaussian((features, labels), num_classes=K)         # one (features, labels) pair
    fit_gaussian(batch_iterator(), num_classes=K)           # streamed batches

  Args:
    batches: iterable of `(features [batch, dim], labels [batch])` pairs (NumPy or JAX arrays,
      floating features, integer labels in [0, num_classes)); batch sizes may differ and a batch
      may miss some classes, but every class needs at least one example overall. Consumed once,
      so a generator works. Also accepted: one `(features, labels)` pair of arrays, or the
      `[N, dim]` features array itself when `labels` is given.
    labels: `[N]` integer labels of `batches` when it is a features array; None otherwise.
    num_classes: K.
    ridge: relative shrinkage ≥ 0: the returned covariance is Σ + ridge·(tr Σ / dim)·I. The
      default 0 gives the exact maximum-likelihood estimate; pass e.g. 1e-6 when the covariance
      is singular (dim > number of examples, or dead / constant features, as ReLU features
      often have), the default of `detectors.get('mahalanobis')`.

  Returns:
    A `Gaussian(means [K, dim], covariance [dim, dim], cholesky [dim, dim])` of JAX arrays, in
    float32 (float64 if the features are float64 and x64 is enabled). The Cholesky factor is
    computed in float64 before the cast.

  Raises:
    ValueError: no examples, a class without examples, labels out of range, or a singular
      covariance.
    TypeError: input that is none of the three spellings above (the message says what to pass).
  """
  if labels is not None:
    if not _is_array(batches):
      raise TypeError(f'fit_gaussian(features, labels) needs a features array as its first argument, got a '
                      f'{type(batches).__name__}. {_FIT_GAUSSIAN_USAGE}')
    batches = [(batches, labels)]
  elif _is_array(batches):
    raise TypeError(f'fit_gaussian got a single array of shape {tuple(batches.shape)} and no labels. '
                    f'{_FIT_GAUSSIAN_USAGE}')
  elif isinstance(batches, (tuple, list)) and len(batches) == 2 and all(_is_array(b) for b in batches):
    batches = [tuple(batches)]  # one (features, labels) pair; a list of batches holds pairs, not arrays
  num_classes = _checks.positive_int('num_classes', num_classes)
  _checks.nonnegative('ridge', ridge)
  ridge = float(ridge)

  counts = np.zeros(num_classes, dtype=np.int64)
  means = None  # [K, D] running class means, allocated once D is known.
  scatter = None  # [D, D] running within-class Σ (f − μ_k)(f − μ_k)ᵀ.
  in_dtype = None
  for index, batch in enumerate(batches):
    dim = None if means is None else means.shape[1]
    features, labels, features_dtype = _host_batch(index, batch, num_classes, dim)
    if means is None:
      dim = features.shape[1]
      means = np.zeros((num_classes, dim))
      scatter = np.zeros((dim, dim))
      in_dtype = features_dtype
    if not labels.size:
      continue

    batch_counts = np.bincount(labels, minlength=num_classes)
    batch_sums = np.zeros_like(means)
    np.add.at(batch_sums, labels, features)
    batch_means = batch_sums / np.maximum(batch_counts, 1)[:, None]
    centred = features - batch_means[labels]
    scatter += centred.T @ centred

    # Chan's merge. Classes absent from either side get weight 0; only classes present on both
    # sides enter the rank-update, which bounds its cost by the batch size.
    total = counts + batch_counts
    delta = batch_means - means
    weight = counts * batch_counts / np.maximum(total, 1)
    both = np.flatnonzero(weight)
    if both.size:
      d = delta[both]
      scatter += (d * weight[both, None]).T @ d
    means += delta * (batch_counts / np.maximum(total, 1))[:, None]
    counts = total

  if means is None or counts.sum() == 0:
    raise ValueError('batches yielded no examples; fit_gaussian needs at least one non-empty '
                     '(features, labels) batch.')
  missing = np.flatnonzero(counts == 0)
  if missing.size:
    raise ValueError(f'class {missing[0]} has no examples (classes without examples: '
                     f'{missing.tolist()[:10]}); every class in [0, {num_classes}) (num_classes) needs '
                     f'at least one to estimate its mean.')

  dim = means.shape[1]
  covariance = scatter / counts.sum()
  covariance = 0.5 * (covariance + covariance.T)  # Exact symmetry for eigvalsh / cholesky.
  if ridge > 0:
    covariance = covariance + ridge * (np.trace(covariance) / dim) * np.eye(dim)

  # A rank-deficient covariance can still pass a float64 Cholesky with round-off-sized pivots and
  # then whiten to garbage, so test the spectrum with NumPy's matrix-rank tolerance.
  eigenvalues = np.linalg.eigvalsh(covariance)
  tolerance = dim * np.finfo(np.float64).eps * max(eigenvalues[-1], 0.0)
  singular_msg = (
      f'The shared covariance is singular (smallest eigenvalue {eigenvalues[0]:.3g}, largest '
      f'{eigenvalues[-1]:.3g}; {int(counts.sum())} examples, dim {dim}, ridge {ridge}): this '
      f'happens when dim exceeds the number of examples or some features are constant within '
      f'every class. Pass ridge > 0 (e.g. ridge=1e-6) to shrink it towards a multiple of the identity.')
  if eigenvalues[-1] <= 0 or eigenvalues[0] <= tolerance:
    raise ValueError(singular_msg)
  try:
    cholesky = np.linalg.cholesky(covariance)
  except np.linalg.LinAlgError:
    raise ValueError(singular_msg) from None

  out_dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(in_dtype, jnp.float32))
  return Gaussian(
      means=jnp.asarray(means, dtype=out_dtype),
      covariance=jnp.asarray(covariance, dtype=out_dtype),
      cholesky=jnp.asarray(cholesky, dtype=out_dtype),
  )


def mahalanobis(features, gaussian: Gaussian):
  """Mahalanobis score, −min_k (f − μ_k)ᵀ Σ⁻¹ (f − μ_k) (Lee et al. 2018, eq. 2, without input
  preprocessing or feature ensembles).

  Equal to max_k of `ood_jax.layers.mahalanobis_logits(features, means, cholesky)`, which whitens
  with a triangular solve against the Cholesky factor and never inverts Σ.

  Args:
    features: `[..., dim]` floating features (e.g. penultimate-layer activations).
    gaussian: a `Gaussian` from `fit_gaussian` (any object with `means` `[K, dim]` and `cholesky`
      `[dim, dim]` attributes).

  Returns:
    `[...]` scores ≤ 0, in at least float32.
  """
  logits = layers.mahalanobis_logits(features, gaussian.means, gaussian.cholesky)
  return jnp.max(logits, axis=-1)


# ------------------------------------------------------------------------------------------------
# KNN.
# ------------------------------------------------------------------------------------------------


# Candidates kept per query beyond k before the exact re-scoring: the float32 scores that select them
# are off by ~1e-6, so the true k-th neighbour is among them unless more than this many bank entries
# lie within that rounding of it (and then every choice among those ties is within the rounding).
_KNN_SPARE_CANDIDATES = 8


def _knn_normalize(x):
  """x / max(‖x‖, 1e-12) row by row, bitwise the same for equal rows whatever the array's shape.

  XLA sums a row in an order that depends on the row count (vectorised blocks of rows, remainders),
  so `layers.l2_normalize` can give a query and its copy in the bank norms one ulp apart, and the pair
  a distance of ~1e-7 instead of 0. A fixed pairwise tree of elementwise adds over a zero-padded,
  power-of-two width, then a correctly rounded sqrt and division, computes every row the same way.
  """
  sq = jnp.square(x)
  width = 1 << max(int(x.shape[1]) - 1, 0).bit_length()
  sq = jnp.pad(sq, ((0, 0), (0, width - x.shape[1])))
  while width > 1:
    width //= 2
    sq = sq[:, :width] + sq[:, width:]
  return x / jnp.sqrt(jnp.maximum(sq, 1e-24))


def _knn_group_size(chunk_size: int, num_candidates: int) -> int:
  """Power of two G near sqrt(chunk / candidates): balances the two top-k passes of `_knn_chunk_top`."""
  group = 1
  while group < 64 and (2 * group) ** 2 * num_candidates <= chunk_size:
    group *= 2
  return group


def _knn_chunk_top(q, rows, half_sq_norms, *, num, group):
  """Approximate top-`num` bank rows of one chunk for each query, by q·b − ½‖b‖² (float32).

  With `group` G > 1 the chunk's C columns are split into C / G strided groups of G; the best `num`
  candidates lie in the `num` groups with the largest maxima (each of them is its group's maximum or
  below it), so one top-k runs over C / G group maxima and one over num·G members instead of one
  over C, which on CPU costs several times the matmul.
  """
  s = jnp.dot(q, rows.T, precision=jax.lax.Precision.HIGHEST)  # [qc, C]
  if group == 1:
    v, i = jax.lax.top_k(s - half_sq_norms, num)
    return v, i
  width = s.shape[1] // group
  # Elementwise maxima of G contiguous column slabs vectorise; a reduce over a minor axis of G does not.
  maxima = functools.reduce(jnp.maximum, [s[:, g * width:(g + 1) * width] - half_sq_norms[g * width:(g + 1) * width]
                                          for g in range(group)])
  _, best_groups = jax.lax.top_k(maxima, num)  # [qc, num]
  members = (best_groups[:, :, None] + width * jnp.arange(group, dtype=best_groups.dtype)).reshape(q.shape[0], -1)
  scores = jnp.take_along_axis(s, members, axis=1, mode='promise_in_bounds') - half_sq_norms[members]
  v, pos = jax.lax.top_k(scores, num)
  return v, jnp.take_along_axis(members, pos, axis=1, mode='promise_in_bounds')


@functools.partial(jax.jit, static_argnames=('k', 'query_chunk_size', 'bank_chunk_size'))
def _kth_squared_distance(queries, bank, *, k, query_chunk_size, bank_chunk_size):
  """Exact k-th smallest ‖q − b‖² of each (unit or zero) query against (unit or zero) bank rows, in chunks."""
  num_queries, dim = queries.shape
  bank_size = bank.shape[0]
  num = min(k + _KNN_SPARE_CANDIDATES, bank_size)
  num_b_chunks = -(-bank_size // bank_chunk_size)
  chunk = -(-bank_size // num_b_chunks)  # even chunks: at most num_b_chunks − 1 padded rows per chunk
  group = _knn_group_size(chunk, num)
  chunk = -(-chunk // group) * group
  num_q_chunks = -(-num_queries // query_chunk_size)
  padded = num_b_chunks * chunk
  # ‖q − b‖² = ‖q‖² + 2(½‖b‖² − q·b): ranking by q·b − ½‖b‖² ranks zero bank rows (half norm 0)
  # correctly against unit ones (half norm ½). Padded rows get +inf, so they are never selected:
  # num <= bank_size real rows always score higher.
  half = 0.5 * jnp.sum(jnp.square(bank), axis=1)
  bank = jnp.pad(bank, ((0, padded - bank_size), (0, 0)))
  half = jnp.pad(half, (0, padded - bank_size), constant_values=jnp.inf)
  queries = jnp.pad(queries, ((0, num_q_chunks * query_chunk_size - num_queries), (0, 0)))
  queries = queries.reshape(num_q_chunks, query_chunk_size, dim)
  chunks = (bank.reshape(num_b_chunks, chunk, dim), half.reshape(num_b_chunks, chunk),
            jnp.arange(num_b_chunks, dtype=jnp.int32) * chunk)
  width = min(num, chunk)

  def query_chunk(q):
    def bank_step(best, xs):
      rows, half_rows, start = xs
      v, i = _knn_chunk_top(q, rows, half_rows, num=width, group=group if chunk // group >= width else 1)
      merged, pos = jax.lax.top_k(jnp.concatenate([best[0], v], axis=1), num)
      index = jnp.take_along_axis(jnp.concatenate([best[1], i + start], axis=1), pos, axis=1,
                                  mode='promise_in_bounds')
      return (merged, index), None

    init = (jnp.full((query_chunk_size, num), -jnp.inf, q.dtype), jnp.zeros((query_chunk_size, num), jnp.int32))
    if num_b_chunks == 1:
      (_, index), _ = bank_step(init, jax.tree.map(lambda a: a[0], chunks))
    else:
      (_, index), _ = jax.lax.scan(bank_step, init, chunks)
    # Exact re-scoring from the differences: no cancellation, so a query equal to a bank row is at
    # exactly 0 and near pairs keep their relative precision.
    sq = jnp.sum(jnp.square(q[:, None, :] - bank[index]), axis=2)  # [qc, num]
    return -jax.lax.top_k(-sq, k)[0][:, k - 1]

  return jax.lax.map(query_chunk, queries).reshape(-1)[:num_queries]


def knn(features, bank, *, k: int, query_chunk_size: int = 256, bank_chunk_size: int = 65536):
  """KNN score: −(distance to the k-th nearest bank entry) on L2-normalised features (Sun et al. 2022).

  Features and bank rows are normalised to unit length (zero vectors stay zero) and the score is
  −‖q̂ − b̂_(k)‖, the Euclidean distance to the k-th nearest normalised bank row, as scikit-learn's
  `NearestNeighbors` or faiss' `IndexFlatL2` give it on the normalised arrays. Queries are processed
  in chunks of `query_chunk_size`; for each, the bank is scanned in chunks of `bank_chunk_size`: one
  float32 matmul per chunk ranks the rows by q̂·b̂ − ½‖b̂‖², a top-k over strided groups of columns
  keeps the k + 8 best candidates (merged across chunks), and those candidates are re-scored exactly
  as ‖q̂ − b̂‖² from the differences. So the query × bank matrix is never materialised (peak working
  memory O(query_chunk_size × bank_chunk_size), 64 MiB at the defaults, beyond normalised, padded
  copies of the inputs) and distances carry float32 rounding only: a query that is in the bank is at
  exactly 0, near pairs are at their true distance (no √(2 − 2·cos) cancellation), and a zero
  vector is at distance 1 from every unit row (0 from zero rows). The k-th distance is exact unless
  more than 8 bank rows tie with it within the ~1e-6 rounding of the selection scores, and then
  within that rounding. On 2 CPU cores, 10 000 queries against 50 000 × 512 take 2.3–2.6 s, mostly the
  matmul (`python -m experiments.benchmark_peers`).

  Jittable with `k`, `query_chunk_size` and `bank_chunk_size` static (they set array shapes).

  Args:
    features: `[num_queries, dim]` floating query features.
    bank: `[bank_size, dim]` floating training features (the memory bank).
    k: which neighbour, 1 ≤ k ≤ bank_size. Paper 003 / KNN use k = 100 for CIFAR-10 and 300 for
      CIFAR-100 (50 for KNN+).
    query_chunk_size: queries per chunk (clipped to num_queries).
    bank_chunk_size: bank rows per chunk (clipped to bank_size; the bank is split into equal chunks).

  Returns:
    `[num_queries]` scores in [−2, 0], in at least float32.
  """
  features = _checks.floating('features', features, ndim=2)
  bank = _checks.floating('bank', bank, ndim=2)
  if features.shape[1] != bank.shape[1]:
    raise ValueError(f'features have dimension {features.shape[1]} but bank has dimension '
                     f'{bank.shape[1]} (shape {tuple(bank.shape)}).')
  _checks.nonempty('bank', bank)
  k = _checks.positive_int('k', k)
  if k > bank.shape[0]:
    raise ValueError(f'k must be <= the bank size {bank.shape[0]}, got k={k}.')
  query_chunk_size = _checks.positive_int('query_chunk_size', query_chunk_size)
  bank_chunk_size = _checks.positive_int('bank_chunk_size', bank_chunk_size)

  dtype = _checks.compute_dtype(features, bank)
  if features.shape[0] == 0:
    return jnp.zeros((0,), dtype=dtype)
  queries = _knn_normalize(features.astype(dtype))
  bank = _knn_normalize(bank.astype(dtype))
  kth = _kth_squared_distance(
      queries, bank, k=k,
      query_chunk_size=min(query_chunk_size, features.shape[0]),
      bank_chunk_size=min(bank_chunk_size, bank.shape[0]))
  return -jnp.sqrt(kth)
