"""ood_jax: out-of-distribution detection and calibration under dataset shift, in JAX/Flax.

Import the pieces into your own Flax project:

  import ood_jax
  from ood_jax import layers, layers_nnx, losses, scores, detectors, metrics, calibration

The library core, which needs only jax, flax, optax, chex and numpy (`pip install ood_jax`):
`layers` logit layers (pure functions and Linen modules; NNX twins in `layers_nnx`), `losses`
per-example losses of every method, `scores` the methods' logit scores (higher = more
in-distribution), `detectors` post-hoc OOD detectors for any Flax model, `metrics` detection and
calibration metrics, `calibration` post-hoc calibrators, `corruptions` CIFAR-C corruptions,
`evaluation` tuning and results tables, `models` backbones and the `Classifier`, `methods` the
training methods.

Two parts need extras and are imported on demand: the trainer wing `ood_jax.trainer` (configs, the
training loop, checkpoints, TFDS data: `pip install 'ood_jax[train]'`, in Colab `ood_jax[colab]`) and
the figures `ood_jax.plots` (`ood_jax[plots]`). Importing either without its extra raises
ModuleNotFoundError naming it. docs/architecture.md maps every module.
"""

from ood_jax import calibration
from ood_jax import corruptions
from ood_jax import detectors
from ood_jax import evaluation
from ood_jax import layers
from ood_jax import layers_nnx
from ood_jax import losses
from ood_jax import methods
from ood_jax import metrics
from ood_jax import models
from ood_jax import scores

__version__ = '0.2.0'
__all__ = ['calibration', 'corruptions', 'detectors', 'evaluation', 'layers', 'layers_nnx', 'losses', 'methods',
           'metrics', 'models', 'scores']
