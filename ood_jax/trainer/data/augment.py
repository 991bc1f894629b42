"""Image augmentation on the accelerator: pure, jit-able functions of (key, images).

Every random function takes one PRNG key and a batch `[B, H, W, C]` with C ∈ {1, 3}, splits the key
into one key per example, draws all of that example's random choices from it and vmaps a
per-example function over the batch. Example i's result thus
depends only on (key, i, image i), never on the batch layout, which is what lets a batch sharded over
many devices equal the one computed on a single device.

Pixel scale: images stay on the 0–255 scale of the uint8 inputs (float inputs are read on the same
scale) until `normalize`, the one place that maps pixels to network inputs. Re-indexing (crop, flip)
keeps the input dtype; interpolation and colour arithmetic return float32 and are not re-quantised to
uint8 (torchvision's PIL path re-quantises after every operation; the difference is below one grey
level).

Recipes:
  * `crop_and_flip`: zero padding 4, random crop back to H×W, random horizontal flip — the CIFAR
    recipe of every paper here (e.g. the ResNet-20 setup of Padhy et al. 2020).
  * `contrastive_views`: SupCon's CIFAR recipe (Khosla et al. 2020), used by ReweightOOD (Regmi et al. 2024):
    RandomResizedCrop(scale=(0.2, 1)), RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.1) with
    p = 0.8, RandomGrayscale(p = 0.2), each view drawn independently.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'color_jitter',
    'contrastive_views',
    'crop_and_flip',
    'normalize',
    'random_flip',
    'random_grayscale',
    'random_resized_crop',
]

_MAX_PIXEL = 255.0
# ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# torchvision's RandomResizedCrop draws up to 10 boxes and keeps the first that fits.
_CROP_ATTEMPTS = 10


# ----------------------------------------------------------------------------------------------
# Checks and per-example randomness.


def _check_images(images):
  dtype = getattr(images, 'dtype', None)
  if dtype is None:
    images = np.asarray(images)
    dtype = images.dtype
  if dtype != jnp.uint8 and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'images must be uint8 or floating on the 0–255 scale, got dtype {dtype}.')
  if np.ndim(images) != 4 or np.shape(images)[-1] not in (1, 3):
    raise ValueError(f'images must have shape [B, H, W, C] with C = 1 or 3, got {tuple(np.shape(images))}.')
  return jnp.asarray(images)


def _check_probability(name, value):
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name} must lie in [0, 1], got {value}.')


def _check_range(name, value, *, low, high):
  """Checks a (min, max) pair with low < min <= max <= high (high may be None)."""
  if len(value) != 2 or not value[0] <= value[1]:
    raise ValueError(f'{name} must be a pair (min, max) with min <= max, got {value}.')
  if value[0] <= low or (high is not None and value[1] > high):
    bounds = f'({low}, {high}]' if high is not None else f'({low}, ∞)'
    raise ValueError(f'{name} must lie in {bounds}, got {value}.')


def _noise(key, batch_size, shape):
  """`[B, *shape]` uniforms on [0, 1), each example's drawn from its own key split off `key`.

  Per-example functions take all their random choices from one such vector: every separate
  jax.random call adds a threefry circuit of its own, and those dominate compile time.
  """
  return jax.vmap(lambda k: jax.random.uniform(k, shape))(jax.random.split(key, batch_size))


def _uniform_int(u, count):
  """Integers uniform in [0, count) from u ~ U[0, 1); the cap guards float32 rounding of u·count up."""
  return jnp.minimum(jnp.floor(u * count), count - 1).astype(jnp.int32)


def _split(noise, *sizes):
  """Consecutive slices of a noise vector with the given sizes."""
  bounds = np.cumsum((0,) + sizes)
  return [noise[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------------------------
# Geometry. Per-example functions take (noise, [H, W, C] image); *_NOISE is the noise they use.

_FLIP_NOISE = 1
_CROP_FLIP_NOISE = 3
_RESIZED_CROP_NOISE = 2 * _CROP_ATTEMPTS + 2


def _flip_one(noise, image):
  return jnp.where(noise[0] < 0.5, image[:, ::-1], image)


def _crop_and_flip_one(noise, image, padding, flip):
  height, width, channels = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = _uniform_int(noise[:2], 2 * padding + 1)
  crop = jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))
  return _flip_one(noise[2:], crop) if flip else crop


def _bilinear_weights(size, start, length):
  """`[size, size]` matrix resampling the span [start, start + length) of an axis to `size` points.

  Output point o samples input coordinate start + (o + ½)·length/size − ½ (half-pixel centres),
  clamped to the axis, interpolating linearly between its two neighbouring pixels.
  """
  coord = jnp.clip(start + (jnp.arange(size) + 0.5) * length / size - 0.5, 0, size - 1)
  low = jnp.floor(coord)[:, None]
  frac = coord[:, None] - low
  grid = jnp.arange(size)
  return (1.0 - frac) * (grid == low) + frac * (grid == low + 1)


def _resized_crop_one(noise, image, scale, ratio):
  """torchvision's RandomResizedCrop box, resampled bilinearly to the input size.

  Box sizes and offsets are whole pixels, as torchvision draws them. If none of the attempts fits,
  the box is the whole image (torchvision's fallback for square images; for non-square images it
  would first clamp the aspect ratio).
  """
  height, width = image.shape[:2]
  area_u, ratio_u, offset_u = _split(noise, _CROP_ATTEMPTS, _CROP_ATTEMPTS, 2)
  area = height * width * (scale[0] + (scale[1] - scale[0]) * area_u)
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * ratio_u)
  box_h = jnp.round(jnp.sqrt(area / aspect))
  box_w = jnp.round(jnp.sqrt(area * aspect))
  fits = (box_h >= 1) & (box_h <= height) & (box_w >= 1) & (box_w <= width)
  first = jnp.argmax(fits)
  box_h = jnp.where(fits[first], box_h[first], height)
  box_w = jnp.where(fits[first], box_w[first], width)
  top = _uniform_int(offset_u[0], height - box_h + 1)
  left = _uniform_int(offset_u[1], width - box_w + 1)
  rows = _bilinear_weights(height, top, box_h)
  cols = _bilinear_weights(width, left, box_w)
  # HIGHEST keeps TPUs from rounding the weights and pixels to bfloat16 (a visible error of ~1 level).
  return jnp.einsum('yh,hwc,xw->yxc', rows, image.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=('padding', 'flip'))
def crop_and_flip(key, images, *, padding=4, flip=True):
  """Zero-pads by `padding`, crops a random H×W window and flips it horizontally with p = 1/2.

  Each example is cut with `jax.lax.dynamic_slice` at its own offset; no other crop is computed.

  Args:
    key: PRNG key for the whole batch.
    images: `[B, H, W, C]` uint8 or float images.
    padding: zero border in pixels; offsets are uniform in [0, 2·padding] along each axis.
    flip: also flip; False for data whose mirror image is another class (digits, text).

  Returns:
    `[B, H, W, C]` images, same dtype as `images`.
  """
  images = _check_images(images)
  if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
    raise ValueError(f'padding must be an int >= 0, got {padding!r}.')
  noise = _noise(key, images.shape[0], (_CROP_FLIP_NOISE,))
  return jax.vmap(lambda u, x: _crop_and_flip_one(u, x, padding, flip))(noise, images)


@jax.jit
def random_flip(key, images):
  """Flips each image horizontally with probability 1/2.

  Args:
    key: PRNG key for the whole batch.
    images: `[B, H, W, C]` uint8 or float images.

  Returns:
    `[B, H, W, C]` images, same dtype as `images`.
  """
  images = _check_images(images)
  return jax.vmap(_flip_one)(_noise(key, images.shape[0], (_FLIP_NOISE,)), images)


@functools.partial(jax.jit, static_argnames=('scale', 'ratio'))
def random_resized_crop(key, images, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop with the output size equal to the input size.

  Per example: area fraction a ~ U(scale), aspect ratio r = w/h log-uniform in `ratio`,
  box h = round(√(a·H·W / r)), w = round(√(a·H·W·r)) at a uniform whole-pixel offset (the first of
  10 draws that fits), then bilinear resampling (half-pixel centres, edges clamped) back to H×W.

  Args:
    key: PRNG key for the whole batch.
    images: `[B, H, W, C]` uint8 or float images.
    scale: (min, max) tuple, fraction of the image area within (0, 1]; SupCon's CIFAR value by default.
    ratio: (min, max) tuple, positive aspect ratios w/h.

  Returns:
    `[B, H, W, C]` float32 images on the input's 0–255 scale.
  """
  images = _check_images(images)
  _check_range('scale', scale, low=0.0, high=1.0)
  _check_range('ratio', ratio, low=0.0, high=None)
  noise = _noise(key, images.shape[0], (_RESIZED_CROP_NOISE,))
  return jax.vmap(lambda u, x: _resized_crop_one(u, x, scale, ratio))(noise, images)


# ----------------------------------------------------------------------------------------------
# Colour. The per-example functions work on [0, 1] and clip after every operation, as torchvision.

_JITTER_NOISE = 9  # apply?, 4 for the order, 4 factors
_GRAYSCALE_NOISE = 1


def _gray(image):
  """[H, W, 3] → [H, W, 1] luma."""
  return image @ jnp.asarray(_LUMA, image.dtype)[:, None]


def _blend(image, target, factor):
  return jnp.clip(factor * image + (1.0 - factor) * target, 0.0, 1.0)


def _rgb_to_hsv(image):
  """[..., 3] RGB on [0, 1] → [..., 3] HSV on [0, 1] (torchvision's formulas)."""
  red, green, blue = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.max(image, axis=-1)
  chroma = value - jnp.min(image, axis=-1)
  saturation = chroma / jnp.where(value > 0, value, 1.0)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
  red_c, green_c, blue_c = ((value - c) / safe_chroma for c in (red, green, blue))
  # Ties go to red, then green, as in colorsys and torchvision; grey pixels get hue 0. The largest
  # channel is found by comparing the channels, not by `value == channel`: XLA may recompute a
  # channel in another fusion, rounded differently from the copy `max` saw, and then no equality
  # holds and a green pixel took blue's formula (measured with XLA:CPU at -O0). Near a tie either
  # formula gives about the same colour, so a comparison flipped by rounding is harmless.
  red_max = (red >= green) & (red >= blue)
  green_max = ~red_max & (green >= blue)
  hue = jnp.where(red_max, blue_c - green_c, jnp.where(green_max, 2.0 + red_c - blue_c, 4.0 + green_c - red_c))
  hue = jnp.where(chroma > 0, hue, 0.0)
  return jnp.stack([jnp.mod(hue / 6.0, 1.0), saturation, value], axis=-1)


def _hsv_to_rgb(image):
  """[..., 3] HSV on [0, 1] → [..., 3] RGB on [0, 1]."""
  hue, saturation, value = image[..., 0], image[..., 1], image[..., 2]
  sector = jnp.floor(hue * 6.0)
  frac = hue * 6.0 - sector
  sector = jnp.mod(sector, 6).astype(jnp.int32)
  p = value * (1.0 - saturation)
  q = value * (1.0 - saturation * frac)
  t = value * (1.0 - saturation * (1.0 - frac))
  cases = [sector == i for i in range(5)]  # sector 5 is the default of jnp.select
  red = jnp.select(cases, [value, q, p, p, t], value)
  green = jnp.select(cases, [t, value, value, q, p], p)
  blue = jnp.select(cases, [p, p, t, value, value], q)
  return jnp.clip(jnp.stack([red, green, blue], axis=-1), 0.0, 1.0)


def _adjust_hue(image, delta):
  hsv = _rgb_to_hsv(image)
  return _hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + delta, 1.0)))


def _blend_op(image, op, factor):
  """Brightness (op 0), contrast (1) or saturation (2) of one image by `factor`.

  torchvision writes all three as a blend towards a target — black, the mean grey level, the grey
  image — so one function serves them, and a random choice among them costs one evaluation.
  """
  grey = _gray(image) if image.shape[-1] == 3 else image
  target = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(grey), grey))
  return _blend(image, target, factor)


def _color_jitter_one(noise, image, strengths, probability):
  """torchvision's ColorJitter on one [H, W, C] image on [0, 1], applied with `probability`.

  The operations run once each in a uniformly random order, as torchvision. A single channel has
  no saturation or hue, so it gets brightness and contrast only.
  """
  apply_u, order_u, factor_u = _split(noise, 1, 4, 4)
  brightness, contrast, saturation, hue = strengths
  # torchvision draws brightness/contrast/saturation factors from [max(0, 1 − s), 1 + s].
  low = jnp.asarray([max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast), max(0.0, 1.0 - saturation), -hue])
  high = jnp.asarray([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue])
  factors = low + factor_u * (high - low)
  color = image.shape[-1] == 3
  num_blends = 3 if color else 2
  # A uniform order of the four operations is a uniform order of the three blends (the ranks of
  # i.i.d. uniforms) with hue inserted at a uniform slot. Running the blends before and after that
  # slot in two masked passes evaluates the costly hue rotation once: under vmap, a switch over the
  # four operations per slot would evaluate hue in every slot.
  blend_order = jnp.argsort(order_u[:num_blends])
  hue_slot = _uniform_int(order_u[3], num_blends + 1) if color else num_blends

  def blends(x, start, stop):
    for slot in range(num_blends):
      op = blend_order[slot]
      x = jnp.where((start <= slot) & (slot < stop), _blend_op(x, op, factors[op]), x)
    return x

  jittered = blends(image, 0, hue_slot)
  if color:
    jittered = blends(_adjust_hue(jittered, factors[3]), hue_slot, num_blends)
  return jnp.where(apply_u[0] < probability, jittered, image)


def _grayscale_one(noise, image, probability):
  if image.shape[-1] == 1:
    return image
  grey = jnp.broadcast_to(_gray(image), image.shape)
  return jnp.where(noise[0] < probability, grey, image)


@functools.partial(jax.jit, static_argnames=('brightness', 'contrast', 'saturation', 'hue', 'probability'))
def color_jitter(key, images, *, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, probability=0.8):
  """torchvision's RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=probability).

  Per example, with probability `probability`, in a random order: brightness x·b, contrast
  c·x + (1 − c)·mean(grey(x)), saturation s·x + (1 − s)·grey(x), each factor uniform in
  [max(0, 1 − strength), 1 + strength], and a hue rotation by δ ~ U(−hue, hue) turns in HSV space;
  values are clipped to the pixel range after each operation. One-channel images get brightness and
  contrast only.

  Args:
    key: PRNG key for the whole batch.
    images: `[B, H, W, C]` uint8 or float images on the 0–255 scale.
    brightness: strength of the brightness factor, >= 0.
    contrast: strength of the contrast factor, >= 0.
    saturation: strength of the saturation factor, >= 0.
    hue: largest hue rotation in turns, in [0, 0.5].
    probability: chance that an example is jittered at all.

  Returns:
    `[B, H, W, C]` float32 images on the 0–255 scale.
  """
  images = _check_images(images)
  for name, value in (('brightness', brightness), ('contrast', contrast), ('saturation', saturation)):
    if value < 0:
      raise ValueError(f'{name} must be >= 0, got {value}.')
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f'hue must lie in [0, 0.5], got {hue}.')
  _check_probability('probability', probability)
  strengths = (brightness, contrast, saturation, hue)
  noise = _noise(key, images.shape[0], (_JITTER_NOISE,))
  unit = images.astype(jnp.float32) / _MAX_PIXEL
  return _MAX_PIXEL * jax.vmap(lambda u, x: _color_jitter_one(u, x, strengths, probability))(noise, unit)


@functools.partial(jax.jit, static_argnames=('probability',))
def random_grayscale(key, images, *, probability=0.2):
  """Replaces each RGB image by its luma in all three channels with probability `probability`.

  One-channel images are returned unchanged (as float32).

  Args:
    key: PRNG key for the whole batch.
    images: `[B, H, W, C]` uint8 or float images.
    probability: chance that an example turns grey.

  Returns:
    `[B, H, W, C]` float32 images on the input's scale.
  """
  images = _check_images(images)
  _check_probability('probability', probability)
  noise = _noise(key, images.shape[0], (_GRAYSCALE_NOISE,))
  return jax.vmap(lambda u, x: _grayscale_one(u, x, probability))(noise, images.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Recipes and normalisation.

_VIEW_NOISE = (_RESIZED_CROP_NOISE, _FLIP_NOISE, _JITTER_NOISE, _GRAYSCALE_NOISE)


def _contrastive_one(noise, image):
  crop_u, flip_u, jitter_u, grey_u = _split(noise, *_VIEW_NOISE)
  view = _resized_crop_one(crop_u, image, (0.2, 1.0), (3 / 4, 4 / 3)) / _MAX_PIXEL
  view = _flip_one(flip_u, view)
  view = _color_jitter_one(jitter_u, view, (0.4, 0.4, 0.4, 0.1), 0.8)
  return _MAX_PIXEL * _grayscale_one(grey_u, view, 0.2)


@functools.partial(jax.jit, static_argnames=('num_views',))
def contrastive_views(key, images, *, num_views=2):
  """`num_views` independent SupCon augmentations of every image (the two views of Regmi et al. 2024).

  Each view is RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3)) → horizontal flip (p = 1/2) →
  ColorJitter(0.4, 0.4, 0.4, 0.1) applied with p = 0.8 in a random order → grayscale (p = 0.2), with
  the semantics of `random_resized_crop`, `color_jitter` and `random_grayscale`.

  Args:
    key: PRNG key for the whole batch.
    images: `[B, H, W, C]` uint8 or float images on the 0–255 scale.
    num_views: views per image, >= 1.

  Returns:
    `[B, V, H, W, C]` float32 views on the 0–255 scale; views of one image share its label.
  """
  images = _check_images(images)
  if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
    raise ValueError(f'num_views must be an int >= 1, got {num_views!r}.')
  noise = _noise(key, images.shape[0], (num_views, sum(_VIEW_NOISE)))
  views_of_one = jax.vmap(_contrastive_one, in_axes=(0, None))
  return jax.vmap(views_of_one)(noise, images)


def normalize(images, mean, std):
  """Maps pixels on the 0–255 scale to network inputs: (x / 255 − mean) / std per channel.

  Args:
    images: `[..., C]` uint8 or float images on the 0–255 scale.
    mean: C per-channel means on the [0, 1] scale (`DatasetInfo.mean`).
    std: C per-channel standard deviations on the [0, 1] scale, all > 0.

  Returns:
    float32 array shaped like `images`.
  """
  channels = np.shape(images)[-1]
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f'mean and std must hold one value per channel ({channels}), got {mean.shape} and {std.shape}.')
  if not np.all(std > 0):
    raise ValueError(f'std must be > 0, got {std}.')
  return (jnp.asarray(images).astype(jnp.float32) / _MAX_PIXEL - mean) / std
