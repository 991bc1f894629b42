"""The streamed input path: sources from OpenOOD lists and TFDS (mocked), strided chunks, host decoding, devices.

`write_imagenet_release` builds a miniature of OpenOOD v1.5's ImageNet release (its list files and folder
layout, tiny PNGs of varying size); tests/trainer/test_streamed_evaluation.py evaluates on it.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import protocols
from ood_jax.trainer.data import sources
from ood_jax.trainer.data import stream

# Rows per list of the miniature release: the training list spans several chunks of 8.
SIZES = {'imagenet200/train_imagenet200': 40, 'imagenet200/val_imagenet200': 12, 'imagenet200/test_imagenet200': 20,
         'imagenet200/val_openimage_o': 8, 'imagenet/test_ssb_hard': 10, 'imagenet/test_ninco': 10,
         'imagenet/test_inaturalist': 10, 'imagenet/test_textures': 10, 'imagenet/test_openimage_o': 10}
NUM_LABELS = 4  # the miniature's classes (of ImageNet-200's 200)


def write_imagenet_release(root, sizes=None) -> dict[str, list[tuple[str, int]]]:
  """OpenOOD's layout under root/openood: benchmark_imglist/<dataset>/<list>.txt and the images they name.

  In-distribution images are a class colour plus noise, OOD images stripes; sizes vary (18–30 pixels a
  side, portrait and landscape), so the resize-and-crop path is exercised. Returns {list: [(path, label)]}.
  """
  rng = np.random.default_rng(0)
  written = {}
  for list_name, count in (sizes or SIZES).items():
    dataset, _, listed = list_name.partition('/')
    images = root / 'openood' / catalog.openood_images(list_name)
    in_distribution = dataset == 'imagenet200' and 'openimage' not in listed
    lines = []
    for i in range(count):
      height, width = (int(v) for v in rng.integers(18, 31, 2))
      label = i % NUM_LABELS if in_distribution else -1
      if in_distribution:
        colour = np.array([60 * label, 255 - 60 * label, 128])
        pixels = colour + rng.normal(0, 20, (height, width, 3))
      else:
        stripes = np.where((np.arange(width) // (2 + i % 3)) % 2, 220, 30)[None, :, None]
        pixels = stripes + rng.normal(0, 20, (height, 1, 3))
      relative = f'{listed}/img_{i:03d}.png'
      (images / listed).mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(images / relative)
      lines.append((relative, label))
    imglist = root / 'openood' / 'benchmark_imglist' / dataset
    imglist.mkdir(parents=True, exist_ok=True)
    (imglist / f'{listed}.txt').write_text(''.join(f'{p} {y}\n' for p, y in lines))
    written[list_name] = lines
  return written


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp('benchmark')
  return root, write_imagenet_release(root)


def test_chunks_are_strided_disjoint_and_cover_every_row():
  shares = [stream.chunks(45, 8, process_index=p, process_count=2) for p in range(2)]
  assert [c.index for c in shares[0]] == [0, 2, 4] and [c.index for c in shares[1]] == [1, 3, 5]
  rows = sorted(r for share in shares for c in share for r in range(c.start, c.stop))
  assert rows == list(range(45))  # every row once, in whole chunks; the last chunk is short
  assert shares[1][-1] == stream.Chunk(5, 40, 45)
  assert stream.chunks(45, 8) == stream.chunks(45, 8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='process_index must lie in'):
    stream.chunks(45, 8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='chunk_size'):
    stream.chunks(45, 0)


def test_list_source_reads_its_chunk_labelled_decoded_and_cropped(release):
  root, written = release
  source = stream.open_source('openood:imagenet200/train_imagenet200', labelled=True, benchmark_dir=root)
  assert source.num_examples == 40 and source.labelled
  chunk = stream.chunks(40, 8, process_index=1, process_count=2)[1]  # chunk 3: rows 24–31
  batches = list(stream.host_batches(source, chunk, batch_size=3, image_size=(16, 16), resize=18))
  assert [len(b['label']) for b in batches] == [3, 3, 2]  # batches never cross the chunk's end
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels, [y for _, y in written['imagenet200/train_imagenet200'][24:32]])
  images = np.concatenate([b['image'] for b in batches])
  assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 3)
  # Reference for one image: Pillow, shorter side to 18 (the longer int(18·long/short)), centre crop 16.
  path = root / 'openood' / 'images_largescale' / written['imagenet200/train_imagenet200'][24][0]
  with Image.open(path) as image:
    width, height = image.size
    scale = 18 / min(width, height)
    size = (18, int(height * scale)) if width <= height else (int(width * scale), 18)
    resized = np.asarray(image.convert('RGB').resize(size, Image.BILINEAR), np.float64)
  top, left = (resized.shape[0] - 16) // 2, (resized.shape[1] - 16) // 2
  expected = resized[top:top + 16, left:left + 16]
  # TF's antialiased bilinear and Pillow's filter differ by rounding at a few pixels (both triangle kernels).
  assert np.abs(images[0] - expected).mean() < 2.0


def test_ood_lists_are_unlabelled_and_textures_come_from_images_classic(release):
  root, _ = release
  source = stream.open_source('openood:imagenet/test_textures', labelled=False, benchmark_dir=root)
  assert source.num_examples == 10 and not source.labelled
  batch = next(stream.host_batches(source, stream.Chunk(0, 0, 4), batch_size=4, image_size=(16, 16), resize=None))
  assert batch['image'].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(batch['label'], [sources.OUTLIER_LABEL] * 4)
  assert catalog.openood_images('imagenet/test_textures') == 'images_classic'
  assert catalog.openood_images('imagenet200/test_imagenet200') == 'images_largescale'
  with pytest.raises(ValueError, match='must give every image a label >= 0'):  # OOD lists label -1
    stream.open_source('openood:imagenet/test_ssb_hard', labelled=True, benchmark_dir=root)


def test_missing_sets_are_reported_together_with_how_to_prepare_them(tmp_path):
  plan = protocols.get('openood_v1_5', 'imagenet200')
  with pytest.raises(sources.DatasetNotFoundError) as err:
    stream.check_sources(plan.in_distribution.sets + plan.test_sets + plan.validation, benchmark_dir=tmp_path)
  message = str(err.value)
  assert message.startswith('9 data set(s)')
  assert '--datasets imagenet-200 imagenet-1k' in message and 'ILSVRC2012_img_train.tar' in message
  assert str(tmp_path / 'openood' / 'images_classic') in message  # Textures
  with pytest.raises(ValueError, match='Cannot stream set'):
    stream.open_source('cifar10', labelled=True)


def test_imagenet_1k_streams_from_tfds_under_mock_data(release):
  root, _ = release
  plan = protocols.get('openood_v1_5', 'imagenet')
  assert plan.large and plan.in_distribution.num_classes == 1000
  assert plan.near == ('openood:imagenet/test_ssb_hard', 'openood:imagenet/test_ninco')
  assert plan.validation == ('openood:imagenet/val_openimage_o',)
  with tfds.testing.mock_data(num_examples=12):
    stream.check_sources(plan.in_distribution.sets, benchmark_dir=root)
    whole = stream.open_source('tfds:imagenet2012/validation', labelled=True)
    tail = stream.open_source('tfds:imagenet2012/validation[5:]', labelled=True)
    assert (whole.num_examples, tail.num_examples) == (12, 7)
    read = lambda source, chunk: np.concatenate(
        [b['label'] for b in stream.host_batches(source, chunk, batch_size=4, image_size=(16, 16), resize=20)])
    labels = read(whole, stream.Chunk(0, 0, 12))
    np.testing.assert_array_equal(read(tail, stream.Chunk(1, 4, 7)), labels[9:12])  # rows 5 + [4, 7)
    assert labels.max() < 1000
    with pytest.raises(ValueError, match='selects no rows'):
      stream.open_source('tfds:imagenet2012/validation[20:]', labelled=True)


def test_device_batches_are_padded_masked_and_split_over_local_devices():
  host = [{'image': np.full((8, 2, 2, 3), i, np.uint8), 'label': np.arange(8, dtype=np.int32)} for i in range(2)]
  host.append({'image': np.full((3, 2, 2, 3), 9, np.uint8), 'label': np.arange(3, dtype=np.int32)})
  out = list(stream.prefetch_to_devices(iter(host), batch_size=8))
  assert len(out) == 3 and [int(b['mask'].sum()) for b in out] == [8, 8, 3]
  last = out[-1]['image']
  assert len(last.sharding.device_set) == len(jax.local_devices())  # 8 CPU devices in the tests, 1 row each
  np.testing.assert_array_equal(np.asarray(last)[:3], 9)
  np.testing.assert_array_equal(np.asarray(last)[3:], 0)
  with pytest.raises(ValueError, match='more than batch_size'):
    list(stream.prefetch_to_devices(iter(host), batch_size=4))
