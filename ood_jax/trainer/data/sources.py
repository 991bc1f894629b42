"""Host-side acquisition of datasets as uint8 NumPy arrays.

Every loader returns an `ArrayData` (images [N, H, W, C] uint8, labels [N] int32) that the device
pipeline shards and augments. By default TFDS data is only ever read, never downloaded: a dataset that
has not been prepared fails with `DatasetNotFoundError` saying how to prepare it, rather than starting a
multi-gigabyte download on an accelerator host. `download=True` (`config.download`, the notebook's
`DOWNLOAD` switch) opts in: a missing dataset is then downloaded and prepared with TFDS's
`download_and_prepare` before it is read. TensorFlow and TFDS are imported on first use, with GPUs
hidden from TensorFlow so that it never reserves accelerator memory JAX needs.

Images that must change size (OOD sets, outliers) are resized once, here, with Pillow's antialiased
bilinear filter; grey ↔ RGB conversion uses ITU-R BT.601 luma weights or channel repetition.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import numpy as np
from PIL import Image

from ood_jax import _checks
from ood_jax import _extras
from ood_jax.trainer.data import registry

OUTLIER_LABEL = -1  # label of every OOD / outlier example: no in-distribution class, and invalid for losses
_BATCH = 1024
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, the weights of PIL's convert('L')


class DatasetNotFoundError(FileNotFoundError):
  """The files of a dataset are not on disk (TFDS data not prepared, folder or file missing)."""


@dataclasses.dataclass(frozen=True)
class ArrayData:
  """Images and labels of one dataset split, in host memory.

  Loaders cache what they read, so the arrays they return may be shared and read-only: copy them
  before writing.

  Attributes:
    images: [N, H, W, C] uint8 pixels.
    labels: [N] int32 class indices in [0, num_classes), or `OUTLIER_LABEL` (-1) for OOD and outlier
      sets, which have no in-distribution class (a loss given -1 fails its label check loudly).
    name: where the data came from, e.g. 'cifar10', 'cifar10_corrupted/fog_3', 'folder:/data/LSUN'.
  """

  images: np.ndarray
  labels: np.ndarray
  name: str

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise TypeError(f'images must be a uint8 NumPy array [N, H, W, C], got {_describe(self.images)}.')
    if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int32 or self.labels.ndim != 1:
      raise TypeError(f'labels must be an int32 NumPy array [N], got {_describe(self.labels)}.')
    if len(self.labels) != len(self.images):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} labels.')

  def __len__(self) -> int:
    return self.images.shape[0]


def load_split(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
               download: bool = False) -> ArrayData:
  """One split of a registered in-distribution dataset, read once per process.

  Args:
    name: registry name ('cifar10', 'cifar100', 'svhn_cropped', 'digits').
    split: split name or TFDS slice ('train', 'test', 'train[:90%]').
    data_dir: TFDS data directory; None means TFDS's default (`TFDS_DATA_DIR` or ~/tensorflow_datasets).
    download: let TFDS download and prepare the dataset under `data_dir` if it is missing (needs
      internet access); False (the default) never downloads.

  Returns:
    ArrayData of shape `registry.get_info(name).image_shape` per image and labels in [0, num_classes);
    cifar100 gives the 100 fine labels.

  Raises:
    ValueError: unknown name (the message lists the valid ones).
    DatasetNotFoundError: the TFDS data is not prepared under `data_dir` (and `download` is False).
  """
  info = registry.get_info(name)
  if info.tfds_name is None:
    return _load_builtin(name, split)
  data = read_tfds(info.tfds_name, split, data_dir=data_dir, label_key=info.label_key, download=download)
  return dataclasses.replace(data, name=name)


def read_tfds(tfds_name: str, split: str, *, data_dir: str | os.PathLike | None = None,
              label_key: str | None = None, image_size: tuple[int, int] | None = None,
              num_examples: int | None = None, seed: int = 0, download: bool = False) -> ArrayData:
  """Any TFDS image dataset (feature 'image') as arrays; results are cached per argument set.

  Args:
    tfds_name: TFDS name, with a config where the builder has several ('cifar10_corrupted/fog_3').
    split: split name or TFDS split expression ('train+validation+test').
    data_dir: TFDS data directory; None means TFDS's default.
    label_key: feature holding the label; None gives `OUTLIER_LABEL` for every example.
    image_size: (height, width) to resize to; None keeps the stored size, which must then be fixed.
    num_examples: keep a random subset of at most this many examples (source order kept); None keeps
      all. Unselected examples are never decoded, so subsampling a huge split is cheap in memory.
    seed: seed of that subset.
    download: if the dataset is not prepared under `data_dir`, download and prepare it
      (`builder.download_and_prepare()`, which needs internet access) and then read it; False raises
      DatasetNotFoundError instead.

  Returns:
    ArrayData named `tfds_name`.
  """
  if image_size is not None:
    image_size = check_image_size(image_size)
  if num_examples is not None:
    num_examples = _checks.positive_int('num_examples', num_examples)
  data_dir = None if data_dir is None else os.fspath(data_dir)
  args = (tfds_name, split, data_dir, label_key, image_size, num_examples, int(seed))
  try:
    return _read_tfds(*args)
  except DatasetNotFoundError:
    if not download:
      raise
  _download_and_prepare(tfds_name, data_dir)  # outside the read cache: one download serves every read
  return _read_tfds(*args)


def load_outliers(source: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, split: str = 'train',
                  image_size: tuple[int, int] = (32, 32), channels: int = 3, max_examples: int | None = None,
                  seed: int = 0, download: bool = False) -> ArrayData:
  """Auxiliary outlier images for outlier exposure (OE, Energy, ICE training).

  Args:
    source: a TFDS name, with config if needed ('imagenet_resized/32x32', 'svhn_cropped'), or a path
      ending in '.npy' holding uint8 images [N, H, W, C] (C = 1 or 3) or grey [N, H, W], such as the
      300K Random Images file of Hendrycks et al.
    data_dir: TFDS data directory (TFDS sources only).
    split: TFDS split (TFDS sources only).
    image_size: (height, width) of the returned images; others are resized.
    channels: 3 (RGB) or 1 (grey) to match the in-distribution data.
    max_examples: keep a random subset of at most this many images; None keeps all.
    seed: seed of that subset.
    download: download and prepare a missing TFDS source (TFDS sources only; see `read_tfds`).

  Returns:
    ArrayData with every label `OUTLIER_LABEL`.

  Raises:
    DatasetNotFoundError: missing .npy file or unprepared TFDS data.
    TypeError, ValueError: a .npy file with the wrong dtype or rank.
  """
  image_size = check_image_size(image_size)
  check_channels(channels)
  if os.fspath(source).endswith('.npy'):
    return _load_npy(os.fspath(source), image_size, channels, max_examples, seed)
  data = read_tfds(os.fspath(source), split, data_dir=data_dir, image_size=image_size,
                   num_examples=max_examples, seed=seed, download=download)
  return dataclasses.replace(data, images=convert_channels(data.images, channels))


def clear_cache() -> None:
  """Forgets every dataset read so far (frees host memory; tests switch between mock and real data)."""
  _read_tfds.cache_clear()


def choose(count: int, num_examples: int | None, seed: int) -> np.ndarray | None:
  """Sorted indices of a random subset of min(num_examples, count) of `count` items; None means all."""
  if num_examples is None or num_examples >= count:
    return None
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(count, size=num_examples, replace=False))


def resize_images(images: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
  """Resizes uint8 images [N, H, W, C] to `image_size` = (height, width); a no-op when they match.

  Pillow's bilinear filter widens its triangle kernel by the downscale factor, so downscaling
  averages over the source pixels instead of aliasing; it works at full precision, no reducing_gap.
  """
  height, width = check_image_size(image_size)
  if images.shape[1:3] == (height, width):
    return images
  return np.stack([_resize_one(image, (height, width)) for image in images])


def resize_pil(image: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
  """A Pillow image (mode 'RGB' or 'L') resized to (height, width), as uint8 [H, W, C]."""
  height, width = image_size
  if image.size != (width, height):
    image = image.resize((width, height), Image.BILINEAR)
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """uint8 images [..., C] with C in {1, 3} converted to `channels` (1: BT.601 luma, 3: repeated grey)."""
  check_channels(channels)
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 1:
    return np.repeat(images, 3, axis=-1)
  if have == 3:
    grey = np.round(images.astype(np.float32) @ _LUMA)
    return np.clip(grey, 0, 255).astype(np.uint8)[..., None]
  raise ValueError(f'images must have 1 or 3 channels, got {have}.')


def check_channels(channels) -> None:
  """Raises ValueError unless `channels` is 1 (grey) or 3 (RGB)."""
  if isinstance(channels, bool) or channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels!r}.')


def check_image_size(image_size) -> tuple[int, int]:
  """`image_size` as a (height, width) tuple of positive ints; raises ValueError/TypeError otherwise."""
  if len(image_size) != 2:
    raise ValueError(f'image_size must be (height, width), got {image_size!r}.')
  return tuple(_checks.positive_int('image_size', size) for size in image_size)


def _load_builtin(name: str, split: str) -> ArrayData:
  # Datasets built inside ood_jax (tfds_name None) live in ood_jax.trainer.data.<name>, which exposes
  # load_split(split) returning .images/.labels; imported lazily to keep `import ood_jax` light.
  module = importlib.import_module(f'ood_jax.trainer.data.{name}')
  data = module.load_split(split)
  return ArrayData(np.asarray(data.images), np.asarray(data.labels), name)


def _load_npy(path: str, image_size, channels: int, max_examples: int | None, seed: int) -> ArrayData:
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f'Outlier file {path!r} does not exist.')
  # Memory-mapped, so that taking a subset of a large file reads only the selected images.
  images = np.load(path, mmap_mode='r')
  if images.dtype != np.uint8:
    raise TypeError(f'Outlier file {path!r} must hold uint8 images, got dtype {images.dtype}.')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Outlier file {path!r} must hold images [N, H, W], [N, H, W, 1] or [N, H, W, 3], '
                     f'got shape {images.shape}.')
  if max_examples is not None:
    max_examples = _checks.positive_int('max_examples', max_examples)
  keep = choose(len(images), max_examples, seed)
  images = np.asarray(images if keep is None else images[keep])
  images = convert_channels(resize_images(images, image_size), channels)
  return ArrayData(images, np.full(len(images), OUTLIER_LABEL, np.int32), path)


@functools.lru_cache(maxsize=None)
def _read_tfds(tfds_name, split, data_dir, label_key, image_size, num_examples, seed) -> ArrayData:
  tf, tfds = _tensorflow()
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if 'image' not in builder.info.features:
    raise ValueError(f'TFDS dataset {tfds_name!r} has no image feature.')
  feature = builder.info.features['image']
  fixed = None not in feature.shape
  if image_size is None and not fixed:
    raise ValueError(f'TFDS dataset {tfds_name!r} has images of varying size: pass image_size.')
  try:
    # Encoded images pass the subset filter undecoded: decoding is the expensive part.
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
  except AssertionError as err:  # how TFDS reports a dataset that has not been prepared
    raise DatasetNotFoundError(_not_prepared(tfds, builder, tfds_name, data_dir)) from err

  keys = ('image',) if label_key is None else ('image', label_key)
  ds = ds.map(lambda ex: {key: ex[key] for key in keys})
  count = int(ds.cardinality())  # TFDS knows every split's size, slices and unions included
  keep = choose(count, num_examples, seed)
  if keep is not None:
    mask = np.zeros(count, bool)
    mask[keep] = True
    mask = tf.constant(mask)
    ds = ds.enumerate().filter(lambda index, _: mask[index]).map(lambda _, ex: ex)
  ds = ds.map(lambda ex: {**ex, 'image': feature.decode_example(ex['image'])},
              num_parallel_calls=tf.data.AUTOTUNE)

  # Fixed-size images decode in batches; variable-size ones (DTD) one at a time, resized as they come,
  # so full-resolution images never pile up in memory.
  images, labels = [], []
  for example in tfds.as_numpy(ds.batch(_BATCH) if fixed else ds):
    batch = example['image'] if fixed else example['image'][None]
    images.append(batch if image_size is None else resize_images(batch, image_size))
    if label_key is not None:
      labels.append(np.atleast_1d(example[label_key]))
  if not images:
    raise ValueError(f'TFDS dataset {tfds_name!r} split {split!r} has no examples.')
  images = np.concatenate(images)
  labels = (np.concatenate(labels).astype(np.int32) if labels
            else np.full(len(images), OUTLIER_LABEL, np.int32))
  images.flags.writeable = labels.flags.writeable = False  # shared through the cache
  return ArrayData(images, labels, tfds_name)


@functools.cache
def _tensorflow():
  # Optional packages (the 'train' extra; 'colab' where tensorflow is installed already): a missing one
  # raises ModuleNotFoundError naming the extra.
  _extras.require(('tensorflow', 'tensorflow_datasets'), needed_by='Reading TFDS datasets')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF was initialised elsewhere first; its devices can no longer change
    pass
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tf, tfds


def _download_and_prepare(tfds_name: str, data_dir: str | None) -> None:
  _, tfds = _tensorflow()
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  # Downloads land in <data_dir>/downloads, so the configs of one archive (CIFAR-10-C's 95) fetch it once.
  builder.download_and_prepare()


def _not_prepared(tfds, builder, tfds_name: str, data_dir: str | None) -> str:
  root = data_dir or tfds.core.constants.DATA_DIR
  return (f'TFDS dataset {tfds_name!r} is not prepared: nothing in {builder.data_dir} (data_dir={root!r}). '
          'ood_jax downloads only when asked to (download=True, --config.download=True); prepare it '
          'once on a machine with internet access and copy the directory here:\n'
          f'  python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{tfds_name}', data_dir='{root}').download_and_prepare()\"\n"
          f'or: tfds build {tfds_name} --data_dir={root}\n'
          'then pass that data_dir (or set TFDS_DATA_DIR).')


def tfds_problem(tfds_name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> str | None:
  """Why `tfds_name`'s `split` cannot be read without a download (with the command that prepares it), or None.

  Opens the split as `read_tfds` would, without reading an example: cheap, and true to what the read will
  find (under `tfds.testing.mock_data` too).
  """
  _, tfds = _tensorflow()
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as err:
    return f'TFDS has no dataset {tfds_name!r}: {str(err).splitlines()[0]}'
  try:
    builder.as_dataset(split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
  except AssertionError:  # how TFDS reports a dataset that has not been prepared
    return _not_prepared(tfds, builder, tfds_name, data_dir)
  except ValueError as err:  # an unknown split or slice
    return f'TFDS dataset {tfds_name!r} has no split {split!r}: {err}'
  return None


def _resize_one(image: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
  # 2-D uint8 arrays become mode 'L', [H, W, 3] ones mode 'RGB'.
  return resize_pil(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), image_size)


def _describe(x) -> str:
  if isinstance(x, np.ndarray):
    return f'{x.dtype} array of shape {x.shape}'
  return type(x).__name__
