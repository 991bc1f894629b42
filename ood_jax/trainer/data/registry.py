"""The in-distribution datasets ood_jax knows: class count, image shape, normalisation statistics.

Statistics are per-channel means and standard deviations of the training images on the [0, 1]
pixel scale. Padhy et al. 2020 instead rescale inputs to [−1, 1]; that is mean = std = 0.5, which a
config can choose with `SYMMETRIC`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipelines need to know about an in-distribution dataset.

  Attributes:
    name: registry name (what configs say).
    tfds_name: TFDS builder name, or None for a dataset built inside ood_jax (digits).
    num_classes: number of classes K; labels lie in [0, K).
    image_shape: (H, W, C) of the uint8 images the loaders return.
    mean: per-channel mean of the training images on [0, 1].
    std: per-channel standard deviation of the training images on [0, 1].
    train_split: TFDS split used for training.
    test_split: TFDS split used for evaluation.
    label_key: feature holding the label ('label'; cifar100 also has 'coarse_label').
  """

  name: str
  tfds_name: str | None
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str = 'train'
  test_split: str = 'test'
  label_key: str = 'label'


SYMMETRIC = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # mean, std mapping [0, 1] to [−1, 1]

_DATASETS = (
    DatasetInfo('cifar10', 'cifar10', 10, (32, 32, 3),
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    DatasetInfo('cifar100', 'cifar100', 100, (32, 32, 3),
                mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    DatasetInfo('svhn_cropped', 'svhn_cropped', 10, (32, 32, 3),
                mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
    # Built from scikit-learn's bundled digits (ood_jax.trainer.data.digits): classes 0–5 in-distribution.
    DatasetInfo('digits', None, 6, (32, 32, 1), mean=(0.3084,), std=(0.3512,)),
)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _DATASETS}


def get_info(name: str) -> DatasetInfo:
  """The registry entry for `name`; unknown names fail with the list of valid ones."""
  try:
    return DATASETS[name]
  except KeyError:
    raise ValueError(f'Unknown dataset {name!r}; valid names: {", ".join(sorted(DATASETS))}.') from None
