r"""Throughput of the on-device input pipeline against a host tf.data pipeline, in images/s.

  python -m experiments.benchmark_data [--num_examples=50000 --batch_sizes=128,512 \
      --augment=crop_flip,two_views --seconds=4]

Both pipelines read the same synthetic data (random uint8 32×32×3 images, not CIFAR) and deliver
normalised float32 batches sharded over all local devices; timing starts after warm-up (compilation,
shuffle-buffer fill) and blocks on the delivered arrays.

  device:   `ood_jax.trainer.data.TrainStream` (dataset resident on the devices; gather, augment, normalise on
            device, one jitted call per batch).
  baseline: tf.data from_tensor_slices → shuffle(N) → repeat → batch, read through `tfds.as_numpy`.
            crop_flip: pad/crop/flip in NumPy per batch. two_views: SimCLR-style tf.image ops mapped per
            example (sample_distorted_bounding_box + bilinear resize, flip, colour jitter in a fixed
            order with p = 0.8, grayscale with p = 0.2). Its uint8 (crop_flip) or float (two_views)
            batch is transferred and normalised on device.

On a 2-core CPU the default run takes about 1.5 minutes. Milliseconds per batch are printed so they
can be compared with a training step on the same hardware.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ood_jax.trainer.data import augment
from ood_jax.trainer import sharding
from ood_jax.trainer.data import pipeline


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _throughput(next_batch, batch_size, seconds, warmup):
  """(images/s, ms/batch) of `next_batch()`; blocks every 5 batches so dispatch can run ahead a little."""
  for _ in range(warmup):
    jax.block_until_ready(next_batch())
  count, start = 0, time.perf_counter()
  while True:
    batch = next_batch()
    count += 1
    if count % 5 == 0:
      jax.block_until_ready(batch)
      elapsed = time.perf_counter() - start
      if elapsed >= seconds:
        return count * batch_size / elapsed, 1000.0 * elapsed / count


def _numpy_crop_flip(rng, images, padding=4):
  size = images.shape[1]
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, (2, len(images), 1))
  rows = (top + np.arange(size))[:, :, None]
  cols = (left + np.arange(size))[:, None, :]
  crops = padded[np.arange(len(images))[:, None, None], rows, cols]
  flip = rng.random(len(images)) < 0.5
  return np.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


def _tf_view(image):
  """One SimCLR-style view of a [32, 32, 3] uint8 image, float32 on the 0–255 scale."""
  begin, size, _ = tf.image.sample_distorted_bounding_box(
      tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.2, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  view = tf.image.resize(tf.slice(image, begin, size), (32, 32)) / 255.0
  view = tf.image.random_flip_left_right(view)

  def jitter(x):
    x = tf.clip_by_value(x * tf.random.uniform([], 0.6, 1.4), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.adjust_contrast(x, tf.random.uniform([], 0.6, 1.4)), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.adjust_saturation(x, tf.random.uniform([], 0.6, 1.4)), 0.0, 1.0)
    return tf.clip_by_value(tf.image.adjust_hue(x, tf.random.uniform([], -0.1, 0.1)), 0.0, 1.0)

  view = tf.cond(tf.random.uniform([]) < 0.8, lambda: jitter(view), lambda: view)
  grey = tf.tile(tf.image.rgb_to_grayscale(view), [1, 1, 3])
  return 255.0 * tf.cond(tf.random.uniform([]) < 0.2, lambda: grey, lambda: view)


def _baseline(images, labels, augment_name, batch_size, mesh):
  """A zero-argument function returning the next baseline batch, on device and normalised."""
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(len(images)).repeat()
  if augment_name == 'two_views':
    dataset = dataset.map(lambda x, y: (tf.stack([_tf_view(x), _tf_view(x)]), y), num_parallel_calls=tf.data.AUTOTUNE)
  batches = iter(tfds.as_numpy(dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)))
  normalize = jax.jit(lambda x: augment.normalize(x, MEAN, STD), out_shardings=sharding.batch_sharding(mesh))
  rng = np.random.default_rng(0)

  def next_batch():
    image, label = next(batches)
    if augment_name == 'crop_flip':
      image = _numpy_crop_flip(rng, image)
    return {'image': normalize(sharding.to_global(image, mesh)), 'label': sharding.to_global(label, mesh)}

  return next_batch


def _device(images, labels, augment_name, batch_size, mesh):
  stream = pipeline.TrainStream(images, labels, global_batch_size=batch_size, seed=0, mesh=mesh,
                                augment=augment_name, mean=MEAN, std=STD)
  steps = iter(range(2**31))
  return lambda: stream.batch(next(steps))


def main(argv):
  del argv
  tf.config.set_visible_devices([], 'GPU')  # TensorFlow stays on the host
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (flags.FLAGS.num_examples, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, flags.FLAGS.num_examples).astype(np.int32)
  mesh = sharding.make_mesh()
  print(f'{jax.device_count()} × {jax.devices()[0].device_kind}; N = {len(images)} synthetic uint8 32×32×3 images '
        f'(random pixels, not CIFAR); {flags.FLAGS.seconds:g} s per row after {flags.FLAGS.warmup} warm-up batches.')
  print(f'{"augment":<10} {"batch":>6} {"pipeline":<22} {"images/s":>10} {"ms/batch":>9} {"device/baseline":>16}')
  for augment_name in flags.FLAGS.augment:
    for batch_size in map(int, flags.FLAGS.batch_sizes):
      rates = {}
      for name, make in (('device (ood_jax)', _device), ('baseline (tf.data+np)', _baseline)):
        rates[name], ms = _throughput(make(images, labels, augment_name, batch_size, mesh), batch_size,
                                      flags.FLAGS.seconds, flags.FLAGS.warmup)
        ratio = f'{rates["device (ood_jax)"] / rates[name]:.2f}×' if name.startswith('baseline') else ''
        print(f'{augment_name:<10} {batch_size:>6} {name:<22} {rates[name]:>10,.0f} {ms:>9.2f} {ratio:>16}', flush=True)


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_integer('num_examples', 50_000, 'Synthetic 32×32×3 uint8 images.')
  flags.DEFINE_list('batch_sizes', ['128', '512'], 'Global batch sizes.')
  flags.DEFINE_list('augment', ['crop_flip', 'two_views'], 'Augmentations to time.')
  flags.DEFINE_float('seconds', 4.0, 'Timed seconds per (pipeline, augmentation, batch size).')
  flags.DEFINE_integer('warmup', 3, 'Untimed batches first.')
  app.run(main)
