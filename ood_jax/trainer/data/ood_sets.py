"""Evaluation sets beyond the in-distribution test split: OOD sets and corrupted (covariate-shift) sets.

OOD sets follow the ODIN / IsoMax / OpenOOD protocols: other datasets' test images (SVHN, CIFAR-10 ↔
CIFAR-100), Textures (DTD), Places365, the resized LSUN / TinyImageNet / iSUN folders released with
ODIN, and synthetic Gaussian and uniform noise. All come out as `ArrayData` at the in-distribution
image size and channel count, with every label `OUTLIER_LABEL` (-1).

Corrupted sets are CIFAR-10-C as released (TFDS `cifar10_corrupted/{name}_{severity}`) or, for any
other base dataset, its test split corrupted on the fly by a `corrupt_fn`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from ood_jax import _checks
from ood_jax import corruptions
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources

# name → (TFDS name, split). DTD: all 5,640 images of its three splits, as OpenOOD uses them. Places365:
# the test split (328,500 images), which Outlier Exposure evaluates on; subsampled by default.
TFDS_SETS = {
    'cifar10': ('cifar10', 'test'),
    'cifar100': ('cifar100', 'test'),
    'mnist': ('mnist', 'test'),
    'svhn_cropped': ('svhn_cropped', 'test'),
    'dtd': ('dtd', 'train+validation+test'),
    'places365_small': ('places365_small', 'test'),
}
_DEFAULT_NUM_EXAMPLES = {'places365_small': 10_000, 'gaussian_noise': 10_000, 'uniform_noise': 10_000}
_FOLDER = 'folder:'
_IMGLIST = 'imglist:'
_IMAGE_SUFFIXES = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp'})

CorruptFn = Callable[[np.ndarray, str, int, jax.Array], np.ndarray]


def _gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return np.clip(rng.standard_normal(shape, np.float32) + 0.5, 0.0, 1.0)  # N(0.5, 1) clipped, as ODIN


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.random(shape, np.float32)  # U[0, 1)


_NOISE = {'gaussian_noise': _gaussian_noise, 'uniform_noise': _uniform_noise}
OOD_SETS = (*TFDS_SETS, *_NOISE, _FOLDER + '<path>', _IMGLIST + '<list file>[@<image root>]')


def load_ood(name: str, *, data_dir: str | os.PathLike | None = None, image_size: tuple[int, int] = (32, 32),
             num_examples: int | None = None, seed: int = 0, channels: int = 3,
             download: bool = False) -> sources.ArrayData:
  """An OOD test set at the in-distribution image size and channel count.

  Args:
    name: one of `OOD_SETS`: 'cifar10', 'cifar100', 'svhn_cropped' (test splits), 'dtd' (all 5,640
      Textures images, every split), 'places365_small' (test split), 'gaussian_noise' (N(0.5, 1)
      clipped to [0, 1]), 'uniform_noise' (U[0, 1]), or 'folder:<path>': every PNG/JPEG/... file
      under <path>, recursively, in sorted path order (ODIN's LSUN / TinyImageNet / iSUN releases,
      or a tfds.folder_dataset.ImageFolder tree root/<split>/<label>/*.png), or
      'imglist:<list file>[@<image root>]': the images an OpenOOD benchmark_imglist file names, one
      `<relative path> <label>` line each, read in file order from <image root> (default: the list
      file's folder); the labels are ignored (every image is OOD here).
    data_dir: TFDS data directory; None means TFDS's default.
    image_size: (height, width) to resize to (Pillow antialiased bilinear, once, on the host).
    num_examples: a random subset of at most this many examples, in source order. None means the set's
      default: all images, except 10,000 for places365_small and for the noise sets (exactly that many).
    seed: seed of the subset and of the noise.
    channels: 3 (RGB) or 1 (grey, BT.601 luma) to match the in-distribution data.
    download: download and prepare a missing TFDS set (`sources.read_tfds`); False never downloads.

  Returns:
    ArrayData named `name`, images [N, *image_size, channels] uint8, labels all `OUTLIER_LABEL`.

  Raises:
    ValueError: unknown name (the message lists the valid ones).
    DatasetNotFoundError: unprepared TFDS data or a missing folder.
  """
  image_size = sources.check_image_size(image_size)
  sources.check_channels(channels)
  if num_examples is None:
    num_examples = _DEFAULT_NUM_EXAMPLES.get(name)
  else:
    num_examples = _checks.positive_int('num_examples', num_examples)

  if name.startswith(_FOLDER):
    images = _load_folder(name[len(_FOLDER):], image_size, num_examples, seed)
  elif name.startswith(_IMGLIST):
    images = _load_image_list(name[len(_IMGLIST):], image_size, num_examples, seed)
  elif name in _NOISE:
    pixels = _NOISE[name](np.random.default_rng(seed), (num_examples, *image_size, channels))
    images = np.round(pixels * 255).astype(np.uint8)
  elif name in TFDS_SETS:
    tfds_name, split = TFDS_SETS[name]
    images = sources.read_tfds(tfds_name, split, data_dir=data_dir, image_size=image_size,
                               num_examples=num_examples, seed=seed, download=download).images
  else:
    raise ValueError(f'Unknown OOD set {name!r}; valid names: {", ".join(OOD_SETS)}.')
  images = sources.convert_channels(images, channels)
  return sources.ArrayData(images, np.full(len(images), sources.OUTLIER_LABEL, np.int32), name)


def load_corrupted(base: str, corruption: str, severity: int, *, data_dir: str | os.PathLike | None = None,
                   corrupt_fn: CorruptFn | None = None, seed: int = 0, download: bool = False) -> sources.ArrayData:
  """The test split of `base` under one corruption at one severity, with its true labels.

  Args:
    base: registry name of the in-distribution dataset.
    corruption: a name from `ood_jax.corruptions.CORRUPTIONS`.
    severity: 1..5.
    data_dir: TFDS data directory; None means TFDS's default.
    corrupt_fn: `corrupt_fn(images, corruption, severity, rng) -> images`, uint8 [N, H, W, C] in and
      out, `rng` a JAX key. None means the released CIFAR-10-C images for base 'cifar10' and
      `ood_jax.corruptions.corrupt` for any other base. Passing one for 'cifar10' corrupts its clean
      test split on the fly instead of reading CIFAR-10-C.
    seed: seed of the `rng` key given to `corrupt_fn` (the same key for every corruption).
    download: download and prepare missing TFDS data (`sources.read_tfds`); False never downloads.

  Returns:
    ArrayData named '{base}_corrupted/{corruption}_{severity}'.

  Raises:
    ValueError: unknown base, corruption or severity, or a corrupt_fn output of the wrong shape/dtype.
    NotImplementedError: on-the-fly corruption without `corrupt_fn` while ood_jax.corruptions has no
      `corrupt`.
    DatasetNotFoundError: unprepared TFDS data.
  """
  corruptions.check_corruption(corruption, severity)
  info = registry.get_info(base)
  name = f'{base}_corrupted/{corruption}_{severity}'
  if base == 'cifar10' and corrupt_fn is None:
    # Always with a config name: the config-less `cifar10_corrupted` is silently brightness_1.
    return sources.read_tfds(name, 'test', data_dir=data_dir, label_key='label', download=download)

  if corrupt_fn is None:
    corrupt_fn = _default_corrupt_fn(base)
  clean = sources.load_split(base, info.test_split, data_dir=data_dir, download=download)
  images = np.asarray(corrupt_fn(clean.images, corruption, severity, jax.random.key(seed)))
  if images.dtype != np.uint8 or images.shape != clean.images.shape:
    raise ValueError(f'corrupt_fn must return uint8 images of shape {clean.images.shape}, '
                     f'got {images.dtype} of shape {images.shape}.')
  return sources.ArrayData(images, clean.labels, name)


def corruption_grid(names: Sequence[str] = corruptions.BENCHMARK_CORRUPTIONS,
                    severities: Sequence[int] = corruptions.SEVERITIES) -> list[tuple[str, int]]:
  """Every (corruption, severity) pair of a benchmark; by default the 15 corruptions × 5 severities."""
  if isinstance(names, str):
    raise TypeError(f'names must be a sequence of corruption names, got the string {names!r}.')
  pairs = [(name, severity) for name in names for severity in severities]
  for pair in pairs:
    corruptions.check_corruption(*pair)
  return pairs


def _default_corrupt_fn(base: str) -> CorruptFn:
  # Looked up at call time, so on-the-fly corruption starts working once the module provides it.
  corrupt = getattr(corruptions, 'corrupt', None)
  if corrupt is None:
    raise NotImplementedError(
        f'Corrupting {base!r} on the fly needs corrupt_fn(images, name, severity, rng) until '
        'ood_jax.corruptions.corrupt is available; only cifar10 has released corrupted images '
        '(TFDS cifar10_corrupted).')
  return corrupt


def _load_folder(root: str, image_size: tuple[int, int], num_examples: int | None, seed: int) -> np.ndarray:
  if not os.path.isdir(root):
    raise sources.DatasetNotFoundError(f'OOD image folder {root!r} does not exist.')
  files = sorted(path for path in pathlib.Path(root).rglob('*') if path.suffix.lower() in _IMAGE_SUFFIXES)
  if not files:
    raise sources.DatasetNotFoundError(
        f'OOD image folder {root!r} holds no image files ({", ".join(sorted(_IMAGE_SUFFIXES))}).')
  keep = sources.choose(len(files), num_examples, seed)
  if keep is not None:
    files = [files[i] for i in keep]
  return np.stack([_read_image(path, image_size) for path in files])


def read_image_list(list_file: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The image paths of an OpenOOD-style image list, in file order.

  Each non-empty line is `<path relative to image_root> <anything>` (OpenOOD writes the class label,
  or a dict of extras, after the first space); blank lines are skipped.

  Args:
    list_file: the text file.
    image_root: folder the paths are relative to; None means the list file's folder.

  Returns:
    Absolute paths. Raises DatasetNotFoundError for a missing list, an empty one or a listed image that
    does not exist (naming the first few missing).
  """
  list_file = pathlib.Path(list_file)
  if not list_file.is_file():
    raise sources.DatasetNotFoundError(f'Image list {os.fspath(list_file)!r} does not exist.')
  root = list_file.parent if image_root is None else pathlib.Path(image_root)
  with open(list_file, encoding='utf-8') as f:
    paths = [root / line.strip().split(' ', 1)[0] for line in f if line.strip()]
  if not paths:
    raise sources.DatasetNotFoundError(f'Image list {os.fspath(list_file)!r} names no image.')
  missing = [path for path in paths if not path.is_file()]
  if missing:
    shown = ', '.join(os.fspath(path) for path in missing[:3])
    raise sources.DatasetNotFoundError(
        f'{len(missing)} of the {len(paths)} images of {os.fspath(list_file)!r} are missing under '
        f'{os.fspath(root)!r} (e.g. {shown}); is the image root right?')
  return paths


def _load_image_list(spec: str, image_size: tuple[int, int], num_examples: int | None, seed: int) -> np.ndarray:
  list_file, _, image_root = spec.partition('@')
  files = read_image_list(list_file, image_root or None)
  keep = sources.choose(len(files), num_examples, seed)
  if keep is not None:
    files = [files[i] for i in keep]
  return np.stack([_read_image(path, image_size) for path in files])


def _read_image(path: pathlib.Path, image_size: tuple[int, int]) -> np.ndarray:
  with Image.open(path) as image:
    # RGB first, whatever the file holds (grey, palette, RGBA, CMYK); load_ood converts channels after.
    return sources.resize_pil(image.convert('RGB'), image_size)
