"""`ood_jax.trainer.xla_options`: the CPU compile options change speed, not results beyond float32 rounding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits as digits_config
from ood_jax.trainer import experiment
from ood_jax.trainer import xla_options


def test_cpu_gets_the_option_and_it_can_be_turned_off():
  assert jax.default_backend() == 'cpu'
  assert xla_options.compiler_options() == {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert xla_options.compiler_options(enabled=False) is None
  options = xla_options.compiler_options()
  options['x'] = 'y'  # a private copy: callers cannot change what the next caller gets
  assert 'x' not in xla_options.compiler_options()


def test_a_jaxlib_without_the_flag_gets_no_options(monkeypatch):
  monkeypatch.setattr(xla_options, '_CPU_OPTIONS', {'xla_cpu_no_such_flag_in_any_jaxlib': ''})
  xla_options._cpu_options_supported.cache_clear()
  try:
    assert xla_options.compiler_options() is None
  finally:
    xla_options._cpu_options_supported.cache_clear()


def _conv_net_grad(x, w1, w2):
  def loss(w1, w2):
    dn = ('NHWC', 'HWIO', 'NHWC')
    y = jax.lax.conv_general_dilated(x, w1, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    y = jax.nn.relu((y - y.mean((0, 1, 2))) * jax.lax.rsqrt(y.var((0, 1, 2)) + 1e-5))
    y = jax.lax.conv_general_dilated(y, w2, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    return jnp.mean(jnp.square(y))
  return jax.value_and_grad(loss, argnums=(0, 1))(w1, w2)


def test_options_change_conv_gradients_only_by_float32_rounding_and_are_deterministic():
  keys = jax.random.split(jax.random.key(0), 3)
  args = (jax.random.normal(keys[0], (16, 16, 16, 8)), 0.2 * jax.random.normal(keys[1], (3, 3, 8, 16)),
          0.1 * jax.random.normal(keys[2], (3, 3, 16, 16)))
  default = jax.jit(_conv_net_grad)(*args)
  tuned = jax.jit(_conv_net_grad, compiler_options=xla_options.compiler_options())
  first, second = tuned(*args), jax.jit(_conv_net_grad, compiler_options=xla_options.compiler_options())(*args)
  for a, b, c in zip(jax.tree.leaves(default), jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))  # recompiled: bitwise the same


def test_config_field_must_be_a_bool():
  # ml_collections already refuses `--config.xla_cpu_defaults=yes`; a config built as a dict is not typed.
  fields = digits_config.get_config('smoke').to_dict()
  fields['xla_cpu_defaults'] = 'yes'
  config = ml_collections.ConfigDict(fields)
  with pytest.raises(ValueError, match='xla_cpu_defaults must be True or False'):
    experiment.check_config(config)
