"""The set catalog: the validation split (stratified, deterministic, disjoint), set names, dispatch."""

import numpy as np
import pytest

from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import digits
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources


def _data(counts):
  labels = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(counts)])
  images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(2, axis=1)
  return sources.ArrayData(images, labels, 'toy')


def test_validation_split_is_stratified_disjoint_and_fixed():
  data = _data([40, 20, 10])
  train, validation = catalog.split_validation(data, 0.1)
  assert np.bincount(validation.labels).tolist() == [4, 2, 1]  # round(0.1·n_c) per class
  assert len(train) + len(validation) == len(data)
  ids_train, ids_val = train.images[:, 0, 0, 0].tolist(), validation.images[:, 0, 0, 0].tolist()
  assert not set(ids_train) & set(ids_val)
  assert ids_train == sorted(ids_train) and ids_val == sorted(ids_val)  # source order kept
  np.testing.assert_array_equal(train.labels, data.labels[ids_train])
  again_train, again_val = catalog.split_validation(data, 0.1)
  np.testing.assert_array_equal(again_val.images, validation.images)  # the same draw every time
  assert (train.name, validation.name) == ('toy:train', 'toy:validation')


def test_validation_split_edges():
  data = _data([3, 2])
  _, validation = catalog.split_validation(data, 0.01)
  assert np.bincount(validation.labels).tolist() == [1, 1]  # at least one per class ...
  train, _ = catalog.split_validation(data, 0.5)
  assert np.bincount(train.labels).tolist() == [1, 1]  # ... and at least one left to train on
  train, validation = catalog.split_validation(data, 0.0)
  assert len(validation) == 0 and len(train) == len(data)
  with pytest.raises(ValueError, match=r'validation_fraction must lie in \[0, 0.5\]'):
    catalog.split_validation(data, 0.7)
  unlabelled = sources.ArrayData(data.images, np.full(len(data), -1, np.int32), 'outliers')
  with pytest.raises(ValueError, match='labelled data'):
    catalog.split_validation(unlabelled, 0.1)


def test_digits_train_and_validation_partition_the_digits_training_split():
  info = registry.get_info('digits')
  train, validation = catalog.load_train_and_validation(info, validation_fraction=0.1)
  full = digits.load_split('train')
  assert len(train) + len(validation) == len(full) == 724 and len(validation) == 72
  assert set(np.unique(validation.labels)) == set(range(6))


@pytest.mark.parametrize('name,message', [
    ('digits/nearish', 'valid digits sets: digits/near, digits/photos'),
    ('imagenet_o', 'valid: cifar10, cifar100'),
])
def test_unknown_set_names_list_the_valid_ones(name, message):
  with pytest.raises(ValueError, match=message):
    catalog.check_ood_set(name)


def test_digits_names_dispatch_to_the_digits_benchmark():
  info = registry.get_info('digits')
  near = catalog.load_ood_set('digits/near', info)
  np.testing.assert_array_equal(near.images, digits.load_ood('near').images)
  outliers = catalog.load_outlier_set(catalog.DIGITS_OUTLIERS, info)
  np.testing.assert_array_equal(outliers.images, digits.load_outliers().images)
  corrupted = catalog.load_corrupted_set(info, 'fog', 2)
  np.testing.assert_array_equal(corrupted.labels, digits.load_split('test').labels)
  catalog.check_ood_set('folder:/anywhere')  # folders are checked when read
