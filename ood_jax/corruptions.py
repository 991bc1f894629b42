"""CIFAR-C corruptions (Hendrycks & Dietterich 2019) for covariate-shift evaluation, in JAX.

Names follow TFDS's `cifar10_corrupted` configs (glass blur is `frosted_glass_blur`, elastic
transform is `elastic`). The 15 benchmark corruptions are the ones papers average over; the 4
extras were released as a validation set.

  corrupt(images, name, severity, rng)   uint8 [N, H, W, C] → uint8 [N, H, W, C], C = 1 or 3
  frost(images, severity, rng, textures=None)   frost with your own texture photographs
  frost_textures(height, width)          the procedural frost textures `corrupt` uses

`corrupt` is jitted with `name` and `severity` static, corrupts the whole batch at once on the
accelerator (a whole dataset in chunks of 512 images, which bounds memory) and vmaps. Image i draws
its randomness from `fold_in(rng, i)`: the output is a function of (rng, i, image i) alone, so it is
deterministic and does not depend on the batch size, and one key gives every severity the same
underlying draws (common random numbers across severities).

The formulas and the severity parameters are those of the CIFAR-10-C generation script
(`make_cifar_c.py` of hendrycks/robustness, Hendrycks & Dietterich 2019), which needs ImageMagick,
OpenCV and scikit-image and runs one image at a time. The parameters are defined at 32×32 and are
used unchanged at every other size (as ×32 pixel amounts for `elastic`). Conventions:

- Pixels are float32 on [0, 1] throughout. The result is clipped, scaled by 255 and rounded half to
  even (TFDS's `np.around`); the script truncates with `np.uint8`, which darkens by half a level on
  average and lets float error push an untouched pixel one level down.
- Steps where the script round-trips through 8-bit images keep that quantisation: glass blur's
  first blur (truncated), snow's flake layer (truncated into PIL, rounded out of ImageMagick),
  Pillow's pixelate and JPEG, and the 8-bit image processing of spatter's liquid branch.
- Grey images (C = 1): corruptions that depend on colour (brightness, saturate, frost, spatter) run
  on the grey RGB image and come back through ITU-R BT.601 luma, as `ood_jax.trainer.data.sources` converts
  channels; saturate at severities 4–5 adds saturation to grey pixels, which tints them red and so
  darkens them by 7 % / 14 %, as it would the RGB image. Noise is drawn per channel, and JPEG
  encodes a grey image as one luma plane, as Pillow does for mode 'L'.

Per family (boundary rules named as SciPy does: 'nearest' repeats the edge pixel, 'reflect' mirrors
with the edge repeated, 'mirror' without; OpenCV's default border is 'mirror'):

- Noise: Gaussian, Poisson (shot), salt-and-pepper (impulse; each value independently 0 or 1 with
  probability amount/2), multiplicative Gaussian (speckle). Poisson counts come by inverse CDF from
  one table per rate (the input has only 256 levels): exact to float32 resolution, and far cheaper
  than `jax.random.poisson`, whose rejection loops run over the whole batch until its slowest pixel.
- gaussian_blur: separable sampled Gaussian truncated at 4σ, 'nearest' (scikit-image's default).
- defocus_blur: the script's anti-aliased disk (17×17 aliased disk, then a 3×3 Gaussian of σ =
  alias_blur), correlated with 'mirror' borders as `cv2.filter2D`.
- frosted_glass_blur: blur, truncate to 8 bits, displace, blur. The script's loop "swaps" pixels with
  a tuple assignment of NumPy views, which copies instead: each visited pixel takes the value of its
  neighbour at offset (dy, dx) ∈ {−1, 0}² and the neighbour keeps its own. Visited pixels run from
  the bottom right, so every source is still unvisited and one iteration is a parallel gather; we
  reproduce that (not a true shuffle), including the unvisited first two rows and columns.
- motion_blur and snow's flakes: ImageMagick's motion blur, a one-sided Gaussian line kernel of
  2⌈radius⌉ + 1 taps whose tap i samples the pixel at (round(i sin θ), round(i cos θ)) rows/columns
  away, edge pixels extended, at θ ~ U(−45°, 45°) (snow: U(−135°, −45°)).
- zoom_blur: the script's `clipped_zoom` (central crop, bilinear `scipy.ndimage.zoom`, trim) as one
  interpolation matrix per axis and factor, averaged with the input. The factors are the script's
  `np.arange(1, stop, 0.01)`, which by float rounding include the stop at severities 1–2: 7, 12, 16,
  21 and 26 factors.
- snow: Gaussian flake layer, zoomed, thresholded, motion blurred, added with its 180° rotation to
  the image blended towards 1.5 × grey + 0.5.
- frost: a random crop of a random frost texture added to the dimmed image. The script's textures are
  photographs we cannot ship (nor download); `frost_textures` draws five procedural ones instead
  (fern-like ice dendrites over a fractal haze, bluish white, seeded and so identical on every
  machine). They resemble the photographs only loosely, so frost scores are not comparable with
  published CIFAR-10-C numbers; pass the photographs (or any texture set) to `frost` to match them.
- fog: the script's diamond-square plasma fractal (toroidal, as its np.roll) at the script's CIFAR
  map size (the next power of two ≥ the image side: 32 for CIFAR; ImageNet-C uses 256), one per
  image, then its brightness rescaling.
- brightness / saturate: scikit-image's HSV conversion conventions; V + c, or S·a + b, clipped.
- contrast: per image and channel around the mean.
- pixelate: Pillow's BOX resampling down to ⌊side·factor⌋ and back, horizontal pass first, each pass
  rounded to 8 bits as Pillow does; identical to Pillow.
- jpeg_compression: Pillow's default JPEG: JFIF YCbCr, 4:2:0 chroma (2×2 means in, triangle
  "fancy" upsampling out), 8×8 DCT-II quantised with the IJG tables scaled by libjpeg's quality
  formula, every plane rounded to 8 bits. Floating-point DCT and rounding instead of libjpeg's
  integer arithmetic (and its alternating rounding bias in the chroma means): close to Pillow, not
  bit-identical (on photo crops 45 dB PSNR between the two for RGB, 51 dB for grey; 65–95 % of the
  values equal), while JPEG itself costs 27–35 dB.
- elastic: random affine (three control points moved by U(±affine), bilinear, 'mirror') then a
  displacement field of U(−1, 1) noise smoothed by a Gaussian (σ, truncated at 3σ, 'reflect') times
  α, sampled bilinearly with 'reflect'. OpenCV's warp quantises positions to 1/32 pixel; we do not.
  Control points are placed about (W/2, H/2); the script uses (H/2, W/2) as (x, y), the same for
  square images. Note the table's severity 1 is a pure affine warp with the largest jitter (2.56
  pixels), which costs more PSNR than severity 5.
- spatter: severities 1–3 are liquid: thresholded blurred Gaussian layer, then (as the script, with
  OpenCV's algorithms) Canny edges (3×3 Sobel, L1 magnitude, thresholds 50/150), 5×5 chamfer
  distance to the edges capped at 20, 3×3 box blur, histogram equalisation, emboss, box blur, which
  shades the layer into pale-turquoise drops. Severities 4–5 are mud: the layer's mask blurred,
  thresholded at 0.8 and blended with mud brown. The layer is clipped to [0, 1] before its 8-bit
  conversion, where the script would wrap around.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BENCHMARK_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'frosted_glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic', 'pixelate', 'jpeg_compression',
)
EXTRA_CORRUPTIONS = ('gaussian_blur', 'saturate', 'spatter', 'speckle_noise')
CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)

_HIGHEST = lax.Precision.HIGHEST  # interpolation and DCT matmuls must stay float32 on GPU/TPU
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, also OpenCV's RGB2GRAY
_MIN_SIDE = 8  # elastic's control triangle and pixelate's downscale need a few pixels
_CHUNK = 512  # images per vectorised step; larger batches loop over chunks of this size

# Severity parameters of the CIFAR-10-C script, severities 1..5.
_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # σ
_SHOT_NOISE = (500, 250, 100, 75, 50)  # Poisson rate
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # salt-and-pepper amount
_SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)  # σ
_GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # σ
_GLASS_BLUR = ((0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2))  # σ, iterations (max_delta 1)
_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # radius, alias_blur
_MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # radius, σ
_ZOOM_BLUR = (1.06, 1.11, 1.16, 1.21, 1.26)  # stop of np.arange(1, stop, 0.01)
_SNOW = (  # loc, scale, zoom, threshold, blur radius, blur σ, blend
    (0.1, 0.2, 1.0, 0.6, 8, 3.0, 0.95), (0.1, 0.2, 1.0, 0.5, 10, 4.0, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4.0, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6.0, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12.0, 0.8))
_FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
_FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # strength, wibble decay
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))  # HSV saturation · a + b
_JPEG_QUALITY = (80, 65, 58, 50, 40)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
_ELASTIC = ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
_ELASTIC_SCALE = 32  # α, σ and the affine jitter are these fractions of the script's 32-pixel side
_SPATTER = (  # loc, scale, σ, threshold, intensity (mud: σ of the mask blur), mud
    (0.62, 0.1, 0.7, 0.7, 0.5, False), (0.65, 0.1, 0.8, 0.7, 0.5, False),
    (0.65, 0.3, 1.0, 0.69, 0.5, False), (0.65, 0.1, 0.7, 0.69, 0.6, True),
    (0.65, 0.1, 0.5, 0.68, 0.6, True))

_WATER = np.array([175, 238, 238]) / 255  # the script's pale turquoise
_MUD = np.array([63, 42, 20]) / 255
# IJG example quantisation tables (JPEG standard, Annex K), quality 50.
_JPEG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]).reshape(8, 8)
_JPEG_CHROMA = np.full((8, 8), 99)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
_CANNY_TAN_22 = 13573  # OpenCV's round(tan(22.5°)·2¹⁵)
_CHAMFER_CAP = 20.0  # the script truncates the distance at 20
_CHAMFER_STEPS = (  # OpenCV's 5×5 mask for DIST_L2: axial 1, diagonal 1.4, knight's move 2.1969
    *[(dy, dx, 1.0) for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))],
    *[(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)],
    *[(dy, dx, 2.1969) for dy, dx in ((1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1))])


def check_corruption(name: str, severity: int) -> None:
  """Raises ValueError for an unknown corruption name or a severity outside 1..5."""
  if name not in CORRUPTIONS:
    raise ValueError(f'Unknown corruption {name!r}; valid names: {", ".join(CORRUPTIONS)}.')
  if isinstance(severity, bool) or severity not in SEVERITIES:
    raise ValueError(f'severity must be one of 1..5, got {severity!r}.')


@functools.partial(jax.jit, static_argnames=('name', 'severity'))
def corrupt(images: jax.Array, name: str, severity: int, rng: jax.Array) -> jax.Array:
  """Applies one CIFAR-C corruption at one severity to a batch of images.

  Args:
    images: uint8 `[N, H, W, C]`, C = 1 or 3, H and W ≥ 8.
    name: one of `CORRUPTIONS` (static).
    severity: 1..5 (static).
    rng: a JAX PRNG key; image i uses `fold_in(rng, i)`.

  Returns:
    uint8 `[N, H, W, C]`.

  Raises:
    ValueError: unknown name, severity outside 1..5, or images of the wrong shape.
    TypeError: images not uint8.
  """
  check_corruption(name, severity)
  _check_images(images)
  if name == 'frost':
    return _frost(images, severity, rng, jnp.asarray(frost_textures(*_texture_shape(images.shape))))
  corruption = _REGISTRY[name]
  return _apply(images, rng, functools.partial(corruption.fn, params=corruption.table[severity - 1]),
                colour=corruption.colour)


@functools.partial(jax.jit, static_argnames=('severity',))
def frost(images: jax.Array, severity: int, rng: jax.Array, *, textures: jax.Array | None = None) -> jax.Array:
  """Frost: `corrupt(images, 'frost', severity, rng)`, optionally with your own textures.

  Each image gets `a·x + b·t` (clipped), t a uniformly random crop of a uniformly random texture and
  (a, b) the severity's weights. The script uses the first five of the frost photographs shipped with
  the CIFAR-10-C code, resized by 0.2; pass those to reproduce its frost.

  Args:
    images: uint8 `[N, H, W, C]`, C = 1 or 3.
    severity: 1..5 (static).
    rng: a JAX PRNG key; image i uses `fold_in(rng, i)`.
    textures: uint8 `[K, h, w, 3]` RGB textures with h ≥ H and w ≥ W; None means the procedural
      `frost_textures`.

  Returns:
    uint8 `[N, H, W, C]`.
  """
  check_corruption('frost', severity)
  _check_images(images)
  if textures is None:
    textures = jnp.asarray(frost_textures(*_texture_shape(images.shape)))
  elif (textures.dtype != jnp.uint8 or textures.ndim != 4 or textures.shape[-1] != 3
        or textures.shape[1] < images.shape[1] or textures.shape[2] < images.shape[2]):
    raise ValueError(f'textures must be uint8 [K, h, w, 3] with h ≥ {images.shape[1]} and w ≥ '
                     f'{images.shape[2]}, got {textures.dtype} of shape {textures.shape}.')
  return _frost(images, severity, rng, textures)


@functools.lru_cache(maxsize=4)
def frost_textures(height: int = 192, width: int = 192) -> np.ndarray:
  """The five procedural frost textures, seeded, so identical on every machine.

  Each is a field of fern-like ice dendrites (needles 15–60 pixels long with side branches at ±60°
  every 3–5 pixels, two generations) over a fractal haze, thick and thin by a smoother fractal
  cover, tinted bluish white; mean level about 0.45. `corrupt` uses 192×192 textures for images up
  to 96×96 and twice the image size beyond.

  Args:
    height, width: texture size; at least the image size, larger for more distinct crops.

  Returns:
    uint8 `[5, height, width, 3]`, read-only.
  """
  rng = np.random.default_rng(20190328)  # fixed: textures are data, not randomness
  textures = np.stack([_frost_texture(rng, height, width) for _ in range(5)])
  textures.flags.writeable = False
  return textures


# Dispatch.

class _Corruption(NamedTuple):
  fn: Callable[..., jax.Array]  # fn(x [H, W, C] on [0, 1], key, params) -> [H, W, C], unclipped
  table: tuple[Any, ...]  # parameters per severity
  colour: bool = False  # grey images are corrupted as grey RGB images, then converted back


def _check_images(images) -> None:
  if images.dtype != jnp.uint8:
    raise TypeError(f'images must be uint8, got {images.dtype}.')
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must have shape [N, H, W, C] with C = 1 or 3, got {images.shape}.')
  if min(images.shape[1:3]) < _MIN_SIDE:
    raise ValueError(f'images must be at least {_MIN_SIDE}×{_MIN_SIDE}, got {images.shape[1:3]}.')


def _apply(images, rng, fn, *, colour):
  x = images.astype(jnp.float32) / 255.0
  grey = colour and x.shape[-1] == 1
  if grey:
    x = jnp.repeat(x, 3, axis=-1)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(x.shape[0]))
  if x.shape[0] <= _CHUNK:
    y = jax.vmap(fn)(x, keys)
  else:  # whole datasets in one call: chunks bound the intermediates (zoom blur holds 26 copies)
    y = lax.map(lambda args: fn(*args), (x, keys), batch_size=_CHUNK)
  y = jnp.clip(y, 0.0, 1.0)
  if grey:
    y = _luma(y)[..., None]
  return jnp.round(y * 255.0).astype(jnp.uint8)


def _draw(sampler, key, shape, **kwargs):
  """`sampler(key, shape)` drawn flat and reshaped: flat draws compile several times faster under vmap."""
  return sampler(key, (math.prod(shape),), **kwargs).reshape(shape)


def _luma(rgb):
  return jnp.einsum('...c,c->...', rgb, _LUMA.astype(np.float32), precision=_HIGHEST)


def _grey(x):
  return x[..., 0] if x.shape[-1] == 1 else _luma(x)


# Linear filters as matrices: a 1-D filter with a boundary rule is an [n, n] matrix built on the
# host, and a separable 2-D filter is two small matmuls, exact about the boundary and fast anywhere.

def _fold(index, size, mode, xp=np):
  """Maps integer indices outside [0, size) inside by a boundary rule ('nearest', 'reflect', 'mirror')."""
  if mode == 'nearest':
    return xp.clip(index, 0, size - 1)
  period = 2 * size if mode == 'reflect' else max(2 * size - 2, 1)
  index = xp.mod(index, period)
  return xp.where(index >= size, period - index - (mode == 'reflect'), index)


def _filter_matrix(size, taps, mode):
  """`[size, size]` matrix of the centred 1-D correlation with `taps` under boundary rule `mode`."""
  radius = len(taps) // 2
  columns = _fold(np.arange(size)[:, None] + np.arange(-radius, radius + 1), size, mode)
  matrix = np.zeros((size, size))
  np.add.at(matrix, (np.repeat(np.arange(size), len(taps)), columns.ravel()), np.tile(taps, size))
  return matrix


def _separable(x, rows, cols):
  """Applies host matrices along the two spatial axes of x `[H, W, C]`: rows `[H', H]`, cols `[W', W]`."""
  x = jnp.einsum('ij,jwc->iwc', rows.astype(np.float32), x, precision=_HIGHEST)
  return jnp.einsum('kw,iwc->ikc', cols.astype(np.float32), x, precision=_HIGHEST)


def _gaussian_taps(sigma, truncate):
  """SciPy's sampled Gaussian: radius ⌊truncate·σ + ½⌋, normalised; σ = 0 is the identity."""
  if sigma == 0:
    return np.ones(1)
  offsets = np.arange(-int(truncate * sigma + 0.5), int(truncate * sigma + 0.5) + 1)
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


def _gaussian_filter(x, sigma, mode='nearest', truncate=4.0):
  """scikit-image's `gaussian` (defaults 'nearest', 4σ) over the spatial axes of x `[H, W, C]`."""
  taps = _gaussian_taps(sigma, truncate)
  return _separable(x, _filter_matrix(x.shape[0], taps, mode), _filter_matrix(x.shape[1], taps, mode))


def _correlate2d(x, kernel, mode):
  """Correlation of x `[H, W, ...]` with a small host kernel, as a sum of shifted copies."""
  radius = kernel.shape[0] // 2
  h, w = x.shape[:2]
  padded = x[_fold(np.arange(-radius, h + radius), h, mode)][:, _fold(np.arange(-radius, w + radius), w, mode)]
  out = jnp.zeros_like(x)
  for (i, j), weight in np.ndenumerate(kernel):
    if weight:
      out = out + float(weight) * padded[i:i + h, j:j + w]
  return out


def _bilinear(x, rows, cols, mode):
  """Samples x `[H, W, C]` at fractional positions rows, cols `[H', W']` (order 1, boundary `mode`)."""
  h, w = x.shape[:2]
  top, left = jnp.floor(rows), jnp.floor(cols)
  fy, fx = (rows - top)[..., None], (cols - left)[..., None]
  r0, r1 = (_fold(r, h, mode, jnp) for r in (top.astype(jnp.int32), top.astype(jnp.int32) + 1))
  c0, c1 = (_fold(c, w, mode, jnp) for c in (left.astype(jnp.int32), left.astype(jnp.int32) + 1))
  upper = x[r0, c0] * (1 - fx) + x[r0, c1] * fx
  lower = x[r1, c0] * (1 - fx) + x[r1, c1] * fx
  return upper * (1 - fy) + lower * fy


# Noise.

def _gaussian_noise(x, key, params):
  return x + params * _draw(jax.random.normal, key, x.shape)


def _shot_noise(x, key, params):
  return _poisson_quantile(jnp.round(x * 255.0).astype(jnp.int32), _draw(jax.random.uniform, key, x.shape),
                           params) / params


def _poisson_quantile(levels, u, rate):
  """Poisson(level/255 · rate) by inverse CDF at u ~ U[0, 1): exact sampling to float32 resolution.

  The input has 256 levels, so the CDFs are one host table `[256, K]` and sampling is a binary search
  (far cheaper than jax.random.poisson's rejection loops, which iterate over the whole batch).
  """
  means = np.arange(256)[:, None] / 255 * rate
  counts = np.arange(int(rate + 12 * math.sqrt(rate) + 12))  # past the last float32-visible tail mass
  log_factorials = np.concatenate([[0.0], np.cumsum(np.log(counts[1:]))])
  pmf = np.exp(counts * np.log(np.maximum(means, 1e-300)) - means - log_factorials)  # level 0: always 0
  cdf = jnp.asarray(np.cumsum(pmf, axis=1).astype(np.float32).ravel())
  # The smallest k with u < cdf[k], by binary search on [low, high].
  low, high = jnp.zeros_like(levels), jnp.full_like(levels, len(counts) - 1)
  for _ in range(len(counts).bit_length()):
    middle = (low + high) // 2
    above = u < cdf[levels * len(counts) + middle]
    low, high = jnp.where(above, low, middle + 1), jnp.where(above, middle, high)
  return low.astype(jnp.float32)


def _impulse_noise(x, key, params):
  u = _draw(jax.random.uniform, key, x.shape)
  return jnp.where(u < params / 2, 0.0, jnp.where(u < params, 1.0, x))


def _speckle_noise(x, key, params):
  return x + x * params * _draw(jax.random.normal, key, x.shape)


# Blurs.

def _gaussian_blur(x, key, params):
  del key
  return _gaussian_filter(x, params)


def _glass_blur(x, key, params):
  sigma, iterations = params
  h, w = x.shape[:2]
  # The script's np.random.randint(-1, 1): offsets (dx, dy) ∈ {−1, 0}, one pair per visited pixel.
  offsets = _draw(jax.random.randint, key, (iterations, h - 2, w - 2, 2), minval=-1, maxval=1)
  return _glass_blur_given(x, offsets, sigma)


def _glass_blur_given(x, offsets, sigma):
  """Glass blur with the offsets `[iterations, H − 2, W − 2, 2]` (dx, dy) of the visited pixels 2..H−1."""
  h, w = x.shape[:2]
  # The script's np.uint8(): truncation; the tolerance keeps float32 error on exact levels from
  # dropping them one level.
  x = jnp.floor(_gaussian_filter(x, sigma) * 255.0 + 1e-3) / 255.0
  for dx, dy in zip(offsets[..., 0], offsets[..., 1]):
    rows = jnp.arange(h)[:, None] + jnp.pad(dy, ((2, 0), (2, 0)))
    cols = jnp.arange(w)[None, :] + jnp.pad(dx, ((2, 0), (2, 0)))
    x = x[rows, cols]
  return _gaussian_filter(x, sigma)


def _disk_kernel(radius, alias_blur):
  """The script's defocus kernel, trimmed to its non-zero support."""
  span = np.arange(-8, 9)
  disk = (span[:, None] ** 2 + span[None, :] ** 2 <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  blur = _filter_matrix(17, _gaussian_taps_cv(alias_blur), 'mirror')  # cv2.GaussianBlur, 3×3
  kernel = blur @ disk @ blur.T
  reach = np.abs(span[np.nonzero(kernel.any(axis=0))[0]]).max()
  return kernel[8 - reach:9 + reach, 8 - reach:9 + reach]


def _gaussian_taps_cv(sigma):
  taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * sigma ** 2))
  return taps / taps.sum()


def _defocus_blur(x, key, params):
  del key
  return _correlate2d(x, _disk_kernel(*params), 'mirror')


def _motion_kernel(radius, sigma):
  taps = np.exp(-np.arange(2 * math.ceil(radius) + 1) ** 2 / (2 * sigma ** 2))
  return taps / taps.sum()


def _motion_blur_given(x, angle, radius, sigma):
  """ImageMagick's motion blur of x `[H, W, C]` along `angle` degrees (a traced scalar)."""
  h, w = x.shape[:2]
  taps = _motion_kernel(radius, sigma)
  steps = jnp.arange(len(taps), dtype=jnp.float32)
  theta = jnp.deg2rad(angle)
  # ImageMagick rounds the offsets with ceil(v − ½) and reads edge pixels beyond the border.
  rows = jnp.clip(jnp.arange(h) + jnp.ceil(steps * jnp.sin(theta) - 0.5).astype(jnp.int32)[:, None], 0, h - 1)
  cols = jnp.clip(jnp.arange(w) + jnp.ceil(steps * jnp.cos(theta) - 0.5).astype(jnp.int32)[:, None], 0, w - 1)
  samples = x[rows[:, :, None], cols[:, None, :]]  # [taps, H, W, C]
  return jnp.tensordot(taps.astype(np.float32), samples, axes=1, precision=_HIGHEST)


def _motion_blur(x, key, params):
  return _motion_blur_given(x, _draw(jax.random.uniform, key, (), minval=-45.0, maxval=45.0), *params)


def _zoom_matrix(size, factor):
  """`[size, size]` map of the script's `clipped_zoom` along one axis: crop, bilinear zoom, trim."""
  crop = int(np.ceil(size / factor))
  top = (size - crop) // 2
  zoomed = int(round(crop * factor))
  # scipy.ndimage.zoom maps output o to input o·(in − 1)/(out − 1).
  coords = (np.arange(size) + (zoomed - size) // 2) * (crop - 1) / (zoomed - 1)
  lower = np.floor(coords).astype(int)
  frac = coords - lower
  matrix = np.zeros((size, size))
  np.add.at(matrix, (np.arange(size), top + lower), 1 - frac)
  np.add.at(matrix, (np.arange(size), top + np.minimum(lower + 1, crop - 1)), frac)
  return matrix


def _zoom_blur(x, key, params):
  del key
  factors = np.arange(1, params, 0.01)
  h, w = x.shape[:2]
  rows = np.stack([_zoom_matrix(h, factor) for factor in factors]).astype(np.float32)
  cols = np.stack([_zoom_matrix(w, factor) for factor in factors]).astype(np.float32)
  # Dense matmuls beat the two-tap gathers they stand for, on CPU too.
  zoomed = jnp.einsum('zij,jwc->ziwc', rows, x, precision=_HIGHEST)
  zoomed = jnp.einsum('ziwc,zkw->ikc', zoomed, cols, precision=_HIGHEST)
  return (x + zoomed) / (len(factors) + 1)


# Weather.

def _snow(x, key, params):
  flakes_key, angle_key = jax.random.split(key)
  loc, scale = params[:2]
  flakes = loc + scale * _draw(jax.random.normal, flakes_key, x.shape[:2])
  angle = _draw(jax.random.uniform, angle_key, (), minval=-135.0, maxval=-45.0)
  return _snow_given(x, flakes, angle, params)


def _snow_given(x, flakes, angle, params):
  """Snow with the flake layer `[H, W]` (before zoom) and the motion-blur angle in degrees."""
  _, _, zoom, threshold, radius, sigma, blend = params
  flakes = _separable(flakes[..., None], _zoom_matrix(flakes.shape[0], zoom), _zoom_matrix(flakes.shape[1], zoom))
  flakes = jnp.where(flakes < threshold, 0.0, flakes)
  flakes = jnp.floor(jnp.clip(flakes, 0.0, 1.0) * 255.0) / 255.0  # into an 8-bit PIL image
  flakes = jnp.round(_motion_blur_given(flakes, angle, radius, sigma) * 255.0) / 255.0  # 8-bit PNG out
  x = blend * x + (1 - blend) * jnp.maximum(x, _grey(x)[..., None] * 1.5 + 0.5)
  return x + flakes + flakes[::-1, ::-1]


def _texture_shape(image_shape):
  return max(192, 2 * image_shape[1]), max(192, 2 * image_shape[2])  # room for many crops


def _frost(images, severity, rng, textures):
  def fn(x, key):
    h, w = x.shape[:2]
    # A texture, then a crop of it: every texture and every crop position equally likely.
    index, top, left = jax.random.randint(
        key, (3,), 0, jnp.array([textures.shape[0], textures.shape[1] - h + 1, textures.shape[2] - w + 1]))
    crop = lax.dynamic_slice(textures[index], (top, left, 0), (h, w, 3)).astype(jnp.float32) / 255.0
    image_weight, frost_weight = _FROST[severity - 1]
    return image_weight * x + frost_weight * crop
  return _apply(images, rng, fn, colour=True)


def _frost_texture(rng, height, width):
  cover = _fractal_noise(rng, height, width, exponent=2.2)  # where the frost is thick or thin
  film = _fractal_noise(rng, height, width, exponent=1.2)  # fine-grained haze between crystals
  crystals = _ice_crystals(rng, height, width)
  density = np.clip((0.2 + 0.3 * film + crystals) * (0.4 + cover), 0.0, 1.0)
  return np.round(255 * density[..., None] * np.array([0.84, 0.92, 1.0])).astype(np.uint8)


def _fractal_noise(rng, height, width, exponent):
  """Periodic 1/f^exponent noise on [0, 1] by spectral synthesis."""
  frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
  frequency[0, 0] = np.inf  # no DC: the mean is set by the normalisation below
  shape = frequency.shape
  spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * frequency ** -exponent
  noise = np.fft.irfft2(spectrum, s=(height, width))
  return (noise - noise.min()) / (noise.max() - noise.min())


def _ice_crystals(rng, height, width):
  """Feathery dendrites splatted bilinearly onto a periodic canvas, softened; values on [0, 1)."""
  points = []
  for _ in range(height * width // 600):
    start = rng.uniform((0, 0), (height, width))
    _dendrite(rng, points, start, rng.uniform(0, 2 * np.pi), rng.uniform(15, 60), generations=2)
  points = np.concatenate(points)
  canvas = np.zeros((height, width))
  top_left = np.floor(points).astype(int)
  frac = points - top_left
  for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
    weight = np.abs(1 - dy - frac[:, 0]) * np.abs(1 - dx - frac[:, 1])
    np.add.at(canvas, ((top_left[:, 0] + dy) % height, (top_left[:, 1] + dx) % width), weight)
  taps = _gaussian_taps(0.5, 4.0)
  soft = _filter_matrix(height, taps, 'mirror') @ canvas @ _filter_matrix(width, taps, 'mirror').T
  return 1 - np.exp(-0.45 * soft)  # one needle is faint; where needles cross, the ice turns white


def _dendrite(rng, points, start, angle, length, generations):
  """Appends the sample points (every ½ pixel) of one needle and, recursively, its side branches."""
  direction = np.array([np.sin(angle), np.cos(angle)])
  points.append(start + np.arange(0, length, 0.5)[:, None] * direction)
  if generations == 0:
    return
  for along in np.arange(rng.uniform(1, 4), length, rng.uniform(3, 5)):
    for side in (-1, 1):  # ice branches at ±60°, shorter towards the tip
      _dendrite(rng, points, start + along * direction, angle + side * np.pi / 3 + rng.normal(0, 0.1),
                0.35 * (length - along) * rng.uniform(0.6, 1.0), generations - 1)


def _fog(x, key, params):
  strength, decay = params
  h, w = x.shape[:2]
  size = 1 << (max(h, w) - 1).bit_length()  # the next power of two
  uniforms = _draw(jax.random.uniform, key, (size, size), minval=-1.0, maxval=1.0)
  return _fog_given(x, _plasma_fractal(uniforms, decay)[:h, :w], strength)


def _fog_given(x, fractal, strength):
  """Fog with a plasma fractal `[H, W]` on [0, 1]."""
  peak = jnp.max(x)
  return (x + strength * fractal[..., None]) * peak / (peak + strength)


def _plasma_fractal(uniforms, wibble_decay):
  """The script's diamond-square height map: periodic, `[size, size]` on [0, 1]; size a power of two.

  Each level fills the centres of the squares of known points, then the midpoints of their sides,
  with the mean of the four neighbours plus wibble²·u; wibble starts at 100 and is divided by
  `wibble_decay` per level (larger is smoother). Every point but (0, 0) is filled once, with its own
  u from `uniforms` `[size, size]` on [−1, 1) (the script draws wibble·U(−wibble, wibble)).
  """
  size = uniforms.shape[0]
  grid = jnp.zeros((1, 1))  # the points known so far: every step-th point of the map
  wibble = 100.0
  while grid.shape[0] < size:
    n, step = grid.shape[0], size // grid.shape[0]
    half = step // 2
    noise = wibble ** 2 * uniforms
    corners = grid + jnp.roll(grid, -1, axis=0)
    centres = (corners + jnp.roll(corners, -1, axis=1)) / 4 + noise[half::step, half::step]
    # Midpoints of the sides along the rows (neighbours: two corners, two centres), then the columns.
    row_sides = (centres + jnp.roll(centres, 1, axis=0) + grid + jnp.roll(grid, -1, axis=1)) / 4
    col_sides = (centres + jnp.roll(centres, 1, axis=1) + grid + jnp.roll(grid, -1, axis=0)) / 4
    even_rows = jnp.stack([grid, row_sides + noise[::step, half::step]], axis=-1).reshape(n, 2 * n)
    odd_rows = jnp.stack([col_sides + noise[half::step, ::step], centres], axis=-1).reshape(n, 2 * n)
    grid = jnp.stack([even_rows, odd_rows], axis=1).reshape(2 * n, 2 * n)
    wibble /= wibble_decay
  grid = grid - grid.min()
  return grid / grid.max()


# Digital.

def _rgb_to_hsv(rgb):
  """scikit-image's rgb2hsv: hue on [0, 1), grey pixels get hue and saturation 0."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.max(rgb, axis=-1)
  delta = value - jnp.min(rgb, axis=-1)
  chromatic = delta > 0
  safe = jnp.where(chromatic, delta, 1.0)
  # Ties go to the later channel, as in scikit-image: blue over green over red. Channel comparisons,
  # not `channel == value`, pick the branch: see `ood_jax.trainer.data.augment._rgb_to_hsv`.
  blue_max = (b >= g) & (b >= r)
  green_max = ~blue_max & (g >= r)
  hue = jnp.where(blue_max, 4 + (r - g) / safe, jnp.where(green_max, 2 + (b - r) / safe, (g - b) / safe))
  hue = jnp.where(chromatic, jnp.mod(hue / 6, 1.0), 0.0)
  saturation = jnp.where(chromatic, delta / jnp.where(chromatic, value, 1.0), 0.0)
  return hue, saturation, value


def _hsv_to_rgb(hue, saturation, value):
  # Closed form of the six-sector formula: channel n ∈ (5, 3, 1) for (R, G, B).
  k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + 6 * hue[..., None], 6)
  ramp = jnp.clip(jnp.minimum(k, 4 - k), 0.0, 1.0)
  return value[..., None] * (1 - saturation[..., None] * ramp)


def _brightness(x, key, params):
  del key
  hue, saturation, value = _rgb_to_hsv(x)
  return _hsv_to_rgb(hue, saturation, jnp.clip(value + params, 0.0, 1.0))


def _saturate(x, key, params):
  del key
  hue, saturation, value = _rgb_to_hsv(x)
  scale, shift = params
  return _hsv_to_rgb(hue, jnp.clip(saturation * scale + shift, 0.0, 1.0), value)


def _contrast(x, key, params):
  del key
  mean = jnp.mean(x, axis=(0, 1), keepdims=True)
  return (x - mean) * params + mean


def _box_matrix(in_size, out_size):
  """`[out, in]` weights of Pillow's BOX resampling: the input pixels whose centres fall in the output pixel."""
  scale = in_size / out_size
  support = 0.5 * max(scale, 1.0)
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = (i + 0.5) * scale
    pixels = np.arange(int(centre - support + 0.5), min(int(centre + support + 0.5), in_size))
    offset = (pixels + 0.5 - centre) / max(scale, 1.0)
    inside = (offset > -0.5) & (offset <= 0.5)
    matrix[i, pixels] = inside / inside.sum()
  return matrix


def _pixelate(x, key, params):
  del key
  h, w = x.shape[:2]
  small = int(h * params), int(w * params)
  levels = jnp.round(x * 255.0)
  passes = ((np.eye(h), _box_matrix(w, small[1])), (_box_matrix(h, small[0]), np.eye(small[1])),
            (np.eye(small[0]), _box_matrix(small[1], w)), (_box_matrix(small[0], h), np.eye(w)))
  for rows, cols in passes:  # Pillow resizes horizontally, then vertically, rounding each pass
    levels = jnp.floor(_separable(levels, rows, cols) + 0.5)
  return levels / 255.0


def _jpeg_table(base, quality):
  """libjpeg's jpeg_set_quality with force_baseline: base·scale/100, rounded, clipped to 1..255."""
  scale = 5000 // quality if quality < 50 else 200 - 2 * quality
  return np.clip((base * scale + 50) // 100, 1, 255)


def _dct_matrix():
  u, n = np.arange(8)[:, None], np.arange(8)[None, :]
  matrix = np.cos((2 * n + 1) * u * np.pi / 16) / 2
  matrix[0] /= np.sqrt(2)
  return matrix  # orthonormal, so the JPEG DCT is D·B·Dᵀ and its inverse Dᵀ·F·D


def _jpeg_plane(plane, table):
  """Encodes and decodes one 8-bit plane `[H, W]` (multiples of 8): level shift, DCT, quantise, back."""
  h, w = plane.shape
  dct = _dct_matrix().astype(np.float32)
  blocks = (plane - 128.0).reshape(h // 8, 8, w // 8, 8)
  coefficients = jnp.einsum('ux,ixjy,vy->iujv', dct, blocks, dct, precision=_HIGHEST)
  table = table.astype(np.float32)[None, :, None, :]
  coefficients = jnp.round(coefficients / table) * table
  blocks = jnp.einsum('ux,iujv,vy->ixjy', dct, coefficients, dct, precision=_HIGHEST)
  return jnp.clip(jnp.round(blocks.reshape(h, w) + 128.0), 0.0, 255.0)


def _upsample_matrix(size):
  """`[2·size, size]` libjpeg 'fancy' upsampling: ¾ of the nearer chroma sample, ¼ of the next, edges repeated."""
  out = np.arange(2 * size)
  nearer = out // 2
  further = np.clip(nearer + np.where(out % 2, 1, -1), 0, size - 1)
  matrix = np.zeros((2 * size, size))
  np.add.at(matrix, (out, nearer), 0.75)
  np.add.at(matrix, (out, further), 0.25)
  return matrix


def _jpeg(x, key, params):
  del key
  h, w, c = x.shape
  block = 8 if c == 1 else 16  # a 4:2:0 MCU covers 16×16 pixels
  pixels = jnp.pad(jnp.round(x * 255.0), ((0, -h % block), (0, -w % block), (0, 0)), mode='edge')
  luma_table, chroma_table = _jpeg_table(_JPEG_LUMA, params), _jpeg_table(_JPEG_CHROMA, params)
  if c == 1:
    return _jpeg_plane(pixels[..., 0], luma_table)[:h, :w, None] / 255.0
  ycc = jnp.einsum('hwc,kc->hwk', pixels, _RGB_TO_YCC.astype(np.float32), precision=_HIGHEST)
  ycc = jnp.clip(jnp.round(ycc + np.array([0.0, 128.0, 128.0], np.float32)), 0.0, 255.0)
  ph, pw = pixels.shape[:2]
  down = _separable(ycc[..., 1:], np.kron(np.eye(ph // 2), [[0.5, 0.5]]), np.kron(np.eye(pw // 2), [[0.5, 0.5]]))
  chroma = jnp.stack([_jpeg_plane(jnp.round(down[..., k]), chroma_table) for k in (0, 1)], axis=-1)
  chroma = jnp.round(_separable(chroma, _upsample_matrix(ph // 2), _upsample_matrix(pw // 2)))
  ycc = jnp.concatenate([_jpeg_plane(ycc[..., 0], luma_table)[..., None], chroma - 128.0], axis=-1)
  rgb = jnp.einsum('hwk,ck->hwc', ycc, _YCC_TO_RGB.astype(np.float32), precision=_HIGHEST)
  return jnp.clip(jnp.round(rgb), 0.0, 255.0)[:h, :w] / 255.0


# Elastic.

def _elastic(x, key, params):
  h, w = x.shape[:2]
  uniforms = _draw(jax.random.uniform, key, (6 + 2 * h * w,), minval=-1.0, maxval=1.0)
  return _elastic_given(x, uniforms[:6].reshape(3, 2), uniforms[6:].reshape(2, h, w), params)


def _elastic_given(x, jitter, fields, params):
  """Elastic transform given U(−1, 1) draws: control-point jitter `[3, 2]` (x, y), fields `[2, H, W]` (dx, dy)."""
  alpha, sigma, affine = (_ELASTIC_SCALE * p for p in params)
  h, w = x.shape[:2]
  half = min(h, w) // 3
  source = np.array([[w // 2 + half, h // 2 + half], [w // 2 + half, h // 2 - half],
                     [w // 2 - half, h // 2 - half]], np.float32)
  target = source + affine * jitter
  # cv2.warpAffine fills each output pixel from the point of the source triangle with the same
  # barycentric coordinates in the target triangle.
  rows, cols = jnp.mgrid[:h, :w].astype(jnp.float32)
  edge1, edge2 = target[1] - target[0], target[2] - target[0]
  u, v = cols - target[0, 0], rows - target[0, 1]
  det = edge1[0] * edge2[1] - edge1[1] * edge2[0]
  a, b = (u * edge2[1] - v * edge2[0]) / det, (v * edge1[0] - u * edge1[1]) / det  # Cramer's rule
  mapped = source[0] + a[..., None] * (source[1] - source[0]) + b[..., None] * (source[2] - source[0])
  x = _bilinear(x, mapped[..., 1], mapped[..., 0], 'mirror')
  dx, dy = (_gaussian_filter(f[..., None], sigma, 'reflect', truncate=3.0)[..., 0] * alpha for f in fields)
  return _bilinear(x, rows + dy, cols + dx, 'reflect')


# Spatter.

def _spatter(x, key, params):
  loc, scale = params[:2]
  return _spatter_given(x, loc + scale * _draw(jax.random.normal, key, x.shape[:2]), params)


def _spatter_given(x, layer, params):
  """Spatter with the raw liquid layer `[H, W]` (before its blur)."""
  _, _, sigma, threshold, intensity, mud = params
  layer = _gaussian_filter(layer[..., None], sigma)[..., 0]
  layer = jnp.where(layer < threshold, 0.0, layer)
  if mud:
    mask = _gaussian_filter((layer > threshold).astype(jnp.float32)[..., None], intensity)
    mask = jnp.where(mask < 0.8, 0.0, mask)
    return x * (1 - mask) + mask * _MUD.astype(np.float32)
  level = jnp.floor(jnp.clip(layer, 0.0, 1.0) * 255.0)
  drops = level * _liquid_shading(level)
  peak = jnp.max(drops)
  drops = jnp.where(peak > 0, drops / jnp.where(peak > 0, peak, 1.0), 0.0) * intensity
  return x + drops[..., None] * _WATER.astype(np.float32)


def _liquid_shading(level):
  """The script's OpenCV chain on the 8-bit layer `[H, W]`: 8-bit shading `[H, W]` of the drops."""
  distance = _chamfer_distance(_canny(level, 50, 150))
  distance = jnp.floor(_correlate2d(distance, np.ones((3, 3)), 'mirror') / 9)  # blur → uint8
  shading = _equalize_histogram(distance, int(_CHAMFER_CAP) + 1)
  shading = jnp.clip(_correlate2d(shading, _EMBOSS, 'mirror'), 0.0, 255.0)  # filter2D to CV_8U
  return jnp.round(_correlate2d(shading, np.ones((3, 3)), 'mirror') / 9)  # 8-bit blur


def _canny(image, low, high):
  """OpenCV's Canny (3×3 Sobel with repeated edges, L1 magnitude) of an 8-bit image `[H, W]`: bool mask."""
  gx = _correlate2d(image, _SOBEL_X, 'nearest').astype(jnp.int32)
  gy = _correlate2d(image, _SOBEL_X.T, 'nearest').astype(jnp.int32)
  ax, ay = jnp.abs(gx), jnp.abs(gy)
  magnitude = ax + ay
  m = jnp.pad(magnitude, 1)  # zero magnitude beyond the border
  h, w = image.shape
  at = lambda dy, dx: m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
  # Gradient direction in four sectors by OpenCV's fixed-point tangent tests; the strict/non-strict
  # comparisons are OpenCV's.
  tan22 = ax * _CANNY_TAN_22
  steep = ay * (1 << 15)
  same_sign = (gx ^ gy) >= 0
  diagonal = jnp.where(same_sign, (magnitude > at(-1, -1)) & (magnitude > at(1, 1)),
                       (magnitude > at(-1, 1)) & (magnitude > at(1, -1)))
  maximum = jnp.where(steep < tan22, (magnitude > at(0, -1)) & (magnitude >= at(0, 1)),
                      jnp.where(steep > tan22 + ax * (1 << 16), (magnitude > at(-1, 0)) & (magnitude >= at(1, 0)),
                                diagonal))
  candidate = maximum & (magnitude > low)

  def grow(state):
    edges, _ = state
    padded = jnp.pad(edges, 1)
    near = functools.reduce(jnp.logical_or, [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    grown = candidate & near
    return grown, jnp.any(grown != edges)

  # Hysteresis: weak maxima join the edges through 8-connected chains from strong ones.
  edges, _ = lax.while_loop(lambda state: state[1], grow, (candidate & (magnitude > high), True))
  return edges


def _chamfer_distance(edges):
  """OpenCV's 5×5 chamfer distance (DIST_L2, mask 5) of every pixel to the nearest edge pixel, capped."""
  h, w = edges.shape
  distance = jnp.where(edges, 0.0, _CHAMFER_CAP)

  def relax(_, distance):
    padded = jnp.pad(distance, 2, constant_values=_CHAMFER_CAP)
    for dy, dx, cost in _CHAMFER_STEPS:
      distance = jnp.minimum(distance, padded[2 + dy:2 + dy + h, 2 + dx:2 + dx + w] + cost)
    return distance

  # Every step costs at least 1, so paths to distances below the cap have fewer steps than the cap.
  return lax.fori_loop(0, int(_CHAMFER_CAP), relax, distance)


def _equalize_histogram(image, levels):
  """OpenCV's equalizeHist of an 8-bit image `[H, W]` whose values lie in [0, levels)."""
  counts = jnp.sum(image.reshape(-1, 1) == jnp.arange(levels), axis=0)
  first = counts[jnp.argmax(counts > 0)]
  scale = jnp.float32(255.0) / jnp.maximum(image.size - first, 1).astype(jnp.float32)
  table = jnp.round((jnp.cumsum(counts) - first).astype(jnp.float32) * scale)
  table = jnp.where(first == image.size, jnp.arange(levels, dtype=jnp.float32), table)  # constant image
  return table[image.astype(jnp.int32)]


_REGISTRY = {
    'gaussian_noise': _Corruption(_gaussian_noise, _GAUSSIAN_NOISE),
    'shot_noise': _Corruption(_shot_noise, _SHOT_NOISE),
    'impulse_noise': _Corruption(_impulse_noise, _IMPULSE_NOISE),
    'speckle_noise': _Corruption(_speckle_noise, _SPECKLE_NOISE),
    'gaussian_blur': _Corruption(_gaussian_blur, _GAUSSIAN_BLUR),
    'frosted_glass_blur': _Corruption(_glass_blur, _GLASS_BLUR),
    'defocus_blur': _Corruption(_defocus_blur, _DEFOCUS_BLUR),
    'motion_blur': _Corruption(_motion_blur, _MOTION_BLUR),
    'zoom_blur': _Corruption(_zoom_blur, _ZOOM_BLUR),
    'snow': _Corruption(_snow, _SNOW),
    'fog': _Corruption(_fog, _FOG),
    'brightness': _Corruption(_brightness, _BRIGHTNESS, colour=True),
    'contrast': _Corruption(_contrast, _CONTRAST),
    'saturate': _Corruption(_saturate, _SATURATE, colour=True),
    'jpeg_compression': _Corruption(_jpeg, _JPEG_QUALITY),
    'pixelate': _Corruption(_pixelate, _PIXELATE),
    'elastic': _Corruption(_elastic, _ELASTIC),
    'spatter': _Corruption(_spatter, _SPATTER, colour=True),
}
