"""In-memory device input pipelines: the batch at step s is a pure function of (seed, s).

A 32×32 training set is small (CIFAR-10 is 150 MB as uint8), so it is put on every device once,
replicated, and a step's batch is gathered, augmented and normalised on the accelerator by one jitted
function whose output is sharded over the mesh axis 'data': each device gathers and augments only
its own slice of the global batch, and the host does no per-step work beyond dispatch.

Order: training is an infinite sequence of epochs. Global position p = s·B + i (step s, row i,
global batch size B) belongs to epoch e = p // N and reads example perm_e[p mod N], with
perm_e = permutation(fold_in(data_key, e), N). Every epoch visits each example exactly once even when
B does not divide N; such a batch straddles two epochs. The augmentation of step s uses
fold_in(aug_key, s), split per example (see `augment`). The permutations, a sort of N keys each,
come from a second jitted function and are reused until the epoch of a batch's first row changes.
No result depends on earlier calls, so a run resumed at step s sees exactly the batches of an
uninterrupted run, whatever the number of devices.

Multi-host: every host holds the whole dataset in host memory. Arrays become global `jax.Array`s
through `jax.make_array_from_process_local_data` with the global shape equal to the local one, which
tells JAX that each host has all the data and should copy only the rows its own devices hold.
Evaluation batches are built the same way from the same host-side slices on every host.
"""

from __future__ import annotations

import functools
import operator
import zlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from ood_jax import _checks
from ood_jax.trainer import sharding
from ood_jax.trainer.data import augment as augment_lib

__all__ = [
    'TrainStream',
    'eval_batches',
    'outlier_stream',
]

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _no_augmentation(key, images):
  del key
  return images


_AUGMENTATIONS: dict[str, Augment] = {
    'none': _no_augmentation,
    'crop_flip': augment_lib.crop_and_flip,
    'crop': functools.partial(augment_lib.crop_and_flip, flip=False),
    'two_views': augment_lib.contrastive_views,
}


# ----------------------------------------------------------------------------------------------
# Checks shared by the streams and the evaluation batches.


def _check_images(name, images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f'{name} must be uint8 [N, H, W, C], got dtype {images.dtype}.')
  if images.ndim != 4:
    raise ValueError(f'{name} must have rank 4 [N, H, W, C], got shape {images.shape}.')
  if images.shape[0] == 0:
    raise ValueError(f'{name} is empty.')
  return images


def _check_labels(labels, num_examples) -> np.ndarray:
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f'labels must be integers, got dtype {labels.dtype}.')
  if labels.shape != (num_examples,):
    raise ValueError(f'labels must have shape ({num_examples},) to match images, got {labels.shape}.')
  if labels.size and (labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max):
    raise ValueError('labels must fit in int32.')
  return labels.astype(np.int32)


def _check_batch_size(global_batch_size, mesh: Mesh) -> int:
  batch_size = _checks.positive_int('global_batch_size', global_batch_size)
  if batch_size % mesh.size:
    raise ValueError(f'global_batch_size ({batch_size}) must be divisible by the number of devices in the '
                     f'mesh ({mesh.size}), so that every device gets the same share.')
  return batch_size


def _check_uint32(name, value) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f'{name} must be an integer, got {type(value).__name__}.') from None
  if not 0 <= value < 2**32:
    # jax.random.key and fold_in keep only 32 bits: larger values would silently alias.
    raise ValueError(f'{name} must lie in [0, 2**32), got {value}.')
  return value


def _augmentation(augment) -> Augment:
  if callable(augment):
    return augment
  try:
    return _AUGMENTATIONS[augment]
  except (KeyError, TypeError):
    raise ValueError(f'augment must be one of {sorted(_AUGMENTATIONS)} or a callable (key, images) -> images, '
                     f'got {augment!r}.') from None


# ----------------------------------------------------------------------------------------------
# The batch function.


def _stream_key_data(seed: int, domain: str) -> np.ndarray:
  """Raw key of one stream: the seed folded with a hash of the domain name.

  Streams with equal seeds but different domains (training data, outliers) are thus independent.
  The hash is far above any step or epoch number, so the keys also differ from a trainer's
  fold_in(key(seed), step).
  """
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(domain.encode()) & 0x7FFFFFFF)
  return np.asarray(jax.random.key_data(key))


def _epoch_permutations(epoch, *, key_data, num_epochs: int, num_examples: int):
  """`[num_epochs, N]` permutations perm_e of epochs e = epoch, …, epoch + num_epochs − 1."""
  data_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), 0)
  epochs = epoch + jnp.arange(num_epochs, dtype=jnp.uint32)
  return jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(data_key, e), num_examples))(epochs)


def _global_batch(images, labels, permutations, offset, step, *, key_data, batch_size, augment, mean, std,
                  index_sharding):
  """The global batch whose first row is position `offset` of the first epoch in `permutations`."""
  aug_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), 1)
  num_examples = permutations.shape[1]
  position = offset + jnp.arange(batch_size, dtype=jnp.int32)
  index = permutations[position // num_examples, position % num_examples]
  # Splitting the indices over the devices here makes the gather and every per-example augmentation
  # run on the device that owns the row, instead of computing the whole batch everywhere.
  index = jax.lax.with_sharding_constraint(index, index_sharding)
  batch = {'image': augment_lib.normalize(augment(jax.random.fold_in(aug_key, step), images[index]), mean, std)}
  if labels is not None:
    batch['label'] = labels[index]
  return batch


class TrainStream:
  """Infinite stream of augmented training batches on the devices of a mesh, indexed by step.

  `batch(step)` depends only on (seed, domain, step) and the data, never on earlier calls, so two
  processes, a resumed run and meshes of any size agree on it (bitwise for integer augmentations such
  as 'crop_flip'; up to float rounding for resampling). With `labels=None` the stream yields images
  only, as for outlier exposure (see `outlier_stream`).

  Attributes:
    num_examples: N, the number of training examples.
    global_batch_size: B, rows per step over all devices.
  """

  def __init__(self, images, labels=None, *, global_batch_size: int, seed: int, mesh: Mesh,
               augment: str | Augment = 'crop_flip', mean, std, domain: str = 'train'):
    """Puts the dataset on the devices and prepares the jitted batch function.

    Args:
      images: `[N, H, W, C]` uint8 images, in host memory (on every host).
      labels: `[N]` integer labels, or None for an unlabelled stream.
      global_batch_size: B >= 1, divisible by the number of devices in `mesh`.
      seed: integer in [0, 2**32).
      mesh: a mesh with axis 'data' (`ood_jax.trainer.sharding.make_mesh`).
      augment: 'crop_flip' (pad 4, crop, flip), 'crop' (no flip), 'none', 'two_views' (`augment.contrastive_views`,
        images `[B, 2, H, W, C]`) or a jit-able callable (key, uint8 [B, H, W, C]) → images on the
        0–255 scale with the batch axis first.
      mean: per-channel means on [0, 1] for `augment.normalize`.
      std: per-channel standard deviations on [0, 1].
      domain: name whose hash separates the keys of streams that share a seed.
    """
    images = _check_images('images', images)
    self.num_examples = images.shape[0]
    labels = None if labels is None else _check_labels(labels, self.num_examples)
    self.global_batch_size = _check_batch_size(global_batch_size, mesh)
    key_data = _stream_key_data(_check_uint32('seed', seed), domain)
    augment = _augmentation(augment)
    self._images = sharding.replicate(images, mesh)
    self._labels = None if labels is None else sharding.replicate(labels, mesh)
    # A batch reads positions offset, …, offset + B − 1 with offset < N: at most this many epochs.
    num_epochs = (self.num_examples + self.global_batch_size - 2) // self.num_examples + 1
    self._permutations_fn = jax.jit(
        functools.partial(_epoch_permutations, key_data=key_data, num_epochs=num_epochs,
                          num_examples=self.num_examples),
        out_shardings=sharding.replicated(mesh))
    self._batch_fn = jax.jit(
        functools.partial(_global_batch, key_data=key_data, batch_size=self.global_batch_size, augment=augment,
                          mean=mean, std=std, index_sharding=sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh))
    self._cached_permutations = (None, None)
    # Tracing once here (no compilation) makes a bad mean/std or augment callable fail at
    # construction rather than at the first step of a run.
    jax.eval_shape(self._batch_fn, self._images, self._labels, *self._arguments(0))

  @property
  def steps_per_epoch(self) -> float:
    """N / B; math.ceil of it is the number of steps whose batches cover a whole epoch."""
    return self.num_examples / self.global_batch_size

  def epoch(self, step: int) -> int:
    """The epoch the first example of `step`'s batch belongs to: step·B // N."""
    return _check_uint32('step', step) * self.global_batch_size // self.num_examples

  def _permutations(self, epoch: int) -> jax.Array:
    # Sorting N keys for a permutation costs more than the rest of a batch (~25 ms per epoch for
    # N = 50 000 on a CPU core), so the permutations are recomputed only when the batch's first
    # epoch changes. The cache holds a pure function of (seed, epoch): it never changes a result.
    if self._cached_permutations[0] != epoch:
      self._cached_permutations = (epoch, self._permutations_fn(np.uint32(epoch)))
    return self._cached_permutations[1]

  def _arguments(self, step: int):
    # Host-side integer arithmetic: s·B overflows int32 in long runs; epoch and offset do not.
    epoch, offset = divmod(step * self.global_batch_size, self.num_examples)
    return self._permutations(epoch), np.int32(offset), np.uint32(step)

  def batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch of `step`, sharded over the mesh axis 'data'.

    Args:
      step: training step in [0, 2**32).

    Returns:
      dict with 'image': float32 `[B, H, W, C]` (`[B, V, H, W, C]` for multi-view augmentations),
      normalised, and, for a labelled stream, 'label': int32 `[B]`.
    """
    return self._batch_fn(self._images, self._labels, *self._arguments(_check_uint32('step', step)))


def outlier_stream(images, *, global_batch_size: int, seed: int, mesh: Mesh,
                   augment: str | Augment = 'crop_flip', mean, std) -> TrainStream:
  """Unlabelled stream of auxiliary outliers for outlier exposure, energy and ICE training.

  Its keys live in their own domain, so it is independent of the in-distribution stream even with
  the same seed, and deterministic per (seed, step) like it. Batches hold 'image' only.

  Args:
    images: `[N, H, W, C]` uint8 outlier images.
    global_batch_size: outliers per step (e.g. 256 next to 128 in-distribution images, Wu et al. 2022).
    seed: integer in [0, 2**32).
    mesh: the training mesh.
    augment: as for `TrainStream`.
    mean: the in-distribution normalisation means (outliers go through the same network input).
    std: the in-distribution standard deviations.

  Returns:
    a `TrainStream` without labels.
  """
  return TrainStream(images, None, global_batch_size=global_batch_size, seed=seed, mesh=mesh,
                     augment=augment, mean=mean, std=std, domain='outliers')


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([array, np.zeros((rows - len(array),) + array.shape[1:], array.dtype)])


@functools.lru_cache(maxsize=None)
def _sharded_normalize(mesh: Mesh, mean: tuple[float, ...], std: tuple[float, ...]):
  # One compilation per (mesh, statistics, shape): evaluating many sets (CIFAR-10-C has 95) reuses it.
  return jax.jit(functools.partial(augment_lib.normalize, mean=mean, std=std),
                 out_shardings=sharding.batch_sharding(mesh))


def eval_batches(images, labels=None, *, global_batch_size: int, mesh: Mesh, mean, std
                 ) -> Iterator[dict[str, jax.Array]]:
  """Every example exactly once, in order, as full sharded batches with a validity mask.

  The last batch is padded on the host with zero images (label 0) whose mask is False, so callers
  weight per-example results by the mask instead of dropping the remainder. Only uint8 rows cross to
  the devices; normalisation runs there.

  Args:
    images: `[N, H, W, C]` uint8 images (the same on every host).
    labels: `[N]` integer labels, or None (OOD sets).
    global_batch_size: B, divisible by the number of devices in `mesh`.
    mesh: a mesh with axis 'data'.
    mean: per-channel means on [0, 1].
    std: per-channel standard deviations on [0, 1].

  Returns:
    an iterator over ceil(N / B) dicts of arrays sharded over 'data': 'image' float32
    `[B, H, W, C]`, 'mask' bool `[B]` and, with labels, 'label' int32 `[B]`.
  """
  images = _check_images('images', images)
  labels = None if labels is None else _check_labels(labels, images.shape[0])
  batch_size = _check_batch_size(global_batch_size, mesh)
  normalize = _sharded_normalize(mesh, tuple(np.ravel(mean).tolist()), tuple(np.ravel(std).tolist()))
  # Traced here so that bad statistics fail now, not at the first next().
  jax.eval_shape(normalize, jax.ShapeDtypeStruct((batch_size,) + images.shape[1:], jnp.uint8))
  return _eval_iterator(images, labels, batch_size, mesh, normalize)


def _eval_iterator(images, labels, batch_size, mesh, normalize):
  for start in range(0, len(images), batch_size):
    rows = slice(start, start + batch_size)
    valid = len(images[rows])
    batch = {
        'image': normalize(sharding.to_global(_pad_rows(images[rows], batch_size), mesh)),
        'mask': sharding.to_global(np.arange(batch_size) < valid, mesh),
    }
    if labels is not None:
      batch['label'] = sharding.to_global(_pad_rows(labels[rows], batch_size), mesh)
    yield batch
