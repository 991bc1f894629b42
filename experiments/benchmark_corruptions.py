r"""Throughput of `ood_jax.corruptions.corrupt` against a per-image NumPy/SciPy implementation, in images/s.

  python -m experiments.benchmark_corruptions [--batch_size=1000 --severity=3 --seconds=2 \
      --names=gaussian_noise,fog,...]

The data are `batch_size` random 32×32 crops of scikit-learn's two sample photos (reduced 4× first, so
crops hold whole objects). JAX: one jitted call corrupts the whole batch; compilation and a warm-up
call are excluded and the best of three timed calls counts. Baseline: the loop the CIFAR-10-C script
runs, one image at a time through the NumPy/SciPy/Pillow functions below, timed over whole passes
through the batch until `seconds` have passed (at least one image).

The baseline functions are written for this benchmark from the script's formulas, without
ImageMagick, OpenCV or scikit-image (which the script needs): SciPy filters and interpolation, Pillow
for pixelate and JPEG (as the script), NumPy for the rest. They are reasonable per-image code, not
tuned: the script's own per-pixel Python loops (glass blur) stay loops. Frost reads the same
procedural textures as ood_jax.

On a 2-core CPU the default run takes about 1–1.5 minutes.
"""

from __future__ import annotations

import io
import math
import time

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn import datasets as sk_datasets

from ood_jax import corruptions


LUMA = np.array([0.299, 0.587, 0.114])


# Per-image baseline: x uint8 [H, W, C] → uint8, randomness from a NumPy Generator.

def _finish(x):
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def gaussian_noise(x, c, rng):
  x = x / 255.0
  return _finish(x + rng.normal(scale=c, size=x.shape))


def shot_noise(x, c, rng):
  return _finish(rng.poisson(x / 255.0 * c) / c)


def impulse_noise(x, c, rng):
  x = x / 255.0
  u = rng.random(x.shape)
  return _finish(np.where(u < c / 2, 0.0, np.where(u < c, 1.0, x)))


def speckle_noise(x, c, rng):
  x = x / 255.0
  return _finish(x + x * rng.normal(scale=c, size=x.shape))


def _blur(x, sigma, mode='nearest', truncate=4.0):
  return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0)[:x.ndim], mode=mode, truncate=truncate)


def gaussian_blur(x, c, rng):
  del rng
  return _finish(_blur(x / 255.0, c))


def frosted_glass_blur(x, c, rng):
  sigma, iterations = c
  x = np.floor(_blur(x / 255.0, sigma) * 255 + 1e-3)
  h, w = x.shape[:2]
  for _ in range(iterations):
    for row in range(h - 1, 1, -1):
      for col in range(w - 1, 1, -1):
        dx, dy = rng.integers(-1, 1, size=2)
        x[row, col] = x[row + dy, col + dx]  # what the script's tuple "swap" of NumPy views does
  return _finish(_blur(x / 255.0, sigma))


def disk_kernel(radius, alias_blur):
  span = np.arange(-8, 9)
  disk = (span[:, None] ** 2 + span[None, :] ** 2 <= radius ** 2).astype(float)
  disk /= disk.sum()
  taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
  return ndimage.correlate(disk, np.outer(taps, taps) / taps.sum() ** 2, mode='mirror')


def defocus_blur(x, c, rng):
  del rng
  kernel = disk_kernel(*c)
  x = x / 255.0
  return _finish(np.stack([ndimage.correlate(x[..., k], kernel, mode='mirror') for k in range(x.shape[-1])], -1))


def line_blur(x, radius, sigma, angle):
  """ImageMagick's motion blur of float x [H, W, C]."""
  steps = np.arange(2 * math.ceil(radius) + 1)
  taps = np.exp(-steps ** 2 / (2 * sigma ** 2))
  taps /= taps.sum()
  h, w = x.shape[:2]
  theta = np.deg2rad(angle)
  out = np.zeros_like(x)
  for tap, step in zip(taps, steps):
    rows = np.clip(np.arange(h) + int(np.ceil(step * np.sin(theta) - 0.5)), 0, h - 1)
    cols = np.clip(np.arange(w) + int(np.ceil(step * np.cos(theta) - 0.5)), 0, w - 1)
    out += tap * x[rows][:, cols]
  return out


def motion_blur(x, c, rng):
  return _finish(line_blur(x / 255.0, *c, rng.uniform(-45, 45)))


def clipped_zoom(x, factor):
  h, w = x.shape[:2]
  ch, cw = math.ceil(h / factor), math.ceil(w / factor)
  top, left = (h - ch) // 2, (w - cw) // 2
  x = ndimage.zoom(x[top:top + ch, left:left + cw], (factor, factor, 1), order=1)
  top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
  return x[top:top + h, left:left + w]


def zoom_blur(x, c, rng):
  del rng
  x = x / 255.0
  factors = np.arange(1, c, 0.01)
  return _finish((x + sum(clipped_zoom(x, f) for f in factors)) / (len(factors) + 1))


def _grey(x):
  return x[..., :1] if x.shape[-1] == 1 else (x @ LUMA)[..., None]


def snow(x, c, rng):
  loc, scale, zoom, threshold, radius, sigma, blend = c
  x = x / 255.0
  flakes = clipped_zoom(rng.normal(loc, scale, size=x.shape[:2] + (1,)), zoom)
  flakes[flakes < threshold] = 0
  flakes = np.floor(np.clip(flakes, 0, 1) * 255) / 255
  flakes = np.round(line_blur(flakes, radius, sigma, rng.uniform(-135, -45)) * 255) / 255
  x = blend * x + (1 - blend) * np.maximum(x, _grey(x) * 1.5 + 0.5)
  return _finish(x + flakes + flakes[::-1, ::-1])


def frost(x, c, rng, textures=None):
  textures = corruptions.frost_textures() if textures is None else textures
  texture = textures[rng.integers(len(textures))]
  h, w = x.shape[:2]
  top, left = rng.integers(texture.shape[0] - h + 1), rng.integers(texture.shape[1] - w + 1)
  crop = texture[top:top + h, left:left + w] / 255.0
  y = np.clip(c[0] * np.repeat(x / 255.0, 3 // x.shape[-1], axis=-1) + c[1] * crop, 0, 1)
  return _finish(_grey(y) if x.shape[-1] == 1 else y)


def plasma_fractal(size, decay, rng):
  """Diamond-square on a size × size torus, in place, as the script."""
  height = np.zeros((size, size))
  step, wibble = size, 100.0
  while step >= 2:
    half = step // 2
    corners = height[::step, ::step]
    centres = corners + np.roll(corners, -1, 0)
    centres = centres + np.roll(centres, -1, 1)
    height[half::step, half::step] = centres / 4 + wibble * rng.uniform(-wibble, wibble, centres.shape)
    centres = height[half::step, half::step]
    rows = centres + np.roll(centres, 1, 0) + corners + np.roll(corners, -1, 1)
    height[::step, half::step] = rows / 4 + wibble * rng.uniform(-wibble, wibble, rows.shape)
    cols = centres + np.roll(centres, 1, 1) + corners + np.roll(corners, -1, 0)
    height[half::step, ::step] = cols / 4 + wibble * rng.uniform(-wibble, wibble, cols.shape)
    step, wibble = half, wibble / decay
  height -= height.min()
  return height / height.max()


def fog(x, c, rng):
  strength, decay = c
  x = x / 255.0
  h, w = x.shape[:2]
  peak = x.max()
  fractal = plasma_fractal(1 << (max(h, w) - 1).bit_length(), decay, rng)[:h, :w, None]
  return _finish((x + strength * fractal) * peak / (peak + strength))


def rgb_to_hsv(rgb):
  value = rgb.max(-1)
  delta = value - rgb.min(-1)
  safe = np.where(delta > 0, delta, 1)
  r, g, b = np.moveaxis(rgb, -1, 0)
  hue = np.where(b == value, 4 + (r - g) / safe, np.where(g == value, 2 + (b - r) / safe, (g - b) / safe))
  hue = np.where(delta > 0, (hue / 6) % 1, 0)
  return hue, np.where(delta > 0, delta / np.where(value > 0, value, 1), 0), value


def hsv_to_rgb(hue, saturation, value):
  sector = np.floor(hue * 6)
  f = hue * 6 - sector
  p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
  choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
  index = sector.astype(int) % 6
  return np.stack([np.choose(index, [choice[k] for choice in choices]) for k in range(3)], -1)


def _hsv_op(x, op):
  grey = x.shape[-1] == 1
  rgb = np.repeat(x / 255.0, 3, axis=-1) if grey else x / 255.0
  y = np.clip(hsv_to_rgb(*op(*rgb_to_hsv(rgb))), 0, 1)
  return _finish(_grey(y) if grey else y)


def brightness(x, c, rng):
  del rng
  return _hsv_op(x, lambda h, s, v: (h, s, np.clip(v + c, 0, 1)))


def saturate(x, c, rng):
  del rng
  return _hsv_op(x, lambda h, s, v: (h, np.clip(s * c[0] + c[1], 0, 1), v))


def contrast(x, c, rng):
  del rng
  x = x / 255.0
  mean = x.mean(axis=(0, 1), keepdims=True)
  return _finish((x - mean) * c + mean)


def _pil(x):
  return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


def _array(image):
  array = np.asarray(image)
  return array[..., None] if array.ndim == 2 else array


def pixelate(x, c, rng):
  del rng
  h, w = x.shape[:2]
  return _array(_pil(x).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))


def jpeg_compression(x, c, rng):
  del rng
  buffer = io.BytesIO()
  _pil(x).save(buffer, 'JPEG', quality=c)
  return _array(Image.open(buffer))


def elastic(x, c, rng):
  alpha, sigma, affine = (32 * p for p in c)
  x = x / 255.0
  h, w = x.shape[:2]
  half = min(h, w) // 3
  source = np.array([[w // 2 + half, h // 2 + half], [w // 2 + half, h // 2 - half], [w // 2 - half, h // 2 - half]])
  target = source + rng.uniform(-affine, affine, size=(3, 2))
  to_source = np.linalg.solve(np.c_[target, np.ones(3)], source)  # (x, y, 1) of the output → source (x, y)
  rows, cols = np.mgrid[:h, :w].astype(float)
  mapped = np.stack([cols, rows, np.ones_like(rows)], -1) @ to_source
  dx, dy = (_blur(rng.uniform(-1, 1, size=(h, w)), sigma, 'reflect', 3.0) * alpha for _ in range(2))
  out = []
  for k in range(x.shape[-1]):
    warped = ndimage.map_coordinates(x[..., k], [mapped[..., 1], mapped[..., 0]], order=1, mode='mirror')
    out.append(ndimage.map_coordinates(warped, [rows + dy, cols + dx], order=1, mode='reflect'))
  return _finish(np.stack(out, -1))


def canny(image, low=50, high=150):
  """OpenCV's Canny (3×3 Sobel, L1 magnitude, 4-sector non-maximum suppression, 8-connected hysteresis)."""
  sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
  gx = ndimage.correlate(image, sobel, mode='nearest').astype(np.int64)
  gy = ndimage.correlate(image, sobel.T, mode='nearest').astype(np.int64)
  magnitude = np.abs(gx) + np.abs(gy)
  padded = np.pad(magnitude, 1)
  h, w = image.shape

  def at(dy, dx):
    return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  tan22 = np.abs(gx) * 13573
  steep = np.abs(gy) << 15
  horizontal = steep < tan22
  vertical = ~horizontal & (steep > tan22 + (np.abs(gx) << 16))
  same = (gx ^ gy) >= 0
  maximum = np.where(horizontal, (magnitude > at(0, -1)) & (magnitude >= at(0, 1)),
                     np.where(vertical, (magnitude > at(-1, 0)) & (magnitude >= at(1, 0)),
                              np.where(same, (magnitude > at(-1, -1)) & (magnitude > at(1, 1)),
                                       (magnitude > at(-1, 1)) & (magnitude > at(1, -1)))))
  candidate = maximum & (magnitude > low)
  labels, _ = ndimage.label(candidate, structure=np.ones((3, 3)))
  strong = np.unique(labels[candidate & (magnitude > high)])
  return np.isin(labels, strong[strong > 0])


def chamfer_distance(edges, cap=20.0):
  """OpenCV's 5×5 chamfer distance to the nearest edge, by relaxation, capped."""
  steps = ([(0, 1, 1.0), (1, 0, 1.0), (0, -1, 1.0), (-1, 0, 1.0)]
           + [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
           + [(a * sy, b * sx, 2.1969) for a, b in ((1, 2), (2, 1)) for sy in (-1, 1) for sx in (-1, 1)])
  distance = np.where(edges, 0.0, cap)
  h, w = edges.shape
  for _ in range(int(cap)):
    padded = np.pad(distance, 2, constant_values=cap)
    for dy, dx, cost in steps:
      distance = np.minimum(distance, padded[2 + dy:2 + dy + h, 2 + dx:2 + dx + w] + cost)
  return distance


def equalize_histogram(image):
  counts = np.bincount(image.ravel(), minlength=256)
  first = counts[np.flatnonzero(counts)[0]]
  if first == image.size:
    return image
  table = np.round((np.cumsum(counts) - first).astype(np.float32) * np.float32(255.0 / (image.size - first)))
  return table[image]


def spatter(x, c, rng):
  loc, scale, sigma, threshold, intensity, mud = c
  grey = x.shape[-1] == 1
  x = np.repeat(x / 255.0, 3, axis=-1) if grey else x / 255.0
  layer = _blur(rng.normal(loc, scale, size=x.shape[:2]), sigma)
  layer[layer < threshold] = 0
  if mud:
    mask = _blur((layer > threshold).astype(float), intensity)
    mask[mask < 0.8] = 0
    y = x * (1 - mask[..., None]) + mask[..., None] * np.array([63, 42, 20]) / 255
  else:
    level = np.floor(np.clip(layer, 0, 1) * 255)
    box = np.ones((3, 3))
    distance = np.floor(ndimage.correlate(chamfer_distance(canny(level)), box, mode='mirror') / 9)
    shading = equalize_histogram(distance.astype(int))
    shading = np.clip(ndimage.correlate(shading, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]), mode='mirror'), 0, 255)
    shading = np.round(ndimage.correlate(shading, box, mode='mirror') / 9)
    drops = level * shading
    drops = drops / drops.max() * intensity if drops.max() > 0 else drops
    y = x + drops[..., None] * np.array([175, 238, 238]) / 255
  y = np.clip(y, 0, 1)
  return _finish(_grey(y) if grey else y)


BASELINES = {
    'gaussian_noise': (gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    'shot_noise': (shot_noise, (500, 250, 100, 75, 50)),
    'impulse_noise': (impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    'defocus_blur': (defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
    'frosted_glass_blur': (frosted_glass_blur, ((0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2))),
    'motion_blur': (motion_blur, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))),
    'zoom_blur': (zoom_blur, (1.06, 1.11, 1.16, 1.21, 1.26)),
    'snow': (snow, ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))),
    'frost': (frost, ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))),
    'fog': (fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))),
    'brightness': (brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    'contrast': (contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    'elastic': (elastic, ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
    'pixelate': (pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    'jpeg_compression': (jpeg_compression, (80, 65, 58, 50, 40)),
    'gaussian_blur': (gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    'saturate': (saturate, ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))),
    'spatter': (spatter, ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                          (0.65, 0.3, 1, 0.69, 0.5, 0), (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                          (0.65, 0.1, 0.5, 0.68, 0.6, 1))),
    'speckle_noise': (speckle_noise, (0.06, 0.1, 0.12, 0.16, 0.2)),
}


def baseline(x: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
  """The per-image baseline of one corruption: uint8 [H, W, C] → uint8 [H, W, C]."""
  fn, table = BASELINES[name]
  return fn(x, table[severity - 1], rng)


def photo_crops(num: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """uint8 `[num, size, size, 3]`: random crops of the two sample photos reduced 4×."""
  rng = np.random.default_rng(seed)
  photos = [np.asarray(Image.fromarray(p).reduce(4)) for p in sk_datasets.load_sample_images().images]
  crops = []
  for index in rng.integers(len(photos), size=num):
    photo = photos[index]
    top, left = rng.integers(photo.shape[0] - size + 1), rng.integers(photo.shape[1] - size + 1)
    crops.append(photo[top:top + size, left:left + size])
  return np.stack(crops)


def time_jax(images, name, severity):
  key = jax.random.key(0)
  jax.block_until_ready(corruptions.corrupt(images, name, severity, key))  # compile and warm up
  best = math.inf
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(corruptions.corrupt(images, name, severity, key))
    best = min(best, time.perf_counter() - start)
  return len(images) / best


def time_baseline(images, name, severity, seconds):
  rng = np.random.default_rng(0)
  count, start = 0, time.perf_counter()
  while True:
    for image in images:
      baseline(image, name, severity, rng)
      count += 1
      elapsed = time.perf_counter() - start
      if elapsed >= seconds:
        return count / elapsed


def main(argv):
  del argv
  images = photo_crops(flags.FLAGS.batch_size)
  device = jax.devices()[0]
  print(f'Batch {len(images)} × 32×32×3, severity {flags.FLAGS.severity}, JAX on {device.platform} '
        f'({device.device_kind}).')
  print('| corruption | JAX images/s | NumPy/SciPy per image, images/s | ratio |')
  print('|---|---:|---:|---:|')
  for name in flags.FLAGS.names:
    corruptions.check_corruption(name, flags.FLAGS.severity)
    fast = time_jax(images, name, flags.FLAGS.severity)
    slow = time_baseline(images, name, flags.FLAGS.severity, flags.FLAGS.seconds)
    print(f'| {name} | {fast:,.0f} | {slow:,.0f} | {fast / slow:,.1f}× |', flush=True)


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_integer('batch_size', 1000, 'Images per JAX call.', lower_bound=1)
  flags.DEFINE_integer('severity', 3, 'Severity of every corruption.', lower_bound=1, upper_bound=5)
  flags.DEFINE_float('seconds', 2.0, 'Seconds of per-image baseline per corruption.')
  flags.DEFINE_list('names', list(corruptions.CORRUPTIONS), 'Corruptions to time.')
  app.run(main)
