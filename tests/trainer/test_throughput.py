"""ood_jax.trainer.throughput: step FLOPs from XLA's cost analysis against hand counts, peaks by device kind, rates."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax.trainer import throughput


def test_step_flops_of_a_matmul_is_two_m_n_k():
  m, k, n = 64, 48, 32
  f = jax.jit(lambda a, b: a @ b)
  args = (jnp.ones((m, k)), jnp.ones((k, n)))
  assert throughput.step_flops(f.lower(*args)) == 2 * m * k * n
  assert throughput.step_flops(f.lower(*args).compile()) == 2 * m * k * n


def test_step_flops_of_a_convolution_and_its_gradient():
  # 3x3 'SAME' conv, stride 1: XLA counts the multiply-adds of in-bounds taps only, (3H - 2)(3W - 2) of
  # the 9HW per channel pair; the gradients w.r.t. input and filter cost as much again each.
  b, h, w, c_in, c_out = 2, 8, 8, 3, 4
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  x, k = jnp.ones((b, h, w, c_in)), jnp.ones((3, 3, c_in, c_out))
  forward = 2 * b * (3 * h - 2) * (3 * w - 2) * c_in * c_out
  assert throughput.step_flops(jax.jit(conv).lower(x, k)) == forward
  step = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k)), argnums=(0, 1)))
  flops = throughput.step_flops(step.lower(x, k))
  assert 3 * forward <= flops <= 3 * forward + 2 * b * h * w * c_out  # + the sum's additions
  assert throughput.step_flops(step.lower(x, k).compile()) == flops


def test_step_flops_is_none_without_a_cost_analysis():
  assert throughput.step_flops(types.SimpleNamespace(cost_analysis=lambda: None)) is None
  assert throughput.step_flops(types.SimpleNamespace(cost_analysis=lambda: [{'flops': 12.0}])) == 12.0
  assert throughput.step_flops(types.SimpleNamespace(cost_analysis=lambda: {'flops': -1.0})) is None

  def broken():
    raise NotImplementedError('no cost analysis on this backend')

  assert throughput.step_flops(types.SimpleNamespace(cost_analysis=broken)) is None


@pytest.mark.parametrize('kind, dtype, tflops', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.0), ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
    ('NVIDIA H200', 'float32', 494.5), ('NVIDIA A100-SXM4-80GB', 'float32', 156.0),
    ('TPU v4', 'bfloat16', 275.0), ('TPU v5 lite', 'float32', 197.0), ('TPU v5p', 'bfloat16', 459.0),
    ('cpu', 'float32', None), ('NVIDIA GeForce GTX 1080', 'bfloat16', None)])
def test_peak_flops_by_device_kind(kind, dtype, tflops):
  peak = throughput.peak_flops(types.SimpleNamespace(device_kind=kind), dtype)
  assert peak == (None if tflops is None else tflops * 1e12)


def test_peak_flops_override_and_its_errors():
  cpu = jax.devices('cpu')[0]
  assert throughput.peak_flops(cpu, 'float32') is None
  assert throughput.peak_flops(cpu, 'float32', override_tflops=1.5) == 1.5e12
  for bad in (0, -1.0, float('nan'), float('inf'), True, '2'):
    with pytest.raises(ValueError, match='peak_tflops must be a positive number'):
      throughput.peak_flops(cpu, 'float32', override_tflops=bad)


def test_rates():
  assert throughput.rates(2.5, batch_size=128, flops=None, peak=1e12) == {'images_per_sec': 320.0}
  assert throughput.rates(2.5, batch_size=128, flops=4e11, peak=None) == {'images_per_sec': 320.0}
  got = throughput.rates(2.5, batch_size=128, flops=4e11, peak=2e12)
  np.testing.assert_allclose([got['images_per_sec'], got['mfu']], [320.0, 0.5], rtol=1e-15)
