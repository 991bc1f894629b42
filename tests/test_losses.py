"""Tests of ood_jax.losses against float64 NumPy formulas written from the papers' equations.

The references below are deliberately naive (loops, explicit probabilities, mpmath-free float64)
and share no code with the library; extreme regimes are checked against closed forms.
"""

import functools
import warnings

import jax
from jax.experimental import checkify
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from configs import digits as digits_config
from ood_jax.trainer import experiment
from ood_jax import layers
from ood_jax import losses


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  shifted = z - z.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_logsumexp(z, axis=-1):
  z = np.asarray(z, np.float64)
  top = z.max(axis=axis, keepdims=True)
  return np.squeeze(top + np.log(np.exp(z - top).sum(axis=axis, keepdims=True)), axis=axis)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _pick(a, y):
  return np.take_along_axis(np.asarray(a), np.asarray(y)[..., None], axis=-1)[..., 0]


def _data(shape=(6, 5), seed=0, scale=2.0, negative=False):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=shape) * scale
  if negative:
    z = -np.abs(z)
  y = rng.integers(0, shape[-1], size=shape[:-1])
  return z.astype(np.float32), y.astype(np.int32)


# ------------------------------------------------------------------------------------------
# Value tests against the paper formulas, under jit.


def _np_logit_norm(z, y, tau=0.04, eps=1e-7):
  # Wei et al. 2022 eq. 4, −log softmax(z / (τ·(‖z‖ + ε)))_y, one row at a time. ε = 1e-7: the authors' code and
  # OpenOOD's LogitNormLoss; ε = 0: pytorch-ood's documented LogitNorm (not installed here, so written out).
  rows = np.reshape(np.asarray(z, np.float64), (-1, np.shape(z)[-1]))
  out = []
  for zi, yi in zip(rows, np.ravel(y)):
    scaled = zi / (tau * (np.sqrt(np.sum(zi**2)) + eps))
    out.append(np.log(np.sum(np.exp(scaled))) - scaled[yi])
  return np.array(out).reshape(np.shape(y))


REFERENCES = {
    'softmax_cross_entropy': lambda z, y: -_pick(_np_log_softmax(z), y),
    # Macêdo et al. 2021, eq. 5: −log(exp(−E_s·D_y) / Σ_j exp(−E_s·D_j)) with logits = −D.
    'isomax': lambda z, y: -_pick(_np_log_softmax(10.0 * np.asarray(z, np.float64)), y),
    # Padhy et al. 2020: −log σ(z_y) − Σ_{k≠y} log(1 − σ(z_k)).
    'one_vs_all': lambda z, y: np.array([
        -np.log(_sigmoid(zi[yi])) - sum(np.log(1 - _sigmoid(zi[k])) for k in range(len(zi)) if k != yi)
        for zi, yi in zip(np.reshape(z, (-1, np.shape(z)[-1])), np.ravel(y))]).reshape(np.shape(y)),
    # Padhy et al. 2020: p = 2σ(−d), −log p_y − Σ_{k≠y} log(1 − p_k).
    'distance_one_vs_all': lambda z, y: np.array([
        -np.log(2 * _sigmoid(zi[yi])) - sum(np.log(1 - 2 * _sigmoid(zi[k])) for k in range(len(zi)) if k != yi)
        for zi, yi in zip(np.reshape(z, (-1, np.shape(z)[-1])), np.ravel(y))]).reshape(np.shape(y)),
    # Wu et al. 2022, eq. 0.14.
    'ice_in': lambda z, y: -_pick(np.asarray(z, np.float64), y),
    'logit_norm': _np_logit_norm,
}


@pytest.mark.parametrize('name', sorted(REFERENCES))
@pytest.mark.parametrize('shape', [(7, 5), (2, 3, 4), (5, 1)])
def test_labelled_losses_match_reference(name, shape):
  z, y = _data(shape, seed=len(name), negative=name in ('isomax', 'distance_one_vs_all', 'ice_in'))
  got = jax.jit(getattr(losses, name))(z, y)
  assert got.shape == shape[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(got, REFERENCES[name](z, y), rtol=2e-5, atol=2e-6)


def test_isomax_entropic_scale_and_dm():
  z, y = _data((8, 4), seed=3, negative=True)
  got = jax.jit(functools.partial(losses.isomax, entropic_scale=3.0))(z, y)
  np.testing.assert_allclose(got, -_pick(_np_log_softmax(3.0 * z.astype(np.float64)), y), rtol=1e-5)
  # E_s = 1 is the DM loss: softmax cross-entropy on the distance logits.
  np.testing.assert_allclose(losses.isomax(z, y, entropic_scale=1.0), losses.softmax_cross_entropy(z, y), rtol=1e-6)


def test_outlier_exposure_is_cross_entropy_to_uniform():
  z, _ = _data((9, 6), seed=4)
  got = jax.jit(losses.outlier_exposure)(z)
  want = -np.mean(_np_log_softmax(z), axis=-1)  # −Σ_k (1/K) log p_k
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(losses.outlier_exposure(np.full((2, 6), 3.0, np.float32)), np.log(6.0), rtol=1e-6)


def _np_outlier_exposure(z):
  return -np.mean(_np_log_softmax(np.asarray(z, np.float64)), axis=-1)  # float64, max-shifted


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_outlier_exposure_exact_at_large_logits(dtype):
  k = 10
  # Equal logits of ±1e4 (bfloat16 rounds 1e4 to 9984): exactly uniform, so exactly log K. The
  # unshifted logsumexp(z) − mean(z) gave 2.30273 here, 1.4e-4 off.
  equal = jnp.asarray(np.stack([np.full(k, 1e4), np.full(k, -1e4), np.zeros(k)]), dtype)
  got = np.asarray(jax.jit(losses.outlier_exposure)(equal))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np.log(k), rtol=0, atol=np.spacing(np.float32(np.log(k))))
  # Mixed scales: near-uniform rows at a 1e4 offset (where cancellation would cost ~1e-3 of a
  # value ~1), one-hot-like rows spanning ±1e4, and ordinary logits.
  rng = np.random.default_rng(20)
  mixed = np.stack([1e4 + rng.integers(-4, 5, size=k) * 0.5, -1e4 + rng.integers(-4, 5, size=k) * 0.5,
                    np.r_[1e4, -1e4, np.zeros(k - 2)], rng.normal(size=k) * 3, np.r_[1e4, np.full(k - 1, 1e4 - 20)]])
  z = jnp.asarray(mixed, dtype)
  want = _np_outlier_exposure(np.asarray(z.astype(jnp.float32)))
  np.testing.assert_allclose(jax.jit(losses.outlier_exposure)(z), want, rtol=1e-6)


def test_outlier_exposure_gradient_is_softmax_minus_uniform():
  # Analytic gradient of logsumexp(z) − mean(z): softmax(z) − 1/K, in float64, at ±1e4 and mixed scales.
  z = np.array([[1e4, 1e4, 1e4, 1e4], [1e4, 9999.0, -1e4, 0.0], [0.5, -1.0, 2.0, 0.0], [-1e4, -1e4, -1e4 + 2, -1e4]])
  want = np.exp(_np_log_softmax(z)) - 1.0 / z.shape[-1]
  grad = jax.jit(jax.grad(lambda x: losses.outlier_exposure(x).sum()))
  np.testing.assert_allclose(grad(jnp.asarray(z, jnp.float32)), want, rtol=1e-6, atol=1e-7)
  bf16_grad = grad(jnp.asarray(z, jnp.bfloat16))
  assert np.all(np.isfinite(np.asarray(bf16_grad, np.float32)))
  with jax.enable_x64(True):
    np.testing.assert_allclose(jax.grad(lambda x: losses.outlier_exposure(x).sum())(jnp.asarray(z)), want,
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize('m_in,m_out', [(-25.0, -7.0), (-23.0, -5.0), (-1.0, -2.0)])
def test_energy_margins(m_in, m_out):
  z, _ = _data((10, 4), seed=5, scale=8.0)
  energy = -_np_logsumexp(z)
  got_in = jax.jit(functools.partial(losses.energy_in_margin, margin=m_in))(z)
  got_out = jax.jit(functools.partial(losses.energy_out_margin, margin=m_out))(z)
  np.testing.assert_allclose(got_in, np.maximum(energy - m_in, 0) ** 2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_out, np.maximum(m_out - energy, 0) ** 2, rtol=1e-5, atol=1e-5)


def test_ice_out_matches_paper():
  h, _ = _data((8, 5), seed=6, negative=True)
  got = jax.jit(losses.ice_out)(h)
  want = -np.log(1 - np.exp(h.astype(np.float64).max(axis=-1)))  # Wu et al. 2022, eq. 0.13
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_smot_smoothing_and_loss():
  t = np.array([255.0, 245.0, 100.0, 0.0], np.float32)
  got = jax.jit(functools.partial(losses.smot_smoothing, temperature=10.0))(t)
  np.testing.assert_allclose(got, 1 - np.exp((t.astype(np.float64) - 255) / 10), rtol=1e-6, atol=1e-7)
  assert float(got[0]) == 0.0
  np.testing.assert_allclose(float(got[1]), 1 - np.exp(-1.0), rtol=1e-6)

  z, y = _data((4, 3), seed=7)
  zm, _ = _data((4, 3), seed=8)
  eps = np.asarray(got)
  loss = jax.jit(functools.partial(losses.smooth_training, weight=0.1))(z, zm, y, eps)
  soft = (1 - eps[:, None]) * np.eye(3)[y] + eps[:, None] / 3  # SMOT, eq. 5
  want = 0.9 * -_pick(_np_log_softmax(z), y) + 0.1 * -np.sum(soft * _np_log_softmax(zm), axis=-1)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # A scalar ε broadcasts.
  np.testing.assert_allclose(losses.smooth_training(z, zm, y, np.float32(eps[1])),
                             losses.smooth_training(z, zm, y, np.full(4, eps[1], np.float32)), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Contrastive losses: loop references over anchors and pairs.


def _embeddings(n=6, v=2, d=5, seed=0, labels=(0, 1, 0, 2, 1, 0)):
  rng = np.random.default_rng(seed)
  e = rng.normal(size=(n, v, d))
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  return e.astype(np.float32), np.asarray(labels[:n], np.int32)


def _np_supcon(e, y, tau):
  n, v, d = e.shape
  flat = e.reshape(n * v, d).astype(np.float64)
  lab = np.repeat(y, v)
  out = []
  for i in range(n * v):
    others = [a for a in range(n * v) if a != i]
    denom = np.log(sum(np.exp(flat[i] @ flat[a] / tau) for a in others))
    pos = [p for p in others if lab[p] == lab[i]]
    out.append(-np.mean([flat[i] @ flat[p] / tau - denom for p in pos]) if pos else 0.0)
  return np.array(out)


def _np_reweight_paper(e, y, tau, mb, cb, mw, cw):
  n, v, d = e.shape
  flat = e.reshape(n * v, d).astype(np.float64)
  lab = np.repeat(y, v)
  out = []
  for k in range(n * v):
    neg = [flat[k] @ flat[i] for i in range(n * v) if lab[i] != lab[k]]
    pos = [flat[k] @ flat[j] for j in range(n * v) if j != k and lab[j] == lab[k]]
    if not neg or not pos:
      out.append(0.0)
      continue
    # ReweightOOD (Regmi et al. 2024) eq. 3, literally.
    between = np.log(sum(np.exp(1 / (1 + np.exp(-s * mb - cb)) * s / tau) for s in neg))
    within = np.log(sum(np.exp(1 / (1 + np.exp(s * mw + cw)) * s / tau) for s in pos))
    out.append(between - within)
  return np.array(out)


def _np_reweight_openood(e, y, tau, m_b, c_b, m_w, c_w):
  # OpenOOD's trainer in its own sign convention: views concatenated view-major, pairs i < j.
  flat = np.concatenate([e[:, 0], e[:, 1]], axis=0).astype(np.float64)
  lab = np.concatenate([y, y])
  pos, neg = [], []
  for i in range(len(flat)):
    for j in range(i + 1, len(flat)):
      (pos if lab[i] == lab[j] else neg).append(flat[i] @ flat[j])
  pos, neg = np.array(pos), np.array(neg)
  w_pos = _sigmoid(-(pos * m_w - c_w))
  w_neg = _sigmoid(neg * m_b - c_b)
  total = _np_logsumexp(-w_pos * pos / tau, axis=0) + _np_logsumexp(w_neg * neg / tau, axis=0)
  return total if total > 0 else np.exp(total) - 1  # ELU


@pytest.mark.parametrize('tau', [0.1, 0.07, 1.0])
def test_supervised_contrastive_matches_loop(tau):
  e, y = _embeddings(labels=(0, 1, 0, 2, 1, 3))  # class 2 and 3: only their own other view
  got = jax.jit(functools.partial(losses.supervised_contrastive, temperature=tau))(e, y)
  assert got.shape == (12,)
  np.testing.assert_allclose(got, _np_supcon(e, y, tau), rtol=1e-5, atol=1e-5)


def test_supervised_contrastive_anchor_without_positive_is_zero():
  e, y = _embeddings(n=3, v=1, labels=(0, 1, 1))
  got = losses.supervised_contrastive(e, y)
  assert float(got[0]) == 0.0
  np.testing.assert_allclose(got, _np_supcon(e, y, 0.1), rtol=1e-5)


@pytest.mark.parametrize('between,within', [((5.0, -4.0), (2.0, 1.0)), ((5.0, -2.0), (2.0, 1.0)),
                                            ((1.0, 0.5), (-1.0, 0.0))])
def test_reweighted_contrastive_paper_matches_eq3(between, within):
  e, y = _embeddings(n=5, v=2, labels=(0, 1, 0, 2, 1), seed=1)
  fn = functools.partial(losses.reweighted_contrastive, between=between, within=within)
  got = jax.jit(fn)(e, y)
  np.testing.assert_allclose(got, _np_reweight_paper(e, y, 0.1, *between, *within), rtol=1e-5, atol=1e-5)


def test_reweighted_contrastive_single_class_batch_is_zero():
  e, y = _embeddings(n=3, labels=(1, 1, 1))
  np.testing.assert_array_equal(losses.reweighted_contrastive(e, y), 0.0)


def test_reweighted_contrastive_openood_variant():
  e, y = _embeddings(n=6, v=2, labels=(0, 1, 0, 2, 1, 0), seed=2)
  # OpenOOD (m_b, c_b, m_w, c_w) = (5, 4, 2, 1) == between=(5, −4), within=(2, −1) here.
  fn = functools.partial(losses.reweighted_contrastive, between=(5.0, -4.0), within=(2.0, -1.0), variant='openood')
  got = jax.jit(fn)(e, y)
  assert got.shape == (12,)
  np.testing.assert_allclose(float(jnp.mean(got)), _np_reweight_openood(e, y, 0.1, 5.0, 4.0, 2.0, 1.0), rtol=1e-5)


def test_reweighted_contrastive_stop_gradient_weights():
  with jax.enable_x64(True):
    e, y = _embeddings(n=4, v=2, labels=(0, 1, 0, 1), seed=3)
    e = jnp.asarray(e, jnp.float64)
    base = np.asarray(e)

    def frozen_weights_loss(x):
      # Loss with the reweighting factors computed from the fixed point `base`, in NumPy.
      flat_b = base.reshape(8, -1)
      flat = x.reshape(8, -1)
      lab = np.repeat(np.asarray(y), 2)
      total = 0.0
      for k in range(8):
        neg = [(flat_b[k] @ flat_b[i], flat[k] @ flat[i]) for i in range(8) if lab[i] != lab[k]]
        pos = [(flat_b[k] @ flat_b[j], flat[k] @ flat[j]) for j in range(8) if j != k and lab[j] == lab[k]]
        total += np.log(sum(np.exp(_sigmoid(5 * sb - 4) * s / 0.1) for sb, s in neg))
        total -= np.log(sum(np.exp(_sigmoid(-(2 * sw + 1)) * s / 0.1) for sw, s in pos))
      return total

    grad = jax.grad(lambda x: losses.reweighted_contrastive(x, y).sum())(e)
    numeric = np.zeros(base.size)
    for i in range(base.size):
      step = np.zeros(base.size)
      step[i] = 1e-6
      numeric[i] = (frozen_weights_loss(base + step.reshape(base.shape)) -
                    frozen_weights_loss(base - step.reshape(base.shape))) / 2e-6
    np.testing.assert_allclose(np.ravel(grad), numeric, rtol=1e-5, atol=1e-7)
    grad_through = jax.grad(lambda x: losses.reweighted_contrastive(x, y, stop_gradient_weights=False).sum())(e)
    assert np.max(np.abs(grad_through - grad)) > 1e-3
    check_grads(lambda x: losses.reweighted_contrastive(x, y, stop_gradient_weights=False), (e,), order=1,
                modes=['rev'])


# ------------------------------------------------------------------------------------------
# Gradients, extremes, dtypes.

LABELLED = ['softmax_cross_entropy', 'isomax', 'one_vs_all', 'distance_one_vs_all', 'ice_in', 'logit_norm']
UNLABELLED = ['outlier_exposure', 'energy_in_margin', 'energy_out_margin', 'ice_out']


@pytest.mark.parametrize('name', LABELLED + UNLABELLED)
def test_check_grads(name):
  with jax.enable_x64(True):
    z, y = _data((4, 3), seed=9, scale=3.0, negative=True)
    z = jnp.asarray(z, jnp.float64) - 0.5  # away from the floors at 0
    fn = getattr(losses, name)
    if name in ('energy_in_margin', 'energy_out_margin'):
      fn = functools.partial(fn, margin=-1.0)  # active margins so the gradient is not trivially 0
    args = (z, jnp.asarray(y)) if name in LABELLED else (z,)
    f = (lambda x: fn(x, args[1])) if name in LABELLED else fn
    check_grads(f, (z,), order=2 if name != 'ice_out' else 1, modes=['rev'])


def test_contrastive_check_grads():
  with jax.enable_x64(True):
    e, y = _embeddings(n=4, v=2, labels=(0, 1, 0, 2))
    check_grads(lambda x: losses.supervised_contrastive(x, y), (jnp.asarray(e, jnp.float64),), order=1, modes=['rev'])
    # Numerical differentiation moves the weights too, so compare with the weights differentiated.
    check_grads(lambda x: losses.reweighted_contrastive(x, y, stop_gradient_weights=False),
                (jnp.asarray(e, jnp.float64),), order=1, modes=['rev'])


def test_isomax_through_zero_prototypes_has_finite_nonzero_gradient():
  # The IsoMax start: zero prototypes, and features that sit on them too.
  features = jnp.zeros((4, 3))
  prototypes = jnp.zeros((5, 3))
  y = jnp.array([0, 1, 2, 3])

  def loss(f, p):
    return jnp.mean(losses.isomax(layers.negative_distances(f, p), y))

  gf, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(features, prototypes)
  assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gp))
  value = loss(features, prototypes)
  np.testing.assert_allclose(float(value), np.log(5.0), rtol=1e-6)  # uniform at the start
  # One step off the singular point, the gradient is the analytic one and non-zero.
  f1 = jnp.array([[1.0, 0.0, 0.0]] * 4)
  gp1 = jax.grad(loss, argnums=1)(f1, prototypes)
  assert np.all(np.isfinite(gp1)) and np.abs(gp1).max() > 0


def test_extreme_regimes_are_finite_and_exact():
  big = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4]], np.float32)
  y = np.array([0, 0], np.int32)
  for name in ('softmax_cross_entropy', 'one_vs_all'):
    out = np.asarray(getattr(losses, name)(big, y))
    assert np.all(np.isfinite(out)), name
  np.testing.assert_allclose(losses.softmax_cross_entropy(big, y), [0.0, 2e4], rtol=1e-6)
  np.testing.assert_allclose(losses.one_vs_all(big, y), [np.log1p(np.exp(-1e4)) + np.log(2), 2e4], rtol=1e-6)
  for name in ('outlier_exposure', 'energy_in_margin', 'energy_out_margin'):
    assert np.all(np.isfinite(np.asarray(getattr(losses, name)(big)))), name
  np.testing.assert_allclose(losses.outlier_exposure(big), [1e4 - 0.0, 1e4 + 1e4 / 3], rtol=1e-6)

  # Distances 0 and 1e4.
  dist = np.array([[0.0, -1e4, 0.0], [-1e4, 0.0, -1e4]], np.float32)
  for name in ('isomax', 'distance_one_vs_all'):
    value = np.asarray(getattr(losses, name)(dist, np.array([0, 1], np.int32)))
    assert np.all(np.isfinite(value)), name
    grad = jax.grad(lambda d: getattr(losses, name)(d, jnp.array([0, 1])).sum())(jnp.asarray(dist))
    assert np.all(np.isfinite(grad)), name
  # Non-target at distance 0 is floored at eps = 1e-6: −log tanh(5e-7) + target term at d = 0.
  np.testing.assert_allclose(losses.distance_one_vs_all(dist, np.array([0, 1], np.int32)),
                             [-np.log(np.tanh(5e-7)) + np.log1p(np.exp(-1e4)) * 0, 0.0],
                             rtol=1e-5, atol=1e-6)

  # ICE: max h → 0⁻ stays finite; exact away from the cap.
  h = np.array([[-1e-30, -5.0], [0.0, -1.0], [-1e-3, -2.0], [-1e4, -1e4]], np.float32)
  out = np.asarray(losses.ice_out(h))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[2], -np.log(-np.expm1(-1e-3)), rtol=1e-6)
  np.testing.assert_allclose(out[3], 0.0, atol=1e-30)
  grad = jax.grad(lambda x: losses.ice_out(x).sum())(jnp.asarray(h))
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('name', LABELLED)
def test_bfloat16_inputs(name):
  z, y = _data((6, 4), seed=10, negative=name in ('isomax', 'distance_one_vs_all', 'ice_in'))
  zb = jnp.asarray(z, jnp.bfloat16)
  got = jax.jit(getattr(losses, name))(zb, y)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, REFERENCES[name](np.asarray(zb, np.float64), y), rtol=1e-5, atol=1e-5)


def test_bfloat16_contrastive_and_unlabelled():
  e, y = _embeddings()
  eb = jnp.asarray(e, jnp.bfloat16)
  got = losses.supervised_contrastive(eb, y)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_supcon(np.asarray(eb, np.float64), y, 0.1), rtol=1e-4, atol=1e-4)
  z, _ = _data((5, 4), seed=11)
  zb = jnp.asarray(z, jnp.bfloat16)
  np.testing.assert_allclose(losses.outlier_exposure(zb), -np.mean(_np_log_softmax(np.asarray(zb, np.float64)), -1),
                             rtol=1e-5)


def test_losses_vmap():
  z, y = _data((3, 4, 5), seed=12)
  got = jax.vmap(losses.isomax)(z, y)
  np.testing.assert_allclose(got, losses.isomax(z, y), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Bad input.


def test_errors():
  z, y = _data((4, 3))
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
    losses.isomax(z, np.array([0, 1, 2, 3], np.int32))
  with pytest.raises(ValueError, match='labels must lie'):
    losses.one_vs_all(z, np.array([0, -1, 2, 1], np.int32))
  with pytest.raises(ValueError, match='labels must have shape'):
    losses.softmax_cross_entropy(z, y[:3])
  with pytest.raises(TypeError, match='labels'):
    losses.ice_in(z, y.astype(np.float32))
  with pytest.raises(TypeError, match='logits'):
    losses.distance_one_vs_all(z.astype(np.int32), y)
  with pytest.raises(ValueError, match='logits must have rank'):
    losses.isomax(np.float32(1.0), np.int32(0))
  with pytest.raises(TypeError, match='outlier_logits'):
    losses.outlier_exposure(np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match='entropic_scale'):
    losses.isomax(z, y, entropic_scale=0.0)
  with pytest.raises(TypeError):
    losses.isomax(z, y, 10.0)  # hyperparameters are keyword-only
  e, ye = _embeddings()
  with pytest.raises(ValueError, match='embeddings must have rank 3'):
    losses.supervised_contrastive(e[:, 0], ye)
  with pytest.raises(ValueError, match='labels must have shape'):
    losses.reweighted_contrastive(e, ye[:-1])
  with pytest.raises(ValueError, match='temperature'):
    losses.supervised_contrastive(e, ye, temperature=-0.1)
  with pytest.raises(ValueError, match='variant'):
    losses.reweighted_contrastive(e, ye, variant='simclr')
  with pytest.raises(ValueError, match='N·V'):
    losses.supervised_contrastive(e[:1, :1], ye[:1])
  with pytest.raises(ValueError, match='masked_logits'):
    losses.smooth_training(z, z[:2], y, 0.1)
  with pytest.raises(ValueError, match='smoothing must lie'):
    losses.smooth_training(z, z, y, np.float32(1.5))
  with pytest.raises(ValueError, match='smoothing must be a scalar'):
    losses.smooth_training(z, z, y, np.zeros(3, np.float32))
  with pytest.raises(ValueError, match='weight'):
    losses.smooth_training(z, z, y, 0.1, weight=1.5)
  with pytest.raises(TypeError, match='threshold'):
    losses.smot_smoothing(np.array([3], np.int32))


# ------------------------------------------------------------------------------------------
# Out-of-range labels and hyperparameters under jit: NaN (or a checkify error), never a silently
# wrong finite value; valid entries unchanged bit for bit.

_SMOOTHING = np.linspace(0.0, 1.0, 8).astype(np.float32)
LABEL_LOSSES = {
    'softmax_cross_entropy': losses.softmax_cross_entropy,
    'isomax': losses.isomax,
    'one_vs_all': losses.one_vs_all,
    'distance_one_vs_all': losses.distance_one_vs_all,
    'ice_in': losses.ice_in,
    'smooth_training': lambda z, y: losses.smooth_training(z, z[::-1] * 0.5, y, _SMOOTHING),
    'logit_norm': losses.logit_norm,
    'mixup_cross_entropy': lambda z, y: losses.mixup_cross_entropy(z, y, np.roll(_GOOD, 1), 0.3),
    'confidence_branch': lambda z, y: losses.confidence_branch(z, z[:, 0], y, weight=0.1),
}
_BAD = np.array([0, -1, 2, 4, 1, 9, -7, 3], np.int32)  # K = 4: −1 (the outlier label), 4, 9 and −7 are invalid
_INVALID = (_BAD < 0) | (_BAD >= 4)
_GOOD = np.where(_INVALID, 1, _BAD).astype(np.int32)


@pytest.mark.parametrize('name', sorted(LABEL_LOSSES))
def test_out_of_range_labels_under_jit_give_nan_and_leave_valid_rows_exact(name):
  z, _ = _data((8, 4), seed=30, negative=True)  # ≤ 0: valid for the distance and ICE losses too
  fn = jax.jit(LABEL_LOSSES[name])
  bad, good = np.asarray(fn(z, _BAD)), np.asarray(fn(z, _GOOD))
  assert np.all(np.isnan(bad[_INVALID])), bad
  np.testing.assert_array_equal(bad[~_INVALID], good[~_INVALID])  # the same bits
  if name in REFERENCES:
    np.testing.assert_allclose(bad[~_INVALID], REFERENCES[name](z, _GOOD)[~_INVALID], rtol=2e-5, atol=2e-6)
  assert np.isnan(float(jax.jit(lambda z, y: LABEL_LOSSES[name](z, y).mean())(z, _BAD)))  # the trainer's signal

  # Gradients: the NaN rows must not poison the valid ones (the where-gradient trap), whether the
  # invalid rows are masked out with jnp.where or left in the mean.
  masked = lambda y: jax.jit(jax.grad(lambda x: jnp.where(_INVALID, 0.0, LABEL_LOSSES[name](x, y)).sum()))(z)
  grad_bad, grad_good = np.asarray(masked(_BAD)), np.asarray(masked(_GOOD))
  assert np.all(np.isfinite(grad_bad))
  np.testing.assert_array_equal(grad_bad, grad_good)
  grad_mean = np.asarray(jax.jit(jax.grad(lambda x: LABEL_LOSSES[name](x, _BAD).mean()))(z))
  assert np.all(np.isfinite(grad_mean))
  if name != 'smooth_training':  # (its masked logits mix rows, so only the loss rows are independent)
    np.testing.assert_array_equal(grad_mean[_INVALID], 0.0)
    np.testing.assert_allclose(grad_mean[~_INVALID], grad_good[~_INVALID] / 8, rtol=1e-6)


@pytest.mark.parametrize('dtype,num_classes,label,valid', [
    (np.uint8, 4, 255, False), (np.int8, 200, 127, True), (np.int8, 200, -1, False), (np.int64, 4, 2**40, False)])
def test_label_range_for_other_integer_dtypes(dtype, num_classes, label, valid):
  if dtype == np.int64 and not jax.config.jax_enable_x64:
    label = 4  # without x64 int64 labels become int32; still out of range
  z = np.zeros((2, num_classes), np.float32)
  y = np.array([0, label], dtype)
  out = np.asarray(jax.jit(losses.softmax_cross_entropy)(z, y))
  np.testing.assert_allclose(out[0], np.log(num_classes), rtol=1e-6)
  assert np.isnan(out[1]) != valid
  if valid:
    np.testing.assert_allclose(out[1], np.log(num_classes), rtol=1e-6)


def test_checkify_reports_out_of_range_labels_and_traced_hyperparameters():
  z, y = _data((8, 4), seed=31, negative=True)
  checked = jax.jit(checkify.checkify(lambda z, y: losses.isomax(z, y).mean()))
  err, value = checked(z, _BAD)
  assert 'labels must lie in [0, 4), got values in [-7, 9]' in err.get()
  assert np.isnan(float(value))
  err, value = checked(z, y)
  assert err.get() is None
  np.testing.assert_allclose(float(value), REFERENCES['isomax'](z, y).mean(), rtol=1e-6)
  err, _ = jax.jit(checkify.checkify(lambda z, s: losses.isomax(z, y, entropic_scale=s)))(z, 0.0)
  assert 'entropic_scale must be > 0, got 0.0' in err.get()
  # Without checkify the checks cost nothing and raise nothing.
  assert np.isnan(float(jax.jit(lambda z, y: losses.isomax(z, y).mean())(z, _BAD)))


def _traced_cases():
  z, y = _data((6, 4), seed=32, negative=True)
  e, ye = _embeddings()
  t = np.array([255.0, 200.0, 30.0], np.float32)
  return [
      ('isomax', lambda v: losses.isomax(z, y, entropic_scale=v), 10.0, 0.0),
      ('distance_one_vs_all', lambda v: losses.distance_one_vs_all(z, y, eps=v), 1e-6, -1.0),
      ('ice_out', lambda v: losses.ice_out(z, eps=v), 1e-6, 0.0),
      ('supervised_contrastive', lambda v: losses.supervised_contrastive(e, ye, temperature=v), 0.1, -0.1),
      ('reweighted_contrastive', lambda v: losses.reweighted_contrastive(e, ye, temperature=v), 0.1, 0.0),
      ('reweighted_openood',
       lambda v: losses.reweighted_contrastive(e, ye, temperature=v, variant='openood'), 0.1, 0.0),
      ('smot_smoothing', lambda v: losses.smot_smoothing(t, temperature=v), 10.0, -10.0),
      ('smooth_training', lambda v: losses.smooth_training(z, z * 0.5, y, 0.3, weight=v), 0.1, 1.5),
      ('logit_norm', lambda v: losses.logit_norm(z, y, temperature=v), 0.04, 0.0),
      ('mixup_cross_entropy', lambda v: losses.mixup_cross_entropy(z, y, y[::-1], v), 0.3, 1.5),
      ('regmixup', lambda v: losses.regmixup(z, z * 0.5, y, y[::-1], 0.3, weight=v), 1.0, -1.0),
      ('confidence_branch', lambda v: losses.confidence_branch(z, z[:, 1], y, weight=v), 0.1, -0.1),
  ]


@pytest.mark.parametrize('case', range(len(_traced_cases())))
def test_traced_hyperparameters_out_of_range_give_nan(case):
  name, fn, good, bad = _traced_cases()[case]
  jitted = jax.jit(fn)
  # A traced valid value gives the loss (to rounding: XLA folds a constant hyperparameter differently).
  np.testing.assert_allclose(jitted(good), fn(good), rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.all(np.isnan(np.asarray(jitted(bad)))), name
  with pytest.raises(ValueError):
    fn(bad)  # the same value, concrete: an error at the call


def test_smooth_training_traced_smoothing_out_of_range_is_nan_per_example():
  z, y = _data((4, 3), seed=33)
  eps = np.array([0.0, 0.5, 1.5, -0.1], np.float32)
  out = np.asarray(jax.jit(lambda e: losses.smooth_training(z, z * 2, y, e))(eps))
  assert np.all(np.isnan(out[2:]))
  np.testing.assert_array_equal(out[:2], losses.smooth_training(z[:2], (z * 2)[:2], y[:2], eps[:2]))
  with pytest.raises(TypeError, match='weight must be a scalar'):
    losses.smooth_training(z, z, y, 0.1, weight=np.ones(2))


# ------------------------------------------------------------------------------------------
# The trainer's warnings for the recipes the Energy and ICE docstrings warn about.


def _smoke_config(method, **overrides):
  config = digits_config.get_config('smoke')
  config.method = method
  config.outliers.source = 'digits/outliers'
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize('method,overrides,expected', [
    ('energy', {}, 'default margins'),
    ('energy', {'init_from': '/pretrained/run'}, None),
    ('ice', {}, 'without gradient clipping'),
    ('oe', {}, None),
])
def test_trainer_warns_about_energy_margins_from_scratch_and_unclipped_ice(method, overrides, expected):
  config = _smoke_config(method, **overrides)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    experiment.check_config(config)
  messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  if expected is None:
    assert not any('margins' in m or 'clipping' in m for m in messages), messages
  else:
    assert any(expected in m for m in messages), messages
  if method == 'energy' and not overrides:  # explicit margins silence it; so does clipping for ICE
    config.method_kwargs.margin_in, config.method_kwargs.margin_out = -5.0, -1.0
  elif method == 'ice':
    config.optimizer.grad_clip_norm = 1.0
  else:
    return
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    experiment.check_config(config)
  assert not any(expected in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------
# Training baselines of OpenOOD v1.5: LogitNorm, Mixup, RegMixup, ConfBranch.


@pytest.mark.parametrize('tau', [0.04, 0.5, 1.0])
def test_logit_norm_follows_both_epsilon_conventions_and_ignores_the_logit_scale(tau):
  z, y = _data((9, 10), seed=40, scale=3.0)
  fn = jax.jit(functools.partial(losses.logit_norm, temperature=tau))
  got = fn(z, y)
  np.testing.assert_allclose(got, _np_logit_norm(z, y, tau, 1e-7), rtol=1e-5, atol=1e-6)  # authors' / OpenOOD's ε
  np.testing.assert_allclose(got, _np_logit_norm(z, y, tau, 0.0), rtol=1e-5, atol=1e-6)  # pytorch-ood's formula
  # The point of the loss: inflating the logits cannot lower it.
  np.testing.assert_allclose(fn(z * 100.0, y), got, rtol=1e-5, atol=1e-6)


def test_logit_norm_at_zero_logits_is_log_k_with_a_finite_gradient():
  z, y = np.zeros((2, 5), np.float32), np.array([0, 3], np.int32)
  np.testing.assert_allclose(losses.logit_norm(z, y), np.log(5.0), rtol=1e-6)
  assert np.all(np.isfinite(jax.grad(lambda x: losses.logit_norm(x, y).sum())(z)))


def test_mixup_cross_entropy_is_the_cross_entropy_to_the_mixed_target():
  z, y = _data((8, 5), seed=41, scale=3.0)
  partners = np.roll(y, 3).astype(np.int32)
  for mix in (np.float32(0.3), np.linspace(0.0, 1.0, 8).astype(np.float32)):
    got = jax.jit(losses.mixup_cross_entropy)(z, y, partners, mix)
    lam = np.broadcast_to(np.asarray(mix, np.float64), (8,))[:, None]
    # OpenOOD's MixupTrainer: soft_cross_entropy to the mixed one-hot labels (Zhang et al. 2018, Sec. 2).
    target = lam * np.eye(5)[y] + (1 - lam) * np.eye(5)[partners]
    np.testing.assert_allclose(got, -np.sum(target * _np_log_softmax(z), axis=-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.mixup_cross_entropy(z, y, partners, 1.0), losses.softmax_cross_entropy(z, y),
                             rtol=1e-6)


@pytest.mark.parametrize('eta', [1.0, 0.5])
def test_regmixup_matches_the_reference_criterion_on_the_concatenated_batch(eta):
  z, y = _data((6, 4), seed=42)
  mixed, _ = _data((6, 4), seed=43)
  partners, lam = np.roll(y, 1).astype(np.int32), 0.37
  got = np.asarray(jax.jit(functools.partial(losses.regmixup, weight=eta))(z, mixed, y, partners, np.float32(lam)))
  ls, ls_mixed = _np_log_softmax(z), _np_log_softmax(mixed)
  mix_term = lam * -_pick(ls_mixed, y) + (1 - lam) * -_pick(ls_mixed, partners)
  np.testing.assert_allclose(got, -_pick(ls, y) + eta * mix_term, rtol=1e-5)
  if eta == 1.0:
    # Pinto et al.'s regmixup_criterion (copied by OpenOOD): F.cross_entropy over [x; x̃] with targets
    # a = [y; y], b = [y; y_π], lam·CE(a) + (1 − lam)·CE(b), averaged over the 2B rows: half the mean here.
    logits = _np_log_softmax(np.concatenate([z, mixed]))
    a, b = np.concatenate([y, y]), np.concatenate([y, partners])
    criterion = lam * np.mean(-_pick(logits, a)) + (1 - lam) * np.mean(-_pick(logits, b))
    np.testing.assert_allclose(0.5 * got.mean(), criterion, rtol=1e-6)


def _np_confidence_branch(z, s, y, lam, hints):
  # DeVries & Taylor 2018, eqs. 2–5 literally: p' = c·p + (1 − c)·onehot(y), −log p'_y − λ·log c; c = 1 in the
  # prediction term where no hint is given. pytorch-ood's ConfidenceLoss documents the same per-example formula
  # (its code sums the first term over the batch); OpenOOD's trainer is this with hints on a random half.
  z, s = np.asarray(z, np.float64), np.asarray(s, np.float64)
  p, c = np.exp(_np_log_softmax(z)), _sigmoid(s)
  c_used = np.where(hints, c, 1.0)[:, None]
  p_new = c_used * p + (1 - c_used) * np.eye(z.shape[-1])[y]
  return -np.log(_pick(p_new, y)) - lam * np.log(c)


def test_confidence_branch_matches_the_paper_and_has_exact_gradients():
  z, y = _data((8, 5), seed=44, scale=3.0)
  s = (np.random.default_rng(45).normal(size=8) * 2).astype(np.float32)
  hints = np.array([True, False] * 4)
  for lam, h in ((0.1, None), (0.7, hints)):
    got = jax.jit(functools.partial(losses.confidence_branch, weight=lam))(z, s, y, hints=h)
    want = _np_confidence_branch(z, s, y, lam, np.ones(8, bool) if h is None else h)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The log-space form is the loss's own formula: its gradient against finite differences, in float64.
  with jax.enable_x64(True):
    z64, s64 = jnp.asarray(z, jnp.float64), jnp.asarray(s, jnp.float64)
    check_grads(lambda a, b: losses.confidence_branch(a, b, y, weight=0.3, hints=hints), (z64, s64), order=2,
                modes=['rev'])
  # Saturated confidences and logits stay finite where the literal formula needs the reference code's clamps.
  extreme_z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], np.float32)
  extreme_s = np.array([-60.0, 60.0], np.float32)
  out = losses.confidence_branch(extreme_z, extreme_s, np.array([1, 0], np.int32), weight=0.1)
  grads = jax.grad(lambda a, b: losses.confidence_branch(a, b, np.array([1, 0]), weight=0.1).sum(), (0, 1))(
      jnp.asarray(extreme_z), jnp.asarray(extreme_s))
  assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_allclose(out[0], 0.1 * 60.0, rtol=1e-5)  # c → 0: p' → the label, only λ·(−log c) is left


def test_openood_baseline_losses_reject_bad_arguments():
  z, y = _data((4, 3))
  with pytest.raises(ValueError, match='temperature must be > 0'):
    losses.logit_norm(z, y, temperature=0.0)
  with pytest.raises(ValueError, match=r'partner_labels must lie in \[0, 3\)'):
    losses.mixup_cross_entropy(z, y, np.array([0, 1, 2, 3], np.int32), 0.5)
  with pytest.raises(ValueError, match='mix must be a scalar or have shape'):
    losses.mixup_cross_entropy(z, y, y, np.full(3, 0.5, np.float32))
  with pytest.raises(ValueError, match='mixed_logits must have the shape'):
    losses.regmixup(z, z[:2], y, y, 0.5)
  with pytest.raises(ValueError, match='confidence_logits must have shape'):
    losses.confidence_branch(z, z, y, weight=0.1)
  with pytest.raises(TypeError, match='hints must be booleans'):
    losses.confidence_branch(z, z[:, 0], y, weight=0.1, hints=np.ones(4, np.int32))
  with pytest.raises(TypeError):
    losses.logit_norm(z, y, 0.04)  # hyperparameters are keyword-only


# ------------------------------------------------------------------------------------------
# RotPred (Hendrycks et al. 2019) and MixOE (Zhang et al. 2023).


def test_rotation_prediction_matches_openoods_two_cross_entropies():
  z, y = _data((5, 4), seed=50, scale=3.0)
  rho = (np.random.default_rng(51).normal(size=(5, 4, 4)) * 3).astype(np.float32)
  for weight in (1.0, 0.5):
    got = np.asarray(jax.jit(functools.partial(losses.rotation_prediction, weight=weight))(z, rho, y))
    # OpenOOD's RotPredTrainer, literally: F.cross_entropy(logits[:B], y) + F.cross_entropy over the 4B rotated
    # rows with targets [0]*B + [1]*B + [2]*B + [3]*B; per example: CE + mean over the four turns.
    rotation_ce = np.array([[-_np_log_softmax(rho[i, r])[r] for r in range(4)] for i in range(5)])
    want = -_pick(_np_log_softmax(z), y) + weight * rotation_ce.mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    batch_rows = -np.mean([_np_log_softmax(rho[i, r])[r] for r in range(4) for i in range(5)])
    np.testing.assert_allclose(got.mean(), np.mean(-_pick(_np_log_softmax(z), y)) + weight * batch_rows, rtol=1e-5)
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda a, b: losses.rotation_prediction(a, b, y)), (jnp.asarray(z, jnp.float64),
                                                                   jnp.asarray(rho, jnp.float64)), order=1,
                modes=['rev'])
  bad = np.asarray(jax.jit(losses.rotation_prediction)(z, rho, np.array([0, 4, 1, -1, 2], np.int32)))
  assert np.isnan(bad[[1, 3]]).all() and np.isfinite(bad[[0, 2, 4]]).all()
  with pytest.raises(ValueError, match='rotation_logits must have shape'):
    losses.rotation_prediction(z, rho[:, :3], y)
  with pytest.raises(ValueError, match='weight must be >= 0'):
    losses.rotation_prediction(z, rho, y, weight=-1.0)


def test_mixoe_is_the_cross_entropy_to_the_label_moved_towards_uniform():
  z, y = _data((6, 5), seed=52, scale=3.0)
  mixed, _ = _data((6, 5), seed=53, scale=3.0)
  for lam, weight in ((np.float32(0.3), 1.0), (np.linspace(0.0, 1.0, 6).astype(np.float32), 0.5)):
    got = np.asarray(jax.jit(functools.partial(losses.mixoe, weight=weight))(z, mixed, y, lam))
    # OpenOOD's MixOETrainer: F.cross_entropy(net(x), y) + lambda_oe·SoftCE(net(x̃), λ·onehot(y) + (1 − λ)/K).
    mix = np.broadcast_to(np.asarray(lam, np.float64), (6,))[:, None]
    target = mix * np.eye(5)[y] + (1 - mix) * np.full((6, 5), 1 / 5)
    want = -_pick(_np_log_softmax(z), y) + weight * -np.sum(target * _np_log_softmax(mixed), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # λ = 0 is outlier exposure on the mixed row; λ = 1 the plain cross-entropy on both rows.
  np.testing.assert_allclose(losses.mixoe(z, mixed, y, 0.0, weight=1.0) - losses.softmax_cross_entropy(z, y),
                             losses.outlier_exposure(mixed), rtol=1e-5)
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda a, b: losses.mixoe(a, b, y, 0.4)), (jnp.asarray(z, jnp.float64),
                                                          jnp.asarray(mixed, jnp.float64)), order=1, modes=['rev'])
  traced = np.asarray(jax.jit(losses.mixoe)(z, mixed, y, np.float32(1.5)))
  assert np.isnan(traced).all()  # λ outside [0, 1] under jit
  with pytest.raises(ValueError, match='mix must lie in'):
    losses.mixoe(z, mixed, y, 1.5)
  with pytest.raises(ValueError, match='mixed_logits must have the shape'):
    losses.mixoe(z, mixed[:2], y, 0.5)
  with pytest.raises(TypeError):
    losses.mixoe(z, mixed, y, 0.5, 1.0)  # β is keyword-only


# ------------------------------------------------------------------------------------------
# VOS / NPOS outlier loss and CIDER's prototype losses (float64 references from the papers' equations).


def test_outlier_logistic_is_voss_two_class_cross_entropy_of_linear_1_2():
  rng = np.random.default_rng(0)
  energies = rng.normal(size=9) * 3  # the negative weighted energies of 6 inliers and 3 virtual outliers
  w, b = rng.normal(size=2), rng.normal(size=2)
  phi = energies[:, None] * w + b  # the reference's Linear(1, 2)
  targets = np.array([1] * 6 + [0] * 3)  # 1: in-distribution
  expected = -(phi[np.arange(9), targets] - _np_logsumexp(phi))  # F.cross_entropy, per row
  s = (phi[:, 1] - phi[:, 0]).astype(np.float32)
  got = jax.jit(losses.outlier_logistic)(s[:6], s[6:])
  assert got.shape == (9,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='outlier_logits'):
    losses.outlier_logistic(s[:6], s[6:, None])


def _np_compactness(e, p, y, tau):
  out = []
  for i in range(len(y)):
    sims = [e[i] @ (p[k] / np.linalg.norm(p[k])) / tau for k in range(len(p))]
    out.append(-(sims[y[i]] - np.log(np.sum(np.exp(sims)))))
  return np.array(out)


def _np_dispersion(p, tau):
  k = len(p)
  return np.array([np.log(sum(np.exp(p[i] @ p[j] / tau) for j in range(k) if j != i) / (k - 1)) for i in range(k)])


def test_prototype_losses_match_cider_equations():
  rng = np.random.default_rng(1)
  e = rng.normal(size=(7, 5))
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  p = rng.normal(size=(3, 5))
  p[1] *= 4.0  # compactness normalises the prototypes; dispersion takes them as given
  y = rng.integers(0, 3, 7)
  compact = jax.jit(functools.partial(losses.prototype_compactness, temperature=0.1))
  np.testing.assert_allclose(compact(e.astype(np.float32), p.astype(np.float32), y), _np_compactness(e, p, y, 0.1),
                             rtol=1e-5)
  unit = p / np.linalg.norm(p, axis=1, keepdims=True)
  disperse = jax.jit(functools.partial(losses.prototype_dispersion, temperature=0.5))
  np.testing.assert_allclose(disperse(unit.astype(np.float32)), _np_dispersion(unit, 0.5), rtol=1e-5)
  with pytest.raises(ValueError, match='temperature'):
    losses.prototype_compactness(e, p, y, temperature=0.0)
  with pytest.raises(ValueError, match='K >= 2'):
    losses.prototype_dispersion(unit[:1])
  with pytest.raises(ValueError, match='labels'):
    losses.prototype_compactness(e, p, np.full(7, 3))
