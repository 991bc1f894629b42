"""Gradient detectors: GradNorm, last-layer gradient norms, ODIN and iODIN.

* GradNorm (Huang, Geng & Li 2021, "On the importance of gradients for detecting distributional shifts
  in the wild", eq. 3–4): S(x) = ‖∂ D_KL(u ‖ softmax(f(x)/T)) / ∂W‖₁, the L1 norm of the gradient of
  the KL divergence from the uniform distribution to the softmax with respect to the final layer's
  weights, T = 1. Per-example gradients come from `jax.vmap(jax.grad(...))`: one batched pass.
* ODIN (Liang, Li & Srikant 2018, "Enhancing the reliability of out-of-distribution image detection in
  neural networks", eq. 2): temperature scaling plus a signed-gradient input perturbation
  (`ood_jax.scores.odin` is its door).
* iODIN (Regmi 2024, "Going beyond conventional OOD detection"): ODIN's step on the single input entry with the
  largest gradient magnitude.
* Gradient uncertainty (Oberdiek, Rottmann & Gottschalk 2018): −‖∂ CE(softmax(z), ŷ) / ∂W‖ for the predicted
  label ŷ, the last layer's weights.
* Confounding-label gradient (Lee & AlRegib 2020; pytorch-ood `GradUncertainty`): ‖∂ Σ_k BCE(p_k, 1) / ∂(W, b)‖₂².

The last-layer scores are closed forms: the gradient with respect to (W, b) is an outer product, whose norms
factor into a norm of the features and a norm of ∂L/∂z.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.detectors import _base as base
from ood_jax.detectors import logit
from ood_jax.detectors import registry
from ood_jax.detectors import shaping

__all__ = ['gradient_confounding', 'gradient_uncertainty', 'gradnorm', 'iodin', 'odin']


def gradnorm(state: shaping.HeadState, features, *, temperature=1.0, include_bias=False, chunk_size=256):
  """GradNorm: ‖∂ KL(u ‖ softmax((Wᵀh + b)/T)) / ∂W‖₁ per example (Huang et al. 2021, eq. 3–4).

    D_KL(u ‖ p) = −(1/K) Σ_k log p_k − log K,    p = softmax((Wᵀh + b)/T)

  Higher = more in-distribution (in-distribution inputs give sharper softmaxes, so larger gradients).
  The per-example gradient is taken by `jax.vmap(jax.grad(kl))` over chunks of `chunk_size` examples
  (`jax.lax.map`), so the `[chunk, D, K]` per-example gradients are bounded in memory; under `jit` XLA
  fuses the absolute-value sum into the outer product. Analytically the gradient is
  h ⊗ (p − u)/T, so the score equals ‖h‖₁·‖p − u‖₁/T (the tests check this).

  The paper takes the gradient of the last layer's weights only (default; OpenOOD agrees);
  `include_bias=True` adds the bias gradient's L1 norm. OpenOOD's code uses the cross-entropy to
  all-ones targets, K times the KL gradient: the same ranking.

  Args:
    state: `HeadState` (from `ood_jax.detectors.shaping.fit_head`).
    features: `[N, D]` penultimate features.
    temperature: T > 0; 1 as in the paper.
    include_bias: also count the bias gradient.
    chunk_size: examples per vmapped chunk (a Python int).

  Returns:
    `[N]` scores ≥ 0.
  """
  state = base.check_state(state, shaping.HeadState, detector='gradnorm')
  h = base.features_arg(features, detector='gradnorm', dim=state.head.kernel.shape[0])
  _checks.positive('temperature', temperature)
  chunk_size = _checks.positive_int('chunk_size', chunk_size)
  if h.shape[0] == 0:
    return base.to_device(np.zeros((0,)), _checks.compute_dtype(h))
  return _gradnorm(state, h, base.as_float(temperature), include_bias=bool(include_bias),
                   chunk=min(chunk_size, h.shape[0]))


@functools.partial(jax.jit, static_argnames=('include_bias', 'chunk'))
def _gradnorm(state, h, temperature, *, include_bias, chunk):
  h = base.compute(h)
  params = (state.head.kernel.astype(h.dtype), state.head.bias.astype(h.dtype))
  num_classes = params[1].shape[0]
  t = jnp.asarray(temperature, h.dtype)

  def kl_to_uniform(p, x):
    kernel, bias = p
    z = (jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST) + bias) / t
    return -jnp.mean(jax.nn.log_softmax(z)) - jnp.log(jnp.asarray(num_classes, h.dtype))

  def one(x):
    g_kernel, g_bias = jax.grad(kl_to_uniform)(params, x)
    out = jnp.sum(jnp.abs(g_kernel))
    return out + jnp.sum(jnp.abs(g_bias)) if include_bias else out

  n = h.shape[0]
  num_chunks = -(-n // chunk)
  # Zero-padded rows are valid inputs (finite gradients) and are sliced off.
  padded = jnp.pad(h, ((0, num_chunks * chunk - n), (0, 0))).reshape(num_chunks, chunk, -1)
  return jax.lax.map(jax.vmap(one), padded).reshape(-1)[:n]


registry.register('gradnorm', needs={'features', 'head'}, fit=shaping.fit_head, score=gradnorm,
                  defaults={'temperature': 1.0, 'include_bias': False}, paper='Huang, Geng & Li 2021', year=2021)


def _perturbation_inputs(name, apply_fn, inputs, temperature, epsilon):
  """ODIN's and iODIN's argument checks, and their temperature-scaled logits as a function of the inputs."""
  if not callable(apply_fn):
    raise ValueError(f"detector '{name}' needs apply_fn (inputs -> logits) and inputs; got no apply_fn.")
  if inputs is None:
    raise ValueError(f"detector '{name}' needs inputs (it perturbs them); got None.")
  inputs = _checks.floating('inputs', inputs, min_ndim=1)
  _checks.positive('temperature', temperature)
  _checks.nonnegative('epsilon', epsilon)

  def scaled_logits(x):
    out = apply_fn(x)
    logits = base.any_logits(out['logits'] if isinstance(out, Mapping) else out, name='apply_fn(inputs)')
    return logits / jnp.asarray(temperature, dtype=logits.dtype)

  return inputs, scaled_logits


def odin(apply_fn: Callable, inputs, *, temperature=1000.0, epsilon=0.0014):
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

  Defaults T = 1000 and ε = 0.0014 are the paper's (CIFAR-10 DenseNet); the paper tunes
  T ∈ {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000} and ε over 21 values in [0, 0.004].

  Jitting: with a hashable `apply_fn`, `jax.jit(odin, static_argnums=0)` works. To keep parameters
  as traced arguments rather than constants baked into the compiled code, jit a wrapper instead:
  `jax.jit(lambda v, x: odin(functools.partial(model.apply, v), x))`.

  Args:
    apply_fn: maps `inputs` `[batch, ...]` to logits `[batch, num_classes]` (or to a dict with 'logits',
      as the adapter's extractor does), for example `functools.partial(model.apply, variables, train=False)`.
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
  inputs, scaled_logits = _perturbation_inputs('odin', apply_fn, inputs, temperature, epsilon)

  if _checks.is_concrete(epsilon) and float(epsilon) == 0:
    # Without a perturbation ODIN is temperature scaling; skip the useless backward pass.
    out = logit.max_softmax(scaled_logits(inputs))
    return base.traced_hyperparameter(out, 'temperature', temperature, lambda v: v > 0, '> 0')

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
  out = logit.max_softmax(scaled_logits(perturbed))
  out = base.traced_hyperparameter(out, 'temperature', temperature, lambda v: v > 0, '> 0')
  return base.traced_hyperparameter(out, 'epsilon', epsilon, lambda v: v >= 0, '>= 0')


registry.register('odin', needs={'model'}, score=odin, defaults={'temperature': 1000.0, 'epsilon': 0.0014},
                  grid={'temperature': (1.0, 10.0, 100.0, 1000.0),
                        'epsilon': (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005)},
                  paper='Liang, Li & Srikant 2018', year=2018)


def iodin(apply_fn: Callable, inputs, *, temperature=1000.0, epsilon=0.0014):
  """iODIN: ODIN whose perturbation moves only the input entry with the largest gradient magnitude.

    g = ∇ₓ log S_ŷ(x; T),  m = 1 at argmax_j |g_j| (per example),  x̃ = x + ε·sign(g)·m,
    score = max_k S_k(x̃; T)                 (Regmi 2024, "Going beyond conventional OOD detection", iODIN)

  ODIN's sign step (`odin`) on one entry per example: a smaller change than ODIN's, in the entry that moves the
  prediction most. OpenOOD's `iodin` postprocessor: defaults T = 1000, ε = 0.0014 (its sweep T ∈ {1, 10, 100,
  1000}, ε ∈ {0.0014, 0.0028}); ε is in the units of `inputs` (OpenOOD divides by the normalisation's std, as
  for ODIN: let `apply_fn` take [0, 1] pixels to match it). The argmax takes the first of tied entries; a zero
  gradient gives sign 0 here (OpenOOD's `ge(grad, 0)` maps it to +1). Same batching rules as `odin`:
  inference-mode layers, so that each example's gradient is its own.

  Args:
    apply_fn: `inputs` `[batch, ...]` → logits `[batch, K]` (or a dict with 'logits').
    inputs: `[batch, ...]` floating inputs.
    temperature: T > 0.
    epsilon: ε ≥ 0.

  Returns:
    `[batch]` scores in (0, 1].
  """
  inputs, scaled_logits = _perturbation_inputs('iodin', apply_fn, inputs, temperature, epsilon)

  def total_log_msp(x):
    log_probs = jax.nn.log_softmax(scaled_logits(x), axis=-1)
    predicted = jnp.argmax(jax.lax.stop_gradient(log_probs), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_probs, predicted[..., None], axis=-1))

  dtype = _checks.compute_dtype(inputs)
  x = inputs.astype(dtype)
  grad = jax.grad(total_log_msp)(x)
  flat = grad.reshape(grad.shape[0], -1)
  mask = jax.nn.one_hot(jnp.argmax(jnp.abs(flat), axis=-1), flat.shape[1], dtype=dtype)
  step = jnp.asarray(epsilon, dtype) * (jnp.sign(flat).astype(dtype) * mask).reshape(x.shape)
  out = logit.max_softmax(scaled_logits(x + step))
  out = base.traced_hyperparameter(out, 'temperature', temperature, lambda v: v > 0, '> 0')
  return base.traced_hyperparameter(out, 'epsilon', epsilon, lambda v: v >= 0, '>= 0')


registry.register('iodin', needs={'model'}, score=iodin, defaults={'temperature': 1000.0, 'epsilon': 0.0014},
                  grid={'temperature': (1.0, 10.0, 100.0, 1000.0), 'epsilon': (0.0014, 0.0028)},
                  paper='Regmi 2024', year=2024)


# ------------------------------------------------------------------------------------------------
# Last-layer gradient norms in closed form: for a loss L(z) of the logits z = Wᵀh + b, ∂L/∂W = h ⊗ ∂L/∂z and
# ∂L/∂b = ∂L/∂z, so the gradient over (W, b) is the outer product of ĥ = [h, 1] with δ = ∂L/∂z, whose norms
# factor: ‖ĥ ⊗ δ‖₁ = ‖ĥ‖₁‖δ‖₁, ‖·‖₂ = ‖ĥ‖₂‖δ‖₂, ‖·‖_∞ = ‖ĥ‖_∞‖δ‖_∞. No [N, D, K] gradient is formed.
# ------------------------------------------------------------------------------------------------

_NORMS = ('l1', 'l2', 'max')


def _outer_norm(h, delta, norm, include_bias):
  """‖[h, 1 if include_bias] ⊗ δ‖ per row for `norm` in `_NORMS`."""
  one = jnp.ones_like(h[:, :1])
  h = jnp.concatenate([h, one], axis=-1) if include_bias else h
  if norm == 'l1':
    return jnp.sum(jnp.abs(h), -1) * jnp.sum(jnp.abs(delta), -1)
  if norm == 'l2':
    return jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(delta, axis=-1)
  return jnp.max(jnp.abs(h), -1) * jnp.max(jnp.abs(delta), -1)


def _gradient_args(state, features, norm, detector):
  state = base.check_state(state, shaping.HeadState, detector=detector)
  h = base.features_arg(features, detector=detector, dim=state.head.kernel.shape[0])
  if norm not in _NORMS:
    raise ValueError(f'norm must be one of {_NORMS}, got {norm!r}.')
  return state, h


def gradient_uncertainty(state: shaping.HeadState, features, *, norm='l2', include_bias=False):
  """Negated norm of the last layer's gradient of the cross-entropy to the predicted class.

    ŷ = argmax_k z_k,  L = −log softmax(z)_ŷ,  ∂L/∂W = h ⊗ (p − e_ŷ),  score = −‖∂L/∂W‖

  (Oberdiek, Rottmann & Gottschalk 2018, "Classification uncertainty of deep neural networks based on gradient
  information", Section 3.) The predicted label stands in for the unknown true one, so the gradient is the
  update the network would make to become surer of its own prediction: small for confident in-distribution
  examples. The paper computes several statistics of the last layer's gradient (its 1- and 2-norms, maximum,
  ...) and feeds them to a meta classifier; this is the single-statistic score, 2-norm of the weight gradient
  by default. Exact through the head from features (a closed form, no per-example gradient is materialised).

  Args:
    state: `HeadState` (from `ood_jax.detectors.shaping.fit_head`).
    features: `[N, D]` penultimate features.
    norm: 'l1', 'l2' or 'max' (the largest absolute entry).
    include_bias: also count the bias gradient p − e_ŷ.

  Returns:
    `[N]` scores ≤ 0.
  """
  state, h = _gradient_args(state, features, norm, 'gradient_uncertainty')
  return _gradient_uncertainty(state, h, norm=norm, include_bias=bool(include_bias))


@functools.partial(jax.jit, static_argnames=('norm', 'include_bias'))
def _gradient_uncertainty(state, h, *, norm, include_bias):
  h = base.compute(h)
  z = base.head_logits(h, state.head)
  p = jax.nn.softmax(z, axis=-1)
  delta = p - jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=h.dtype)
  return -_outer_norm(h, delta, norm, include_bias)


registry.register('gradient_uncertainty', needs={'features', 'head'}, fit=shaping.fit_head,
                  score=gradient_uncertainty, defaults={'norm': 'l2', 'include_bias': False},
                  grid={'norm': _NORMS}, paper='Oberdiek, Rottmann & Gottschalk 2018', year=2018)


def gradient_confounding(state: shaping.HeadState, features, *, include_bias=True):
  """Squared 2-norm of the last layer's gradient of the binary cross-entropy of softmax(z) to all-ones labels.

    L = Σ_k BCE(p_k, 1) = −Σ_k log p_k,  ∂L/∂z = K·p − 1,  score = ‖∂L/∂W‖₂² + ‖∂L/∂b‖₂²
      = (‖h‖₂² + 1)·‖K·p − 1‖₂²

  (Lee & AlRegib 2020, "Gradients as a measure of uncertainty in neural networks"; pytorch-ood's
  `GradUncertainty` restricted to the final layer with its `param_filter`.) The "confounding" label claims every
  class at once; the gradient vanishes for a uniform softmax and grows with confidence, so, as pytorch-ood
  concludes (its outlier score is the negation), a large value means in-distribution. pytorch-ood sums over
  every parameter of the model by default; here the final layer (weights and bias), exact in closed form.
  The paper trains a classifier on per-layer gradient features; this is the training-free score.

  Args:
    state: `HeadState`.
    features: `[N, D]`.
    include_bias: count the bias gradient (pytorch-ood's head filter selects both).

  Returns:
    `[N]` scores ≥ 0.
  """
  state, h = _gradient_args(state, features, 'l2', 'gradient_confounding')
  return _gradient_confounding(state, h, include_bias=bool(include_bias))


@functools.partial(jax.jit, static_argnames='include_bias')
def _gradient_confounding(state, h, *, include_bias):
  h = base.compute(h)
  z = base.head_logits(h, state.head)
  delta = z.shape[-1] * jax.nn.softmax(z, axis=-1) - 1.0
  return _outer_norm(h, delta, 'l2', include_bias) ** 2


registry.register('gradient_confounding', needs={'features', 'head'}, fit=shaping.fit_head,
                  score=gradient_confounding, defaults={'include_bias': True}, paper='Lee & AlRegib 2020',
                  year=2020)
