"""ood_jax: out-of-distribution detection and calibration under dataset shift, in JAX/Flax.

Import the pieces into your own Flax project:

  from ood_jax import layers, losses, scores, metrics

`layers` holds logit layers (pure functions, Linen modules; NNX twins in `ood_jax.layers.nnx`),
`losses` per-example losses of every method, `scores` post-hoc OOD scores (higher = more
in-distribution), `metrics` detection and calibration metrics.
"""

from ood_jax import layers
from ood_jax import losses
from ood_jax import metrics
from ood_jax import scores

__version__ = '0.1.0'
__all__ = ['layers', 'losses', 'metrics', 'scores']
