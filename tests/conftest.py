"""Test session set-up: 8 fake CPU devices (for sharding tests) and TensorFlow kept off accelerators."""

import os

# Must happen before JAX initialises its backend: every test process sees 8 CPU devices, so
# sharded code paths run here exactly as on an 8-accelerator host. Single-device code is unaffected.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # TensorFlow (used by TFDS) must never grab a GPU

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

assert len(jax.devices()) == 8, 'tests expect 8 fake CPU devices; import jax only after conftest'
