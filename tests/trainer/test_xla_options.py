"""`ood_jax.trainer.xla_options`: the CPU compile options change speed, not results beyond float32 rounding; the GPU
deterministic-ops flags reach XLA_FLAGS before the backend starts (inspected on CPU)."""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits as digits_config
from ood_jax.trainer import experiment
from ood_jax.trainer import xla_options

REPO = pathlib.Path(__file__).resolve().parents[2]


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


# ---- config.deterministic: XLA_FLAGS for deterministic GPU kernels, set before JAX starts its backend ----


@pytest.mark.parametrize('platform, flags', [('gpu', ('--xla_gpu_deterministic_ops=true',)),
                                             ('cuda', ('--xla_gpu_deterministic_ops=true',)),
                                             ('rocm', ('--xla_gpu_deterministic_ops=true',)), ('cpu', ()), ('tpu', ())])
def test_deterministic_flags_per_platform(platform, flags):
  assert xla_options.deterministic_flags(platform) == flags


def test_set_deterministic_before_the_backend_starts_adds_the_gpu_flags(monkeypatch):
  monkeypatch.setattr(xla_options, '_backend_started', lambda: False)
  monkeypatch.setattr(xla_options, '_platform', lambda: 'gpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert xla_options.set_deterministic(False) == ()
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
  assert xla_options.set_deterministic(True) == ('--xla_gpu_deterministic_ops=true',)
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=true'
  assert xla_options.set_deterministic(True) == ()  # once
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_deterministic_ops=false')  # the user's own choice is kept
  assert xla_options.set_deterministic(True) == ()
  assert os.environ['XLA_FLAGS'] == '--xla_gpu_deterministic_ops=false'


def test_set_deterministic_after_the_backend_started_warns_on_gpu_only(monkeypatch):
  flags = os.environ.get('XLA_FLAGS', '')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert xla_options.set_deterministic(True) == ()  # this CPU backend (started): nothing to set, no warning
  monkeypatch.setattr(xla_options, '_platform', lambda: 'gpu')
  with pytest.warns(UserWarning, match=r'XLA_FLAGS="--xla_gpu_deterministic_ops=true".*deterministic=False'):
    assert xla_options.set_deterministic(True) == ()
  assert os.environ.get('XLA_FLAGS', '') == flags


# In a fresh process: what `prepare` does before the backend starts, then the backend starts and reads XLA_FLAGS.
_FLAGS_SCRIPT = r"""
import json, sys
import jax
from ood_jax.trainer import xla_options
platform, started = xla_options._platform(), xla_options._backend_started()
if sys.argv[1] == 'gpu':  # as on a GPU host: the flags are added, and XLA (this jaxlib's, on CPU) must accept them
  xla_options._platform = lambda: 'gpu'
added = xla_options.set_deterministic(True)
import os
os.environ['XLA_FLAGS'] += ' ' + sys.argv[2]
print(json.dumps({'platform': platform, 'started': started, 'added': added, 'devices': jax.device_count()}))
"""


def test_platform_is_known_without_starting_the_backend():
  # JAX_PLATFORMS names the platform JAX will start (on a GPU host without it: its CUDA plugin); asking starts nothing.
  script = 'from ood_jax.trainer import xla_options; print(xla_options._platform(), xla_options._backend_started())'
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cuda'})
  assert result.stdout.split() == ['cuda', 'False']


def test_xla_knows_the_deterministic_flags_and_reads_them_when_the_backend_starts():
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  run = lambda *args: subprocess.run([sys.executable, '-c', _FLAGS_SCRIPT, *args], capture_output=True, text=True,
                                     env=env)
  # The device count set after `import jax` is honoured: XLA_FLAGS is read when the backend starts.
  result = run('gpu', '--xla_force_host_platform_device_count=3')
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {'platform': 'cpu', 'started': False, 'added': ['--xla_gpu_deterministic_ops=true'], 'devices': 3}
  # XLA aborts on a flag it does not know, so the run above shows it knows the deterministic one.
  assert run('gpu', '--xla_gpu_no_such_flag_in_any_jaxlib=true').returncode != 0
