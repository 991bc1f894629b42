"""Every named set a config can ask for, by name: OOD test sets, corrupted sets, auxiliary outliers.

The trainer and the evaluator never look at a name's prefix: they ask this module. 'digits/<set>'
names and the digits dataset's corruptions come from the offline benchmark (`ood_jax.data.digits`),
'folder:<path>' from an image folder, everything else from TFDS (`ood_jax.data.ood_sets`,
`ood_jax.data.sources`).
"""

from __future__ import annotations

import os

from ood_jax.data import digits
from ood_jax.data import ood_sets
from ood_jax.data import registry
from ood_jax.data import sources

DIGITS_PREFIX = 'digits/'
DIGITS_OUTLIERS = 'digits/outliers'  # the digits benchmark's auxiliary outliers (train digits 6–9)
FOLDER_PREFIX = 'folder:'

__all__ = [
    'DIGITS_OUTLIERS',
    'check_ood_set',
    'load_corrupted_set',
    'load_ood_set',
    'load_outlier_set',
]


def check_ood_set(name: str) -> None:
  """Raises ValueError, listing the valid names, unless `name` names an OOD set `load_ood_set` knows."""
  if name.startswith(DIGITS_PREFIX):
    if name[len(DIGITS_PREFIX):] not in digits.OOD_SETS:
      valid = ', '.join(DIGITS_PREFIX + v for v in digits.OOD_SETS)
      raise ValueError(f'Unknown OOD set {name!r}; valid digits sets: {valid}.')
  elif not name.startswith(FOLDER_PREFIX) and name not in ood_sets.OOD_SETS:
    raise ValueError(f'Unknown OOD set {name!r}; valid: {", ".join(ood_sets.OOD_SETS)}, '
                     f'{DIGITS_PREFIX}<{"|".join(digits.OOD_SETS)}>.')


def load_ood_set(name: str, info: registry.DatasetInfo, *, data_dir: str | os.PathLike | None = None
                 ) -> sources.ArrayData:
  """An OOD test set at the image shape of the in-distribution dataset `info`."""
  check_ood_set(name)
  if name.startswith(DIGITS_PREFIX):
    return digits.load_ood(name[len(DIGITS_PREFIX):])
  return ood_sets.load_ood(name, data_dir=data_dir, image_size=info.image_shape[:2], channels=info.image_shape[-1])


def load_corrupted_set(info: registry.DatasetInfo, corruption: str, severity: int, *,
                       data_dir: str | os.PathLike | None = None) -> sources.ArrayData:
  """The test split of `info`'s dataset under one corruption (CIFAR-10-C as released, else on the fly)."""
  if info.name == 'digits':
    return digits.load_corrupted(corruption, severity)
  return ood_sets.load_corrupted(info.name, corruption, severity, data_dir=data_dir)


def load_outlier_set(source: str, info: registry.DatasetInfo, *, data_dir: str | os.PathLike | None = None,
                     split: str = 'train', max_examples: int | None = None, seed: int = 0) -> sources.ArrayData:
  """Auxiliary outliers (a TFDS name, a .npy file, or 'digits/outliers') at `info`'s image shape."""
  if source == DIGITS_OUTLIERS:
    return digits.load_outliers()
  return sources.load_outliers(source, data_dir=data_dir, split=split, image_size=info.image_shape[:2],
                               channels=info.image_shape[-1], max_examples=max_examples, seed=seed)
