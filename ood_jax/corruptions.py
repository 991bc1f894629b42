"""CIFAR-C corruptions (Hendrycks & Dietterich 2019) for covariate-shift evaluation.

Names follow TFDS's `cifar10_corrupted` configs (glass blur is `frosted_glass_blur`, elastic
transform is `elastic`). The 15 benchmark corruptions are the ones papers average over; the 4
extras were released as a validation set.
"""

from __future__ import annotations

BENCHMARK_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'frosted_glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic', 'pixelate', 'jpeg_compression',
)
EXTRA_CORRUPTIONS = ('gaussian_blur', 'saturate', 'spatter', 'speckle_noise')
CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)


def check_corruption(name: str, severity: int) -> None:
  """Raises ValueError for an unknown corruption name or a severity outside 1..5."""
  if name not in CORRUPTIONS:
    raise ValueError(f'Unknown corruption {name!r}; valid names: {", ".join(CORRUPTIONS)}.')
  if isinstance(severity, bool) or severity not in SEVERITIES:
    raise ValueError(f'severity must be one of 1..5, got {severity!r}.')
