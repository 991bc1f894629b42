"""NNX twins of the logit layers, under a name that does not shadow `flax.nnx`.

  from flax import nnx
  from ood_jax import layers_nnx

  head = layers_nnx.DistanceLogits(256, 10, rngs=nnx.Rngs(0))  # in_features, out_features

`DistanceLogits`, `MahalanobisLogits` (with `.cholesky()`) and `ProjectionHead`: the same classes as
`ood_jax.layers.nnx`, their older home, which stays importable. The name is the one the project's design notes give the
twins (a `layers_nnx` module beside `layers`), and it sorts next to `layers` in an import block.
"""

from ood_jax.layers.nnx import DistanceLogits
from ood_jax.layers.nnx import MahalanobisLogits
from ood_jax.layers.nnx import ProjectionHead

__all__ = ['DistanceLogits', 'MahalanobisLogits', 'ProjectionHead']
