"""Streamed, process-sharded input for sets too large for host memory (ImageNet-scale evaluation).

The in-memory pipeline (`pipeline`) puts a whole 32 × 32 dataset on every host; ImageNet's 1.28 M
training images (140 GB of JPEG) cannot be. Here a set is a `Source`: a row count and a way to read rows
[start, stop) as encoded images, from an OpenOOD image list ('openood:<dataset>/<list>',
'imglist:<file>[@<root>]') or a TFDS split ('tfds:<name>/<split>', a `[a:b]` slice allowed).

* Rows are cut into chunks of `chunk_size` (chunk c holds rows [c·S, (c + 1)·S)); process p of P
  handles chunks p, p + P, p + 2P, ... (`chunks`), so each host reads, decodes and runs the model on its
  own shard only, and no chunk depends on the process count.
* `host_batches` decodes and resizes one chunk on the host with tf.data (parallel map, prefetch):
  the shorter side to `resize`, then a centre crop to `image_size` (torchvision's Resize + CenterCrop, as
  OpenOOD evaluates; bilinear with antialiasing), uint8 out. Batches never cross a chunk boundary, so
  every row sits at the same position of the same-shaped batch whatever the process count.
* `prefetch_to_devices` pads each batch to a fixed size (one compilation) with a validity mask and keeps
  `size` batches in flight on the devices while the model runs.

The per-chunk outputs go to `ood_jax.trainer.feature_cache.ChunkStore`, read back by every host in chunk
order. TensorFlow is imported when a source is first read (the `train` extra), never by the core.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from ood_jax import _checks
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import ood_sets
from ood_jax.trainer.data import sources

__all__ = [
    'TFDS_PREFIX',
    'Chunk',
    'Source',
    'check_sources',
    'chunks',
    'host_batches',
    'open_source',
    'prefetch_to_devices',
]

TFDS_PREFIX = 'tfds:'
_TFDS_SPLIT = re.compile(r'^(?P<split>[A-Za-z0-9_]+)(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$')
_MANUAL = {  # TFDS datasets that need a manual download, and how to make one
    'imagenet2012': ('download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org '
                     '(after accepting its terms) into <data_dir>/downloads/manual/, then run: tfds build '
                     'imagenet2012 --data_dir=<data_dir> (about 150 GB and a few hours; --manual_dir=<folder> reads '
                     'the archives from elsewhere)'),
}


@dataclasses.dataclass(frozen=True)
class Source:
  """A set read from disk in row ranges.

  Attributes:
    name: the source name it was opened by.
    num_examples: N.
    labelled: whether rows carry class labels (otherwise every label is `sources.OUTLIER_LABEL`).
    read: `read(start, stop)` → a tf.data.Dataset of {'image': encoded bytes, 'label': int32} for rows
      [start, stop), in order.
  """

  name: str
  num_examples: int
  labelled: bool
  read: Callable[[int, int], object]


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Rows [start, stop) of a set: chunk `index` of it."""

  index: int
  start: int
  stop: int


def _tf():
  return sources._tensorflow()  # pylint: disable=protected-access


def _list_labels(list_file: str, count: int) -> np.ndarray:
  """The integer labels of an OpenOOD list (`<path> <label>` lines), in file order."""
  labels = []
  with open(list_file, encoding='utf-8') as f:
    for number, line in enumerate((line for line in f if line.strip()), 1):
      parts = line.strip().split(' ', 1)
      try:
        labels.append(int(parts[1]))
      except (IndexError, ValueError):
        raise ValueError(f'Image list {list_file!r}, line {number}: an in-distribution list needs '
                         f'"<path> <integer label>", got {line.strip()!r}.') from None
  labels = np.asarray(labels, np.int64)
  if len(labels) != count or (labels.size and labels.min() < 0):
    raise ValueError(f'Image list {list_file!r} must give every image a label >= 0.')
  return labels.astype(np.int32)


def _list_source(name: str, spec: str, labelled: bool) -> Source:
  list_file, _, root = spec.partition('@')
  paths = np.asarray([os.fspath(p) for p in ood_sets.read_image_list(list_file, root or None)])
  labels = (_list_labels(list_file, len(paths)) if labelled
            else np.full(len(paths), sources.OUTLIER_LABEL, np.int32))

  def read(start, stop):
    tf, _ = _tf()
    rows = tf.data.Dataset.from_tensor_slices((paths[start:stop], labels[start:stop]))
    return rows.map(lambda path, label: {'image': tf.io.read_file(path), 'label': label})

  return Source(name, len(paths), labelled, read)


def _tfds_source(name: str, data_dir, labelled: bool) -> Source:
  tf, tfds = _tf()
  tfds_name, _, split = name[len(TFDS_PREFIX):].rpartition('/')
  match = _TFDS_SPLIT.match(split)
  if not tfds_name or not match:
    raise ValueError(f'TFDS source {name!r} must read tfds:<name>/<split> with an optional [a:b] slice, '
                     "e.g. 'tfds:imagenet2012/validation[:5000]'.")
  builder = tfds.builder(tfds_name, data_dir=None if data_dir is None else os.fspath(data_dir))
  open_split = lambda expression: builder.as_dataset(split=expression, shuffle_files=False,
                                                     decoders={'image': tfds.decode.SkipDecoding()})
  base = match['split']
  try:
    total = int(open_split(base).cardinality())
  except AssertionError as err:  # how TFDS reports a dataset that has not been prepared
    raise sources.DatasetNotFoundError(_tfds_problem(tfds_name, base, data_dir)) from err
  first = int(match['start'] or 0)
  last = min(int(match['stop']) if match['stop'] else total, total)
  if first >= last:
    raise ValueError(f'TFDS source {name!r} selects no rows of the {total} in {base!r}.')

  def read(start, stop):
    a, b = first + start, first + stop
    rows = open_split(f'{base}[{a}:{b}]')
    if int(rows.cardinality()) != b - a:
      # tfds.testing.mock_data ignores slice expressions and serves the whole split: take the rows from it.
      rows = rows.skip(a).take(b - a)
    label = (lambda ex: tf.cast(ex['label'], tf.int32)) if labelled else (
        lambda ex: tf.constant(sources.OUTLIER_LABEL, tf.int32))
    return rows.map(lambda ex: {'image': ex['image'], 'label': label(ex)})

  return Source(name, last - first, labelled, read)


def open_source(name: str, *, labelled: bool, data_dir: str | os.PathLike | None = None,
                benchmark_dir: str | os.PathLike | None = None) -> Source:
  """The `Source` a set name denotes.

  Args:
    name: 'openood:<dataset>/<list>' (OpenOOD's release under `benchmark_dir`), 'imglist:<file>[@<root>]',
      or 'tfds:<name>/<split>' with an optional absolute slice ('tfds:imagenet2012/validation[5000:]').
    labelled: read class labels (in-distribution sets: a list's second column, TFDS's 'label').
    data_dir: TFDS data directory.
    benchmark_dir: the benchmark releases' folder (`catalog.resolve_benchmark_dir`).

  Raises:
    DatasetNotFoundError: data not on disk (with how to prepare it).
    ValueError: a name of another kind, or a labelled list without integer labels.
  """
  if name.startswith(TFDS_PREFIX):
    return _tfds_source(name, data_dir, labelled)
  if name.startswith(catalog.OPENOOD_PREFIX):
    catalog.check_prepared([name], benchmark_dir=benchmark_dir)
    root = os.path.join(catalog.resolve_benchmark_dir(benchmark_dir), 'openood')
    listed = name[len(catalog.OPENOOD_PREFIX):]
    spec = (f'{os.path.join(root, "benchmark_imglist", listed)}.txt'
            f'@{os.path.join(root, catalog.openood_images(listed))}')
    return _list_source(name, spec, labelled)
  if name.startswith(catalog.IMGLIST_PREFIX):
    return _list_source(name, name[len(catalog.IMGLIST_PREFIX):], labelled)
  raise ValueError(f'Cannot stream set {name!r}: use {catalog.OPENOOD_PREFIX}<dataset>/<list>, '
                   f'{catalog.IMGLIST_PREFIX}<list file>[@<image root>] or {TFDS_PREFIX}<name>/<split>.')


def _tfds_problem(tfds_name: str, split: str, data_dir) -> str | None:
  problem = sources.tfds_problem(tfds_name, split, data_dir=data_dir)
  if problem and tfds_name in _MANUAL and 'not prepared' in problem:
    problem = f'TFDS dataset {tfds_name!r} is not prepared and needs a manual download: {_MANUAL[tfds_name]}.'
  return problem


def check_sources(names: Iterable[str], *, data_dir: str | os.PathLike | None = None,
                  benchmark_dir: str | os.PathLike | None = None) -> None:
  """One DatasetNotFoundError listing every set of `names` that is not on disk, each with how to prepare it.

  Run before any model: an hour of ImageNet features must not end on a missing OOD list.
  """
  problems = []
  for name in dict.fromkeys(names):
    if name.startswith(TFDS_PREFIX):
      tfds_name, _, split = name[len(TFDS_PREFIX):].rpartition('/')
      match = _TFDS_SPLIT.match(split)
      problem = _tfds_problem(tfds_name, match['split'] if match else split, data_dir)
      if problem:
        problems.append(problem)
    else:
      try:
        catalog.check_prepared([name], benchmark_dir=benchmark_dir)
      except sources.DatasetNotFoundError as err:
        problems.append(str(err).split('\n- ', 1)[-1])
  if problems:
    raise sources.DatasetNotFoundError(
        f'{len(problems)} data set(s) this evaluation reads are missing; nothing was run:\n- ' + '\n- '.join(problems))


def chunks(num_examples: int, chunk_size: int, *, process_index: int | None = None,
           process_count: int | None = None) -> list[Chunk]:
  """The chunks of an N-row set that process `process_index` of `process_count` handles: c ≡ index (mod count).

  Strided, so every process gets whole chunks and the shares differ by at most one chunk; the chunks of
  all processes together are every chunk exactly once. Defaults: this process of the JAX runtime.
  """
  num_examples = _checks.positive_int('num_examples', num_examples)
  chunk_size = _checks.positive_int('chunk_size', chunk_size)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else _checks.positive_int('process_count', process_count)
  if not 0 <= index < count:
    raise ValueError(f'process_index must lie in [0, {count}), got {index}.')
  total = -(-num_examples // chunk_size)
  return [Chunk(c, c * chunk_size, min((c + 1) * chunk_size, num_examples)) for c in range(index, total, count)]


def _decode(tf, encoded, image_size: tuple[int, int], resize: int | None):
  """Encoded bytes → uint8 [H, W, 3]: shorter side to `resize`, centre crop to `image_size`."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  height, width = image_size
  if resize is None:
    size = tf.constant([height, width])
  else:
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    # torchvision's Resize(int): the shorter side becomes `resize`, the longer one int(resize · long / short).
    size = tf.cast(tf.floor(shape * resize / tf.reduce_min(shape)), tf.int32)
    size = tf.where(shape == tf.reduce_min(shape), resize, size)
  image = tf.image.resize(image, size, method='bilinear', antialias=True)
  if resize is not None:
    top = (size[0] - height) // 2
    left = (size[1] - width) // 2
    image = image[top:top + height, left:left + width]
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _check_geometry(image_size, resize) -> tuple[tuple[int, int], int | None]:
  image_size = sources.check_image_size(image_size)
  if resize is not None:
    resize = _checks.positive_int('resize', resize)
    if resize < max(image_size):
      raise ValueError(f'resize ({resize}) must be at least the crop size image_size={image_size}.')
  return image_size, resize


def host_batches(source: Source, chunk: Chunk, *, batch_size: int, image_size: tuple[int, int] = (224, 224),
                 resize: int | None = 256) -> Iterator[dict[str, np.ndarray]]:
  """The rows of one chunk, decoded and resized on the host, as batches of at most `batch_size`.

  Returns:
    an iterator over dicts with 'image' uint8 [b, H, W, 3] and 'label' int32 [b], in row order; every
    batch but the chunk's last has `batch_size` rows.
  """
  batch_size = _checks.positive_int('batch_size', batch_size)
  image_size, resize = _check_geometry(image_size, resize)
  if not 0 <= chunk.start < chunk.stop <= source.num_examples:
    raise ValueError(f'chunk rows [{chunk.start}, {chunk.stop}) lie outside the {source.num_examples} rows of '
                     f'{source.name!r}.')
  tf, _ = _tf()
  rows = source.read(chunk.start, chunk.stop).map(
      lambda ex: {'image': _decode(tf, ex['image'], image_size, resize), 'label': ex['label']},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return rows.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def prefetch_to_devices(batches: Iterable[dict[str, np.ndarray]], *, batch_size: int,
                        devices: Sequence[jax.Device] | None = None, size: int = 2,
                        preprocess: Callable[[np.ndarray], np.ndarray] | None = None
                        ) -> Iterator[dict[str, object]]:
  """Host batches padded to `batch_size` rows and put on this process's devices, `size` ahead of use.

  Args:
    batches: dicts with 'image' [b, ...] (b <= batch_size) and 'label' [b].
    batch_size: rows of every device batch (padding rows are zero images).
    devices: the local devices to split the batch over (default: every local device when their number
      divides `batch_size`, else the first).
    size: batches in flight.
    preprocess: optional host function applied to each (unpadded) image batch before the transfer.

  Returns:
    an iterator over {'image': the device batch, 'mask': bool [batch_size] on the host, 'label': int32
    [b] on the host}.
  """
  batch_size = _checks.positive_int('batch_size', batch_size)
  size = _checks.positive_int('size', size)
  if devices is None:
    devices = jax.local_devices()
    devices = devices if batch_size % len(devices) == 0 else devices[:1]
  mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
  placement = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  queue = collections.deque()

  def put(batch):
    images = batch['image'] if preprocess is None else np.asarray(preprocess(batch['image']))
    count = len(images)
    if count > batch_size:
      raise ValueError(f'a host batch has {count} rows, more than batch_size={batch_size}.')
    if count < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:], images.dtype)])
    queue.append({'image': jax.device_put(images, placement), 'mask': np.arange(batch_size) < count,
                  'label': np.asarray(batch['label'], np.int32)})

  for batch in batches:
    put(batch)
    if len(queue) > size - 1:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
