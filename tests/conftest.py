"""Test session set-up: 8 fake CPU devices (for sharding tests) and TensorFlow kept off accelerators."""

import os

# Must happen before JAX initialises its backend: every test process sees 8 CPU devices, so
# sharded code paths run here exactly as on an 8-accelerator host. Single-device code is unaffected.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # TensorFlow (used by TFDS) must never grab a GPU

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

assert len(jax.devices()) == 8, 'tests expect 8 fake CPU devices; import jax only after conftest'


import jax.numpy as jnp  # noqa: E402  (after XLA_FLAGS, like jax)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def random_variables():
  """`random_variables(model, x, seed=0)`: variables of the right shapes filled from NumPy.

  Compiling a CNN's `init` takes seconds on this CPU; tests that only need plausible weights skip it.
  """
  def _random_variables(model, x, seed=0):
    """Variables of the right shapes filled from NumPy: compiling the CNN's `init` takes seconds on CPU."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
      name = jax.tree_util.keystr(path)
      if 'var' in name or 'scale' in name:
        value = 1.0 + 0.1 * rng.random(leaf.shape)
      else:
        value = rng.standard_normal(leaf.shape) / np.sqrt(max(np.prod(leaf.shape[:-1]), 1))
      return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)

  return _random_variables
