"""Data layer: TFDS acquisition into host memory, OOD / shifted / outlier sets, device pipelines.

* `sources`: in-distribution splits (`load_split`), auxiliary outliers (`load_outliers`), the
  `ArrayData` container (uint8 images `[N, H, W, C]`, int32 labels `[N]`) and resizing helpers.
* `ood_sets`: OOD test sets (`load_ood`) and covariate-shifted sets (`load_corrupted`).
* `digits`: the offline benchmark built from scikit-learn's bundled digits and photos.
* `catalog`: every named OOD, corrupted and outlier set a config can ask for, by name.
* `registry`: class counts, image shapes and normalisation statistics (`get_info`).
* `pipeline` / `augment`: the in-memory device pipeline (batch = pure function of (seed, step),
  sharded over the mesh axis 'data') and on-device augmentation.

TensorFlow is imported only when a TFDS dataset is first read, and never sees an accelerator.
"""

from ood_jax.trainer.data import digits
from ood_jax.trainer.data.ood_sets import OOD_SETS
from ood_jax.trainer.data.ood_sets import CorruptFn
from ood_jax.trainer.data.ood_sets import corruption_grid
from ood_jax.trainer.data.ood_sets import load_corrupted
from ood_jax.trainer.data.ood_sets import load_ood
from ood_jax.trainer.data.registry import DATASETS
from ood_jax.trainer.data.registry import DatasetInfo
from ood_jax.trainer.data.registry import get_info
from ood_jax.trainer.data.sources import OUTLIER_LABEL
from ood_jax.trainer.data.sources import ArrayData
from ood_jax.trainer.data.sources import DatasetNotFoundError
from ood_jax.trainer.data.sources import clear_cache
from ood_jax.trainer.data.sources import convert_channels
from ood_jax.trainer.data.sources import load_outliers
from ood_jax.trainer.data.sources import load_split
from ood_jax.trainer.data.sources import read_tfds
from ood_jax.trainer.data.sources import resize_images
from ood_jax.trainer.data import augment
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import pipeline
from ood_jax.trainer.data.pipeline import TrainStream
from ood_jax.trainer.data.pipeline import eval_batches
from ood_jax.trainer.data.pipeline import outlier_stream
