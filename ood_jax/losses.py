"""Per-example losses of every ood_jax method, as pure functions.

Conventions (as optax): logits are `[..., num_classes]`, labels `[...]` integers; every loss returns
per-example values and never reduces — the caller takes the mean (or a weighted sum). Hyperparameters
are keyword-only. Arithmetic runs in at least float32 whatever the input dtype (bfloat16 logits
give float32 losses), and in log space, so valid inputs never give NaN or inf: logits of ±1e4,
distances of 0 and 1e4 and ICE logits → 0⁻ included.

Out-of-range labels are loud, never a silently wrong finite loss. A label outside [0, K) (−1, the
label ood_jax gives outliers, or ≥ K) raises `ValueError` naming `labels` when the labels are
concrete (an eager call); under `jax.jit` (traced labels) the loss of that example is NaN, so the
batch mean is NaN and the trainer's non-finite guard stops the run naming the step. Rows with valid
labels keep their exact value and gradient (the NaN is a constant selected by `jnp.where`, so no NaN
reaches their gradient), and a padded row masked out with `jnp.where(mask, loss, 0)` costs nothing;
masking by multiplication (`loss * mask`) would keep the NaN. To get an error message instead of a
NaN inside jit, wrap the function with `jax.experimental.checkify`; every check here is a
`checkify.check(..., debug=True)`, which is free (removed from the program) unless functionalised:

  from jax.experimental import checkify
  checked = jax.jit(checkify.checkify(lambda z, y: losses.isomax(z, y).mean()))
  err, loss = checked(logits, labels)
  err.throw()  # ValueError: labels must lie in [0, K), got values in [-1, 3] ...

Hyperparameters get the same treatment: a bad Python or concrete value (`entropic_scale=0`,
`temperature=-1`, `weight=2`) raises `ValueError` at the call; a traced one (a hyperparameter passed
as a jit argument) that breaks its range turns the returned losses into NaN and fails a checkify
check. Contrastive labels are class ids compared only for equality, so any integer (−1 included) is
a class there and needs no range.

Papers: IsoMax (Macêdo et al., "Entropic Out-of-Distribution Detection", 2021), ICE (Wu et al. 2022, with OE and
Energy), one-vs-all (Padhy et al. 2020), ReweightOOD (Regmi et al. 2024, with SupCon), SMOT ("Out-of-Distribution
Detection with Smooth Training"); and
training baselines of OpenOOD v1.5's leaderboard: LogitNorm (Wei et al. 2022), Mixup (Zhang et al. 2018),
RegMixup (Pinto et al. 2022), ConfBranch (DeVries & Taylor 2018), RotPred (Hendrycks et al. 2019), MixOE (Zhang et al.
2023), VOS (Du et al. 2022), NPOS (Tao et al. 2023), CIDER (Ming et al. 2023).
"""

from __future__ import annotations

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks

__all__ = [
    'confidence_branch',
    'distance_one_vs_all',
    'energy_in_margin',
    'energy_out_margin',
    'ice_in',
    'ice_out',
    'isomax',
    'logit_norm',
    'mixoe',
    'mixup_cross_entropy',
    'one_vs_all',
    'outlier_exposure',
    'outlier_logistic',
    'regmixup',
    'prototype_compactness',
    'prototype_dispersion',
    'reweighted_contrastive',
    'rotation_prediction',
    'smooth_training',
    'smot_smoothing',
    'softmax_cross_entropy',
    'supervised_contrastive',
]


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _logits_and_labels(logits, labels, name='logits', labels_name='labels'):
  """(logits in the compute dtype, labels safe to index with, mask of the labels in [0, K)).

  Concrete labels out of range raise here. Traced ones cannot be read, so they are replaced by 0
  for the arithmetic (no wrap-around of −1 to class K − 1, no out-of-bounds gather) and the mask
  lets the caller turn those examples' losses into NaN with `_nan_where_invalid`.
  """
  logits = _checks.floating(name, logits, min_ndim=1)
  if logits.shape[-1] < 1:
    raise ValueError(f'{name} must have at least one class, got shape {tuple(logits.shape)}.')
  num_classes = logits.shape[-1]
  labels = _checks.labels(labels_name, labels, num_classes, shape=logits.shape[:-1])
  info = jnp.iinfo(labels.dtype)
  valid = labels >= 0 if info.min < 0 else jnp.ones(labels.shape, dtype=bool)
  if num_classes <= info.max:  # e.g. int8 labels with K = 200 are always < K
    valid = valid & (labels < num_classes)
  if labels.size:
    checkify.check(jnp.all(valid), f'{labels_name} must lie in [0, {num_classes}), got values in [{{lo}}, {{hi}}] '
                   '(-1 is the outlier label: pass outliers to the outlier terms, not with labels).',
                   lo=jnp.min(labels), hi=jnp.max(labels), debug=True)
  safe = jnp.where(valid, labels, jnp.zeros((), labels.dtype))
  return logits.astype(_checks.compute_dtype(logits)), safe, valid


def _nan_where_invalid(valid, values):
  """`values` where the label was valid, NaN elsewhere; gradients of the valid entries are untouched."""
  return jnp.where(valid, values, jnp.asarray(jnp.nan, values.dtype))


def _traced_hyperparameter(values, name, value, ok, requirement):
  """NaN `values` (and a checkify check) when a traced hyperparameter breaks its range.

  Concrete values were checked eagerly with a ValueError, so they pass through unchanged.
  """
  if _checks.is_concrete(value):
    return values
  good = ok(jnp.asarray(value))
  checkify.check(good, f'{name} must be {requirement}, got {{value}}.', value=value, debug=True)
  return jnp.where(good, values, jnp.asarray(jnp.nan, values.dtype))


def _logits(logits, name):
  logits = _checks.floating(name, logits, min_ndim=1)
  if logits.shape[-1] < 1:
    raise ValueError(f'{name} must have at least one class, got shape {tuple(logits.shape)}.')
  return logits.astype(_checks.compute_dtype(logits))


def _pick(values, labels):
  return jnp.take_along_axis(values, labels[..., None], axis=-1)[..., 0]


def _neg_log_one_minus_exp(a, eps):
  """−log(1 − exp(a)) for a ≤ 0, as −log(−expm1(a)); a is capped at −eps so a → 0⁻ stays finite."""
  return -jnp.log(-jnp.expm1(jnp.minimum(a, -eps)))


def _masked_logsumexp(x, mask, axis=-1):
  """logsumexp of x over the entries where mask holds; 0 (not −inf) for an empty mask.

  Value and gradient stay finite for empty rows: masked-out entries enter as exp(−inf) = 0 and the
  max-shift of an empty row is replaced by 0 before it is used.
  """
  top = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(jnp.exp(jnp.where(mask, x - top, -jnp.inf)), axis=axis, keepdims=True)
  out = top + jnp.log(jnp.where(total > 0, total, 1.0))
  return jnp.squeeze(out, axis=axis)


# ----------------------------------------------------------------------------------------------
# Classification losses: softmax, IsoMax, one-vs-all.


def softmax_cross_entropy(logits, labels):
  """Softmax cross-entropy, −log softmax(z)_y: the SoftMax baseline of every paper.

  Args:
    logits: `[..., K]` logits.
    labels: `[...]` integer labels in [0, K); out of range: ValueError when concrete, NaN loss for
      that example under jit (module docstring).

  Returns:
    `[...]` per-example losses.
  """
  logits, labels, valid = _logits_and_labels(logits, labels)
  return _nan_where_invalid(valid, -_pick(jax.nn.log_softmax(logits, axis=-1), labels))


def isomax(logits, labels, *, entropic_scale=10.0):
  """IsoMax loss (Macêdo et al. 2021, eq. 5): −log softmax(E_s · logits)_y.

  `logits` are negative distances −‖f − p_k‖ (`layers.negative_distances`). The entropic scale
  E_s is applied during training only; scores and predictions use the logits without it
  (`scores.entropic_score`). `entropic_scale=1` is the DM loss of Padhy et al. 2020.

  A drop-in for optax's cross-entropy behind a `layers.DistanceLogits` head:

    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()   # before
    loss = losses.isomax(logits, labels).mean()                                      # IsoMax

  Learning rate: the gradient with respect to the logits is E_s·(softmax(E_s·logits) − onehot(y)),
  entries in [−E_s, E_s] where a softmax cross-entropy's lie in [−1, 1], so plain SGD takes up to
  E_s times larger steps than the softmax recipe it was tuned for. Divide an SGD learning rate by about E_s: the Flax
  MNIST example's `optax.sgd(0.1, 0.9)` diverges with E_s = 10 on a small CNN without batch norm,
  `optax.sgd(0.01, 0.9)` trains it (tests/test_flax_examples.py). Adam-type optimisers normalise the
  gradient's scale and need no change.

  Args:
    logits: `[..., K]` negative distances.
    labels: `[...]` integer labels in [0, K); out of range: ValueError when concrete, NaN loss for
      that example under jit (module docstring).
    entropic_scale: E_s > 0, 10 in the paper (a traced E_s ≤ 0 gives NaN losses).

  Returns:
    `[...]` per-example losses.
  """
  _checks.positive('entropic_scale', entropic_scale)
  logits, labels, valid = _logits_and_labels(logits, labels)
  values = _nan_where_invalid(valid, -_pick(jax.nn.log_softmax(entropic_scale * logits, axis=-1), labels))
  return _traced_hyperparameter(values, 'entropic_scale', entropic_scale, lambda s: s > 0, '> 0')


def one_vs_all(logits, labels):
  """One-vs-all loss (Padhy et al. 2020): −log σ(z_y) − Σ_{k≠y} log(1 − σ(z_k)).

  Written as softplus(−z_y) + Σ_{k≠y} softplus(z_k), exact and finite for any logits.

  Args:
    logits: `[..., K]` affine logits.
    labels: `[...]` integer labels in [0, K); out of range: ValueError when concrete, NaN loss for
      that example under jit (module docstring).
      (A plain one-hot of −1 would be all zeros: a finite loss of "no class", hence the NaN.)

  Returns:
    `[...]` per-example losses.
  """
  logits, labels, valid = _logits_and_labels(logits, labels)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  # −log σ(z) = softplus(−z) for the target, −log(1 − σ(z)) = softplus(z) for the others.
  return _nan_where_invalid(valid, jnp.sum(jax.nn.softplus(jnp.where(onehot, -logits, logits)), axis=-1))


def distance_one_vs_all(logits, labels, *, eps=1e-6):
  """Distance one-vs-all loss, "OvA DM" (Padhy et al. 2020): p_k = 2σ(logits_k), −log p_y − Σ_{k≠y} log(1 − p_k).

  With d = −logits ≥ 0 (distances, `layers.negative_distances`): log p = log 2 − softplus(d) and
  log(1 − p) = log tanh(d/2) = log(−expm1(−d)) − softplus(−d). The second diverges as a
  non-target distance d → 0, so non-target distances are floored at `eps` (the loss is exact for
  d ≥ eps and capped at −log tanh(eps/2) ≈ 14.5 per class below it).

  Args:
    logits: `[..., K]` negative distances (≤ 0; positive values are treated as distance `eps`).
    labels: `[...]` integer labels in [0, K); out of range: ValueError when concrete, NaN loss for
      that example under jit (module docstring).
    eps: distance floor > 0 for the non-target terms (a traced eps ≤ 0 gives NaN losses).

  Returns:
    `[...]` per-example losses.
  """
  _checks.positive('eps', eps)
  logits, labels, valid = _logits_and_labels(logits, labels)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  d = -logits
  target = jax.nn.softplus(d) - jnp.log(2.0).astype(d.dtype)  # −log p_y
  d_other = jnp.maximum(d, eps)
  other = -(jnp.log(-jnp.expm1(-d_other)) - jax.nn.softplus(-d_other))  # −log(1 − p_k)
  values = _nan_where_invalid(valid, jnp.sum(jnp.where(onehot, target, other), axis=-1))
  return _traced_hyperparameter(values, 'eps', eps, lambda e: e > 0, '> 0')


# ----------------------------------------------------------------------------------------------
# Outlier exposure family (Wu et al. 2022): OE, Energy, ICE.


def outlier_exposure(outlier_logits):
  """Outlier-exposure term (Hendrycks et al. 2019; Wu et al. 2022 eq. 0.3): cross-entropy to uniform.

  −(1/K) Σ_k log softmax(z̃)_k = logsumexp(z̃) − mean_k z̃_k. The OE objective is
  CE(in) + λ·mean(outlier_exposure(outlier_logits)), λ = 0.5.

  Both terms are taken after subtracting max_k z̃_k, as log-softmax does: the unshifted difference
  of two numbers near 1e4 would keep only float32's spacing there (~1e-3), e.g. 2.30273 instead of
  log 10 = 2.302585 for logits all equal to 1e4, where the shifted form is exact. The gradient is
  softmax(z̃) − 1/K.

  Args:
    outlier_logits: `[..., K]` logits of auxiliary outliers.

  Returns:
    `[...]` per-outlier losses, minimal (= log K) for uniform predictions.
  """
  z = _logits(outlier_logits, 'outlier_logits')
  # The shift cancels exactly in value and gradient; stop_gradient keeps ties of the max from
  # routing a (zero-sum) gradient through the max.
  shifted = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  return jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) - jnp.mean(shifted, axis=-1)


def energy_in_margin(logits, *, margin=-25.0):
  """Energy-OE in-distribution term (Liu et al. 2020): relu(E(x) − m_in)², E = −logsumexp(z).

  The Energy objective is CE + λ·[mean energy_in_margin(in) + mean energy_out_margin(out)],
  λ = 0.1. Code defaults m_in = −25, m_out = −7; published runs used (−23, −5) on CIFAR-10 and
  (−27, −5) on CIFAR-100.

  The default margins assume a *pretrained* network, as in Liu et al., who fine-tune one for 10
  epochs: a freshly initialised network has logits near 0, so E ≈ −log K (−2.3 for K = 10), and
  with m_in = −25 the term is ≈ (25 − 2.3)² ≈ 515 (≈ 51 after λ = 0.1) against a cross-entropy of
  2.3: it swamps the classification loss, and a from-scratch model trained with these margins can
  end at chance accuracy. Either fine-tune a pretrained model (`--config.init_from` in the trainer),
  or read margins off your own network's energies, e.g. after a softmax warm-up:

    energy_in = -jax.nn.logsumexp(apply(params, x_in), axis=-1)
    energy_out = -jax.nn.logsumexp(apply(params, x_out), axis=-1)
    m_in = float(jnp.median(energy_in)) - 1.0    # ask ID energies to go a little lower
    m_out = float(jnp.median(energy_out)) + 1.0  # and outlier energies a little higher
    reg = (energy_in_margin(z_in, margin=m_in).mean() + energy_out_margin(z_out, margin=m_out).mean())
    loss = softmax_cross_entropy(z_in, y).mean() + 0.1 * reg

  Args:
    logits: `[..., K]` in-distribution logits.
    margin: m_in, any float (−25: for a pretrained network, see above).

  Returns:
    `[...]` per-example losses.
  """
  energy = -jax.nn.logsumexp(_logits(logits, 'logits'), axis=-1)
  return jnp.square(jax.nn.relu(energy - margin))


def energy_out_margin(logits, *, margin=-7.0):
  """Energy-OE outlier term (Liu et al. 2020): relu(m_out − E(x̃))², E = −logsumexp(z̃).

  The default m_out = −7 assumes a pretrained network, like m_in of `energy_in_margin`, whose
  docstring shows how to choose both for a network trained from scratch.

  Args:
    logits: `[..., K]` outlier logits.
    margin: m_out, any float.

  Returns:
    `[...]` per-outlier losses.
  """
  energy = -jax.nn.logsumexp(_logits(logits, 'logits'), axis=-1)
  return jnp.square(jax.nn.relu(margin - energy))


def ice_in(logits, labels):
  """ICE in-distribution term (Wu et al. 2022, eq. 0.14): −log exp(h_y) = −h_y.

  ICE: CE(h) + λ·[mean ice_in(h, y) + mean ice_out(h̃)], λ = 1 (eq. 0.15), with h the
  `layers.mahalanobis_logits`.

  Clip the gradients when training with ICE: the squared Mahalanobis distances grow
  quadratically with the features, so one large step makes the next larger, and without clipping
  the loss diverges within a few steps (on the digits benchmark, within two). ood_jax's ICE configs
  clip the global norm at 1:

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9, nesterov=True))

  (`--config.optimizer.grad_clip_norm=1.0` in the trainer, which warns when method ice runs without.)

  Args:
    logits: `[..., K]` Mahalanobis logits h ≤ 0.
    labels: `[...]` integer labels in [0, K); out of range: ValueError when concrete, NaN loss for
      that example under jit (module docstring).

  Returns:
    `[...]` per-example losses.
  """
  logits, labels, valid = _logits_and_labels(logits, labels)
  return _nan_where_invalid(valid, -_pick(logits, labels))


def ice_out(outlier_logits, *, eps=1e-6):
  """ICE outlier term (Wu et al. 2022, eq. 0.13): −log(1 − exp(max_k h_k(z̃))).

  Computed as −log(−expm1(a)), a = max_k h_k ≤ 0. It diverges as a → 0⁻ (an outlier on a class
  mean), so a is capped at −eps: exact for a ≤ −eps, at most −log(−expm1(−eps)) ≈ 13.8 above.

  Train it with clipped gradients, as `ice_in`'s docstring explains.

  Args:
    outlier_logits: `[..., K]` Mahalanobis logits of outliers (≤ 0).
    eps: cap > 0 on −max h (a traced eps ≤ 0 gives NaN losses).

  Returns:
    `[...]` per-outlier losses.
  """
  _checks.positive('eps', eps)
  h = _logits(outlier_logits, 'outlier_logits')
  values = _neg_log_one_minus_exp(jnp.max(h, axis=-1), eps)
  return _traced_hyperparameter(values, 'eps', eps, lambda e: e > 0, '> 0')


# ----------------------------------------------------------------------------------------------
# Contrastive family (Regmi et al. 2024): SupCon and ReweightOOD.


def _contrastive_inputs(embeddings, labels):
  """(similarities [N·V, N·V], positive mask, negative mask) of the flattened views."""
  embeddings = _checks.floating('embeddings', embeddings, ndim=3)
  n, v, _ = embeddings.shape
  if n * v < 2:
    raise ValueError(f'embeddings must hold at least two views in all (N·V ≥ 2), got shape {tuple(embeddings.shape)}.')
  labels = _checks.integer('labels', labels, ndim=1)
  if labels.shape[0] != n:
    raise ValueError(f'labels must have shape ({n},) to match embeddings {tuple(embeddings.shape)}, '
                     f'got {tuple(labels.shape)}.')
  flat = embeddings.reshape(n * v, -1).astype(_checks.compute_dtype(embeddings))
  flat_labels = jnp.repeat(labels, v)  # anchor a = n·V + view, matching the reshape above
  same = flat_labels[:, None] == flat_labels[None, :]
  not_self = ~jnp.eye(n * v, dtype=bool)
  return flat @ flat.T, same & not_self, ~same


def supervised_contrastive(embeddings, labels, *, temperature=0.1):
  """Supervised contrastive loss (Khosla et al. 2020, L_out; the SupCon baseline of Regmi et al. 2024).

  For anchor i with positives P(i) (other views/examples of its class) and all other entries A(i):
  L_i = −(1/|P(i)|) Σ_{p∈P(i)} [s_ip/τ − log Σ_{a∈A(i)} exp(s_ia/τ)], s = cosine similarity.
  Anchors without positives (a class seen once, one view) get 0, as in the SupCon reference.
  The reference's extra factor τ/τ_base is not applied.

  Args:
    embeddings: `[N, V, D]` L2-normalised embeddings (`layers.ProjectionHead`), V views each.
    labels: `[N]` integer class ids, compared only for equality (any integer, −1 included, is a
      class of its own here; no range applies).
    temperature: τ > 0 (0.1 in Regmi et al. 2024; 0.07 in SupCon); a traced τ ≤ 0 gives NaN losses.

  Returns:
    `[N·V]` per-anchor losses, anchor index n·V + v (reshape to `[N, V]`).
  """
  _checks.positive('temperature', temperature)
  sim, positive, _ = _contrastive_inputs(embeddings, labels)
  logits = sim / temperature
  others = ~jnp.eye(sim.shape[0], dtype=bool)
  log_denominator = _masked_logsumexp(logits, others)
  count = jnp.sum(positive, axis=-1)
  mean_positive = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / jnp.maximum(count, 1)
  values = jnp.where(count > 0, log_denominator - mean_positive, 0.0)
  return _traced_hyperparameter(values, 'temperature', temperature, lambda t: t > 0, '> 0')


def _reweighting(sim, between, within, stop_gradient):
  weights_sim = jax.lax.stop_gradient(sim) if stop_gradient else sim
  m_b, c_b = between
  m_w, c_w = within
  weight_between = jax.nn.sigmoid(m_b * weights_sim + c_b)  # σ(T_B), grows with s_b
  weight_within = jax.nn.sigmoid(-(m_w * weights_sim + c_w))  # reverse sigmoid σ'(T_W)
  return weight_between, weight_within


def reweighted_contrastive(embeddings, labels, *, temperature=0.1, between=(5.0, -4.0),
                           within=(2.0, 1.0), stop_gradient_weights=True, variant='paper'):
  """ReweightOOD loss (Regmi et al. 2024, eq. 2–3).

  variant='paper' (default), per anchor k with negatives (other classes) and positives (same
  class, excluding k itself):
    L_k = log Σ_neg exp(σ(m_b·s_b + c_b)·s_b/τ) − log Σ_pos exp(σ'(m_w·s_w + c_w)·s_w/τ),
  σ'(x) = 1/(1 + eˣ). Anchors with no positive or no negative get 0.

  variant='openood' reproduces OpenOOD's trainer: one loss for the batch over the pairs i < j,
  ELU(logsumexp_pos(−w_w·s/τ) + logsumexp_neg(w_b·s/τ)), with the same weight functions; it is
  returned broadcast to `[N·V]`, so its *mean* is OpenOOD's loss. OpenOOD's defaults
  (m_b, c_b, m_w, c_w) = (5, 4, 2, 1) in its sign convention are `between=(5, -4)`,
  `within=(2, -1)` here.

  The weights are stop-gradient by default (as OpenOOD; the paper does not say); pass
  `stop_gradient_weights=False` to differentiate through them.

  Args:
    embeddings: `[N, V, D]` L2-normalised embeddings, V views each.
    labels: `[N]` integer class ids, compared only for equality (any integer, −1 included, is a
      class of its own here; no range applies).
    temperature: τ > 0, 0.1 in the paper; a traced τ ≤ 0 gives NaN losses.
    between: (m_b, c_b): (5, −4) for CIFAR-10, (5, −2) for CIFAR-100.
    within: (m_w, c_w): (2, 1) for both.
    stop_gradient_weights: treat the reweighting factors as constants.
    variant: 'paper' or 'openood'.

  Returns:
    `[N·V]` per-anchor losses, anchor index n·V + v (reshape to `[N, V]`).
  """
  _checks.positive('temperature', temperature)
  if variant not in ('paper', 'openood'):
    raise ValueError(f"variant must be one of 'paper', 'openood', got {variant!r}.")
  for name, pair in (('between', between), ('within', within)):
    if len(pair) != 2:
      raise ValueError(f'{name} must be a pair (slope, offset), got {pair!r}.')
  sim, positive, negative = _contrastive_inputs(embeddings, labels)
  weight_between, weight_within = _reweighting(sim, between, within, stop_gradient_weights)
  if variant == 'paper':
    log_between = _masked_logsumexp(weight_between * sim / temperature, negative)
    log_within = _masked_logsumexp(weight_within * sim / temperature, positive)
    valid = jnp.any(positive, axis=-1) & jnp.any(negative, axis=-1)
    values = jnp.where(valid, log_between - log_within, 0.0)
  else:
    upper = jnp.triu(jnp.ones(sim.shape, dtype=bool), k=1)  # each unordered pair once
    log_within = _masked_logsumexp((-weight_within * sim / temperature).ravel(), (positive & upper).ravel())
    log_between = _masked_logsumexp((weight_between * sim / temperature).ravel(), (negative & upper).ravel())
    values = jnp.broadcast_to(jax.nn.elu(log_within + log_between), sim.shape[:1])
  return _traced_hyperparameter(values, 'temperature', temperature, lambda t: t > 0, '> 0')


# ----------------------------------------------------------------------------------------------
# Smooth training (the SMOT paper, an anonymous ICLR 2024 submission): SMOT.


def smot_smoothing(threshold, *, temperature=10.0):
  """SMOT soft-label strength ε(t) = 1 − exp((t − 255)/T) (the SMOT paper, eq. 9), as −expm1(·).

  A threshold t near 255 masks only the most class-discriminative pixels, so little smoothing is
  needed (ε → 0); lower thresholds mask more and get softer labels.

  Args:
    threshold: `[...]` CAM thresholds t in [0, 255] (t = 255·Beta(α, β) in the paper). Not
      range-checked: t > 255 gives ε < 0, which `smooth_training` rejects (NaN under jit).
    temperature: T > 0: 10 (CIFAR-10), 150 (CIFAR-100), 200 (ImageNet-200); a traced T ≤ 0 gives
      NaN.

  Returns:
    `[...]` ε(t) in [0, 1) in exact arithmetic; in float32 small t can round to exactly 1 (t = 0,
    T = 10 gives 1 − e^−25.5).
  """
  _checks.positive('temperature', temperature)
  t = _checks.floating('threshold', threshold)
  t = t.astype(_checks.compute_dtype(t))
  values = -jnp.expm1((t - 255.0) / temperature)
  return _traced_hyperparameter(values, 'temperature', temperature, lambda s: s > 0, '> 0')


def smooth_training(logits, masked_logits, labels, smoothing, *, weight=0.1):
  """SMOT loss (the SMOT paper, eq. 6/8): (1 − λ)·CE(f(x), y) + λ·CE(f(M ⊙ x), (1 − ε)·y + ε/K).

  Args:
    logits: `[..., K]` logits of the clean inputs.
    masked_logits: `[..., K]` logits of the CAM-masked inputs.
    labels: `[...]` integer labels in [0, K); out of range: ValueError when concrete, NaN loss for
      that example under jit (module docstring).
    smoothing: ε, scalar or `[...]` (per example, `smot_smoothing(t)`), in [0, 1]: ValueError when
      concrete and outside, NaN loss for those examples when traced.
    weight: λ in [0, 1], 0.1 in the paper; a traced λ outside [0, 1] gives NaN losses.

  Returns:
    `[...]` per-example losses.
  """
  if np.ndim(weight) != 0:
    raise TypeError(f'weight must be a scalar, got shape {np.shape(weight)}.')
  if _checks.is_concrete(weight) and not 0.0 <= float(weight) <= 1.0:
    raise ValueError(f'weight must lie in [0, 1], got {weight}.')
  logits, labels, valid = _logits_and_labels(logits, labels)
  masked_logits = _checks.floating('masked_logits', masked_logits)
  if masked_logits.shape != logits.shape:
    raise ValueError(f'masked_logits must have the shape of logits {tuple(logits.shape)}, '
                     f'got {tuple(masked_logits.shape)}.')
  smoothing = _checks.floating('smoothing', smoothing)
  if smoothing.ndim and smoothing.shape != labels.shape:
    raise ValueError(f'smoothing must be a scalar or have shape {tuple(labels.shape)}, got {tuple(smoothing.shape)}.')
  value = _checks.host_value(smoothing)
  if value is not None and not np.all((value >= 0) & (value <= 1)):
    raise ValueError('smoothing must lie in [0, 1].')
  masked = masked_logits.astype(logits.dtype)
  clean = -_pick(jax.nn.log_softmax(logits, axis=-1), labels)
  log_q = jax.nn.log_softmax(masked, axis=-1)
  # CE to (1 − ε)·onehot + ε/K = (1 − ε)·(−log q_y) + ε·(−mean_k log q_k).
  eps = smoothing.astype(logits.dtype)
  soft = (1.0 - eps) * -_pick(log_q, labels) + eps * -jnp.mean(log_q, axis=-1)
  values = (1.0 - weight) * clean + weight * soft
  if value is None:  # traced ε: the examples whose ε is outside [0, 1] get NaN, like bad labels
    in_range = (eps >= 0) & (eps <= 1)
    checkify.check(jnp.all(in_range), 'smoothing must lie in [0, 1], got values in [{lo}, {hi}].',
                   lo=jnp.min(eps), hi=jnp.max(eps), debug=True)
    values = jnp.where(in_range, values, jnp.asarray(jnp.nan, values.dtype))
  values = _nan_where_invalid(valid, values)
  return _traced_hyperparameter(values, 'weight', weight, lambda w: (w >= 0) & (w <= 1), 'in [0, 1]')


# ----------------------------------------------------------------------------------------------
# Training baselines of OpenOOD v1.5's leaderboard: LogitNorm, Mixup, RegMixup, ConfBranch.


def _fraction(name, value, shape):
  """(value in [0, 1] as an array, in-range mask or None): ValueError when concrete and outside.

  A scalar or an array of `shape`. Concrete values are checked here (mask None); for traced ones
  the mask lets the caller turn the examples whose value is outside [0, 1] into NaN.
  """
  value = _checks.floating(name, value)
  if value.ndim and value.shape != tuple(shape):
    raise ValueError(f'{name} must be a scalar or have shape {tuple(shape)}, got {tuple(value.shape)}.')
  host = _checks.host_value(value)
  if host is not None:
    if not np.all((host >= 0) & (host <= 1)):
      raise ValueError(f'{name} must lie in [0, 1].')
    return value, None
  in_range = (value >= 0) & (value <= 1)
  checkify.check(jnp.all(in_range), f'{name} must lie in [0, 1], got values in [{{lo}}, {{hi}}].',
                 lo=jnp.min(value), hi=jnp.max(value), debug=True)
  return value, in_range


def logit_norm(logits, labels, *, temperature=0.04, eps=1e-7):
  """LogitNorm loss (Wei et al. 2022, eq. 4): −log softmax(z / (τ·(‖z‖ + ε)))_y.

  The cross-entropy of the logit vector rescaled to norm 1/τ: the loss can no longer be lowered by
  inflating ‖z‖, which is how a softmax network becomes over-confident. The normalisation is a training
  device only; predictions and scores use the raw logits z (MSP in the paper and in OpenOOD v1.5).

  ε convention: ε is added to the norm, ‖z‖ + 1e-7, as in the authors' code and OpenOOD's
  `LogitNormLoss`; it matters only for ‖z‖ below ~1e-5 (at z = 0 the loss is log K, not NaN, and the
  gradient is finite). pytorch-ood's `LogitNorm` documents the same cross-entropy without ε (and a
  default τ = 1); this function equals that formula to float32 rounding wherever ‖z‖ ≫ ε
  (tests/test_losses.py; pytorch-ood's code itself applies `nll_loss` to the rescaled logits without a
  log-softmax, −z_y/(τ‖z‖), which is not its documented loss, so the documented formula is the reference).

  Args:
    logits: `[..., K]` affine logits.
    labels: `[...]` integer labels in [0, K); out of range: ValueError when concrete, NaN loss for
      that example under jit (module docstring).
    temperature: τ > 0: 0.04 for CIFAR-10 (the paper and OpenOOD); a traced τ ≤ 0 gives NaN losses.
    eps: ε > 0 added to ‖z‖; a traced ε ≤ 0 gives NaN losses.

  Returns:
    `[...]` per-example losses.
  """
  _checks.positive('temperature', temperature)
  _checks.positive('eps', eps)
  logits, labels, valid = _logits_and_labels(logits, labels)
  square = jnp.sum(jnp.square(logits), axis=-1, keepdims=True)
  nonzero = square > 0
  # The double `where` gives d‖z‖/dz = 0 at z = 0, where √ has an infinite slope (and 0·inf = NaN).
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, square, 1.0)), 0.0)
  scaled = logits / (temperature * (norm + eps))
  values = _nan_where_invalid(valid, -_pick(jax.nn.log_softmax(scaled, axis=-1), labels))
  values = _traced_hyperparameter(values, 'temperature', temperature, lambda t: t > 0, '> 0')
  return _traced_hyperparameter(values, 'eps', eps, lambda e: e > 0, '> 0')


def mixup_cross_entropy(logits, labels, partner_labels, mix):
  """Mixup loss (Zhang et al. 2018, Sec. 2): λ·CE(z̃, y_i) + (1 − λ)·CE(z̃, y_j).

  z̃ are the logits of the mixed input x̃ = λ·x_i + (1 − λ)·x_j, λ ~ Beta(α, α). Equal to the
  cross-entropy to the mixed target λ·onehot(y_i) + (1 − λ)·onehot(y_j), as OpenOOD's MixupTrainer
  computes it (`soft_cross_entropy`), and to RegMixup's `regmixup_criterion` on the mixed rows.

  Args:
    logits: `[..., K]` logits of the mixed inputs.
    labels: `[...]` labels y_i of the inputs weighted λ, in [0, K) (ValueError when concrete and
      outside, NaN loss for that example under jit, as every labelled loss here).
    partner_labels: `[...]` labels y_j of the inputs mixed in with weight 1 − λ, same rules.
    mix: λ in [0, 1], a scalar (one draw per batch, as Zhang et al. and OpenOOD) or `[...]` per
      example; ValueError when concrete and outside [0, 1], NaN loss for those examples when traced.

  Returns:
    `[...]` per-example losses.
  """
  logits, labels, valid = _logits_and_labels(logits, labels)
  _, partners, partner_valid = _logits_and_labels(logits, partner_labels, labels_name='partner_labels')
  mix, in_range = _fraction('mix', mix, labels.shape)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  mix = mix.astype(logits.dtype)
  values = mix * -_pick(log_p, labels) + (1.0 - mix) * -_pick(log_p, partners)
  if in_range is not None:
    values = jnp.where(in_range, values, jnp.asarray(jnp.nan, values.dtype))
  return _nan_where_invalid(valid & partner_valid, values)


def regmixup(logits, mixed_logits, labels, partner_labels, mix, *, weight=1.0):
  """RegMixup loss (Pinto et al. 2022): CE(f(x_i), y_i) + η·mixup_cross_entropy(f(x̃_i), y_i, y_j, λ).

  Mixup used as a regulariser of the clean cross-entropy rather than in its place: example i's clean
  row and its mixed row x̃_i = λ·x_i + (1 − λ)·x_j, with a large α (λ ~ Beta(α, α), α = 20 for CIFAR-10
  and 10 for CIFAR-100 in the authors' commands, so λ stays near 1/2). η = 1 in the paper.

  The authors' code and OpenOOD take `F.cross_entropy` over the concatenated batch of 2B rows, i.e.
  half of the mean of these losses with η = 1 (`methods.mixup` does the same).

  Args:
    logits: `[..., K]` logits of the clean inputs.
    mixed_logits: `[..., K]` logits of the mixed inputs, row i mixing example i with its partner.
    labels: `[...]` labels y_i in [0, K) (ValueError when concrete and outside, NaN under jit).
    partner_labels: `[...]` labels y_j of the partners, same rules.
    mix: λ in [0, 1], scalar or `[...]` (see `mixup_cross_entropy`).
    weight: η ≥ 0, 1 in the paper; a traced η < 0 gives NaN losses.

  Returns:
    `[...]` per-example losses.
  """
  _checks.nonnegative('weight', weight)
  mixed_logits = _checks.floating('mixed_logits', mixed_logits)
  if mixed_logits.shape != np.shape(logits):
    raise ValueError(f'mixed_logits must have the shape of logits {tuple(np.shape(logits))}, '
                     f'got {tuple(mixed_logits.shape)}.')
  values = softmax_cross_entropy(logits, labels) + weight * mixup_cross_entropy(mixed_logits, labels,
                                                                                partner_labels, mix)
  return _traced_hyperparameter(values, 'weight', weight, lambda w: w >= 0, '>= 0')


def confidence_branch(logits, confidence_logits, labels, *, weight, hints=None):
  """ConfBranch loss (DeVries & Taylor 2018, eqs. 2–5): −log p'_y + λ·(−log c).

  A confidence branch c = σ(s) beside the class logits z, p = softmax(z). The prediction is pulled
  towards the label in proportion to 1 − c, p' = c·p + (1 − c)·onehot(y) (eq. 2), so asking for
  "hints" lowers the task loss −log p'_y = −log(c·p_y + 1 − c) (eq. 3) at the price of the confidence
  loss −log c (eq. 4), weighted λ (eq. 5; the trainer adjusts λ towards a budget β, see
  `layers.ConfidenceBranch`). Computed in log space,
  log(c·p_y + (1 − c)) = logaddexp(log σ(s) + log p_y, log σ(−s)), which is exact where the reference
  code (OpenOOD, pytorch-ood) clamps p and c to [ε, 1 − ε].

  Hints are applied to a random half of the examples (the paper; b ~ Bernoulli(1/2) in OpenOOD): where
  `hints` is False the prediction term uses c = 1, i.e. the plain cross-entropy −log p_y; the confidence
  term applies to every example, as in the reference code.

  Args:
    logits: `[..., K]` class logits z.
    confidence_logits: `[...]` confidence logits s, c = σ(s).
    labels: `[...]` integer labels in [0, K) (ValueError when concrete and outside, NaN under jit).
    weight: λ ≥ 0, the weight of −log c (may be traced: the trainer's λ changes every step); a traced
      λ < 0 gives NaN losses.
    hints: `[...]` booleans, True where the prediction is interpolated with the label; None: all.

  Returns:
    `[...]` per-example losses.
  """
  _checks.nonnegative('weight', weight)
  logits, labels, valid = _logits_and_labels(logits, labels)
  s = _checks.floating('confidence_logits', confidence_logits)
  if s.shape != labels.shape:
    raise ValueError(f'confidence_logits must have shape {tuple(labels.shape)} (one per example), '
                     f'got {tuple(s.shape)}.')
  s = s.astype(logits.dtype)
  log_p_y = _pick(jax.nn.log_softmax(logits, axis=-1), labels)
  log_c, log_not_c = -jax.nn.softplus(-s), -jax.nn.softplus(s)  # log σ(s), log σ(−s)
  task = -jnp.logaddexp(log_c + log_p_y, log_not_c)
  if hints is not None:
    hints = jnp.asarray(hints)
    if hints.dtype != jnp.bool_ or hints.shape != labels.shape:
      raise TypeError(f'hints must be booleans of shape {tuple(labels.shape)}, got {hints.dtype} '
                      f'{tuple(hints.shape)}.')
    task = jnp.where(hints, task, -log_p_y)
  values = _nan_where_invalid(valid, task + weight * -log_c)
  return _traced_hyperparameter(values, 'weight', weight, lambda w: w >= 0, '>= 0')


# ----------------------------------------------------------------------------------------------
# Self-supervised and outlier-mixing baselines of OpenOOD v1.5: RotPred, MixOE.


def rotation_prediction(logits, rotation_logits, labels, *, weight=1.0):
  """RotPred loss (Hendrycks, Mazeika, Kadavath & Song 2019): CE(z, y) + λ·(1/R) Σ_r CE(ρ_r, r).

  Every image is also shown in its R = 4 quarter turns (0°, 90°, 180°, 270°), and an auxiliary R-way head
  on the same features predicts which turn it sees. The class cross-entropy is taken on the unrotated copy
  only and the rotation cross-entropy on every copy, averaged over the R turns, as OpenOOD's `RotPredTrainer`
  (whose `F.cross_entropy` over the 4B rotation rows is the batch mean of this second term; λ = 1 there).

  Args:
    logits: `[..., K]` class logits of the unrotated images.
    rotation_logits: `[..., R, R]` rotation logits: row r holds the R-way logits of the copy turned r
      quarter turns, whose target is r.
    labels: `[...]` integer labels in [0, K) (ValueError when concrete and outside, NaN under jit).
    weight: λ ≥ 0, the rotation term's weight; 1 in OpenOOD. A traced λ < 0 gives NaN losses.

  Returns:
    `[...]` per-example losses.
  """
  _checks.nonnegative('weight', weight)
  logits, labels, valid = _logits_and_labels(logits, labels)
  rotation_logits = _checks.floating('rotation_logits', rotation_logits, min_ndim=2)
  turns = rotation_logits.shape[-1]
  if rotation_logits.shape != labels.shape + (turns, turns) or turns < 2:
    raise ValueError(f'rotation_logits must have shape {tuple(labels.shape) + ("R", "R")} (R ≥ 2 rotations, '
                     f'row r the logits of the copy turned r times), got {tuple(rotation_logits.shape)}.')
  log_q = jax.nn.log_softmax(rotation_logits.astype(logits.dtype), axis=-1)
  rotation = -jnp.mean(jnp.diagonal(log_q, axis1=-2, axis2=-1), axis=-1)  # row r, target r
  values = softmax_cross_entropy(logits, labels) + weight * rotation
  values = _nan_where_invalid(valid, values)
  return _traced_hyperparameter(values, 'weight', weight, lambda w: w >= 0, '>= 0')


def mixoe(logits, mixed_logits, labels, mix, *, weight=1.0):
  """MixOE loss (Zhang, Inkawhich, Linderman, Chen & Li 2023): CE(z, y) + β·CE(z̃, λ·onehot(y) + (1 − λ)·u).

  z̃ are the logits of x̃, the in-distribution image x mixed with an auxiliary outlier with weight λ on x
  (mixup or cutmix, `methods.mixoe`), and u the uniform distribution over the K classes: the target moves
  from the label to uniform as the outlier's share grows, so the outlier-exposure term of Hendrycks et al.
  is the case λ = 0. The soft cross-entropy splits as λ·CE(z̃, y) + (1 − λ)·`outlier_exposure`(z̃).
  OpenOOD's `MixOETrainer` (and the paper) add no separate uniform term on the pure outliers; β = 1 there.

  Args:
    logits: `[..., K]` logits of the in-distribution inputs.
    mixed_logits: `[..., K]` logits of the mixed inputs, row i mixing example i with an outlier.
    labels: `[...]` labels y in [0, K) (ValueError when concrete and outside, NaN under jit).
    mix: λ in [0, 1], the in-distribution share: a scalar (one draw per batch, as OpenOOD) or `[...]`;
      ValueError when concrete and outside [0, 1], NaN loss for those examples when traced.
    weight: β ≥ 0 (OpenOOD's `lambda_oe`, 1); a traced β < 0 gives NaN losses.

  Returns:
    `[...]` per-example losses.
  """
  _checks.nonnegative('weight', weight)
  mixed_logits = _checks.floating('mixed_logits', mixed_logits)
  if mixed_logits.shape != np.shape(logits):
    raise ValueError(f'mixed_logits must have the shape of logits {tuple(np.shape(logits))}, '
                     f'got {tuple(mixed_logits.shape)}.')
  _, labels_safe, valid = _logits_and_labels(mixed_logits, labels)
  mix, in_range = _fraction('mix', mix, labels_safe.shape)
  z = mixed_logits.astype(_checks.compute_dtype(mixed_logits))
  log_p = jax.nn.log_softmax(z, axis=-1)
  mix = mix.astype(z.dtype)
  soft = mix * -_pick(log_p, labels_safe) + (1.0 - mix) * -jnp.mean(log_p, axis=-1)
  if in_range is not None:
    soft = jnp.where(in_range, soft, jnp.asarray(jnp.nan, soft.dtype))
  values = softmax_cross_entropy(logits, labels) + weight * soft
  values = _nan_where_invalid(valid, values)
  return _traced_hyperparameter(values, 'weight', weight, lambda w: w >= 0, '>= 0')


# ----------------------------------------------------------------------------------------------
# Outlier synthesis (VOS, NPOS) and hyperspherical prototypes (CIDER, NPOS).


def outlier_logistic(inlier_logits, outlier_logits):
  """Logistic loss of an in-distribution-vs-outlier logit: −log σ(s) for inliers, −log σ(−s) for outliers.

  VOS's uncertainty loss (Du et al. 2022, eq. 5): s = φ(−E) the logistic regression of the negative weighted
  energy (the reference's two-class cross-entropy of `Linear(1, 2)` is the logistic loss of the difference of
  its two outputs, which `layers.VirtualOutlierHead` returns); NPOS's binary loss (Tao et al. 2023; OpenOOD's
  `BCEWithLogitsLoss` of the MLP on ID features, label 1, and synthesised outliers, label 0). The reference
  averages over all B + M rows: take the mean of the result.

  Args:
    inlier_logits: `[B]` logits s of the in-distribution examples.
    outlier_logits: `[M]` logits of the (synthesised) outliers.

  Returns:
    `[B + M]` per-row losses, the inliers first.
  """
  inl = _checks.floating('inlier_logits', inlier_logits, ndim=1)
  out = _checks.floating('outlier_logits', outlier_logits, ndim=1)
  dtype = _checks.compute_dtype(inl, out)
  return jnp.concatenate([jax.nn.softplus(-inl.astype(dtype)), jax.nn.softplus(out.astype(dtype))])


def prototype_compactness(embeddings, prototypes, labels, *, temperature=0.1):
  """CIDER's compactness loss (Ming et al. 2023, eq. 5): −log softmax_k(z·μ̂_k/τ)_y, μ̂ the unit prototypes.

  The cross-entropy of each unit embedding against the K class prototypes (normalised here, as OpenOOD's
  `CompLoss`), at temperature τ. The reference code scales the batch mean by τ/τ_base with τ_base = 0.07; that
  constant factor is the caller's (`methods.prototypes` applies it to reproduce the recipe's weighting).

  Args:
    embeddings: `[N, E]` unit embeddings.
    prototypes: `[K, E]` class prototypes (normalised inside; treat them as constants: CIDER detaches them).
    labels: `[N]` integer labels in [0, K) (ValueError when concrete and outside, NaN under jit).
    temperature: τ > 0 (0.1 in CIDER and OpenOOD).

  Returns:
    `[N]` per-example losses.
  """
  _checks.positive('temperature', temperature)
  embeddings = _checks.floating('embeddings', embeddings, ndim=2)
  prototypes = _checks.floating('prototypes', prototypes, ndim=2)
  if embeddings.shape[1] != prototypes.shape[1]:
    raise ValueError(f'embeddings [N, E] and prototypes [K, E] must share E, got {tuple(embeddings.shape)} and '
                     f'{tuple(prototypes.shape)}.')
  dtype = _checks.compute_dtype(embeddings, prototypes)
  unit = prototypes.astype(dtype) * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(jnp.square(prototypes.astype(dtype)), axis=-1, keepdims=True), 1e-24))
  logits = jnp.matmul(embeddings.astype(dtype), unit.T, precision=jax.lax.Precision.HIGHEST) / temperature
  values = softmax_cross_entropy(logits, labels)
  return _traced_hyperparameter(values, 'temperature', temperature, lambda t: t > 0, '> 0')


def prototype_dispersion(prototypes, *, temperature=0.1):
  """CIDER's dispersion loss (Ming et al. 2023, eq. 4): log (1/(K − 1)) Σ_{j≠i} exp(μ_i·μ_j/τ), per prototype.

  Pushes the class prototypes apart on the sphere; OpenOOD's `DisLoss` (its τ/τ_base is 1) on the prototypes
  after this batch's moving-average update, whose gradient reaches the embeddings (`layers.ema_prototypes`).
  The prototypes are used as given (unit vectors, or zero for a class not seen yet, as the reference).

  Args:
    prototypes: `[K, E]`, K ≥ 2.
    temperature: τ > 0 (0.1).

  Returns:
    `[K]` per-prototype losses (the reference takes their mean).
  """
  _checks.positive('temperature', temperature)
  prototypes = _checks.floating('prototypes', prototypes, ndim=2)
  num_classes = prototypes.shape[0]
  if num_classes < 2:
    raise ValueError(f'prototypes must hold K >= 2 classes to disperse, got shape {tuple(prototypes.shape)}.')
  p = prototypes.astype(_checks.compute_dtype(prototypes))
  logits = jnp.matmul(p, p.T, precision=jax.lax.Precision.HIGHEST) / temperature
  others = ~jnp.eye(num_classes, dtype=bool)
  values = _masked_logsumexp(logits, others) - jnp.log(num_classes - 1.0)
  return _traced_hyperparameter(values, 'temperature', temperature, lambda t: t > 0, '> 0')
