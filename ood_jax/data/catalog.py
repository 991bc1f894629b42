"""Every set a run reads, by name: training and validation splits, OOD, corrupted and outlier sets.

The trainer and the evaluator never look at a name's prefix: they ask this module. 'digits/<set>'
names and the digits dataset's corruptions come from the offline benchmark (`ood_jax.data.digits`),
'folder:<path>' from an image folder, everything else from TFDS (`ood_jax.data.ood_sets`,
`ood_jax.data.sources`).
"""

from __future__ import annotations

import os

import numpy as np

from ood_jax.data import digits
from ood_jax.data import ood_sets
from ood_jax.data import registry
from ood_jax.data import sources

VALIDATION_SEED = 0  # the held-out examples do not change with the training seed
DIGITS_PREFIX = 'digits/'
DIGITS_OUTLIERS = 'digits/outliers'  # the digits benchmark's auxiliary outliers (train digits 6–9)
FOLDER_PREFIX = 'folder:'

__all__ = [
    'DIGITS_OUTLIERS',
    'check_ood_set',
    'check_validation_fraction',
    'load_corrupted_set',
    'load_ood_set',
    'load_outlier_set',
    'load_train_and_validation',
    'split_validation',
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


def check_validation_fraction(fraction) -> float:
  """`fraction` as a float if it lies in [0, 0.5] (a held-out share of each class), else ValueError."""
  fraction = float(fraction)
  if not 0.0 <= fraction <= 0.5:
    raise ValueError(f'validation_fraction must lie in [0, 0.5], got {fraction}.')
  return fraction


def split_validation(data: sources.ArrayData, fraction: float, *, seed: int = VALIDATION_SEED
                     ) -> tuple[sources.ArrayData, sources.ArrayData]:
  """(train, validation): a stratified, deterministic held-out part of a labelled training set.

  From each class c with n_c examples, round(fraction·n_c) examples (at least one when fraction > 0
  and n_c > 1) are drawn by `np.random.RandomState(seed)` and held out; both parts keep the source
  order. Post-hoc calibration and detector tuning fit on the validation part, which training never
  sees.

  Args:
    data: labelled training data.
    fraction: share of each class to hold out, in [0, 0.5]; 0 gives an empty validation set.
    seed: seed of the draw (fixed by default, so the split does not move with `config.seed`).

  Returns:
    `(train, validation)` ArrayData named '<name>:train' and '<name>:validation'.
  """
  fraction = check_validation_fraction(fraction)
  labels = np.asarray(data.labels)
  if labels.size and labels.min() < 0:
    raise ValueError(f'split_validation needs labelled data; {data.name} has label {labels.min()}.')
  rng = np.random.RandomState(seed)
  held_out = np.zeros(len(labels), bool)
  if fraction > 0:
    for label in np.unique(labels):
      members = np.flatnonzero(labels == label)
      count = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
      held_out[rng.permutation(members)[:count]] = True
  part = lambda mask, split: sources.ArrayData(data.images[mask], labels[mask], f'{data.name}:{split}')
  return part(~held_out, 'train'), part(held_out, 'validation')


def load_train_and_validation(info: registry.DatasetInfo, *, validation_fraction: float,
                              data_dir: str | os.PathLike | None = None
                              ) -> tuple[sources.ArrayData, sources.ArrayData]:
  """The training split of `info`'s dataset, less a held-out validation part (`split_validation`)."""
  return split_validation(sources.load_split(info.name, info.train_split, data_dir=data_dir), validation_fraction)
