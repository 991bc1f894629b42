"""Every set a run reads, by name: training and validation splits, OOD, corrupted and outlier sets.

The trainer and the evaluator never look at a name's prefix: they ask this module. 'digits/<set>'
names and the digits dataset's corruptions come from the offline benchmark (`ood_jax.trainer.data.digits`),
'folder:<path>' from an image folder, 'imglist:<file>[@<root>]' from an image list, 'openood:<list>'
and 'odin:<folder>' from the OpenOOD v1.5 and ODIN releases under the benchmark folder
(`benchmark_dir`), everything else from TFDS (`ood_jax.trainer.data.ood_sets`, `ood_jax.trainer.data.sources`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ood_jax.trainer.data import digits
from ood_jax.trainer.data import ood_sets
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources

VALIDATION_SEED = 0  # the held-out examples do not change with the training seed
DIGITS_PREFIX = 'digits/'
DIGITS_OUTLIERS = 'digits/outliers'  # the digits benchmark's auxiliary outliers (train digits 6–9)
FOLDER_PREFIX = 'folder:'
IMGLIST_PREFIX = 'imglist:'
OPENOOD_PREFIX = 'openood:'
ODIN_PREFIX = 'odin:'
BENCHMARK_DIR_ENV = 'OOD_JAX_BENCHMARK_DIR'
DEFAULT_BENCHMARK_DIR = '~/ood_jax_data'
_ODIN_FOLDERS = ('Imagenet_resize', 'Imagenet', 'LSUN_resize', 'LSUN', 'iSUN')
_OPENOOD_LARGESCALE = ('imagenet', 'imagenet200')  # OpenOOD list folders whose images are large-scale

__all__ = [
    'DIGITS_OUTLIERS',
    'openood_images',
    'resolve_benchmark_dir',
    'check_prepared',
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
  elif name.startswith(ODIN_PREFIX):
    if name[len(ODIN_PREFIX):] not in _ODIN_FOLDERS:
      raise ValueError(f'Unknown ODIN set {name!r}; valid: {", ".join(ODIN_PREFIX + f for f in _ODIN_FOLDERS)}.')
  elif name.startswith(OPENOOD_PREFIX):
    if not name[len(OPENOOD_PREFIX):].strip('/'):
      raise ValueError(f'OpenOOD set {name!r} names no list: use openood:<dataset>/<list>, '
                       'e.g. openood:cifar10/test_tin.')
  elif not name.startswith((FOLDER_PREFIX, IMGLIST_PREFIX)) and name not in ood_sets.OOD_SETS:
    raise ValueError(f'Unknown OOD set {name!r}; valid: {", ".join(ood_sets.OOD_SETS)}, '
                     f'{DIGITS_PREFIX}<{"|".join(digits.OOD_SETS)}>, {OPENOOD_PREFIX}<dataset>/<list>, '
                     f'{ODIN_PREFIX}<{"|".join(_ODIN_FOLDERS)}>.')


def resolve_benchmark_dir(path: str | os.PathLike | None = None) -> str:
  """The folder holding downloaded benchmark releases: `path`, else $OOD_JAX_BENCHMARK_DIR, else ~/ood_jax_data.

  Layout: <dir>/openood/{benchmark_imglist,images_classic} as OpenOOD's download script writes them
  (`--save_dir <dir>/openood`), and <dir>/odin/<folder> for ODIN's resized sets.
  """
  path = os.fspath(path) if path else os.environ.get(BENCHMARK_DIR_ENV) or DEFAULT_BENCHMARK_DIR
  return os.path.expanduser(path)


def openood_images(list_name: str) -> str:
  """The folder of OpenOOD's release that holds the images of `list_name` ('<dataset>/<list>').

  OpenOOD keeps its ImageNet-200 / ImageNet-1K images (ImageNet itself, SSB-hard, NINCO, iNaturalist,
  OpenImage-O) in images_largescale/ and every other set, Textures of the ImageNet lists included, in
  images_classic/ (configs/datasets/imagenet200/imagenet200_ood.yml).
  """
  dataset, _, listed = list_name.strip('/').partition('/')
  large = dataset in _OPENOOD_LARGESCALE and listed != 'test_textures'
  return 'images_largescale' if large else 'images_classic'


def _file_set(name: str, root: str) -> str | None:
  """The ood_sets name ('imglist:...' / 'folder:...') of a release set, or None for other names."""
  if name.startswith(OPENOOD_PREFIX):
    openood = os.path.join(root, 'openood')
    listed = name[len(OPENOOD_PREFIX):]
    return (f'{IMGLIST_PREFIX}{os.path.join(openood, "benchmark_imglist", listed)}.txt'
            f'@{os.path.join(openood, openood_images(listed))}')
  if name.startswith(ODIN_PREFIX):
    return FOLDER_PREFIX + os.path.join(root, 'odin', name[len(ODIN_PREFIX):])
  return None


def _how_to_prepare(name: str, root: str) -> str:
  if name.startswith(OPENOOD_PREFIX):
    save_dir = os.path.join(root, 'openood')
    listed = name[len(OPENOOD_PREFIX):]
    large = listed.split('/')[0] in _OPENOOD_LARGESCALE
    benchmarks = 'imagenet-200 imagenet-1k' if large else 'cifar-10 cifar-100'
    text = (f'OpenOOD v1.5 set {name!r} needs {_file_set(name, root).split("@")[0][len(IMGLIST_PREFIX):]} '
            f"and its images under {os.path.join(save_dir, openood_images(listed))}. Prepare them with OpenOOD's "
            'script: git clone https://github.com/Jingkang50/OpenOOD && pip install gdown && python '
            f'OpenOOD/scripts/download/download.py --contents datasets --datasets {benchmarks} '
            f'--dataset_mode benchmark --save_dir {save_dir}  (or set --config.benchmark_dir / '
            f'${BENCHMARK_DIR_ENV} to a folder that holds openood/).')
    if large and listed.split('/')[-1].startswith('train_'):
      text += (' The ImageNet training images are not in that download: extract ILSVRC2012_img_train.tar (from '
               f'https://image-net.org) so that {os.path.join(save_dir, "images_largescale", "imagenet_1k", "train")}'
               '/<wnid>/<image>.JPEG exist.')
    return text
  return (f'ODIN set {name!r} needs the folder {os.path.join(root, "odin", name[len(ODIN_PREFIX):])}: download '
          f'{name[len(ODIN_PREFIX):]}.tar.gz from the links in https://github.com/facebookresearch/odin and '
          f'untar it into {os.path.join(root, "odin")} (or set --config.benchmark_dir / ${BENCHMARK_DIR_ENV}).')


def _file_problems(names, root: str) -> list[str]:
  problems = []
  for name in names:
    check_ood_set(name)
    file_set = _file_set(name, root)
    if file_set is not None:
      missing = (not os.path.isfile(file_set.split('@')[0][len(IMGLIST_PREFIX):]) if file_set.startswith(IMGLIST_PREFIX)
                 else not os.path.isdir(file_set[len(FOLDER_PREFIX):]))
      if missing:
        problems.append(_how_to_prepare(name, root))
    elif name.startswith(IMGLIST_PREFIX) and not os.path.isfile(name[len(IMGLIST_PREFIX):].partition('@')[0]):
      problems.append(f'Image list of {name!r} does not exist.')
    elif name.startswith(FOLDER_PREFIX) and not os.path.isdir(name[len(FOLDER_PREFIX):]):
      problems.append(f'Image folder of {name!r} does not exist.')
  return problems


def check_prepared(names, *, benchmark_dir: str | os.PathLike | None = None) -> None:
  """DatasetNotFoundError naming every OpenOOD / ODIN / image-list / folder set of `names` not on disk.

  Run before any model: a benchmark of ten sets should not fail on the ninth after an hour. TFDS sets
  are checked by `check_available`, which a training run calls before its first step.
  """
  problems = _file_problems(names, resolve_benchmark_dir(benchmark_dir))
  if problems:
    raise sources.DatasetNotFoundError(f'{len(problems)} OOD set(s) are not prepared:\n- ' + '\n- '.join(problems))


def check_available(info: registry.DatasetInfo, *, splits=(), ood_names=(), corrupted=(), outliers=None,
                    data_dir: str | os.PathLike | None = None, benchmark_dir: str | os.PathLike | None = None,
                    download: bool = False) -> None:
  """One DatasetNotFoundError listing every data set a run would fail to read, each with how to prepare it.

  Called before anything is trained or written: a run must not learn after hours that its OOD sets are
  missing. Opens TFDS datasets without reading them (`sources.tfds_problem`); with `download`, TFDS data
  is prepared when read and only the files and folders are checked.

  Args:
    info: the in-distribution dataset.
    splits: its splits to read ('train', 'test').
    ood_names: OOD test and validation set names (`check_ood_set`).
    corrupted: (corruption, severity) pairs of `info`'s corrupted test set.
    outliers: (source, split) of the auxiliary outliers (`load_outlier_set`), or None.
    data_dir: TFDS data directory.
    benchmark_dir: the benchmark releases' folder (`resolve_benchmark_dir`).
    download: whether missing TFDS data may be downloaded.
  """
  root = resolve_benchmark_dir(benchmark_dir)
  problems = _file_problems([name for name in ood_names if not name.startswith(DIGITS_PREFIX)], root)
  tfds = []  # (builder name, split) the run reads
  if info.tfds_name is not None:
    tfds += [(info.tfds_name, split) for split in dict.fromkeys(splits)]
  for name in ood_names:
    if _file_set(name, root) is None and name in ood_sets.TFDS_SETS:
      tfds.append(ood_sets.TFDS_SETS[name])
  if info.name == 'cifar10':  # the released CIFAR-10-C; other datasets are corrupted on the fly
    tfds += [(f'cifar10_corrupted/{corruption}_{severity}', 'test') for corruption, severity in corrupted]
  if outliers is not None and outliers[0] != DIGITS_OUTLIERS:
    source, split = outliers
    if os.fspath(source).endswith('.npy'):
      if not os.path.isfile(source):
        problems.append(f'Outlier file {source!r} does not exist.')
    else:
      tfds.append((source, split))
  if not download:
    problems += [p for p in (sources.tfds_problem(n, s, data_dir=data_dir) for n, s in dict.fromkeys(tfds)) if p]
  problems = list(dict.fromkeys(problems))  # a builder missing for two splits is one problem
  if problems:
    raise sources.DatasetNotFoundError(
        f'{len(problems)} data set(s) this run reads are missing; nothing was trained or written:\n- '
        + '\n- '.join(problems))


def load_ood_set(name: str, info: registry.DatasetInfo, *, data_dir: str | os.PathLike | None = None,
                 benchmark_dir: str | os.PathLike | None = None, download: bool = False) -> sources.ArrayData:
  """An OOD test set at the image shape of the in-distribution dataset `info`, named `name`.

  `download=True` lets TFDS download and prepare a missing TFDS set (`config.download`); the releases
  under `benchmark_dir` are never downloaded.
  """
  check_ood_set(name)
  if name.startswith(DIGITS_PREFIX):
    return digits.load_ood(name[len(DIGITS_PREFIX):])
  file_set = _file_set(name, resolve_benchmark_dir(benchmark_dir))
  if file_set is not None:
    check_prepared([name], benchmark_dir=benchmark_dir)
  data = ood_sets.load_ood(file_set or name, data_dir=data_dir, image_size=info.image_shape[:2],
                           channels=info.image_shape[-1], download=download)
  return dataclasses.replace(data, name=name)


def load_corrupted_set(info: registry.DatasetInfo, corruption: str, severity: int, *,
                       data_dir: str | os.PathLike | None = None, download: bool = False) -> sources.ArrayData:
  """The test split of `info`'s dataset under one corruption (CIFAR-10-C as released, else on the fly)."""
  if info.name == 'digits':
    return digits.load_corrupted(corruption, severity)
  return ood_sets.load_corrupted(info.name, corruption, severity, data_dir=data_dir, download=download)


def load_outlier_set(source: str, info: registry.DatasetInfo, *, data_dir: str | os.PathLike | None = None,
                     split: str = 'train', max_examples: int | None = None, seed: int = 0,
                     download: bool = False) -> sources.ArrayData:
  """Auxiliary outliers (a TFDS name, a .npy file, or 'digits/outliers') at `info`'s image shape."""
  if source == DIGITS_OUTLIERS:
    return digits.load_outliers()
  return sources.load_outliers(source, data_dir=data_dir, split=split, image_size=info.image_shape[:2],
                               channels=info.image_shape[-1], max_examples=max_examples, seed=seed,
                               download=download)


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
                              data_dir: str | os.PathLike | None = None, download: bool = False
                              ) -> tuple[sources.ArrayData, sources.ArrayData]:
  """The training split of `info`'s dataset, less a held-out validation part (`split_validation`)."""
  data = sources.load_split(info.name, info.train_split, data_dir=data_dir, download=download)
  return split_validation(data, validation_fraction)
