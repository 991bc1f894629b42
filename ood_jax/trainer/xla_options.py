"""XLA and JAX options of the trainer: CPU compile options, GPU determinism, the persistent compilation cache.

**CPU compile options** (per compilation). On CPU, XLA (jaxlib 0.10) hands convolutions and their
neighbouring element-wise ops to YNNPACK fusions. For the CIFAR backbones that is the slower choice:
`xla_cpu_experimental_ynn_fusion_type=''` (no YNN fusions: XLA's own Eigen convolutions) was measured faster on
every backbone we timed (2 cores, best of several rounds, quiet machine; `docs/benchmark_peers.md`):

  train step   ResNet-20 b128: 1.08-1.11×   ResNet-18 b32: 1.08×   WRN-40-2 b32: 1.25×
  inference    ResNet-20 b512: 1.34×        ResNet-18 b512: 2.2×

(`python -m experiments.benchmark_peers`, and `python -m experiments.benchmark --xla_cpu_defaults`
to compare with XLA's defaults on your machine). The numbers change only by float32 rounding (the
same products, summed in another order; a step's parameters agree to ~1e-5) and stay deterministic
run to run, so kill-and-resume is still bitwise.

The option also hands matrix products to Eigen instead of YNNPACK, which is slower on large float32 GEMMs:
immaterial for the convolutional backbones, but a network of large dense layers may train faster with the
defaults (scratch measurements in `docs/benchmark_peers.md`, not rerunnable from the repository).

The option is passed per `jax.jit` (`compiler_options=`), never through the process-wide XLA_FLAGS, so user
code in the same process is unaffected. A jaxlib that no longer knows the flag gets no options (probed once,
with a tiny compile). GPU and TPU get no per-compilation options.

**GPU determinism** (`config.deterministic`, process-wide). XLA:GPU's autotuner picks GEMM and convolution
kernels by timing them, and some kernels (scatter, some reductions) add in a run-dependent order, so a resumed
process may round differently from the one that saved the checkpoint. `--xla_gpu_deterministic_ops=true`
(XLA's docs/determinism.md) makes the autotuner take its first valid kernel instead of the fastest and switches
those ops to deterministic implementations. It goes into XLA_FLAGS, read once when JAX starts its backend, so
that every program of the run (initialisation, augmentation, the step, evaluation) is covered: `set_deterministic`
must run before anything touches a device (`train.prepare` calls it first). CPU and TPU get no flags.

**Persistent compilation cache** (`config.compilation_cache_dir`). JAX writes each compiled program there and a
later process with the same program, jaxlib and flags loads it instead of compiling; every program is cached,
however small or quick to compile.
"""

from __future__ import annotations

import functools
import os
import pkgutil
import warnings

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp

_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def _cpu_options_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS)(jnp.zeros((), jnp.float32)).block_until_ready()
  except jax.errors.JaxRuntimeError:  # 'No such compile option' in a jaxlib that renamed or dropped it
    return False
  return True


def compiler_options(enabled: bool = True) -> dict[str, str] | None:
  """The `compiler_options` for `jax.jit` of training and inference on the default backend.

  Args:
    enabled: False returns None (XLA's defaults), e.g. from `--config.xla_cpu_defaults=True`.

  Returns:
    `{'xla_cpu_experimental_ynn_fusion_type': ''}` on CPU when this jaxlib accepts it, else None.
  """
  if not enabled or jax.default_backend() != 'cpu' or not _cpu_options_supported():
    return None
  return dict(_CPU_OPTIONS)


# XLA_FLAGS that make XLA:GPU choose kernels without timing them and use deterministic implementations.
_GPU_DETERMINISTIC_FLAGS = ('--xla_gpu_deterministic_ops=true',)


def deterministic_flags(platform: str) -> tuple[str, ...]:
  """The XLA_FLAGS that `config.deterministic` sets for a JAX platform ('gpu', 'cuda', 'rocm', 'cpu', 'tpu')."""
  return _GPU_DETERMINISTIC_FLAGS if platform in ('gpu', 'cuda', 'rocm') else ()


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (no public way to ask)
  return xla_bridge.backends_are_initialized()


def _platform() -> str:
  """The platform JAX runs on, or, before its backend starts, the one it will choose, without starting it."""
  if _backend_started():
    return jax.default_backend()
  if jax.config.jax_platforms:  # JAX_PLATFORMS / jax_platforms: the first one JAX will try
    return jax.config.jax_platforms.split(',')[0].strip()
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  (the namespace JAX finds its GPU plugins in)
  except ImportError:
    return 'cpu'
  names = [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
  return 'gpu' if any('cuda' in name or 'rocm' in name for name in names) else 'cpu'


def set_deterministic(enabled: bool) -> tuple[str, ...]:
  """Adds the platform's `deterministic_flags` to XLA_FLAGS before JAX starts its backend; returns those added.

  A flag the user's XLA_FLAGS already names keeps the user's value. Once the backend has started, XLA has read
  XLA_FLAGS: nothing is added, and a warning says how to set the flags (or to set deterministic=False).
  """
  if not enabled:
    return ()
  platform = _platform()
  current = os.environ.get('XLA_FLAGS', '')
  missing = tuple(flag for flag in deterministic_flags(platform) if flag.split('=')[0] not in current)
  if not missing:
    return ()
  if _backend_started():
    warnings.warn(
        f'config.deterministic=True, but JAX started its {platform} backend before the trainer could add '
        f'{" ".join(missing)} to XLA_FLAGS: XLA:GPU may choose other kernels in a resumed process, which then does '
        f'not continue bitwise. Set XLA_FLAGS="{" ".join(missing)}" before Python starts (or before the first JAX '
        f'computation of a notebook), or pass --config.deterministic=False to accept that.', UserWarning, stacklevel=2)
    return ()
  os.environ['XLA_FLAGS'] = ' '.join([current, *missing]).strip()
  logging.info('config.deterministic: XLA_FLAGS += %s', ' '.join(missing))
  return missing


def use_compilation_cache(directory: str | None) -> None:
  """JAX's persistent compilation cache in `directory` (created if needed) for every program; None: unchanged.

  Small and quickly compiled programs are cached too (JAX's defaults skip programs compiled in under a second).
  """
  if not directory:
    return
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update('jax_compilation_cache_dir', directory)
    compilation_cache.reset_cache()  # a cache opened earlier in this process keeps its folder otherwise
