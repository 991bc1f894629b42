"""ood_jax: out-of-distribution detection and calibration under dataset shift, in JAX/Flax.

Import the pieces into your own Flax project:

  from ood_jax import layers, losses, scores, metrics

`layers` holds logit layers (pure functions, Linen modules; NNX twins in `ood_jax.layers_nnx`),
`losses` per-example losses of every method, `scores` post-hoc OOD scores (higher = more
in-distribution), `metrics` detection and calibration metrics, `models` backbones and the
`Classifier`, `methods` the training methods. These need only jax, flax, optax, chex and numpy
(`pip install ood_jax`). The data layer (`ood_jax.data`), the trainer (`ood_jax.train`,
`ood_jax.evaluate` and the modules beside them, mapped in docs/architecture.md) and the figures
(`ood_jax.plots`) are imported on demand and need extras: `pip install 'ood_jax[train]'` (in Colab
`ood_jax[colab]`), `ood_jax[plots]`, `ood_jax[digits]` or `ood_jax[all]`; importing one without its
extra raises ModuleNotFoundError naming it (`ood_jax._extras`).
"""

from ood_jax import _extras
from ood_jax import layers
from ood_jax import losses
from ood_jax import methods
from ood_jax import metrics
from ood_jax import models
from ood_jax import scores

__version__ = '0.1.0'
__all__ = ['layers', 'losses', 'methods', 'metrics', 'models', 'scores']

_extras.install()  # a trainer module imported without its extra names the extra (ood_jax._extras)
