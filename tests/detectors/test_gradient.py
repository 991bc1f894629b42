"""Tests for ood_jax.detectors.gradient: GradNorm against the closed form and a per-example loop; ODIN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ood_jax import detectors
from ood_jax import scores
from ood_jax.detectors import gradient
from ood_jax.detectors import shaping


def _problem(seed=0, n=37, d=6, k=4):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((d, k)).astype(np.float32),
          rng.standard_normal(k).astype(np.float32))


def _ref_gradnorm(h, w, b, temperature, include_bias):
  """Closed form: ∂KL(u ‖ softmax(z/T))/∂W = h ⊗ (p − u)/T, so ‖·‖₁ = ‖h‖₁·‖p − u‖₁/T."""
  h = h.astype(np.float64)
  p = special.softmax((h @ w + b) / temperature, axis=1)
  g = np.abs(p - 1.0 / w.shape[1]).sum(1) / temperature
  return np.abs(h).sum(1) * g + (g if include_bias else 0.0)


@pytest.mark.parametrize('temperature,include_bias', [(1.0, False), (2.5, True)])
def test_gradnorm_matches_closed_form(temperature, include_bias):
  h, w, b = _problem()
  det = detectors.get('gradnorm')
  state = det.fit(head=(w, b))
  # chunk_size 8 does not divide 37: the padded tail must be dropped correctly.
  out = jax.jit(lambda s, f: gradient.gradnorm(s, f, temperature=temperature, include_bias=include_bias,
                                               chunk_size=8))(state, h)
  np.testing.assert_allclose(out, _ref_gradnorm(h, w, b, temperature, include_bias), rtol=1e-5)
  np.testing.assert_allclose(det.score(state, {'features': h}, temperature=temperature, include_bias=include_bias),
                             out, rtol=1e-6)


def test_gradnorm_matches_per_example_loop():
  h, w, b = _problem(seed=1, n=5)

  def kl(params, x):
    logp = jax.nn.log_softmax(x @ params[0] + params[1])
    return -jnp.mean(logp) - jnp.log(4.0)

  loop = [float(jnp.sum(jnp.abs(jax.grad(kl)((w, b), x)[0]))) for x in h]
  np.testing.assert_allclose(gradient.gradnorm(shaping.fit_head(head=(w, b)), h), loop, rtol=1e-5)


def test_odin_wrapper_equals_scores_odin():
  h, w, b = _problem(seed=2, n=9)
  apply_logits = lambda x: x @ jnp.asarray(w) + jnp.asarray(b)
  apply_dict = lambda x: {'logits': apply_logits(x), 'features': x}
  det = detectors.get('odin')
  out = jax.jit(lambda x: det.score((), {'inputs': x, 'apply_fn': apply_dict}, temperature=10.0, epsilon=0.01))(h)
  ref = scores.odin(apply_logits, h, temperature=10.0, epsilon=0.01)
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  # One implementation: `scores.odin` is a door into the detector's function.
  door = jax.jit(lambda x: scores.odin(apply_logits, x, temperature=10.0, epsilon=0.01))(h)
  np.testing.assert_array_equal(door, jax.jit(lambda x: gradient.odin(apply_logits, x, temperature=10.0,
                                                                       epsilon=0.01))(h))
  # Hand-derived: ∇ₓ log S_ŷ = (W_ŷ − W softmax(z/T))/T, x̃ = x + ε sign(∇).
  z = (h.astype(np.float64) @ w + b) / 10.0
  p = special.softmax(z, axis=1)
  grad = (w[:, z.argmax(1)].T - p @ w.T) / 10.0
  x_t = h + 0.01 * np.sign(grad)
  np.testing.assert_allclose(out, special.softmax((x_t @ w + b) / 10.0, axis=1).max(1), rtol=1e-5)


def test_errors():
  h, w, b = _problem()
  with pytest.raises(ValueError, match='runs the model'):
    detectors.get('odin').score((), {'features': h})
  with pytest.raises(ValueError, match='apply_fn'):
    gradient.odin(None, h)
  with pytest.raises(ValueError, match="'gradnorm' needs features"):
    detectors.get('gradnorm').score(shaping.fit_head(head=(w, b)), {'logits': h @ w})
  with pytest.raises(ValueError, match='HeadState'):
    gradient.gradnorm((), h)


def _fd_head_gradient(loss, h, w, b, eps=1e-6):
  """Central finite differences of loss(z) at z = hW + b w.r.t. (W, b), float64, for one example h `[D]`."""
  params = np.concatenate([w.ravel(), b]).astype(np.float64)
  d, k = w.shape

  def f(theta):
    return loss(h.astype(np.float64) @ theta[:d * k].reshape(d, k) + theta[d * k:])

  grad = np.zeros_like(params)
  for i in range(params.size):
    step = np.zeros_like(params)
    step[i] = eps
    grad[i] = (f(params + step) - f(params - step)) / (2 * eps)
  return grad[:d * k], grad[d * k:]


def _norm(g, norm):
  return {'l1': np.abs(g).sum(), 'l2': np.sqrt((g ** 2).sum()), 'max': np.abs(g).max()}[norm]


def test_last_layer_gradient_scores_match_finite_differences():
  """Oberdiek et al. 2018: −‖∂CE(·, ŷ)/∂W‖; Lee & AlRegib 2020 (pytorch-ood `GradUncertainty` on the head's
  weight and bias, sign flipped to "higher = ID" as its outlier score is −Σ‖g‖²): ‖∂ Σ_k −log p_k/∂(W, b)‖²."""
  h, w, b = _problem(seed=3, n=6, d=4, k=3)
  state = shaping.fit_head(head=(w, b))
  ce_pred = lambda z: -special.log_softmax(z)[np.argmax(z)]
  confounding = lambda z: -special.log_softmax(z).sum()
  grads = [_fd_head_gradient(ce_pred, x, w, b) for x in h]
  unc = detectors.get('gradient_uncertainty')
  for norm, bias in (('l1', True), ('l2', False), ('max', True)):  # three compilations: norm and bias are static
    out = jax.jit(lambda s, f, norm=norm, bias=bias: unc.score(s, {'features': f}, norm=norm,
                                                               include_bias=bias))(state, h)
    ref = [-_norm(np.concatenate([gw, gb]) if bias else gw, norm) for gw, gb in grads]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7, err_msg=f'{norm} {bias}')
  conf = detectors.get('gradient_confounding')
  ref = [np.sum(np.concatenate(_fd_head_gradient(confounding, x, w, b)) ** 2) for x in h]
  np.testing.assert_allclose(jax.jit(lambda s, f: conf.score(s, {'features': f}))(state, h), ref, rtol=1e-5)
  with pytest.raises(ValueError, match='norm must be one of'):
    gradient.gradient_uncertainty(state, h, norm='l3')
  with pytest.raises(ValueError, match='HeadState'):
    gradient.gradient_confounding((), h)


def test_iodin_moves_one_entry_per_example():
  h, w, b = _problem(seed=4, n=9)
  apply_logits = lambda x: x @ jnp.asarray(w) + jnp.asarray(b)
  det = detectors.get('iodin')
  out = jax.jit(lambda x: det.score((), {'inputs': x, 'apply_fn': apply_logits}, temperature=10.0,
                                    epsilon=0.05))(h)
  # Hand-derived, as for ODIN: ∇ₓ log S_ŷ = (W_ŷ − W softmax(z/T))/T; only the largest |∇| entry moves.
  z = (h.astype(np.float64) @ w + b) / 10.0
  grad = (w[:, z.argmax(1)].T - special.softmax(z, axis=1) @ w.T) / 10.0
  top = np.abs(grad).argmax(1)
  x_t = h.astype(np.float64).copy()
  x_t[np.arange(len(h)), top] += 0.05 * np.sign(grad[np.arange(len(h)), top])
  np.testing.assert_allclose(out, special.softmax((x_t @ w + b) / 10.0, axis=1).max(1), rtol=1e-5)
  assert not np.allclose(out, special.softmax(z, axis=1).max(1), rtol=1e-3)  # the step did move the score
  with pytest.raises(ValueError, match="'iodin' needs apply_fn"):
    gradient.iodin(None, h)
