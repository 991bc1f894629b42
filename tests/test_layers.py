"""Tests of ood_jax.layers and its NNX twins (ood_jax.layers_nnx) against float64 NumPy formulas, explicit
inverses and finite differences."""

from flax import nnx
import importlib

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

from ood_jax import layers
from ood_jax import layers_nnx  # the NNX twins' name beside `from flax import nnx`
from ood_jax import losses
from ood_jax import metrics
from ood_jax import scores


def _np_negative_distances(f, p):
  f = np.asarray(f, np.float64)
  p = np.asarray(p, np.float64)
  out = np.empty(f.shape[:-1] + (p.shape[0],))
  for idx in np.ndindex(*f.shape[:-1]):
    for k in range(p.shape[0]):
      out[idx + (k,)] = -np.sqrt(np.sum((f[idx] - p[k]) ** 2))
  return out


def _np_mahalanobis(f, m, lower):
  f = np.asarray(f, np.float64)
  m = np.asarray(m, np.float64)
  lower = np.tril(np.asarray(lower, np.float64))
  precision = np.linalg.inv(lower @ lower.T)  # the explicit inverse the library must not use
  out = np.empty(f.shape[:-1] + (m.shape[0],))
  for idx in np.ndindex(*f.shape[:-1]):
    for k in range(m.shape[0]):
      diff = f[idx] - m[k]
      out[idx + (k,)] = -diff @ precision @ diff
  return out


def _random_cholesky(rng, d):
  lower = np.tril(rng.normal(size=(d, d)) * 0.3, k=-1)
  return lower + np.diag(rng.uniform(0.5, 1.5, size=d))


@pytest.mark.parametrize('batch_shape', [(7,), (3, 4), ()])
def test_negative_distances_matches_numpy(batch_shape):
  rng = np.random.default_rng(0)
  f = rng.normal(size=batch_shape + (5,)).astype(np.float32)
  p = rng.normal(size=(6, 5)).astype(np.float32)
  got = jax.jit(layers.negative_distances)(f, p)
  assert got.shape == batch_shape + (6,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_negative_distances(f, p), rtol=1e-6, atol=1e-6)


def test_negative_distances_extremes():
  # Zero distance (every example at IsoMax initialisation) and distances of 1e4.
  f = np.array([[0.0, 0.0, 0.0], [1e4, 0.0, 0.0], [3.0, 4.0, 0.0]], np.float32)
  p = np.zeros((2, 3), np.float32)
  got = np.asarray(jax.jit(layers.negative_distances)(f, p))
  np.testing.assert_array_equal(got, [[0.0, 0.0], [-1e4, -1e4], [-5.0, -5.0]])


def test_negative_distances_gradient_finite_at_zero_distance():
  f = jnp.array([[1.0, 2.0], [0.0, 0.0]])
  p = jnp.array([[1.0, 2.0], [4.0, 6.0]])  # f[0] sits exactly on p[0]

  def loss(f, p):
    return jnp.sum(layers.negative_distances(f, p) * jnp.array([[1.0, 1.0], [1.0, 1.0]]))

  gf, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(f, p)
  assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gp))
  # Away from the singular point the gradient is −(f − p)/‖f − p‖; at it, the subgradient 0.
  expected_f0 = -(np.array([1.0, 2.0]) - np.array([4.0, 6.0])) / 5.0
  expected_f1 = -(np.array([0.0, 0.0]) - np.array([1.0, 2.0])) / np.sqrt(5.0) - (
      np.array([0.0, 0.0]) - np.array([4.0, 6.0])) / np.sqrt(52.0)
  np.testing.assert_allclose(gf[0], expected_f0, rtol=1e-6)
  np.testing.assert_allclose(gf[1], expected_f1, rtol=1e-6)


def test_negative_distances_check_grads():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    f = jnp.asarray(rng.normal(size=(4, 3)))
    p = jnp.asarray(rng.normal(size=(5, 3)))
    check_grads(layers.negative_distances, (f, p), order=2, modes=['rev', 'fwd'])


def test_negative_distances_bfloat16():
  rng = np.random.default_rng(2)
  f = jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16)
  p = jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)
  got = jax.jit(layers.negative_distances)(f, p)
  assert got.dtype == jnp.float32  # computed in float32
  want = _np_negative_distances(np.asarray(f, np.float64), np.asarray(p, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('batch_shape', [(9,), (2, 3)])
def test_mahalanobis_logits_matches_explicit_inverse(batch_shape):
  rng = np.random.default_rng(3)
  d = 4
  f = rng.normal(size=batch_shape + (d,))
  m = rng.normal(size=(5, d))
  lower = _random_cholesky(rng, d)
  got = jax.jit(layers.mahalanobis_logits)(f.astype(np.float32), m.astype(np.float32), lower.astype(np.float32))
  np.testing.assert_allclose(got, _np_mahalanobis(f, m, lower), rtol=2e-5, atol=2e-5)
  with jax.enable_x64(True):
    got64 = layers.mahalanobis_logits(f, m, lower)
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(got64, _np_mahalanobis(f, m, lower), rtol=1e-12)


def test_mahalanobis_logits_ignores_upper_triangle_and_check_grads():
  rng = np.random.default_rng(4)
  lower = _random_cholesky(rng, 3)
  noisy = lower + np.triu(rng.normal(size=(3, 3)), k=1)
  f = rng.normal(size=(2, 3)).astype(np.float32)
  m = rng.normal(size=(4, 3)).astype(np.float32)
  np.testing.assert_allclose(layers.mahalanobis_logits(f, m, noisy.astype(np.float32)),
                             layers.mahalanobis_logits(f, m, lower.astype(np.float32)), rtol=1e-6)
  with jax.enable_x64(True):
    check_grads(layers.mahalanobis_logits, (jnp.asarray(f, jnp.float64), jnp.asarray(m, jnp.float64),
                                            jnp.asarray(lower)), order=1, modes=['rev'])
    # A feature exactly on a mean: value 0 and a finite gradient.
    g = jax.grad(lambda x: layers.mahalanobis_logits(x, jnp.asarray(m, jnp.float64), jnp.asarray(lower)).sum())(
        jnp.asarray(m[:1], jnp.float64))
    assert np.all(np.isfinite(g))


def test_cholesky_parametrisation_round_trip():
  rng = np.random.default_rng(5)
  raw = rng.normal(size=(4, 4)) * 3
  lower = np.asarray(layers.cholesky_from_raw(jnp.asarray(raw, jnp.float32)))
  assert np.all(np.triu(lower, k=1) == 0)
  assert np.all(np.diag(lower) > 0)
  np.testing.assert_allclose(np.diag(lower), np.log1p(np.exp(np.diag(raw))), rtol=1e-6)
  back = np.asarray(layers.raw_from_cholesky(jnp.asarray(lower)))
  np.testing.assert_allclose(np.tril(back), np.tril(raw), rtol=1e-4, atol=1e-5)


def test_linen_distance_logits():
  f = jnp.asarray(np.random.default_rng(6).normal(size=(3, 4)), jnp.float32)
  module = layers.DistanceLogits(num_classes=5)
  variables = module.init(jax.random.key(0), f)
  protos = variables['params']['prototypes']
  assert protos.shape == (5, 4)
  np.testing.assert_array_equal(protos, 0.0)  # zero-initialised, as Macêdo et al. 2021
  got = jax.jit(module.apply)(variables, f)
  np.testing.assert_allclose(got, np.repeat(-np.linalg.norm(f, axis=-1, keepdims=True), 5, axis=1), rtol=1e-6)
  # The IsoMax start: gradient w.r.t. the zero prototypes is finite and non-zero.
  g = jax.grad(lambda v: module.apply(v, f)[:, 0].sum())(variables)['params']['prototypes']
  np.testing.assert_allclose(g[0], np.sum(f / np.linalg.norm(f, axis=-1, keepdims=True), axis=0), rtol=1e-5)
  np.testing.assert_array_equal(g[1:], 0.0)


def test_linen_mahalanobis_logits():
  rng = np.random.default_rng(7)
  f = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  module = layers.MahalanobisLogits(num_classes=4)
  variables = module.init(jax.random.key(1), f)
  params = variables['params']
  assert params['means'].shape == (4, 3) and params['cholesky_raw'].shape == (3, 3)
  np.testing.assert_allclose(layers.cholesky_from_raw(params['cholesky_raw']), np.eye(3), atol=1e-6)
  got = jax.jit(module.apply)(variables, f)
  np.testing.assert_allclose(got, _np_mahalanobis(f, params['means'], np.eye(3)), rtol=1e-5)


def test_linen_projection_head_unit_norm_and_zero_input():
  module = layers.ProjectionHead(hidden_dim=16, output_dim=8)
  f = jnp.asarray(np.random.default_rng(8).normal(size=(5, 10)), jnp.float32)
  variables = module.init(jax.random.key(2), f)
  out = jax.jit(module.apply)(variables, f)
  assert out.shape == (5, 8)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-6)
  # Hand-computed forward pass.
  p = variables['params']
  hidden = np.maximum(f @ p['hidden']['kernel'] + p['hidden']['bias'], 0)
  raw = hidden @ p['output']['kernel'] + p['output']['bias']
  np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
  # An all-zero projection normalises to zero with a finite gradient instead of NaN.
  zero_vars = jax.tree.map(jnp.zeros_like, variables)
  g = jax.grad(lambda v: module.apply(v, f).sum())(zero_vars)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


def test_nnx_twins_match_linen():
  rng = np.random.default_rng(9)
  f = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

  dist = layers_nnx.DistanceLogits(3, 5, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(dist.prototypes[...], 0.0)
  dist.prototypes[...] = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  linen_vars = {'params': {'prototypes': dist.prototypes[...]}}
  np.testing.assert_allclose(dist(f), layers.DistanceLogits(5).apply(linen_vars, f), rtol=1e-6)

  maha = layers_nnx.MahalanobisLogits(3, 4, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(maha.cholesky(), np.eye(3), atol=1e-6)
  linen_vars = {'params': {'means': maha.means[...], 'cholesky_raw': maha.cholesky_raw[...]}}
  np.testing.assert_allclose(maha(f), layers.MahalanobisLogits(4).apply(linen_vars, f), rtol=1e-6)

  head = layers_nnx.ProjectionHead(3, 16, 8, rngs=nnx.Rngs(2))
  linen_vars = {'params': {
      'hidden': {'kernel': head.hidden.kernel[...], 'bias': head.hidden.bias[...]},
      'output': {'kernel': head.output.kernel[...], 'bias': head.output.bias[...]}}}
  np.testing.assert_allclose(head(f), layers.ProjectionHead(16, 8).apply(linen_vars, f), rtol=1e-6)

  # NNX modules train under nnx.jit / nnx.grad like any other.
  grads = nnx.grad(lambda m: m(f).sum())(dist)
  assert np.all(np.isfinite(grads.prototypes[...]))


def test_layer_errors():
  f = np.zeros((2, 3), np.float32)
  with pytest.raises(TypeError, match='features'):
    layers.negative_distances(np.zeros((2, 3), np.int32), np.zeros((4, 3), np.float32))
  with pytest.raises(ValueError, match='prototypes'):
    layers.negative_distances(f, np.zeros((4, 2), np.float32))
  with pytest.raises(ValueError, match='prototypes'):
    layers.negative_distances(f, np.zeros((4, 3, 1), np.float32))
  with pytest.raises(ValueError, match='means'):
    layers.mahalanobis_logits(f, np.zeros((4, 2), np.float32), np.eye(3, dtype=np.float32))
  with pytest.raises(ValueError, match='cholesky'):
    layers.mahalanobis_logits(f, np.zeros((4, 3), np.float32), np.eye(2, dtype=np.float32))
  with pytest.raises(ValueError, match='positive diagonal'):
    layers.mahalanobis_logits(f, np.zeros((4, 3), np.float32), np.diag([1.0, 0.0, 1.0]).astype(np.float32))
  with pytest.raises(TypeError, match='cholesky'):
    layers.mahalanobis_logits(f, np.zeros((4, 3), np.float32), np.eye(3, dtype=np.int32))


# ------------------------------------------------------------------------------------------
# API: an NNX module name that does not shadow flax.nnx, Flax's constructor keywords, the
# Cholesky factor of either head.


def test_layers_nnx_is_the_nnx_twins_under_a_name_beside_flax_nnx():
  assert nnx.Linear is not None and nnx.Rngs is not None  # flax.nnx is still flax.nnx
  assert not hasattr(layers, 'nnx')  # one home: `from ood_jax.layers import nnx` would shadow flax.nnx
  with pytest.raises(ModuleNotFoundError):
    importlib.import_module('ood_jax.layers.nnx')
  assert sorted(layers_nnx.__all__) == ['DistanceLogits', 'MahalanobisLogits', 'ProjectionHead']


@pytest.mark.parametrize('cls', [layers.DistanceLogits, layers.MahalanobisLogits])
def test_linen_heads_take_dense_features_keyword(cls):
  f = jnp.asarray(np.random.default_rng(20).normal(size=(4, 3)), jnp.float32)
  spellings = [cls(5), cls(num_classes=5), cls(features=5)]
  variables = [m.init(jax.random.key(3), f) for m in spellings]
  outputs = [np.asarray(jax.jit(m.apply)(v, f)) for m, v in zip(spellings, variables)]
  for v, out in zip(variables[1:], outputs[1:]):
    jax.tree.map(np.testing.assert_array_equal, v, variables[0])
    np.testing.assert_array_equal(out, outputs[0])
  assert outputs[0].shape == (4, 5)
  with pytest.raises(TypeError, match='not both'):
    cls(num_classes=5, features=5)  # at construction, not at the first call
  with pytest.raises(TypeError, match='number of classes'):
    cls()
  with pytest.raises(TypeError, match='features'):
    cls(features=2.5)


@pytest.mark.parametrize('cls', [layers_nnx.DistanceLogits, layers_nnx.MahalanobisLogits])
def test_nnx_heads_take_linear_in_out_features(cls):
  f = jnp.asarray(np.random.default_rng(21).normal(size=(4, 3)), jnp.float32)
  spellings = [cls(3, 5, rngs=nnx.Rngs(7)), cls(3, num_classes=5, rngs=nnx.Rngs(7)),
               cls(in_features=3, out_features=5, rngs=nnx.Rngs(7))]
  states = [nnx.state(m, nnx.Param) for m in spellings]
  for state, module in zip(states[1:], spellings[1:]):
    jax.tree.map(np.testing.assert_array_equal, state, states[0])
    np.testing.assert_array_equal(module(f), spellings[0](f))
  with pytest.raises(TypeError, match='not both'):
    cls(3, 5, out_features=5, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='out_features'):
    cls(3, rngs=nnx.Rngs(0))


def test_cholesky_factor_of_linen_and_nnx_heads_agree():
  rng = np.random.default_rng(22)
  raw = rng.normal(size=(3, 3)).astype(np.float32)
  want = np.tril(raw.astype(np.float64), k=-1) + np.diag(np.log1p(np.exp(np.diag(raw).astype(np.float64))))
  linen = layers.MahalanobisLogits(features=4)
  variables = linen.init(jax.random.key(0), jnp.zeros((1, 3)))
  variables = {'params': {**variables['params'], 'cholesky_raw': jnp.asarray(raw)}}
  twin = layers_nnx.MahalanobisLogits(3, 4, rngs=nnx.Rngs(0))
  twin.cholesky_raw[...] = jnp.asarray(raw)
  got = {
      'linen method': linen.apply(variables, method='cholesky'),
      'linen bound': linen.bind(variables).cholesky(),
      'variables': layers.cholesky_factor(variables),
      'params': layers.cholesky_factor(variables['params']),
      'nnx method': twin.cholesky(),
      'nnx module': layers.cholesky_factor(twin),
  }
  for name, value in got.items():
    np.testing.assert_allclose(np.asarray(value), want, rtol=1e-6, atol=1e-7, err_msg=name)
  with pytest.raises(ValueError, match='cholesky_raw'):
    layers.cholesky_factor({'kernel': jnp.ones((3, 4))})  # a dense head has no factor


def test_nnx_mnist_tutorial_pattern_with_ood_jax_head_loss_and_scores():
  """The Flax NNX MNIST tutorial's loop, its last nnx.Linear replaced by ood_jax's distance head."""
  class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
      self.linear1 = nnx.Linear(2, 4, rngs=rngs)
      self.head = layers_nnx.DistanceLogits(in_features=4, out_features=3, rngs=rngs)  # was nnx.Linear(4, 3)

    def hidden(self, x):
      return nnx.relu(self.linear1(x))

    def __call__(self, x):
      return self.head(self.hidden(x))

  rng = np.random.default_rng(23)
  centres = np.array([[3.0, 0.0], [-2.0, 2.5], [-2.0, -2.5]])
  labels = np.repeat(np.arange(3), 20).astype(np.int32)
  x = (centres[labels] + rng.normal(size=(60, 2))).astype(np.float32)
  x_out = (np.array([6.0, 6.0]) + rng.normal(size=(60, 2))).astype(np.float32)
  model = Net(rngs=nnx.Rngs(0))
  learning_rate = 0.05
  optimizer = nnx.Optimizer(model, optax.sgd(learning_rate), wrt=nnx.Param)

  def loss_fn(model, batch):
    logits = model(batch['image'])
    return losses.isomax(logits, batch['label']).mean(), logits

  @nnx.jit
  def train_step(model, optimizer, batch):
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return loss

  def np_isomax(hidden, prototypes):  # float64: mean −log softmax(−10‖h − p_y‖)
    z = -10.0 * np.linalg.norm(hidden[:, None, :] - prototypes[None], axis=-1)
    z = z - z.max(-1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels])

  batch = {'image': x, 'label': labels}
  for step in range(30):
    hidden = np.asarray(model.hidden(x), np.float64)
    before = np.asarray(model.head.prototypes[...], np.float64)
    loss = float(train_step(model, optimizer, batch))
    np.testing.assert_allclose(loss, np_isomax(hidden, before), rtol=1e-5)
    if step in (0, 29):  # the SGD step on the prototypes against a central-difference gradient
      numeric = np.zeros_like(before)
      for idx in np.ndindex(*before.shape):
        delta = np.zeros_like(before)
        delta[idx] = 1e-6
        numeric[idx] = (np_isomax(hidden, before + delta) - np_isomax(hidden, before - delta)) / 2e-6
      step_taken = (before - np.asarray(model.head.prototypes[...], np.float64)) / learning_rate
      np.testing.assert_allclose(step_taken, numeric, rtol=2e-3, atol=1e-5)
  model.eval()
  logits = np.asarray(model(x))
  hidden = np.asarray(model.hidden(x), np.float64)
  protos = np.asarray(model.head.prototypes[...], np.float64)
  np.testing.assert_allclose(logits, -np.linalg.norm(hidden[:, None] - protos[None], axis=-1), rtol=1e-5, atol=1e-5)
  s_in, s_out = np.asarray(scores.entropic_score(model(x))), np.asarray(scores.entropic_score(model(x_out)))
  want = roc_auc_score(np.r_[np.ones(60), np.zeros(60)], np.r_[s_in, s_out])
  np.testing.assert_allclose(metrics.auroc(s_in, s_out), want, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Heads of OpenOOD v1.5's training baselines: float64 references of their training and inference outputs.


def _head_features(n=6, d=5, seed=40):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32) * 3


def test_feature_norm_dense_normalises_in_training_only():
  f = _head_features()
  head = layers.FeatureNormDense(4, temperature=0.1)
  variables = head.init(jax.random.key(0), f)
  w, b = (np.asarray(variables['params'][k], np.float64) for k in ('kernel', 'bias'))
  assert w.shape == (5, 4) and b.shape == (4,)  # nn.Dense's parameters: checkpoints interchange
  f64 = f.astype(np.float64)
  unit = f64 / np.linalg.norm(f64, axis=-1, keepdims=True)
  np.testing.assert_allclose(jax.jit(lambda v, x: head.apply(v, x, train=True))(variables, f), unit / 0.1 @ w + b,
                             rtol=1e-5, atol=1e-5)  # Regmi et al. 2023: W·(h/‖h‖)/τ + b in training
  np.testing.assert_allclose(jax.jit(head.apply)(variables, f), f64 / 0.1 @ w + b, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match='temperature'):
    layers.FeatureNormDense(4, temperature=0.0)


def test_confidence_branch_inference_logits_carry_p_and_log_c():
  rng = np.random.default_rng(41)
  z, s = rng.normal(size=(5, 4)) * 4, rng.normal(size=5) * 3
  out = np.asarray(jax.jit(layers.confidence_branch_logits)(z.astype(np.float32), s.astype(np.float32)), np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(out) / np.exp(out).sum(-1, keepdims=True), p, rtol=1e-5)  # softmax → p
  np.testing.assert_allclose(np.log(np.exp(out).sum(-1)), -np.log1p(np.exp(-s)), rtol=1e-5, atol=1e-6)  # → log c


@pytest.mark.parametrize('budget', [0.01, 5.0])
def test_confidence_branch_head_outputs_and_budget_controller(budget):
  f = _head_features(seed=42)
  head = layers.ConfidenceBranch(3, budget=budget, weight=0.1)
  variables = head.init(jax.random.key(1), f)
  params = {k: np.asarray(v, np.float64) for k, v in variables['params'].items()}
  assert float(variables['batch_stats']['weight']) == np.float32(0.1)
  z = f.astype(np.float64) @ params['kernel'] + params['bias']
  s = (f.astype(np.float64) @ params['confidence_kernel'] + params['confidence_bias'])[:, 0]
  step = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=['batch_stats']))
  lam, state = 0.1, variables
  for _ in range(3):
    out, updates = step(state, f)
    np.testing.assert_allclose(out[:, :3], z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 3], s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 4], lam, rtol=1e-6)  # the λ of this step, before its update
    # DeVries & Taylor's budget β: λ shrinks while the confidence loss mean(−log c) is below β, else grows.
    lam = lam / 1.01 if budget > np.mean(np.log1p(np.exp(-s))) else lam / 0.99
    state = {'params': variables['params'], 'batch_stats': updates['batch_stats']}
    np.testing.assert_allclose(float(state['batch_stats']['weight']), lam, rtol=1e-6)
  assert (lam < 0.1) == (budget > 1.0)
  np.testing.assert_allclose(jax.jit(head.apply)(variables, f), layers.confidence_branch_logits(z, s), rtol=1e-5,
                             atol=1e-5)


def test_godin_head_divides_cosine_dividends_by_a_batch_normalised_sigmoid():
  f = _head_features(seed=43)
  head = layers.GodinHead(4)
  variables = head.init(jax.random.key(2), f)
  w = np.asarray(variables['params']['kernel'], np.float64)
  dense = {k: np.asarray(v, np.float64) for k, v in variables['params']['divisor'].items()}
  f64 = f.astype(np.float64)
  cosine = (f64 / np.linalg.norm(f64, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
  np.testing.assert_allclose(jax.jit(layers.cosine_logits)(f, w.astype(np.float32)), cosine, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(head.apply)(variables, f), cosine, rtol=1e-5, atol=1e-6)  # inference: h
  (train, updates) = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=['batch_stats']))(variables, f)
  g = (f64 @ dense['kernel'] + dense['bias'])[:, 0]
  normalised = (g - g.mean()) / np.sqrt(g.var() + 1e-5)  # BatchNorm in training: batch statistics, ε = 1e-5
  np.testing.assert_allclose(train, cosine * (1 + np.exp(-normalised))[:, None], rtol=1e-4, atol=1e-5)  # h/σ(·)
  np.testing.assert_allclose(updates['batch_stats']['divisor_bn']['mean'], [0.1 * g.mean()], rtol=1e-5)
