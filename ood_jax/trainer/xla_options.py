"""Per-compilation XLA options for the trainer's step and the inference function (issue 16).

On CPU, XLA (jaxlib 0.10) hands convolutions and their neighbouring element-wise ops to YNNPACK
fusions. For the CIFAR backbones that is the slower choice: `xla_cpu_experimental_ynn_fusion_type=''`
(no YNN fusions: XLA's own Eigen convolutions) was measured faster on every backbone we timed (2 cores,
best of several rounds, quiet machine; `docs/benchmark_peers.md`):

  train step   ResNet-20 b128: 1.08-1.11×   ResNet-18 b32: 1.08×   WRN-40-2 b32: 1.25×
  inference    ResNet-20 b512: 1.34×        ResNet-18 b512: 2.2×

(`python -m experiments.benchmark_peers`, and `python -m experiments.benchmark --xla_cpu_defaults`
to compare with XLA's defaults on your machine). The numbers change only by float32 rounding (the
same products, summed in another order; a step's parameters agree to ~1e-5) and stay deterministic
run to run, so kill-and-resume is still bitwise.

The option also hands matrix products to Eigen instead of YNNPACK, which is slower on large float32 GEMMs:
immaterial for the convolutional backbones, but a network of large dense layers may train faster with the
defaults (scratch measurements in `docs/benchmark_peers.md`, not rerunnable from the repository).

GPU and TPU get no options: their compilers are left alone. The option is passed per `jax.jit`
(`compiler_options=`), never through the process-wide XLA_FLAGS, so user code in the same process is
unaffected. A jaxlib that no longer knows the flag gets no options (probed once, with a tiny compile).
"""

from __future__ import annotations

import functools

import jax
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
