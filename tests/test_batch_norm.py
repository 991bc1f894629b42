"""ood_jax.models.batch_norm against flax.linen.BatchNorm, float64 NumPy and finite differences.

The CPU rewrites (ones-block GEMM sums, the division barrier) are chosen per lowering platform: programs
exported for GPU and TPU from this CPU host are checked to contain none of them, and the GPU/TPU branch's
numbers are checked on CPU by forcing it.
"""

import flax.linen as nn
import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax.models import _common
from ood_jax.models import batch_norm

EPS = 1e-5


def _pair(train, dtype=None):
  ours = batch_norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, dtype=dtype)
  flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, dtype=dtype)
  return ours, flax_bn


def _inputs(shape, seed=0, offset=3.0):
  rng = np.random.default_rng(seed)
  # An offset mean makes the fast variance E[x²] − E[x]² cancel digits, as real activations do.
  return jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.5, 2.0, shape[-1]) + offset, jnp.float32)


def _variables(features, seed=1):
  rng = np.random.default_rng(seed)
  return {'params': {'scale': jnp.asarray(rng.uniform(0.5, 1.5, features), jnp.float32),
                     'bias': jnp.asarray(rng.standard_normal(features), jnp.float32)},
          'batch_stats': {'mean': jnp.asarray(rng.standard_normal(features), jnp.float32),
                          'var': jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32)}}


def _numpy_batch_norm(x, scale, bias):
  """Float64 reference: biased batch variance, as PyTorch's and flax's training mode."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  mean = x.mean(0)
  var = ((x - mean) ** 2).mean(0)
  return (x - mean) / np.sqrt(var + EPS) * scale + bias, mean, var


def test_variables_match_flax():
  x = _inputs((4, 3, 3, 5))
  ours, flax_bn = _pair(train=True)
  got = ours.init(jax.random.key(0), x)
  want = flax_bn.init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(lambda a: (a.shape, a.dtype), want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)  # init does not touch the running averages


def _errors(got, want, reference):
  """Max |got − reference| and max |want − reference| (float64)."""
  reference = np.asarray(reference, np.float64)
  err = lambda a: float(np.max(np.abs(np.asarray(a, np.float64).reshape(reference.shape) - reference)))
  return err(got), err(want)


@pytest.mark.parametrize('shape', [(16, 8, 8, 6), (64, 7)])
@pytest.mark.parametrize('warm', [False, True])
def test_training_forward_and_running_averages_match_flax_and_float64(shape, warm):
  x = _inputs(shape)
  variables = _variables(shape[-1])
  scale, bias = (np.asarray(variables['params'][k], np.float64) for k in ('scale', 'bias'))
  want, mean, var = _numpy_batch_norm(x, scale, bias)
  if warm:  # running mean near the batch mean, as after the first steps: the variance cancels little
    variables['batch_stats']['mean'] = jnp.asarray(mean + 0.1, jnp.float32)
  ours, flax_bn = _pair(train=True)
  apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, mutable=['batch_stats']))(variables, x)
  (y, stats), (y_flax, stats_flax) = apply(ours), apply(flax_bn)
  err, err_flax = _errors(y, y_flax, want)
  # Float32 rounding of outputs ~5 with E[x²] − E[x]² at mean 3: flax's own error is ~1e-5.
  assert err < 4e-5, (err, err_flax)
  if warm:
    assert err <= err_flax, (err, err_flax)
  old = variables['batch_stats']
  np.testing.assert_allclose(stats['batch_stats']['mean'], 0.9 * np.asarray(old['mean']) + 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(stats['batch_stats']['var'], 0.9 * np.asarray(old['var']) + 0.1 * var, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_flax)):
    np.testing.assert_allclose(a, b, rtol=2e-5)


def test_inference_matches_flax_exactly():
  x = _inputs((8, 4, 4, 6))
  variables = _variables(6)
  ours, flax_bn = _pair(train=False)
  got = jax.jit(ours.apply)(variables, x)
  want = jax.jit(flax_bn.apply)(variables, x)
  np.testing.assert_array_equal(got, want)  # the same formula in the same order


@pytest.mark.parametrize('train', [True, False])
def test_bfloat16_matches_flax(train):
  x = _inputs((16, 4, 4, 6)).astype(jnp.bfloat16)
  variables = _variables(6)
  ours, flax_bn = _pair(train=train, dtype=jnp.bfloat16)
  got = jax.jit(lambda v, x: ours.apply(v, x, mutable=['batch_stats']))(variables, x)[0]
  want = jax.jit(lambda v, x: flax_bn.apply(v, x, mutable=['batch_stats']))(variables, x)[0]
  assert got.dtype == want.dtype == jnp.bfloat16
  # Statistics in float32 for both; the outputs differ at most by one bfloat16 rounding (2^-8 relative).
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=8e-3, atol=8e-3)


def _loss(module, variables, x, weights):
  y, _ = module.apply(variables, x, mutable=['batch_stats'])
  return jnp.sum(jnp.sin(y) * weights)


def _numpy_gradients(x, scale, bias, weights):
  """Float64 textbook gradients of Σ sin(BN(x))·w: dx = γ/σ (g − mean g − x̂ mean(g x̂)), dγ, dβ."""
  y, mean, var = _numpy_batch_norm(x, scale, bias)
  x_hat = (np.asarray(x, np.float64).reshape(y.shape) - mean) / np.sqrt(var + EPS)
  g = np.cos(y) * np.asarray(weights, np.float64).reshape(y.shape)
  dx = scale / np.sqrt(var + EPS) * (g - g.mean(0) - x_hat * (g * x_hat).mean(0))
  return dx.reshape(x.shape), (g * x_hat).sum(0), g.sum(0)


def test_gradients_match_float64_as_closely_as_flax_autodiff():
  x = _inputs((32, 4, 4, 5))
  variables = _variables(5)
  weights = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
  ours, flax_bn = _pair(train=True)
  grad = lambda m: jax.jit(jax.grad(lambda v, x: _loss(m, v, x, weights), argnums=(0, 1)))(variables, x)
  (gv, gx), (gv_flax, gx_flax) = grad(ours), grad(flax_bn)
  dx, dscale, dbias = _numpy_gradients(x, *(np.asarray(variables['params'][k]) for k in ('scale', 'bias')), weights)
  for got, want, reference in [(gx, gx_flax, dx), (gv['params']['scale'], gv_flax['params']['scale'], dscale),
                               (gv['params']['bias'], gv_flax['params']['bias'], dbias)]:
    err, err_flax = _errors(got, want, reference)
    assert err <= 2 * err_flax + 1e-6 * np.max(np.abs(reference)), (err, err_flax)


def test_gradient_matches_float64_finite_differences():
  x = _inputs((6, 3), offset=0.5)
  variables = _variables(3)
  weights = np.random.default_rng(3).standard_normal(x.shape)
  scale, bias = (np.asarray(variables['params'][k], np.float64) for k in ('scale', 'bias'))
  ours, _ = _pair(train=True)
  gx = jax.jit(jax.grad(lambda x: _loss(ours, variables, x, jnp.asarray(weights, jnp.float32))))(x)
  f = lambda x: np.sum(np.sin(_numpy_batch_norm(x, scale, bias)[0]) * weights)
  x64, h = np.asarray(x, np.float64), 1e-6
  numeric = np.zeros_like(x64)
  for index in np.ndindex(x64.shape):
    step = np.zeros_like(x64)
    step[index] = h
    numeric[index] = (f(x64 + step) - f(x64 - step)) / (2 * h)
  np.testing.assert_allclose(gx, numeric, rtol=1e-3, atol=1e-4)


def test_gradient_of_returned_statistics():
  """The custom VJP also differentiates the mean and variance it returns (flax's formula as reference)."""
  x = _inputs((20, 4), offset=1.0)
  a, b = jnp.arange(1.0, 5.0), jnp.arange(4.0, 0.0, -1.0)
  ones, zeros = jnp.ones(4), jnp.zeros(4)

  def ours(x):
    y, mean, var = batch_norm._train_forward(x, ones, zeros, jnp.full(4, 0.9), EPS)
    return jnp.sum(y[0]) + jnp.sum(mean * a) + jnp.sum(var * b)

  def reference(x):
    mean = jnp.mean(x, 0)
    var = jnp.mean(x * x, 0) - mean * mean
    y = (x - mean) * jax.lax.rsqrt(var + EPS)
    return jnp.sum(y[0]) + jnp.sum(mean * a) + jnp.sum(var * b)

  np.testing.assert_allclose(jax.jit(jax.grad(ours))(x), jax.grad(reference)(x), rtol=1e-4, atol=1e-5)


def test_constant_channel_gives_finite_values_and_gradients():
  x = _inputs((8, 3)).at[:, 1].set(2.5)
  variables = _variables(3)
  ours, flax_bn = _pair(train=True)
  weights = jnp.ones(x.shape)
  y, _ = jax.jit(lambda v, x: ours.apply(v, x, mutable=['batch_stats']))(variables, x)
  gx = jax.jit(jax.grad(lambda x: _loss(ours, variables, x, weights)))(x)
  gx_flax = jax.grad(lambda x: _loss(flax_bn, variables, x, weights))(x)
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(gx))
  np.testing.assert_allclose(y[:, 1], variables['params']['bias'][1], rtol=1e-6)
  np.testing.assert_allclose(gx, gx_flax, rtol=1e-4, atol=1e-4)


def test_channel_sums_accuracy():
  """The ones-block product on 2^17 rows with a large mean: within 3× of XLA's tree-reduced sum."""
  x = _inputs((2**17, 16), offset=10.0)
  got = jax.jit(batch_norm._gemm_sums)(x)
  want = np.asarray(x, np.float64).sum(0)
  err = np.max(np.abs(np.asarray(got, np.float64) - want) / np.abs(want))
  err_sum = np.max(np.abs(np.asarray(jax.jit(lambda x: jnp.sum(x, 0))(x), np.float64) - want) / np.abs(want))
  assert err < 2e-6, err
  assert err <= 3 * max(err_sum, 1e-7), (err, err_sum)


def test_materialize_is_the_identity_with_identity_gradient():
  x = _inputs((4, 3, 3, 2), offset=0.0).at[0, 0, 0, 0].set(-0.0)
  y, vjp = jax.vjp(jax.jit(_common.materialize), x)
  np.testing.assert_array_equal(y, x)
  assert np.signbit(y[0, 0, 0, 0])
  np.testing.assert_array_equal(vjp(x)[0], x)


def test_conv_keeps_the_nn_conv_parameter_path():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return _common.conv(4, 3, dtype=jnp.float32, name='c')(x)

  params = Net().init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))['params']
  assert jax.tree.map(jnp.shape, params) == {'c': {'kernel': (3, 3, 2, 4)}}


def test_materialize_divides_only_under_differentiation_on_cpu():
  x = jnp.ones((2, 3))
  plain = jax.jit(_common.materialize).lower(x).as_text()
  differentiated = jax.jit(jax.grad(lambda x: jnp.sum(_common.materialize(x) ** 2))).lower(x).as_text()
  assert 'divide' not in plain
  assert differentiated.count('divide') == (2 if jax.default_backend() == 'cpu' else 0), differentiated


@pytest.mark.parametrize('x', [jnp.ones((4, 3), jnp.int32), jnp.float32(1.0)])
def test_rejects_non_floating_or_scalar_input(x):
  with pytest.raises((TypeError, ValueError), match='BatchNorm input'):
    batch_norm.BatchNorm().init(jax.random.key(0), x)


class _ConvBlock(nn.Module):
  """Two conv → BatchNorm → ReLU layers of the backbones (`_common.conv` puts `materialize` on each input)."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = _common.conv(4, 3, dtype=jnp.float32, name=f'conv{i}')(x)
      x = nn.relu(_common.batch_norm(train=True, dtype=jnp.float32, name=f'bn{i}')(x))
    return x


def _block_step(variables, x):
  def loss(params):
    y, stats = _ConvBlock().apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(y ** 2), stats
  return jax.grad(loss, has_aux=True)(variables['params'])


def _rewrites(stablehlo: str) -> dict[str, int]:
  return {'ones_gemm': stablehlo.count('precision = [HIGHEST, HIGHEST]'),
          'divide': stablehlo.count('stablehlo.divide'), 'reshape': stablehlo.count('stablehlo.reshape')}


def test_programs_for_gpu_and_tpu_have_none_of_the_cpu_rewrites():
  x = jnp.ones((2, 5, 5, 3))
  variables = jax.eval_shape(_ConvBlock().init, jax.random.key(0), x)
  step = jax.jit(_block_step)
  cpu = _rewrites(step.lower(variables, x).as_text())
  accelerators = [_rewrites(export.export(step, platforms=['cuda', 'tpu'])(variables, x).mlir_module()),
                  _rewrites(step.trace(variables, x).lower(lowering_platforms=('cuda',)).as_text())]
  # CPU: 2 BatchNorms × (2 forward + 2 backward sums) as ones-GEMMs; the second conv's input (the first one's
  # is the images, not differentiated) divided by a run-time one forward and backward; [B,H,W,C] ↔ [BHW,C].
  assert cpu['ones_gemm'] == 8 and cpu['reshape'] > 0, cpu
  for program in accelerators:
    assert program['ones_gemm'] == 0 and program['reshape'] == 0, program
    assert program['divide'] == cpu['divide'] - 2, (program, cpu)


def test_gpu_tpu_branch_matches_flax_and_keeps_the_variables(monkeypatch):
  # The branch a GPU/TPU program runs, forced on CPU: flax's numbers, forward and backward, same variables.
  monkeypatch.setattr(jax.lax, 'platform_dependent', lambda *args, default, **per_platform: default(*args))
  x = _inputs((16, 4, 4, 5))
  variables = _variables(5)
  weights = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
  ours, flax_bn = _pair(train=True)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, flax_bn.init(jax.random.key(0), x))
  apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, mutable=['batch_stats']))(variables, x)
  (y, stats), (y_flax, stats_flax) = apply(ours), apply(flax_bn)
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=4e-5)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_flax)):
    np.testing.assert_allclose(a, b, rtol=2e-5)
  grad = lambda m: jax.jit(jax.grad(lambda v, x: _loss(m, v, x, weights), argnums=(0, 1)))(variables, x)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(flax_bn))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  x = _inputs((2, 3, 3, 2), offset=0.0)
  y, vjp = jax.vjp(jax.jit(_common.materialize), x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(vjp(x)[0], x)
  assert 'divide' not in jax.jit(jax.grad(lambda x: jnp.sum(_common.materialize(x) ** 2))).lower(x).as_text()
