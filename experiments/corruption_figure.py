r"""The corruption grid: every corruption at every severity on one photograph.

  python -m experiments.corruption_figure [--output=docs/corruptions.png --scale=4 --seed=0]

The image is scikit-learn's sample photo china.jpg (the temple), its central 427×427 square reduced
to 32×32 with Pillow's BOX filter: the size every corruption parameter is defined for. Rows are the
19 corruptions of `ood_jax.corruptions.CORRUPTIONS` (the 15 benchmark ones, then the 4 extras),
columns the clean image and severities 1–5; each 32×32 tile is enlarged `scale` times with nearest
neighbour so single pixels stay visible. Composed with Pillow; takes about 30 s on a 2-core CPU,
mostly compilation.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw
from sklearn import datasets as sk_datasets

from ood_jax import corruptions


SIZE = 32
GAP = 4  # pixels between tiles
LABEL_WIDTH = 130
HEADER_HEIGHT = 20
INK = (0, 0, 0)
PAPER = (255, 255, 255)


def sample_image(size: int = SIZE) -> np.ndarray:
  """uint8 `[size, size, 3]`: china.jpg's central square reduced with Pillow's BOX filter."""
  photo = Image.fromarray(sk_datasets.load_sample_images().images[0])
  width, height = photo.size
  left = (width - height) // 2
  return np.asarray(photo.crop((left, 0, left + height, height)).resize((size, size), Image.BOX))


def corruption_tiles(image: np.ndarray, seed: int) -> np.ndarray:
  """uint8 `[19, 6, H, W, 3]`: per corruption the clean image, then severities 1..5."""
  key = jax.random.key(seed)
  rows = []
  for name in corruptions.CORRUPTIONS:

    def severities(images, name=name):  # one compilation per corruption, not per severity
      return jnp.stack([corruptions.corrupt(images, name, s, key)[0] for s in corruptions.SEVERITIES])

    rows.append(np.concatenate([image[None], np.asarray(jax.jit(severities)(image[None]))]))
  return np.stack(rows)


def compose(tiles: np.ndarray, scale: int) -> Image.Image:
  """The labelled grid of `tiles` `[rows, cols, H, W, 3]`, each enlarged `scale` times."""
  num_rows, num_cols, height, width, _ = tiles.shape
  tile_h, tile_w = height * scale, width * scale
  canvas = Image.new('RGB', (LABEL_WIDTH + num_cols * (tile_w + GAP), HEADER_HEIGHT + num_rows * (tile_h + GAP)),
                     PAPER)
  draw = ImageDraw.Draw(canvas)
  for col, title in enumerate(['clean', *(f'severity {s}' for s in corruptions.SEVERITIES)]):
    draw.text((LABEL_WIDTH + col * (tile_w + GAP) + tile_w // 2, HEADER_HEIGHT // 2), title, fill=INK, anchor='mm')
  for row, name in enumerate(corruptions.CORRUPTIONS):
    top = HEADER_HEIGHT + row * (tile_h + GAP)
    draw.text((LABEL_WIDTH - 8, top + tile_h // 2), name, fill=INK, anchor='rm')
    for col in range(num_cols):
      tile = Image.fromarray(tiles[row, col]).resize((tile_w, tile_h), Image.NEAREST)
      canvas.paste(tile, (LABEL_WIDTH + col * (tile_w + GAP), top))
  return canvas


def main(argv):
  del argv
  figure = compose(corruption_tiles(sample_image(), flags.FLAGS.seed), flags.FLAGS.scale)
  os.makedirs(os.path.dirname(flags.FLAGS.output) or '.', exist_ok=True)
  figure.save(flags.FLAGS.output)
  print(f'Wrote {flags.FLAGS.output} ({figure.size[0]}×{figure.size[1]}).')


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_string('output', 'docs/corruptions.png', 'PNG file to write.')
  flags.DEFINE_integer('scale', 4, 'Nearest-neighbour enlargement of each 32×32 tile.', lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Seed of the corruption key.')
  app.run(main)
