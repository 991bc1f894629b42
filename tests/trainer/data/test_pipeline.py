"""Tests for ood_jax.trainer.data.augment and ood_jax.trainer.data.pipeline on 8 fake CPU devices.

Most datasets here encode the example index in the pixel values, so every batch row tells which
example it came from; references are written in NumPy (and colorsys) without the library.
"""

from __future__ import annotations

import colorsys
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax.trainer.data import augment
from ood_jax.trainer import sharding
from ood_jax.trainer.data import pipeline

MEAN = (0.25, 0.5, 0.75)
STD = (0.5, 0.25, 0.125)
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std that keep x / 255


def _indexed_images(num, size=8):
  """`[num, size, size, 3]` uint8 images; image k is filled with the value k."""
  return np.broadcast_to(np.arange(num, dtype=np.uint8)[:, None, None, None], (num, size, size, 3)).copy()


def _source_index(normalized_images):
  """Inverts _indexed_images after normalisation with IDENTITY (and no augmentation)."""
  pixels = np.rint(np.asarray(normalized_images) * 255.0).astype(np.int64)
  assert np.all(pixels == pixels[:, :1, :1, :1]), 'rows must be constant images'
  return pixels[:, 0, 0, 0]


def _random_images(num, size=32, channels=3, seed=0, low=0):
  return np.random.default_rng(seed).integers(low, 256, (num, size, size, channels), dtype=np.uint8)


def _stream(images, labels=None, *, batch=8, seed=0, augment_name='none', mesh=None, stats=IDENTITY):
  return pipeline.TrainStream(images, labels, global_batch_size=batch, seed=seed,
                              mesh=mesh or sharding.make_mesh(), augment=augment_name, mean=stats[0], std=stats[1])


def _host(batch):
  return {name: np.asarray(value) for name, value in batch.items()}


# ------------------------------------------------------------------------------------------------
# augment


def test_normalize_matches_numpy_formula():
  images = _random_images(4, size=5)
  expected = (images.astype(np.float64) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
  got = jax.jit(lambda x: augment.normalize(x, MEAN, STD))(images)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
  # Float inputs on the 0–255 scale and a single channel follow the same formula.
  grey = images[..., :1].astype(np.float32)
  np.testing.assert_allclose(augment.normalize(grey, (0.5,), (0.2,)), (grey / 255.0 - 0.5) / 0.2, atol=1e-5)
  with pytest.raises(ValueError, match='one value per channel'):
    augment.normalize(images, (0.5,), (0.2,))
  with pytest.raises(ValueError, match='std must be > 0'):
    augment.normalize(images, MEAN, (1.0, 0.0, 1.0))


def _window(padded, top, left, flip, size=32):
  window = padded[top:top + size, left:left + size]
  return window[:, ::-1] if flip else window


def test_crop_and_flip_is_a_window_of_the_zero_padded_image():
  images = _random_images(48, low=1)  # no zeros, so zero pixels can only be padding
  out = np.asarray(jax.jit(augment.crop_and_flip)(jax.random.key(3), images))
  assert out.dtype == np.uint8 and out.shape == images.shape
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  found = []
  for k in range(len(images)):
    matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
               if np.array_equal(out[k], _window(padded[k], top, left, flip))]
    assert len(matches) == 1, (k, matches)
    found.append(matches[0])
  tops, lefts, flips = zip(*found)
  assert set(flips) == {False, True}
  assert len(set(tops)) >= 5 and len(set(lefts)) >= 5
  # padding=0 leaves only the flip.
  flipped = np.asarray(augment.crop_and_flip(jax.random.key(4), images, padding=0))
  assert all(np.array_equal(o, x) or np.array_equal(o, x[:, ::-1]) for o, x in zip(flipped, images))


def test_random_resized_crop_samples_a_whole_pixel_box_bilinearly():
  # Channel 0 is 4x + 2, channel 1 is 4y + 2: bilinear resampling keeps a ramp a ramp, so the
  # output reveals each example's box width, height and offsets exactly.
  size, num = 32, 64
  ramp = 4.0 * np.arange(size) + 2.0
  images = np.zeros((num, size, size, 3), np.uint8)
  images[..., 0] = ramp[None, None, :]
  images[..., 1] = ramp[None, :, None]
  out = np.asarray(jax.jit(augment.random_resized_crop)(jax.random.key(0), images), np.float64)
  assert out.shape == images.shape
  inner = slice(1, size - 1)  # the outermost samples may fall past the image edge and be clamped
  boxes = []
  for k in range(num):
    along_x, along_y = out[k, 1, inner, 0], out[k, inner, 1, 1]
    step_x, step_y = np.diff(along_x), np.diff(along_y)
    np.testing.assert_allclose(step_x, step_x.mean(), atol=1e-3)
    np.testing.assert_allclose(step_y, step_y.mean(), atol=1e-3)
    width, height = step_x.mean() * size / 4.0, step_y.mean() * size / 4.0
    # Output pixel 1 samples input coordinate offset + 1.5·box/size − 0.5.
    left = (along_x[0] - 2.0) / 4.0 - 1.5 * width / size + 0.5
    top = (along_y[0] - 2.0) / 4.0 - 1.5 * height / size + 0.5
    np.testing.assert_allclose([width, height, left, top], np.rint([width, height, left, top]), atol=2e-3)
    width, height, left, top = np.rint([width, height, left, top]).astype(int)
    assert 0 <= left <= size - width and 0 <= top <= size - height
    # Area fraction in [0.2, 1] and aspect ratio in [3/4, 4/3], up to rounding to whole pixels.
    assert 0.2 * size * size - 16 <= width * height <= size * size
    assert (width + 0.5) / (height - 0.5) >= 3 / 4 and (width - 0.5) / (height + 0.5) <= 4 / 3
    boxes.append((width, height))
  assert len(set(boxes)) >= 20
  identity = augment.random_resized_crop(jax.random.key(1), images, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(identity, images, atol=1e-4)


@pytest.mark.parametrize('delta', [0.0, 0.07, -0.1, 0.5])
def test_hue_rotation_matches_colorsys(delta):
  pixels = np.random.default_rng(1).random((500, 3)).astype(np.float32)
  pixels[:20] = pixels[:20, :1]  # greys
  pixels[20:40, 1] = pixels[20:40, 0]  # ties between the largest channels
  expected = [colorsys.hsv_to_rgb((h + delta) % 1.0, s, v) for h, s, v in (colorsys.rgb_to_hsv(*p) for p in pixels)]
  np.testing.assert_allclose(augment._adjust_hue(jnp.asarray(pixels), delta), expected, atol=2e-6)


def _ref_color_jitter(noise, image):
  """ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 in NumPy/colorsys on one [H, W, 3] image on [0, 1].

  Reads augment's noise layout: [apply, 3 blend-order keys, hue slot, 4 factors].
  """
  if noise[0] >= 0.8:
    return image
  factors = np.array([0.6, 0.6, 0.6, -0.1]) + noise[5:9] * np.array([0.8, 0.8, 0.8, 0.2])
  order = list(np.argsort(noise[1:4]))
  order.insert(min(int(noise[4] * 4), 3), 3)
  luma = lambda x: x @ np.array([0.299, 0.587, 0.114])
  x = image.astype(np.float64)
  for op in order:
    f = factors[op]
    if op == 0:
      x = np.clip(f * x, 0, 1)
    elif op == 1:
      x = np.clip(f * x + (1 - f) * luma(x).mean(), 0, 1)
    elif op == 2:
      x = np.clip(f * x + (1 - f) * luma(x)[..., None], 0, 1)
    else:
      hsv = [colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]
      x = np.array([colorsys.hsv_to_rgb((h + f) % 1.0, s, v) for h, s, v in hsv]).reshape(x.shape)
  return x


def _run_in_another_process(script, **env):
  """Runs `script` in a fresh Python process at the repository root, with `env` added to this environment."""
  root = str(pathlib.Path(__file__).resolve().parents[3])
  subprocess.run([sys.executable, '-c', script], check=True, cwd=root, env={**os.environ, 'PYTHONPATH': root, **env})


def _jitter_inputs():
  rng = np.random.default_rng(6)
  images = rng.random((12, 6, 6, 3)).astype(np.float32)
  noise = rng.random((12, 9)).astype(np.float32)
  noise[:, 0] = np.where(np.arange(12) < 10, 0.3, 0.9)  # the last two are left alone
  noise[:8, 4] = np.arange(8) / 8  # hue in each of the four slots
  return noise, images


def test_color_jitter_composes_the_operations_in_the_drawn_order():
  noise, images = _jitter_inputs()
  got = jax.jit(jax.vmap(lambda u, x: augment._color_jitter_one(u, x, (0.4, 0.4, 0.4, 0.1), 0.8)))(noise, images)
  expected = [_ref_color_jitter(u, x) for u, x in zip(noise, images)]
  np.testing.assert_allclose(got, expected, atol=2e-5)
  np.testing.assert_array_equal(got[10:], images[10:])


def test_color_jitter_does_not_depend_on_how_xla_rounds_the_fused_channels(tmp_path):
  """The same jitter compiled with LLVM at -O0, which rounds the fused blends differently (no FMA contraction).

  Finding the largest channel by `max == channel` failed here: XLA recomputes the blended channels in
  several fusions, the copies differed in the last bit, and 9 of 36 pixels of an image took the
  wrong hue formula (errors up to 0.49). The first test passes either way at the default -O2.
  """
  noise, images = _jitter_inputs()
  np.savez(tmp_path / 'inputs.npz', noise=noise, images=images)
  script = textwrap.dedent(f"""
      import numpy as np
      import jax
      from ood_jax.trainer.data import augment
      inputs = np.load({str(tmp_path / 'inputs.npz')!r})
      got = jax.jit(jax.vmap(lambda u, x: augment._color_jitter_one(u, x, (0.4, 0.4, 0.4, 0.1), 0.8)))(
          inputs['noise'], inputs['images'])
      np.save({str(tmp_path / 'got.npy')!r}, np.asarray(got))
  """)
  _run_in_another_process(script, XLA_FLAGS='--xla_backend_optimization_level=0')
  expected = [_ref_color_jitter(u, x) for u, x in zip(noise, images)]
  np.testing.assert_allclose(np.load(tmp_path / 'got.npy'), expected, atol=2e-5)


def test_color_jitter_and_grayscale_against_closed_forms():
  images = _random_images(32, size=8, seed=2)
  images = (images // 2 + 10).astype(np.uint8)  # <= 137, so brightness up to 1.4 never clips
  key = jax.random.key(5)
  np.testing.assert_allclose(augment.color_jitter(key, images, probability=0.0), images, rtol=1e-6)
  bright = np.asarray(augment.color_jitter(key, images, contrast=0.0, saturation=0.0, hue=0.0, probability=1.0))
  factors = bright / images
  np.testing.assert_allclose(factors, factors[:, :1, :1, :1] * np.ones_like(factors), rtol=1e-5)
  assert np.all((factors >= 0.6 - 1e-6) & (factors <= 1.4 + 1e-6)) and np.ptp(factors) > 0.3

  luma = images.astype(np.float64) @ np.asarray([0.299, 0.587, 0.114])
  grey = np.asarray(augment.random_grayscale(key, images, probability=1.0))
  np.testing.assert_allclose(grey, np.repeat(luma[..., None], 3, axis=-1), atol=1e-4)
  np.testing.assert_array_equal(augment.random_grayscale(key, images, probability=0.0), images)
  one_channel = images[..., :1]
  np.testing.assert_array_equal(augment.random_grayscale(key, one_channel, probability=1.0), one_channel)


def test_contrastive_views_are_distinct_and_deterministic():
  images = _random_images(16)
  views = np.asarray(jax.jit(augment.contrastive_views)(jax.random.key(0), images))
  assert views.shape == (16, 2, 32, 32, 3) and views.dtype == np.float32
  assert views.min() >= 0.0 and views.max() <= 255.0
  assert all(not np.allclose(v[0], v[1]) for v in views)
  np.testing.assert_array_equal(views, augment.contrastive_views(jax.random.key(0), images))
  assert not np.allclose(views, augment.contrastive_views(jax.random.key(1), images))
  grey = augment.contrastive_views(jax.random.key(0), images[..., :1], num_views=3)
  assert grey.shape == (16, 3, 32, 32, 1)
  with pytest.raises(ValueError, match='C = 1 or 3'):
    augment.contrastive_views(jax.random.key(0), np.zeros((2, 8, 8, 2), np.uint8))


# ------------------------------------------------------------------------------------------------
# TrainStream and outlier_stream


def test_batch_is_a_pure_function_of_seed_and_step():
  images, labels = _random_images(50), np.arange(50) % 10
  first = _stream(images, labels, augment_name='crop_flip', stats=(MEAN, STD))
  second = _stream(images, labels, augment_name='crop_flip', stats=(MEAN, STD))
  late = _host(second.batch(123))  # call order must not matter
  for step in (0, 7):
    a, b = _host(first.batch(step)), _host(second.batch(step))
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  np.testing.assert_array_equal(_host(first.batch(123))['image'], late['image'])
  assert not np.array_equal(_host(first.batch(0))['image'], _host(first.batch(1))['image'])
  other_seed = _stream(images, labels, seed=1, augment_name='crop_flip', stats=(MEAN, STD))
  assert not np.array_equal(_host(first.batch(0))['image'], _host(other_seed.batch(0))['image'])


def test_batch_is_identical_in_another_process(tmp_path):
  script = textwrap.dedent(f"""
      import os
      # The parent's XLA_FLAGS (compile options change the rounding) plus its 8 devices.
      os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
      import numpy as np
      from ood_jax.trainer import sharding
      from ood_jax.trainer.data import pipeline
      images = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
      stream = pipeline.TrainStream(images, np.arange(50), global_batch_size=8, seed=0, mesh=sharding.make_mesh(),
                                    augment='crop_flip', mean={MEAN}, std={STD})
      batch = stream.batch(5)
      np.savez({str(tmp_path / 'batch.npz')!r}, image=np.asarray(batch['image']), label=np.asarray(batch['label']))
  """)
  _run_in_another_process(script)
  theirs = np.load(tmp_path / 'batch.npz')
  ours = _host(_stream(_random_images(50), np.arange(50), augment_name='crop_flip', stats=(MEAN, STD)).batch(5))
  np.testing.assert_array_equal(theirs['image'], ours['image'])
  np.testing.assert_array_equal(theirs['label'], ours['label'])


@pytest.mark.parametrize('num, batch', [(50, 8), (6, 16)])  # 8 ∤ 50; a batch longer than an epoch
def test_every_epoch_covers_every_example_once(num, batch):
  stream = _stream(_indexed_images(num), np.arange(num) + 100, batch=batch)
  steps = -(-3 * num // batch)
  batches = [_host(stream.batch(step)) for step in range(steps)]
  order = np.concatenate([_source_index(b['image']) for b in batches])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), order + 100)
  epochs = [order[e * num:(e + 1) * num] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert stream.steps_per_epoch == num / batch
  assert [stream.epoch(step) for step in range(steps)] == [step * batch // num for step in range(steps)]


def test_outlier_stream_is_unlabelled_independent_and_deterministic():
  images = _indexed_images(50)
  kwargs = dict(global_batch_size=16, seed=0, mesh=sharding.make_mesh(), augment='none', mean=IDENTITY[0],
                std=IDENTITY[1])
  outliers = pipeline.outlier_stream(images, **kwargs)
  batch = _host(outliers.batch(3))
  assert set(batch) == {'image'}
  np.testing.assert_array_equal(batch['image'], _host(pipeline.outlier_stream(images, **kwargs).batch(3))['image'])
  train = pipeline.TrainStream(images, np.arange(50), **kwargs)
  assert not np.array_equal(_source_index(batch['image']), _source_index(_host(train.batch(3))['image']))


def test_two_view_stream_keeps_the_order_and_labels():
  images, labels = _random_images(50, seed=3), np.arange(50) % 7
  views = _host(_stream(images, labels, augment_name='two_views').batch(2))
  plain = _host(_stream(images, labels).batch(2))
  assert views['image'].shape == (8, 2, 32, 32, 3)
  np.testing.assert_array_equal(views['label'], plain['label'])
  assert all(not np.allclose(v[0], v[1]) for v in views['image'])


def test_callable_augmentation_sees_the_uint8_batch():
  images = _random_images(50)
  flipped = _host(_stream(images, augment_name=lambda key, x: x[:, :, ::-1]).batch(4))['image']
  plain = _host(_stream(images).batch(4))['image']
  np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


@pytest.mark.parametrize('augment_name', ['crop_flip', 'two_views'])
def test_sharded_batch_equals_single_device_batch(augment_name):
  images, labels = _random_images(50, seed=4), np.arange(50)
  sharded = _stream(images, labels, batch=16, augment_name=augment_name, stats=(MEAN, STD))
  single = _stream(images, labels, batch=16, augment_name=augment_name, stats=(MEAN, STD),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  batch = sharded.batch(9)
  for value in batch.values():
    assert value.sharding.spec == jax.sharding.PartitionSpec('data')
    assert len(value.sharding.device_set) == 8
    assert {shard.data.shape[0] for shard in value.addressable_shards} == {2}
  reference = _host(single.batch(9))
  np.testing.assert_array_equal(np.asarray(batch['label']), reference['label'])
  if augment_name == 'crop_flip':
    np.testing.assert_array_equal(np.asarray(batch['image']), reference['image'])
  else:
    np.testing.assert_allclose(np.asarray(batch['image']), reference['image'], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# eval_batches and to_global


def test_eval_batches_see_every_example_once_in_order():
  num = 50
  images = _indexed_images(num)
  batches = [_host(b) for b in pipeline.eval_batches(images, np.arange(num) + 100, global_batch_size=16,
                                                     mesh=sharding.make_mesh(), mean=IDENTITY[0], std=IDENTITY[1])]
  assert [b['mask'].sum() for b in batches] == [16, 16, 16, 2]
  index = np.concatenate([_source_index(b['image'])[b['mask']] for b in batches])
  np.testing.assert_array_equal(index, np.arange(num))
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in batches]), np.arange(num) + 100)
  np.testing.assert_array_equal(batches[-1]['image'][2:], 0.0)  # padding rows are zero images

  normalized = list(pipeline.eval_batches(images, None, global_batch_size=16, mesh=sharding.make_mesh(),
                                          mean=MEAN, std=STD))
  last = normalized[-1]
  assert set(last) == {'image', 'mask'}
  for value in last.values():
    assert value.sharding.spec == jax.sharding.PartitionSpec('data') and len(value.sharding.device_set) == 8
  np.testing.assert_allclose(last['image'][:2], (images[48:] / 255.0 - np.asarray(MEAN)) / np.asarray(STD), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(global_batch_size=12), ValueError, r'divisible by the number of devices in the mesh \(8\)'),
    (dict(global_batch_size=0), ValueError, 'global_batch_size must be >= 1'),
    (dict(images=np.zeros((50, 8, 8, 3), np.float32)), TypeError, 'images must be uint8'),
    (dict(images=np.zeros((50, 8, 8), np.uint8)), ValueError, 'images must have rank 4'),
    (dict(images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, np.int32)), ValueError, 'images is empty'),
    (dict(labels=np.zeros(49, np.int32)), ValueError, r'labels must have shape \(50,\)'),
    (dict(labels=np.zeros(50, np.float32)), TypeError, 'labels must be integers'),
    (dict(augment='autoaugment'), ValueError, 'augment must be one of'),
    (dict(mean=(0.5,)), ValueError, 'one value per channel'),
    (dict(seed=2**32), ValueError, r'seed must lie in \[0, 2\*\*32\)'),
])
def test_train_stream_rejects_bad_arguments(kwargs, error, message):
  arguments = dict(images=np.zeros((50, 8, 8, 3), np.uint8), labels=np.zeros(50, np.int32), global_batch_size=8,
                   seed=0, mesh=sharding.make_mesh(), augment='none', mean=MEAN, std=STD)
  arguments.update(kwargs)
  images, labels = arguments.pop('images'), arguments.pop('labels')
  with pytest.raises(error, match=message):
    pipeline.TrainStream(images, labels, **arguments)


def test_bad_steps_and_eval_batch_sizes_are_rejected():
  stream = _stream(_indexed_images(50))
  with pytest.raises(ValueError, match='step must lie in'):
    stream.batch(-1)
  with pytest.raises(TypeError, match='step must be an integer'):
    stream.batch(1.5)
  with pytest.raises(ValueError, match='divisible by the number of devices'):
    pipeline.eval_batches(_indexed_images(50), None, global_batch_size=20, mesh=sharding.make_mesh(),
                          mean=MEAN, std=STD)
