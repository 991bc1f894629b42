"""Training throughput as users quote it: images per second and model FLOPs utilisation (MFU).

MFU = (FLOPs of one step per device) × steps per second / (one device's dense peak FLOP/s at the computation
dtype), the model FLOPs utilisation of Chowdhery et al. (2022, PaLM, appendix B). The step's FLOPs are XLA's
cost analysis of the lowered (not yet partitioned) step, which counts the global batch, divided by the number of
devices the step runs on: work every device repeats (the optimizer update of data parallelism) counts once.
The peak of a float32 step is the one its matrix units reach under JAX's default precision: TensorFloat-32 on
NVIDIA Ampere and later, bfloat16 passes on TPU (https://docs.jax.dev/en/latest/201/precision.html). The table
lists the chips people train these models on, matched on the whole device kind; for any other device (CPUs
included: their peak depends on the host's clock and vector units) MFU is reported only when the config gives
`peak_tflops`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax

# Normalised jax.Device.device_kind (see `_normalise`) → {dtype name: dense peak TFLOP/s of one JAX device}. A
# kind matches the longest entry it equals or begins with, word for word: 'h100 80gb hbm3' is the SXM entry 'h100',
# 'h100 nvl' its own, 'l40s' never 'l4'. Dense figures: half the "with sparsity" ones of NVIDIA's data sheets,
# float32 = TF32 tensor cores, bfloat16 with float32 accumulation.
#   H100 SXM5 / PCIe: NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), table 3: BF16 989.4 / 756,
#     TF32 494.7 / 378. H100 NVL: H100 data sheet (nvidia.com/en-us/data-center/h100): BF16 1,671*, TF32 835*.
#   H200 SXM / NVL: H200 data sheet (nvidia.com/en-us/data-center/h200): BF16 1,979* / 1,671*, TF32 989* / 835*.
#   A100 (SXM4 and PCIe alike): A100 data sheet: BF16 312, TF32 156.
#   L4: L4 data sheet: BF16 242*, TF32 120*. L40: L40 data sheet: BF16 181.05, TF32 90.5.
#   L40S: L40S data sheet: BF16 362.05, TF32 183.
#   TPUs: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/system-architecture-tpu-vm), bf16 per
#     chip: v2 45, v3 123, v4 275, v5e ('TPU v5 lite') 197, v5p ('TPU v5') 459, v6e ('TPU v6 lite') 918. v2 and v3
#     devices are single cores (half a chip); v4 and later devices are whole chips.
_PEAK_TFLOPS = {
    'h100': {'bfloat16': 989.4, 'float32': 494.7},
    'h100 pcie': {'bfloat16': 756.0, 'float32': 378.0},
    'h100 nvl': {'bfloat16': 835.5, 'float32': 417.5},
    'h200': {'bfloat16': 989.4, 'float32': 494.7},
    'h200 nvl': {'bfloat16': 835.5, 'float32': 417.5},
    'a100': {'bfloat16': 312.0, 'float32': 156.0},
    'l4': {'bfloat16': 121.0, 'float32': 60.0},
    'l40': {'bfloat16': 181.05, 'float32': 90.5},
    'l40s': {'bfloat16': 362.05, 'float32': 183.0},
    'tpu v2': {'bfloat16': 22.5, 'float32': 22.5},
    'tpu v3': {'bfloat16': 61.5, 'float32': 61.5},
    'tpu v4': {'bfloat16': 275.0, 'float32': 275.0},
    'tpu v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
    'tpu v5': {'bfloat16': 459.0, 'float32': 459.0},
    'tpu v5p': {'bfloat16': 459.0, 'float32': 459.0},
    'tpu v6 lite': {'bfloat16': 918.0, 'float32': 918.0},
}


def _normalise(kind: str) -> str:
  """'NVIDIA A100-SXM4-80GB' → 'a100 sxm4 80gb': lower case, words split at spaces, '-' and '_', no vendor."""
  words = re.split(r'[\s_-]+', kind.lower().strip())
  return ' '.join(words[1:] if words[:1] == ['nvidia'] else words)


def _peaks(kind: str) -> dict[str, float] | None:
  """The table's entry for a device kind: the longest key it equals or begins with, word for word."""
  name = _normalise(kind)
  for key in sorted(_PEAK_TFLOPS, key=len, reverse=True):
    if name == key or name.startswith(key + ' '):
      return _PEAK_TFLOPS[key]
  return None


def check_peak_tflops(value) -> float:
  """`value` as a float if it is a positive finite number of TFLOP/s, else ValueError (config checks call it)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
    raise ValueError(f"peak_tflops must be a positive number of TFLOP/s (unset: ood_jax.trainer.throughput's table), "
                     f'got {value!r}.')
  return float(value)


def peak_flops(device: jax.Device, dtype: str, *, override_tflops: float | None = None) -> float | None:
  """Dense peak FLOP/s of `device` at computation dtype `dtype` ('float32' or 'bfloat16'), or None if unknown.

  Args:
    device: a JAX device (its `device_kind` is looked up).
    dtype: the computation dtype's name.
    override_tflops: the peak in TFLOP/s, for a device the table does not list (a CPU, a new chip).

  Raises:
    ValueError: for a non-positive or non-finite override.
  """
  if override_tflops is not None:
    return 1e12 * check_peak_tflops(override_tflops)
  peaks = _peaks(getattr(device, 'device_kind', ''))
  return 1e12 * peaks[dtype] if peaks is not None and dtype in peaks else None


def step_flops(program: Any) -> float | None:
  """FLOPs of one call of a lowered or compiled program (XLA's cost analysis), or None if XLA gives none.

  A `Lowered` program's count is the whole computation's, before it is partitioned over devices; a `Compiled`
  one's is one device's share.
  """
  try:
    analysis = program.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without cost analysis: no MFU, not a failure)
    return None
  if isinstance(analysis, (list, tuple)):  # older jaxlibs: one dict per partition
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and math.isfinite(flops) and flops > 0 else None


def device_flops(lowered: Any, num_devices: int) -> float | None:
  """FLOPs of one step per device: XLA's count of the lowered step (the global batch) / the devices it runs on.

  Args:
    lowered: the `jax.stages.Lowered` step (`jitted.lower(*args)`), not yet partitioned over the devices.
    num_devices: the number of devices of its mesh.
  """
  flops = step_flops(lowered)
  return None if flops is None else flops / num_devices


def rates(steps_per_sec: float, *, batch_size: int, flops: float | None, peak: float | None) -> dict[str, float]:
  """`images_per_sec`, and `mfu` (a fraction) when both the step's FLOPs and the peak are known."""
  out = {'images_per_sec': steps_per_sec * batch_size}
  if flops is not None and peak is not None:
    out['mfu'] = flops * steps_per_sec / peak
  return out
