"""Training throughput as users quote it: images per second and model FLOPs utilisation (MFU).

MFU = (FLOPs of one step, from XLA's cost analysis of the lowered step, per device) × steps per second
/ (the device's dense peak FLOP/s at the computation dtype). The peak of a float32 step is the one its
matrix units reach under JAX's default precision: TensorFloat-32 on NVIDIA Ampere and later, bfloat16
passes on TPU (https://docs.jax.dev/en/latest/201/precision.html). The table lists the chips people
train these models on; for any other device (CPUs included: their peak depends on the host's clock and
vector units) MFU is reported only when the config gives `peak_tflops`.
"""

from __future__ import annotations

import math
from typing import Any

import jax

# (substring of jax.Device.device_kind, {dtype name: dense peak TFLOP/s of one JAX device}), first match
# wins, so more specific names come first. Vendor data sheets, without structured sparsity. TPU v2 / v3
# devices are single cores (half a chip); v4 and later devices are whole chips.
_PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
    ('H100', {'bfloat16': 989.0, 'float32': 494.5}),
    ('H200', {'bfloat16': 989.0, 'float32': 494.5}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('L4', {'bfloat16': 121.0, 'float32': 60.0}),
    ('TPU v6 lite', {'bfloat16': 918.0, 'float32': 918.0}),
    ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
    ('TPU v5', {'bfloat16': 459.0, 'float32': 459.0}),
    ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
    ('TPU v3', {'bfloat16': 61.5, 'float32': 61.5}),
    ('TPU v2', {'bfloat16': 22.5, 'float32': 22.5}),
)


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
  kind = getattr(device, 'device_kind', '')
  for pattern, peaks in _PEAK_TFLOPS:
    if pattern in kind:
      return 1e12 * peaks[dtype] if dtype in peaks else None
  return None


def step_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled program on one device (XLA's cost analysis), or None if XLA gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without cost analysis: no MFU, not a failure)
    return None
  if isinstance(analysis, (list, tuple)):  # older jaxlibs: one dict per partition
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and math.isfinite(flops) and flops > 0 else None


def rates(steps_per_sec: float, *, batch_size: int, flops: float | None, peak: float | None) -> dict[str, float]:
  """`images_per_sec`, and `mfu` (a fraction) when both the step's FLOPs and the peak are known."""
  out = {'images_per_sec': steps_per_sec * batch_size}
  if flops is not None and peak is not None:
    out['mfu'] = flops * steps_per_sec / peak
  return out
