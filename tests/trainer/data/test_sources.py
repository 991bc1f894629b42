"""Tests for ood_jax.trainer.data.sources and ood_jax.trainer.data.ood_sets on mock TFDS data and files in tmp_path."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ood_jax import corruptions
from ood_jax.trainer.data import ood_sets
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources

N = 24  # mock examples per split: enough to exercise batching and subsets, small enough to stay fast


@pytest.fixture(autouse=True)
def fresh_cache():
  sources.clear_cache()  # a cached read from one mock context must not leak into the next test
  yield
  sources.clear_cache()


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=N):
    yield


@pytest.fixture
def requested_configs(monkeypatch):
  """Records the config name of every TFDS builder the loaders create."""
  configs = []
  real_builder = tfds.builder

  def spy(name, **kwargs):
    builder = real_builder(name, **kwargs)
    configs.append(builder.builder_config.name if builder.builder_config else builder.name)
    return builder

  monkeypatch.setattr(tfds, 'builder', spy)
  return configs


def _luma(rgb):
  return np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)[..., None]


# In-distribution splits.

@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'svhn_cropped'])
@pytest.mark.parametrize('split', ['train', 'test'])
def test_load_split_registered_tfds(mock_tfds, name, split):
  data = sources.load_split(name, split)
  num_classes = registry.get_info(name).num_classes
  assert data.name == name and len(data) == N
  assert data.images.shape == (N, 32, 32, 3) and data.images.dtype == np.uint8
  assert data.labels.shape == (N,) and data.labels.dtype == np.int32
  assert 0 <= data.labels.min() and data.labels.max() < num_classes


def test_cifar100_gives_fine_labels(mock_tfds):
  labels = sources.load_split('cifar100', 'train').labels
  # 24 random fine labels all below 20 (the coarse range) would have probability 0.2**24.
  assert labels.max() >= 20 and labels.max() < 100


def test_load_split_is_read_once_and_read_only(mock_tfds, requested_configs):
  first = sources.load_split('cifar10', 'test')
  second = sources.load_split('cifar10', 'test')
  assert second.images is first.images and requested_configs == ['cifar10']
  assert not first.images.flags.writeable and not first.labels.flags.writeable


def test_load_split_digits_dispatches_to_builtin_module():
  pytest.importorskip('ood_jax.trainer.data.digits')
  data = sources.load_split('digits', 'train')
  assert data.name == 'digits' and data.images.shape[1:] == (32, 32, 1) and data.images.dtype == np.uint8
  assert data.labels.dtype == np.int32 and 0 <= data.labels.min() and data.labels.max() < 6


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match='cifar10, cifar100, digits, svhn_cropped'):
    sources.load_split('mnist', 'train')


def test_missing_tfds_data_says_how_to_prepare(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError) as info:
    sources.load_split('cifar10', 'train', data_dir=tmp_path)
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert "tfds.builder('cifar10'" in message and 'download_and_prepare()' in message
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message


def test_array_data_validates():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  assert len(sources.ArrayData(images, np.zeros(2, np.int32), 'x')) == 2
  with pytest.raises(TypeError, match='images must be a uint8'):
    sources.ArrayData(images.astype(np.float32), np.zeros(2, np.int32), 'x')
  with pytest.raises(TypeError, match='labels must be an int32'):
    sources.ArrayData(images, np.zeros(2, np.int64), 'x')
  with pytest.raises(ValueError, match='2 images but 3 labels'):
    sources.ArrayData(images, np.zeros(3, np.int32), 'x')


# OOD sets from TFDS.

@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'svhn_cropped', 'dtd', 'places365_small'])
def test_load_ood_tfds_sets(mock_tfds, name):
  # Mock DTD images have random sizes (5..49 pixels a side) and places365 256x256: all come out 32x32.
  data = ood_sets.load_ood(name)
  assert data.name == name
  assert data.images.shape == (N, 32, 32, 3) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.labels, np.full(N, -1, np.int32))


def test_load_ood_reads_the_documented_splits(mock_tfds, monkeypatch):
  splits = []
  real_read = sources.read_tfds

  def spy(name, split, **kwargs):
    splits.append((name, split))
    return real_read(name, split, **kwargs)

  monkeypatch.setattr(sources, 'read_tfds', spy)
  ood_sets.load_ood('dtd')
  ood_sets.load_ood('places365_small')
  assert splits == [('dtd', 'train+validation+test'), ('places365_small', 'test')]


def test_load_ood_subsets_are_seeded(mock_tfds):
  full = ood_sets.load_ood('places365_small', image_size=(8, 8)).images
  subset = ood_sets.load_ood('places365_small', image_size=(8, 8), num_examples=5, seed=3).images
  again = ood_sets.load_ood('places365_small', image_size=(8, 8), num_examples=5, seed=3).images
  assert subset.shape == (5, 8, 8, 3)
  np.testing.assert_array_equal(subset, again)
  positions = [np.flatnonzero((full == image).all(axis=(1, 2, 3)))[0] for image in subset]
  assert positions == sorted(positions)  # a subset in source order


def test_load_ood_grey_matches_luma_of_rgb(mock_tfds):
  rgb = ood_sets.load_ood('svhn_cropped').images
  grey = ood_sets.load_ood('svhn_cropped', channels=1).images
  assert grey.shape == (N, 32, 32, 1)
  np.testing.assert_allclose(grey.astype(int), _luma(rgb).astype(int), atol=1)


def test_load_ood_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown OOD set 'lsun'.*dtd.*gaussian_noise.*folder:<path>"):
    ood_sets.load_ood('lsun')


def test_load_ood_checks_arguments():
  with pytest.raises(ValueError, match='channels must be 1 or 3'):
    ood_sets.load_ood('uniform_noise', channels=4)
  with pytest.raises(ValueError, match='image_size must be'):
    ood_sets.load_ood('uniform_noise', image_size=(32, 32, 3))
  with pytest.raises(ValueError, match='num_examples must be >= 1'):
    ood_sets.load_ood('uniform_noise', num_examples=0)


# OOD sets from image folders.

def _write_folder(root):
  """An ImageFolder-style tree of mixed formats and sizes; returns the expected colours in sorted order."""
  (root / 'test' / 'a').mkdir(parents=True)
  (root / 'test' / 'b' / 'deeper').mkdir(parents=True)
  Image.new('RGB', (50, 40), (255, 0, 0)).save(root / 'test' / 'a' / '0.png')
  Image.new('L', (20, 20), 77).save(root / 'test' / 'a' / '1.png')
  Image.new('RGBA', (32, 32), (0, 0, 255, 128)).save(root / 'test' / 'b' / '2.PNG')
  Image.new('RGB', (64, 48), (10, 200, 30)).save(root / 'test' / 'b' / 'deeper' / '3.jpg', quality=100)
  Image.new('P', (7, 9), 0).save(root / 'test' / 'b' / 'deeper' / '4.gif')
  (root / 'README.txt').write_text('not an image')
  return [(255, 0, 0), (77, 77, 77), (0, 0, 255), (10, 200, 30), (0, 0, 0)]


def test_load_ood_folder_reads_nested_images(tmp_path):
  colours = _write_folder(tmp_path)
  data = ood_sets.load_ood(f'folder:{tmp_path}')
  assert data.name == f'folder:{tmp_path}'
  assert data.images.shape == (5, 32, 32, 3) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.labels, np.full(5, -1, np.int32))
  for image, colour in zip(data.images, colours):
    # A solid colour stays that colour through the resize (JPEG within its compression error).
    np.testing.assert_allclose(image.reshape(-1, 3) - np.array(colour), 0, atol=3)
  np.testing.assert_array_equal(data.images[0], np.broadcast_to([255, 0, 0], (32, 32, 3)))


def test_load_ood_folder_grey_and_subset(tmp_path):
  _write_folder(tmp_path)
  grey = ood_sets.load_ood(f'folder:{tmp_path}', channels=1, image_size=(16, 24))
  assert grey.images.shape == (5, 16, 24, 1)
  assert (grey.images[0] == 76).all() and (grey.images[1] == 77).all()  # round(0.299 * 255) = 76
  subset = ood_sets.load_ood(f'folder:{tmp_path}', num_examples=3, seed=1)
  again = ood_sets.load_ood(f'folder:{tmp_path}', num_examples=3, seed=1)
  assert len(subset) == 3
  np.testing.assert_array_equal(subset.images, again.images)


def test_load_ood_folder_missing_or_empty(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError, match='does not exist'):
    ood_sets.load_ood(f'folder:{tmp_path / "nowhere"}')
  (tmp_path / 'notes.txt').write_text('no images here')
  with pytest.raises(sources.DatasetNotFoundError, match='holds no image files'):
    ood_sets.load_ood(f'folder:{tmp_path}')


# Synthetic noise sets.

def test_noise_sets_are_seeded_with_the_right_distribution():
  gauss = ood_sets.load_ood('gaussian_noise', num_examples=200, seed=0).images
  assert gauss.shape == (200, 32, 32, 3) and gauss.dtype == np.uint8
  np.testing.assert_array_equal(gauss, ood_sets.load_ood('gaussian_noise', num_examples=200, seed=0).images)
  assert (gauss != ood_sets.load_ood('gaussian_noise', num_examples=200, seed=1).images).mean() > 0.5
  # N(0.5, 1) clipped to [0, 1]: P(x <= 0) = P(x >= 1) = Φ(−0.5) = 0.3085.
  assert abs((gauss == 0).mean() - 0.3085) < 0.01 and abs((gauss == 255).mean() - 0.3085) < 0.01

  uniform = ood_sets.load_ood('uniform_noise', num_examples=200, seed=0, channels=1).images
  assert uniform.shape == (200, 32, 32, 1)
  assert uniform.min() == 0 and uniform.max() == 255 and abs(uniform.mean() - 127.5) < 1.0


def test_noise_sets_default_to_ten_thousand():
  data = ood_sets.load_ood('uniform_noise', image_size=(2, 2))
  assert data.images.shape == (10_000, 2, 2, 3) and data.name == 'uniform_noise'
  np.testing.assert_array_equal(data.labels, np.full(10_000, -1, np.int32))


# Corrupted sets.

def test_load_corrupted_cifar10_reads_the_named_config(mock_tfds, requested_configs):
  data = ood_sets.load_corrupted('cifar10', 'fog', 3)
  # The config-less default would have been brightness_1.
  assert requested_configs == ['fog_3']
  assert data.name == 'cifar10_corrupted/fog_3'
  assert data.images.shape == (N, 32, 32, 3) and data.images.dtype == np.uint8
  assert data.labels.dtype == np.int32 and 0 <= data.labels.min() and data.labels.max() < 10


@pytest.mark.parametrize('corruption, severity', [('blur', 1), ('fog', 0), ('fog', 6), ('fog', True)])
def test_load_corrupted_rejects_invalid_corruptions(corruption, severity):
  with pytest.raises(ValueError, match='Unknown corruption|severity must be'):
    ood_sets.load_corrupted('cifar10', corruption, severity)


def test_load_corrupted_rejects_unknown_base():
  with pytest.raises(ValueError, match='Unknown dataset'):
    ood_sets.load_corrupted('mnist', 'fog', 1)


def test_on_the_fly_corruption_hook(mock_tfds):
  calls = []

  def invert(images, name, severity, rng):
    calls.append((name, severity, jax.random.key_data(rng)))
    return 255 - images

  clean = sources.load_split('cifar100', 'test')
  data = ood_sets.load_corrupted('cifar100', 'contrast', 2, corrupt_fn=invert, seed=5)
  assert data.name == 'cifar100_corrupted/contrast_2'
  np.testing.assert_array_equal(data.images, 255 - clean.images)
  np.testing.assert_array_equal(data.labels, clean.labels)
  ood_sets.load_corrupted('cifar100', 'contrast', 2, corrupt_fn=invert, seed=5)
  ood_sets.load_corrupted('cifar100', 'contrast', 2, corrupt_fn=invert, seed=6)
  assert [call[:2] for call in calls] == [('contrast', 2)] * 3
  np.testing.assert_array_equal(calls[0][2], jax.random.key_data(jax.random.key(5)))
  np.testing.assert_array_equal(calls[0][2], calls[1][2])
  assert (calls[0][2] != calls[2][2]).any()


def test_cifar10_with_corrupt_fn_skips_cifar10c(mock_tfds, requested_configs):
  data = ood_sets.load_corrupted('cifar10', 'fog', 1, corrupt_fn=lambda x, *_: 255 - x)
  np.testing.assert_array_equal(data.images, 255 - sources.load_split('cifar10', 'test').images)
  assert requested_configs == ['cifar10']


def test_corrupt_fn_output_is_checked(mock_tfds):
  with pytest.raises(ValueError, match='corrupt_fn must return uint8'):
    ood_sets.load_corrupted('svhn_cropped', 'fog', 1, corrupt_fn=lambda x, *_: x / 255.0)


@pytest.mark.parametrize('base', ['cifar100', 'svhn_cropped'])
def test_default_corrupt_fn_is_ood_jax_corruptions_corrupt(mock_tfds, base):
  clean = sources.load_split(base, 'test')
  data = ood_sets.load_corrupted(base, 'fog', 3, seed=2)
  assert data.name == f'{base}_corrupted/fog_3'
  np.testing.assert_array_equal(data.images, corruptions.corrupt(clean.images, 'fog', 3, jax.random.key(2)))
  np.testing.assert_array_equal(data.labels, clean.labels)
  assert data.images.dtype == np.uint8 and not np.array_equal(data.images, clean.images)


def test_corruption_grid():
  grid = ood_sets.corruption_grid()
  assert len(grid) == 75 and grid[:2] == [('gaussian_noise', 1), ('gaussian_noise', 2)]
  assert grid[-1] == ('jpeg_compression', 5)
  assert ood_sets.corruption_grid(['fog', 'spatter'], [5]) == [('fog', 5), ('spatter', 5)]
  with pytest.raises(ValueError, match='Unknown corruption'):
    ood_sets.corruption_grid(['glass_blur'])
  with pytest.raises(TypeError, match='sequence of corruption names'):
    ood_sets.corruption_grid('fog')


# Outliers for outlier exposure.

def test_npy_outliers(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
  path = tmp_path / 'outliers.npy'
  np.save(path, images)
  data = sources.load_outliers(path, image_size=(16, 16))
  np.testing.assert_array_equal(data.images, images)
  np.testing.assert_array_equal(data.labels, np.full(10, -1, np.int32))
  assert sources.load_outliers(path).images.shape == (10, 32, 32, 3)
  subset = sources.load_outliers(path, image_size=(16, 16), max_examples=4, seed=2).images
  rows = [int(np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0]) for image in subset]
  assert len(rows) == 4 and rows == sorted(rows)


def test_npy_grey_outliers_convert_channels(tmp_path):
  grey = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8)
  path = tmp_path / 'grey.npy'
  np.save(path, grey)
  one = sources.load_outliers(path, image_size=(8, 8), channels=1).images
  three = sources.load_outliers(path, image_size=(8, 8)).images
  np.testing.assert_array_equal(one, grey[..., None])
  np.testing.assert_array_equal(three, np.repeat(grey[..., None], 3, axis=-1))


@pytest.mark.parametrize('array, error, message', [
    (np.zeros((2, 8, 8, 3), np.float32), TypeError, 'must hold uint8 images, got dtype float32'),
    (np.zeros((8, 8), np.uint8), ValueError, 'got shape \\(8, 8\\)'),
    (np.zeros((2, 8, 8, 4), np.uint8), ValueError, 'got shape \\(2, 8, 8, 4\\)'),
])
def test_npy_outliers_reject_bad_arrays(tmp_path, array, error, message):
  path = tmp_path / 'bad.npy'
  np.save(path, array)
  with pytest.raises(error, match=message):
    sources.load_outliers(path)


def test_npy_outliers_missing_file(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError, match='does not exist'):
    sources.load_outliers(tmp_path / 'missing.npy')


def test_tfds_outliers(mock_tfds, requested_configs):
  data = sources.load_outliers('imagenet_resized/32x32', max_examples=5)
  assert requested_configs == ['32x32']
  assert data.images.shape == (5, 32, 32, 3) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.labels, np.full(5, -1, np.int32))
  grey = sources.load_outliers('svhn_cropped', channels=1, image_size=(28, 28))
  assert grey.images.shape == (N, 28, 28, 1)
