"""An OOD benchmark that needs no download: scikit-learn's handwritten digits and sample photos.

Everything here ships inside scikit-learn, so the benchmark loads on a machine with no network and
no TFDS data: CI, laptops, the smoke configs. All images are real except the two noise sets:
`sklearn.datasets.load_digits` holds 1 797 handwritten digits (8×8, grey levels 0..16, from the UCI
optical-recognition set) and `load_sample_images` two photographs, china.jpg and flower.jpg (427×640
RGB). Digits 0–5 are in-distribution; 6–9 are near-OOD, the same kind of image with unseen classes.

| set                          | what                                               | images | labels |
|------------------------------|----------------------------------------------------|--------|--------|
| `load_split('train')`        | digits 0–5, train part (119 122 118 122 121 122)   |    724 | 0..5   |
| `load_split('test')`         | digits 0–5, test part (59 60 59 61 60 60)          |    359 | 0..5   |
| `load_ood('near')`           | digits 6–9, test part (60 59 58 60)                |    237 | −1     |
| `load_ood('photos')`         | 64×64 patches of the two photos, 2 × 12 × 19 grid  |    456 | −1     |
| `load_ood('gaussian_noise')` | N(0.5, 1) clipped to [0, 1], as in ODIN            |    500 | −1     |
| `load_ood('uniform_noise')`  | U[0, 1), as in ODIN                                |    500 | −1     |
| `load_ood('validation')`     | digits 6–9, ¼ of the train part (30 30 29 30)      |    119 | −1     |
| `load_outliers()`            | digits 6–9, the rest of the train part             |    358 | −1     |
| `load_corrupted(name, s)`    | the ID test split, 19 corruptions × severities 1–5 |    359 | 0..5   |

Every image is uint8 [32, 32, 1]. OOD labels are `sources.OUTLIER_LABEL` (−1), like every other OOD
set. The test part of digits 6–9 is only ever the near-OOD test set, so it stays unseen by outlier
exposure, whose pool is the train part of those classes. There is deliberately no single 'far'
set: as in OpenOOD, metrics are computed per OOD set and then averaged, whereas concatenating photos
and noise would let the set sizes choose the weights.

The train part of digits 6–9 is split once more, as OpenOOD v1.5 splits TinyImageNet: a quarter of
each class (drawn by `np.random.RandomState(1)`) is the validation OOD set on which detector
hyperparameters are tuned (`ood_jax.trainer.data.protocols`, protocol 'digits'), the rest is the auxiliary
outlier pool of outlier exposure, so no method trains on the images its detectors are tuned with.

Why 32×32 when the digits are 8×8: every CIFAR backbone, the pad-4 random-crop augmentation and the
CIFAR-C corruption parameters are defined at 32×32, so the digits benchmark runs exactly the code
paths of the real benchmarks; at ≈1 800 images the larger size costs nothing.

Upsampling: the 0..16 grey levels are upsampled ×4 with Keys' bicubic kernel (a = −0.5, the
'bicubic' of Pillow, TF and JAX; half-pixel centres; borders replicate the edge pixel), scaled by
255/16, clipped (bicubic overshoots at stroke edges) and rounded. Bicubic gives strokes a continuous
gradient where bilinear leaves a crease at every source pixel. It is computed in NumPy float64, where
every weight is a multiple of 1/1024, so every intermediate value is exact whatever the order of the
sums: the uint8 images are bit-identical on every machine and BLAS. A float32 or library resize gives
no such guarantee (in float32, 6 of the 1.8 M pixels already round differently).

Split: per digit class 0..9 in increasing order, one `np.random.RandomState(0)` (legacy generator: its
stream is frozen across NumPy versions) permutes the indices of that class, and the first ⌊n/3⌋ go to
the test part, the rest to train. Both parts keep scikit-learn's order.

Photo patches: each photo becomes a grid of 64×64 crops with stride 32 (half overlap), the leftover
margin split evenly (rows start at 5, columns at 0): 12 × 19 per photo, china.jpg first, row-major.
The crops go through the path of every other OOD set (`sources.resize_images`, Pillow's antialiased
bilinear, to 32×32; then `sources.convert_channels`, ITU-R BT.601 luma). They include smooth regions
(sky, blurred background) as well as textured ones.

Caching: the in-distribution splits and OOD sets are built once per process and returned as shared,
read-only arrays; copy them before writing.
"""

from __future__ import annotations

import functools

import numpy as np

from ood_jax import _extras
from ood_jax.trainer.data import ood_sets
from ood_jax.trainer.data import sources
from ood_jax.trainer.data.sources import ArrayData

ID_CLASSES = (0, 1, 2, 3, 4, 5)
OOD_CLASSES = (6, 7, 8, 9)
IMAGE_SIZE = 32
SPLITS = ('train', 'test')
OOD_SETS = ('near', 'photos', 'gaussian_noise', 'uniform_noise', 'validation')
TEST_OOD_SETS = OOD_SETS[:-1]

_SPLIT_SEED = 0
_TEST_DIVISOR = 3  # ⌊n / 3⌋ of each class is test
_GREY_LEVELS = 16  # load_digits pixels lie in 0..16
_PATCH_SIZE = 64
_PATCH_STRIDE = 32
_NUM_NOISE = 500
_NOISE_SEED = 0
_VALIDATION_SEED = 1
_VALIDATION_DIVISOR = 4  # ⌊n / 4⌋ of each class of the outlier pool is validation OOD


def load_split(split: str) -> ArrayData:
  """The in-distribution digits 0–5 of one split.

  Args:
    split: 'train' (724 images) or 'test' (359 images).

  Returns:
    ArrayData named 'digits': images uint8 [N, 32, 32, 1], labels int32 in [0, 6); shared, read-only.

  Raises:
    ValueError: unknown split (the message lists the valid ones).
  """
  if split not in SPLITS:
    raise ValueError(f'Unknown digits split {split!r}; valid splits: {", ".join(SPLITS)}.')
  return _id_split(split)


def load_ood(name: str) -> ArrayData:
  """One OOD set of the digits benchmark (see the module docstring for what each holds).

  Args:
    name: 'near' (test digits 6–9), 'photos' (patches of scikit-learn's two sample photos),
      'gaussian_noise', 'uniform_noise', or 'validation' (the held-out quarter of the train digits
      6–9, for tuning; never a test set).

  Returns:
    ArrayData named 'digits/<name>': images uint8 [N, 32, 32, 1], labels all `sources.OUTLIER_LABEL`;
    shared, read-only.

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  if name not in OOD_SETS:
    raise ValueError(f'Unknown digits OOD set {name!r}; valid names: {", ".join(OOD_SETS)}.')
  return _ood(name)


def load_corrupted(name: str, severity: int, *, corrupt_fn: ood_sets.CorruptFn | None = None,
                   seed: int = 0) -> ArrayData:
  """The in-distribution test digits under one corruption at one severity (covariate shift).

  The same path as any base dataset without released corrupted images: `ood_sets.load_corrupted`.

  Args:
    name: a name from `ood_jax.corruptions.CORRUPTIONS`.
    severity: 1..5.
    corrupt_fn: `corrupt_fn(images, name, severity, rng) -> images`, uint8 [N, 32, 32, 1] in and out,
      `rng` a JAX key. None means `ood_jax.corruptions.corrupt`.
    seed: seed of the key given to `corrupt_fn`.

  Returns:
    ArrayData named 'digits_corrupted/<name>_<severity>' with the 359 test labels in [0, 6).

  Raises:
    ValueError: unknown corruption or severity, or a corrupt_fn output of the wrong shape or dtype.
    NotImplementedError: `corrupt_fn` is None and ood_jax.corruptions has no `corrupt` yet.
  """
  return ood_sets.load_corrupted('digits', name, severity, corrupt_fn=corrupt_fn, seed=seed)


def load_outliers() -> ArrayData:
  """Auxiliary outliers for outlier exposure: the *train* digits of classes 6–9 less the validation set.

  Disjoint from every test set and from `load_ood('validation')`, but of the same classes as the
  near-OOD test set: a model trained with them has seen near-OOD classes (as OE with 80M Tiny
  Images sees many test OOD classes), while the far-OOD sets (photos, noise) stay unseen.

  Returns:
    ArrayData named 'digits/outliers': images uint8 [358, 32, 32, 1], labels all
    `sources.OUTLIER_LABEL`; shared, read-only.
  """
  return _outliers()


@functools.lru_cache(maxsize=None)
def _outliers() -> ArrayData:
  images, labels, is_test = _all_digits()
  images = images[np.isin(labels, OOD_CLASSES) & ~is_test & ~_validation_mask(labels, is_test)]
  return _shared(ArrayData(images, np.full(len(images), sources.OUTLIER_LABEL, np.int32), 'digits/outliers'))


@functools.lru_cache(maxsize=None)
def _id_split(split: str) -> ArrayData:
  images, labels, is_test = _all_digits()
  keep = np.isin(labels, ID_CLASSES) & (is_test if split == 'test' else ~is_test)
  return _shared(ArrayData(images[keep], labels[keep], 'digits'))


@functools.lru_cache(maxsize=None)
def _ood(name: str) -> ArrayData:
  if name == 'near':
    images, labels, is_test = _all_digits()
    images = images[np.isin(labels, OOD_CLASSES) & is_test]
  elif name == 'photos':
    images = _photo_patches()
  elif name == 'validation':
    images, labels, is_test = _all_digits()
    images = images[_validation_mask(labels, is_test)]
  else:
    images = ood_sets.load_ood(name, image_size=(IMAGE_SIZE, IMAGE_SIZE), num_examples=_NUM_NOISE,
                               seed=_NOISE_SEED, channels=1).images
  return _shared(ArrayData(images, np.full(len(images), sources.OUTLIER_LABEL, np.int32), f'digits/{name}'))


def _sk_datasets():
  # Imported on first use: ood_jax.trainer.data serves TFDS users too, who need not install scikit-learn.
  return _extras.import_optional('sklearn.datasets', needed_by='The digits benchmark (ood_jax.trainer.data.digits)')


@functools.lru_cache(maxsize=None)
def _all_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All 1 797 digits as uint8 [N, 32, 32, 1], their labels 0..9 (int32) and the test mask."""
  bunch = _sk_datasets().load_digits()
  upsample = _upsampling_matrix(bunch.images.shape[1], IMAGE_SIZE // bunch.images.shape[1])
  # Exact in float64 (see the module docstring), so the order of the sums cannot matter.
  pixels = upsample @ bunch.images @ upsample.T * (255 / _GREY_LEVELS)
  images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  return images, labels, _test_mask(labels)


def _test_mask(labels: np.ndarray) -> np.ndarray:
  """True for the ⌊n/3⌋ examples of each class that the seeded permutation puts first."""
  rng = np.random.RandomState(_SPLIT_SEED)
  is_test = np.zeros(labels.shape, bool)
  for digit in (*ID_CLASSES, *OOD_CLASSES):
    members = rng.permutation(np.flatnonzero(labels == digit))
    is_test[members[:len(members) // _TEST_DIVISOR]] = True
  return is_test


def _validation_mask(labels: np.ndarray, is_test: np.ndarray) -> np.ndarray:
  """True for ⌊n/4⌋ of the train examples of each OOD class, drawn by a seeded permutation."""
  rng = np.random.RandomState(_VALIDATION_SEED)
  mask = np.zeros(labels.shape, bool)
  for digit in OOD_CLASSES:
    members = rng.permutation(np.flatnonzero((labels == digit) & ~is_test))
    mask[members[:len(members) // _VALIDATION_DIVISOR]] = True
  return mask


def _upsampling_matrix(size: int, factor: int) -> np.ndarray:
  """[size · factor, size] matrix of Keys' bicubic interpolation (a = −0.5), edge pixels replicated."""
  centres = (np.arange(size * factor) + 0.5) / factor - 0.5  # output pixel centres in input coordinates
  taps = np.floor(centres)[:, None] + np.arange(-1, 3)
  distance = np.abs(taps - centres[:, None])
  weights = np.where(distance <= 1, (1.5 * distance - 2.5) * distance**2 + 1,
                     ((-0.5 * distance + 2.5) * distance - 4) * distance + 2)
  matrix = np.zeros((size * factor, size))
  # Out-of-range taps fold onto the edge pixel, so each row still sums to exactly 1.
  rows = np.broadcast_to(np.arange(size * factor)[:, None], taps.shape)
  np.add.at(matrix, (rows, np.clip(taps, 0, size - 1).astype(int)), weights)
  return matrix


def _photo_patches() -> np.ndarray:
  """The grid of 64×64 patches of both sample photos, resized to 32×32 grey, uint8 [456, 32, 32, 1]."""
  patches = []
  for photo in _sk_datasets().load_sample_images().images:
    rows, cols = (_patch_starts(length) for length in photo.shape[:2])
    patches += [photo[r:r + _PATCH_SIZE, c:c + _PATCH_SIZE] for r in rows for c in cols]
  patches = sources.resize_images(np.stack(patches), (IMAGE_SIZE, IMAGE_SIZE))
  return sources.convert_channels(patches, 1)


def _patch_starts(length: int) -> np.ndarray:
  """Patch offsets along one axis: every stride that fits, the leftover margin split evenly."""
  count = (length - _PATCH_SIZE) // _PATCH_STRIDE + 1
  first = (length - _PATCH_SIZE - (count - 1) * _PATCH_STRIDE) // 2
  return first + _PATCH_STRIDE * np.arange(count)


def _shared(data: ArrayData) -> ArrayData:
  # Cached and handed to every caller: a write through one reference would corrupt all the others.
  data.images.flags.writeable = data.labels.flags.writeable = False
  return data
