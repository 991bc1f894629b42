"""Benchmark protocols: definitions, loading under TFDS mocks and list / folder fixtures, missing data."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import digits
from ood_jax.trainer.data import ood_sets
from ood_jax.trainer.data import protocols
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources


def test_every_protocol_is_well_formed():
  for (name, dataset), protocol in protocols.PROTOCOLS.items():
    assert (protocol.name, protocol.dataset) == (name, dataset)
    if protocol.large:  # ImageNet: its own streamed in-distribution data, no registry dataset
      assert protocol.in_distribution.num_classes > 0 and len(set(protocol.in_distribution.sets)) == 3, name
    else:
      registry.get_info(dataset)
    assert protocol.test_sets and protocol.validation, name
    for set_name in protocol.test_sets + protocol.validation:
      catalog.check_ood_set(set_name)
    # Tuning sets never double as test sets, and no test set is listed twice.
    assert not set(protocol.validation) & set(protocol.test_sets), name
    assert len(set(protocol.test_sets)) == len(protocol.test_sets), name
    assert dataset not in protocol.test_sets, name


def test_openood_v1_5_is_the_published_split():
  c10 = protocols.get('openood_v1_5', 'cifar10')
  assert c10.near == ('cifar100', 'openood:cifar10/test_tin')
  assert c10.far == ('mnist', 'svhn_cropped', 'dtd', 'openood:cifar10/test_places365')
  assert c10.validation == ('openood:cifar10/val_tin',)
  lists = protocols.get('openood_v1_5_lists', 'cifar100')
  assert lists.near == ('openood:cifar100/test_cifar10', 'openood:cifar100/test_tin')
  assert lists.far == tuple(f'openood:cifar100/test_{n}' for n in ('mnist', 'svhn', 'texture', 'places365'))
  assert protocols.get('digits', 'digits').groups == {
      'near': ('digits/near',), 'far': ('digits/photos', 'digits/gaussian_noise', 'digits/uniform_noise')}


def test_unknown_protocol_or_dataset_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown benchmark protocol 'openood'.*openood_v1_5, openood_v1_5_lists"):
    protocols.get('openood', 'cifar10')
  with pytest.raises(ValueError, match=r"no split for dataset 'svhn_cropped'; it defines: cifar10, cifar100"):
    protocols.get('openood_v1_5', 'svhn_cropped')


def _write_openood(root, dataset='cifar10', lists=('test_tin', 'test_places365', 'val_tin'), count=3):
  """OpenOOD's layout: benchmark_imglist/<dataset>/<list>.txt naming images under images_classic/."""
  imglist = root / 'openood' / 'benchmark_imglist' / dataset
  imglist.mkdir(parents=True, exist_ok=True)
  colours = {}
  for i, name in enumerate(lists):
    folder = root / 'openood' / 'images_classic' / name
    folder.mkdir(parents=True, exist_ok=True)
    lines, colours[name] = [], []
    for j in range(count):
      colour = (40 * i, 10 * j, 200)
      Image.new('RGB', (64, 48), colour).save(folder / f'{j}.png')
      lines.append(f'{name}/{j}.png {-1 if j % 2 else 0}')
      colours[name].append(colour)
    (imglist / f'{name}.txt').write_text('\n'.join(lines) + '\n\n')
  return colours


def test_openood_protocol_loads_from_tfds_mocks_and_image_lists(tmp_path, monkeypatch):
  colours = _write_openood(tmp_path)
  monkeypatch.setenv(catalog.BENCHMARK_DIR_ENV, str(tmp_path))
  protocol = protocols.get('openood_v1_5', 'cifar10')
  info = registry.get_info('cifar10')
  catalog.check_prepared(protocol.test_sets + protocol.validation)
  with tfds.testing.mock_data(num_examples=5):
    for name in protocol.test_sets + protocol.validation:
      data = catalog.load_ood_set(name, info)
      assert data.name == name
      assert data.images.shape[1:] == (32, 32, 3) and data.images.dtype == np.uint8, name
      assert np.all(data.labels == sources.OUTLIER_LABEL), name
  # List order is kept and the images are the listed files (uniform colours survive the resize).
  tin = catalog.load_ood_set('openood:cifar10/test_tin', info)
  np.testing.assert_array_equal(tin.images[:, 5, 5], np.array(colours['test_tin'], np.uint8))


def test_mnist_is_grey_at_the_in_distribution_shape():
  sources.clear_cache()  # an earlier test may have read mnist from a mock of another size
  with tfds.testing.mock_data(num_examples=4):
    rgb = catalog.load_ood_set('mnist', registry.get_info('cifar10'))
  assert rgb.images.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(rgb.images[..., 0], rgb.images[..., 2])  # grey repeated


def test_odin_folders_resolve_under_the_benchmark_dir(tmp_path):
  folder = tmp_path / 'odin' / 'LSUN_resize'
  folder.mkdir(parents=True)
  for j in range(2):
    Image.new('RGB', (32, 32), (j, 2, 3)).save(folder / f'{j}.png')
  data = catalog.load_ood_set('odin:LSUN_resize', registry.get_info('cifar10'), benchmark_dir=tmp_path)
  assert data.name == 'odin:LSUN_resize' and data.images.shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match=r"Unknown ODIN set 'odin:lsun'.*odin:LSUN_resize"):
    catalog.check_ood_set('odin:lsun')


def test_missing_sets_are_all_reported_with_the_preparation_command(tmp_path):
  protocol = protocols.get('isomax', 'cifar10')
  with pytest.raises(sources.DatasetNotFoundError) as err:
    catalog.check_prepared(protocol.test_sets + protocol.validation, benchmark_dir=tmp_path)
  message = str(err.value)
  assert message.startswith('3 OOD set(s) are not prepared')  # two ODIN folders and the OpenOOD list
  assert f'untar it into {tmp_path / "odin"}' in message and 'Imagenet_resize.tar.gz' in message
  assert ('OpenOOD/scripts/download/download.py --contents datasets --datasets cifar-10 cifar-100 '
          f'--dataset_mode benchmark --save_dir {tmp_path / "openood"}') in message
  # Loading one names it too, before any image is read.
  with pytest.raises(sources.DatasetNotFoundError, match='val_tin.txt'):
    catalog.load_ood_set('openood:cifar10/val_tin', registry.get_info('cifar10'), benchmark_dir=tmp_path)


def test_image_list_errors_name_the_missing_files(tmp_path):
  _write_openood(tmp_path, lists=('test_tin',))
  listing = tmp_path / 'openood' / 'benchmark_imglist' / 'cifar10' / 'test_tin.txt'
  with pytest.raises(sources.DatasetNotFoundError, match=r'3 of the 3 images .* missing under .*is the image root'):
    ood_sets.load_ood(f'imglist:{listing}')  # default root: the list's folder, wrong for OpenOOD's layout
  good = ood_sets.load_ood(f'imglist:{listing}@{tmp_path / "openood" / "images_classic"}', num_examples=2)
  assert good.images.shape == (2, 32, 32, 3)
  (tmp_path / 'empty.txt').write_text('\n')
  with pytest.raises(sources.DatasetNotFoundError, match='names no image'):
    ood_sets.load_ood(f'imglist:{tmp_path / "empty.txt"}')


def test_digits_validation_ood_is_held_out_of_the_outlier_pool():
  validation, pool = digits.load_ood('validation'), digits.load_outliers()
  assert (len(validation), len(pool)) == (119, 358)  # ⌊n/4⌋ of the 477 train digits 6–9
  flat = lambda data: {image.tobytes() for image in data.images}
  assert not flat(validation) & flat(pool)
  tests = [digits.load_ood(name) for name in digits.TEST_OOD_SETS] + [digits.load_split('test')]
  assert not any(flat(validation) & flat(test) for test in tests)
  # Every protocol set of digits loads offline.
  info = registry.get_info('digits')
  protocol = protocols.get('digits', 'digits')
  sizes = [len(catalog.load_ood_set(name, info)) for name in protocol.test_sets + protocol.validation]
  assert sizes == [237, 456, 500, 500, 119]
