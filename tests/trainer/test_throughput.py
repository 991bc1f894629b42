"""ood_jax.trainer.throughput: step FLOPs from XLA's cost analysis against hand counts, per device on a mesh;
peaks by device kind; rates."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ood_jax import methods
from ood_jax import models
from ood_jax.trainer import sharding
from ood_jax.trainer import step as step_lib
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
    # Each name to its own figure: no shorter name (L4 in L40S, H100 in H100 NVL) takes it over.
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4), ('NVIDIA H100 80GB HBM3', 'float32', 494.7),
    ('NVIDIA H100 PCIe', 'bfloat16', 756.0), ('NVIDIA H100 NVL', 'bfloat16', 835.5),
    ('NVIDIA H100 NVL', 'float32', 417.5), ('NVIDIA H200', 'float32', 494.7), ('NVIDIA H200 NVL', 'bfloat16', 835.5),
    ('NVIDIA A100-SXM4-80GB', 'float32', 156.0), ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312.0),
    ('NVIDIA A100-PCIE-40GB', 'bfloat16', 312.0),
    ('NVIDIA L4', 'bfloat16', 121.0), ('NVIDIA L4', 'float32', 60.0), ('NVIDIA L40', 'bfloat16', 181.05),
    ('NVIDIA L40', 'float32', 90.5), ('NVIDIA L40S', 'bfloat16', 362.05), ('NVIDIA L40S', 'float32', 183.0),
    ('TPU v4', 'bfloat16', 275.0), ('TPU v5 lite', 'float32', 197.0), ('TPU v5 lite', 'bfloat16', 197.0),
    ('TPU v5', 'bfloat16', 459.0), ('TPU v5p', 'bfloat16', 459.0), ('TPU v6 lite', 'bfloat16', 918.0),
    ('TPU v3', 'bfloat16', 61.5),
    ('cpu', 'float32', None), ('NVIDIA GeForce GTX 1080', 'bfloat16', None), ('NVIDIA L4X', 'bfloat16', None),
    ('NVIDIA A10G', 'bfloat16', None), ('TPU v7', 'bfloat16', None)])
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


def _trainer_step_lowered(num_devices: int, per_device_batch: int):
  """The trainer's jitted step (as `train.train` builds it: MLP on 8×8 images) on the first `num_devices` devices."""
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  model = models.make_classifier('mlp', 'dense', 10)
  method, optimizer = methods.get_method('softmax'), optax.sgd(0.1, momentum=0.9)
  state = jax.eval_shape(functools.partial(step_lib.create_state, model, optimizer, (8, 8, 1)), jax.random.key(0))
  replicated = sharding.replicated(mesh)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, method=method, optimizer=optimizer,
                                   schedule=lambda _: 0.1, hparams=dict(method.hparams), key=jax.random.key(1)),
                 in_shardings=(jax.tree.map(lambda _: replicated, state), sharding.batch_sharding(mesh), replicated),
                 out_shardings=(jax.tree.map(lambda _: replicated, state), replicated))
  batch = {'image': jax.ShapeDtypeStruct((num_devices * per_device_batch, 8, 8, 1), jnp.float32),
           'label': jax.ShapeDtypeStruct((num_devices * per_device_batch,), jnp.int32)}
  return step.lower(state, batch, None), mesh


def test_mfu_is_per_device_on_a_mesh():
  # The same per-device batch on 8 devices and on 1: the same FLOPs per device, hence the same MFU at the same
  # speed; the global count (8× as large) would overstate it 8-fold. (What differs is the optimizer update, which
  # the 8 devices repeat and MFU counts once: 2 % of this small MLP's step at 64 images per device.)
  lowered_8, mesh_8 = _trainer_step_lowered(8, per_device_batch=64)
  lowered_1, mesh_1 = _trainer_step_lowered(1, per_device_batch=64)
  flops_8 = throughput.device_flops(lowered_8, mesh_8.devices.size)
  flops_1 = throughput.device_flops(lowered_1, mesh_1.devices.size)
  assert mesh_8.devices.size == 8 and throughput.step_flops(lowered_8) > 7 * flops_1
  np.testing.assert_allclose(flops_8, flops_1, rtol=0.05)
  # XLA's own per-device count of the program partitioned over the 8 devices agrees.
  np.testing.assert_allclose(flops_8, throughput.step_flops(lowered_8.compile()), rtol=0.05)
  mfu = [throughput.rates(10.0, batch_size=64 * n, flops=f, peak=1e12)['mfu'] for n, f in ((8, flops_8), (1, flops_1))]
  np.testing.assert_allclose(mfu[0], mfu[1], rtol=0.05)
