"""Tests for ood_jax.trainer.data.digits: counts, the frozen split, provenance of every image, offline loading.

Provenance is checked against independent references: each 32×32 digit is matched back to its 8×8
source in `sklearn.datasets.load_digits` through Pillow's own bicubic upsampling, and each photo patch
is recomputed from the photo with a hand-written antialiased bilinear (triangle) filter.
"""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn import datasets as sk_datasets

from ood_jax import corruptions
from ood_jax.trainer.data import digits
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources

# Per-class image counts (⌊n/3⌋ of each class is test) and exact pixel sums. The pixel sums are
# machine-independent because the upsampling is exact in float64 (see the module docstring).
TRAIN_COUNTS = (119, 122, 118, 122, 121, 122)
TEST_COUNTS = (59, 60, 59, 61, 60, 60)
NEAR_COUNTS = (60, 59, 58, 60)  # digits 6, 7, 8, 9
PIXEL_SUMS = {'train': 58_298_207, 'test': 28_961_838, 'near': 19_053_252}
# The split itself: load_digits indices of the test digits 0–5 and 6–9.
FIRST_TEST_INDICES = (3, 5, 7, 13, 16, 19, 22, 26, 33, 36)
TEST_INDEX_SUM = {'test': 312_625, 'near': 207_250}
NOISE_PIXEL_SUMS = {'gaussian_noise': 65_313_097, 'uniform_noise': 65_309_247}
PHOTO_GRID = 2 * 12 * 19
BT601 = np.array([0.299, 0.587, 0.114])
INTERIOR = slice(6, 26)  # output rows/cols whose bicubic taps all lie inside the 8×8 source


@pytest.fixture(scope='module')
def source():
  return sk_datasets.load_digits()


@pytest.fixture(scope='module')
def pillow_upsampled(source):
  """Every load_digits image upsampled by Pillow's float bicubic on the 0..255 scale, [1797, 32, 32]."""
  return np.stack([
      np.asarray(Image.fromarray((image * (255 / 16)).astype(np.float32), 'F').resize((32, 32), Image.BICUBIC))
      for image in source.images])


def _source_indices(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """The load_digits index of each 32×32 digit, asserting that it matches Pillow to within rounding.

  Pillow renormalises the kernel at the borders where ood_jax replicates the edge pixel, so only the
  interior is compared; there both must agree up to the final rounding.
  """
  queries = images[:, INTERIOR, INTERIOR, 0].reshape(len(images), -1).astype(np.float64)
  keys = np.clip(reference[:, INTERIOR, INTERIOR], 0, 255).reshape(len(reference), -1).astype(np.float64)
  distances = (queries**2).sum(1)[:, None] - 2 * queries @ keys.T + (keys**2).sum(1)[None]
  indices = np.argmin(distances, axis=1)
  np.testing.assert_array_less(np.abs(queries - keys[indices]).max(axis=1), 0.5 + 1e-3)
  return indices


@pytest.fixture(scope='module')
def indices(pillow_upsampled):
  sets = {'train': digits.load_split('train'), 'test': digits.load_split('test'), 'near': digits.load_ood('near')}
  return {name: _source_indices(data.images, pillow_upsampled) for name, data in sets.items()}


def _all_sets():
  return [digits.load_split(split) for split in digits.SPLITS] + [digits.load_ood(name) for name in digits.OOD_SETS]


def test_constants_agree_with_registry():
  info = registry.get_info('digits')
  assert info.num_classes == len(digits.ID_CLASSES) == 6
  assert info.image_shape == (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1) == (32, 32, 1)
  assert digits.ID_CLASSES + digits.OOD_CLASSES == tuple(range(10))
  assert (info.train_split, info.test_split) == digits.SPLITS


def test_shapes_dtypes_names_and_read_only():
  expected = {'digits': None, 'digits/near': 237, 'digits/photos': PHOTO_GRID,
              'digits/gaussian_noise': 500, 'digits/uniform_noise': 500, 'digits/validation': 119}
  names = []
  for data in _all_sets():
    names.append(data.name)
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (32, 32, 1)
    assert data.labels.dtype == np.int32 and data.labels.shape == (len(data.images),)
    if expected[data.name] is not None:
      assert len(data) == expected[data.name]
    with pytest.raises(ValueError, match='read-only'):
      data.images[0, 0, 0, 0] = 1
    with pytest.raises(ValueError, match='read-only'):
      data.labels[0] = 1
  assert names == ['digits', 'digits', 'digits/near', 'digits/photos', 'digits/gaussian_noise',
                   'digits/uniform_noise', 'digits/validation']


def test_counts_per_class_and_labels():
  train, test = digits.load_split('train'), digits.load_split('test')
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=6), TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=6), TEST_COUNTS)
  assert (len(train), len(test)) == (724, 359)
  for name in digits.OOD_SETS:
    np.testing.assert_array_equal(digits.load_ood(name).labels, sources.OUTLIER_LABEL)


def test_digits_come_from_load_digits_with_their_labels(source, indices):
  for split in digits.SPLITS:
    np.testing.assert_array_equal(source.target[indices[split]], digits.load_split(split).labels)
  near_digits = source.target[indices['near']]
  assert set(near_digits) == set(digits.OOD_CLASSES)
  np.testing.assert_array_equal(np.bincount(near_digits, minlength=10)[6:], NEAR_COUNTS)


def test_split_partitions_digits_without_overlap(source, indices):
  train, test, near = indices['train'], indices['test'], indices['near']
  # Train and test together are every digit 0–5, each exactly once.
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.flatnonzero(source.target < 6))
  assert len(np.unique(near)) == len(near) == 237

  def hashes(rows):
    return {hashlib.sha256(row.tobytes()).hexdigest() for row in source.data[rows]}

  # On the 8×8 pixels themselves, so a duplicate image under two indices would also be caught.
  assert len(hashes(train)) == len(train) and len(hashes(test)) == len(test)
  assert not hashes(train) & hashes(test)


def test_split_is_frozen(indices):
  # Indices of the held-out digits pin the RandomState(0) stream and the ⌊n/3⌋ rule on every machine.
  held_out = np.sort(np.concatenate([indices['test'], indices['near']]))
  np.testing.assert_array_equal(held_out[:10], FIRST_TEST_INDICES)
  for name, total in TEST_INDEX_SUM.items():
    assert indices[name].sum() == total
  # Both splits keep scikit-learn's order.
  for name in ('train', 'test', 'near'):
    assert np.all(np.diff(indices[name]) > 0)


def test_pixels_are_bit_exact():
  sets = {'train': digits.load_split('train'), 'test': digits.load_split('test'), 'near': digits.load_ood('near')}
  for name, data in sets.items():
    assert int(data.images.sum(dtype=np.int64)) == PIXEL_SUMS[name]
  images = sets['train'].images
  assert images.min() == 0 and images.max() == 255  # ×255/16 reaches full white; overshoot is clipped


def test_deterministic_across_rebuilds():
  before = [(data.images.copy(), data.labels.copy()) for data in _all_sets()]
  # The per-process caches, emptied so that everything is built again from scratch.
  for cached in (digits._all_digits, digits._id_split, digits._ood):  # pylint: disable=protected-access
    cached.cache_clear()
  after = _all_sets()
  for (images, labels), data in zip(before, after):
    np.testing.assert_array_equal(images, data.images)
    np.testing.assert_array_equal(labels, data.labels)


def test_registry_statistics_match_train_images():
  pixels = digits.load_split('train').images / 255.0
  info = registry.get_info('digits')
  np.testing.assert_allclose(info.mean, [pixels.mean()], atol=1e-4)
  np.testing.assert_allclose(info.std, [pixels.std()], atol=1e-4)


def test_photo_patches_match_an_independent_triangle_filter():
  patches = digits.load_ood('photos').images[..., 0].astype(np.float64)
  # Pillow's antialiased bilinear at ×1/2: taps (1, 3, 3, 1)/8, renormalised where they leave the crop.
  triangle = np.zeros((32, 64))
  for row in range(32):
    for tap, weight in zip(range(2 * row - 1, 2 * row + 3), (1, 3, 3, 1)):
      if 0 <= tap < 64:
        triangle[row, tap] = weight
  triangle /= triangle.sum(axis=1, keepdims=True)
  expected = []
  for photo in sk_datasets.load_sample_images().images:  # china.jpg, flower.jpg
    for top in 5 + 32 * np.arange(12):
      for left in 32 * np.arange(19):
        crop = photo[top:top + 64, left:left + 64].astype(np.float64).transpose(2, 0, 1)
        expected.append((triangle @ crop @ triangle.T).transpose(1, 2, 0) @ BT601)
  # Two roundings apart (after resizing and after the luma conversion).
  np.testing.assert_allclose(patches, np.stack(expected), atol=1.5)


def test_photo_patches_are_textured_and_varied():
  patches = digits.load_ood('photos').images.reshape(PHOTO_GRID, -1).astype(np.int64)
  contrast = patches.max(axis=1) - patches.min(axis=1)
  assert contrast.min() >= 5  # even the smoothest sky patch is not constant
  assert np.median(contrast) > 80
  assert len({row.tobytes() for row in patches.astype(np.uint8)}) == PHOTO_GRID


def test_noise_sets():
  gaussian = digits.load_ood('gaussian_noise').images
  uniform = digits.load_ood('uniform_noise').images
  for name, images in (('gaussian_noise', gaussian), ('uniform_noise', uniform)):
    assert int(images.sum(dtype=np.int64)) == NOISE_PIXEL_SUMS[name]
  # N(0.5, 1) clipped to [0, 1]: P(x < 0) = P(x > 1) = Φ(−0.5) ≈ 0.3085.
  np.testing.assert_allclose([np.mean(gaussian == 0), np.mean(gaussian == 255)], 0.3085, atol=0.005)
  np.testing.assert_allclose(uniform.mean(), 127.5, atol=0.5)
  np.testing.assert_allclose(np.bincount(uniform.ravel(), minlength=256)[1:255] / uniform.size, 1 / 255, rtol=0.1)


def test_load_corrupted_applies_corrupt_fn_to_the_test_split():
  test = digits.load_split('test')
  calls = []

  def corrupt_fn(images, name, severity, rng):
    calls.append((name, severity))
    np.testing.assert_array_equal(images, test.images)
    shift = jax.random.randint(rng, (), 1, 50)
    return (images.astype(np.int32) + int(shift)).clip(0, 255).astype(np.uint8)

  data = digits.load_corrupted('fog', 3, corrupt_fn=corrupt_fn)
  assert calls == [('fog', 3)]
  assert data.name == 'digits_corrupted/fog_3'
  assert data.images.shape == (359, 32, 32, 1) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.labels, test.labels)
  assert not np.array_equal(data.images, test.images)
  # The key comes from `seed` alone.
  np.testing.assert_array_equal(digits.load_corrupted('fog', 3, corrupt_fn=corrupt_fn).images, data.images)
  shifted = [digits.load_corrupted('fog', 3, corrupt_fn=corrupt_fn, seed=seed).images for seed in range(4)]
  assert len({images.tobytes() for images in shifted}) > 1


def test_load_corrupted_defaults_to_ood_jax_corruptions():
  test = digits.load_split('test')
  data = digits.load_corrupted('contrast', 3)
  assert data.name == 'digits_corrupted/contrast_3'
  assert data.images.shape == (359, 32, 32, 1) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.labels, test.labels)
  np.testing.assert_array_equal(data.images, corruptions.corrupt(test.images, 'contrast', 3, jax.random.key(0)))
  # Contrast 0.4 around each image's mean: the spread of grey levels shrinks to about 0.4.
  ratio = data.images.reshape(359, -1).std(axis=1) / test.images.reshape(359, -1).std(axis=1)
  np.testing.assert_allclose(ratio, 0.4, atol=0.02)


@pytest.mark.parametrize('args, kwargs, error, match', [
    (('fog', 0), {}, ValueError, 'severity'),
    (('fog', 6), {}, ValueError, 'severity'),
    (('glass_blur', 1), {}, ValueError, 'frosted_glass_blur'),
    (('fog', 1), {'corrupt_fn': lambda images, *_: images.astype(np.float32)}, ValueError, 'uint8'),
    (('fog', 1), {'corrupt_fn': lambda images, *_: images[:10]}, ValueError, 'shape'),
])
def test_load_corrupted_errors(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    digits.load_corrupted(*args, **kwargs)


def test_unknown_names():
  with pytest.raises(ValueError, match='valid splits: train, test'):
    digits.load_split('validation')
  with pytest.raises(ValueError, match='valid names: near, photos, gaussian_noise, uniform_noise'):
    digits.load_ood('far')


def test_loads_with_no_network_at_all():
  # A fresh interpreter whose sockets refuse to open before anything is imported: every set must
  # load from scikit-learn's bundled files, including through the registry path of ood_jax.trainer.data.sources.
  script = textwrap.dedent("""
      import socket

      class NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
          raise OSError('network disabled by the test')

      def refuse(*args, **kwargs):
        raise OSError('network disabled by the test')

      socket.socket = NoNetwork
      socket.create_connection = socket.getaddrinfo = refuse

      from ood_jax.trainer.data import digits, sources
      sets = [digits.load_split('train'), digits.load_split('test'), sources.load_split('digits', 'test')]
      sets += [digits.load_ood(name) for name in digits.OOD_SETS]
      print(*(int(data.images.sum(dtype='int64')) for data in sets))
  """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                          check=False, cwd=pathlib.Path(__file__).resolve().parents[3])
  assert result.returncode == 0, result.stderr
  sums = [int(data.images.sum(dtype=np.int64)) for data in _all_sets()]
  assert result.stdout.split() == [str(s) for s in sums[:2] + sums[1:2] + sums[2:]]
