"""Gradient detectors: GradNorm and ODIN.

* GradNorm (Huang, Geng & Li 2021, "On the importance of gradients for detecting distributional shifts
  in the wild", eq. 3–4): S(x) = ‖∂ D_KL(u ‖ softmax(f(x)/T)) / ∂W‖₁, the L1 norm of the gradient of
  the KL divergence from the uniform distribution to the softmax with respect to the final layer's
  weights, T = 1. Per-example gradients come from `jax.vmap(jax.grad(...))`: one batched pass.
* ODIN (Liang, Li & Srikant 2018, "Enhancing the reliability of out-of-distribution image detection in
  neural networks", eq. 2): temperature scaling plus a signed-gradient input perturbation
  (`ood_jax.scores.odin` is its door).
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

__all__ = ['gradnorm', 'odin']


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
  if not callable(apply_fn):
    raise ValueError("detector 'odin' needs apply_fn (inputs -> logits) and inputs; got no apply_fn.")
  if inputs is None:
    raise ValueError("detector 'odin' needs inputs (it perturbs them); got None.")
  inputs = _checks.floating('inputs', inputs, min_ndim=1)
  _checks.positive('temperature', temperature)
  _checks.nonnegative('epsilon', epsilon)

  def scaled_logits(x):
    out = apply_fn(x)
    logits = base.any_logits(out['logits'] if isinstance(out, Mapping) else out, name='apply_fn(inputs)')
    return logits / jnp.asarray(temperature, dtype=logits.dtype)

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
