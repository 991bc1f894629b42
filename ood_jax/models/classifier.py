"""Classifier = backbone → global average pooling → logit head.

The head decides the method family: 'dense' (affine logits: softmax, OvA, outlier exposure,
energy), 'distance' (IsoMax / distance-OvA, `ood_jax.layers.DistanceLogits`) or 'mahalanobis'
(ICE, `ood_jax.layers.MahalanobisLogits`) or 'projection' (SupCon / ReweightOOD: the
`ood_jax.layers.ProjectionHead` MLP to 128-d unit embeddings, returned in place of logits). Any
other Linen module mapping `[B, D]` features to
`[B, K]` logits can be passed instead of a name. The head's parameters live under 'head', so the
class activation map of SMOT for a dense head is
`feature_map @ params['params']['head']['kernel'][:, y]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax import layers

# name → factory(num_classes, feature_dim): the projection head's width follows the features (SupCon).
_HEAD_MODULES = {
    'dense': lambda k, d: nn.Dense(k, name='head'),
    'distance': lambda k, d: layers.DistanceLogits(k, name='head'),
    'mahalanobis': lambda k, d: layers.MahalanobisLogits(k, name='head'),
    'projection': lambda k, d: layers.ProjectionHead(hidden_dim=d, output_dim=128, name='head'),
}
HEADS = tuple(_HEAD_MODULES)


def _check_head(head) -> None:
  if isinstance(head, str):
    if head not in _HEAD_MODULES:
      raise ValueError(f'unknown head {head!r}; valid heads: {", ".join(HEADS)}.')
  elif not isinstance(head, nn.Module):
    raise TypeError(f'head must be one of {HEADS} or a flax.linen Module, '
                    f'got {type(head).__name__}.')


class Classifier(nn.Module):
  """Backbone, global average pooling and a logit head.

  Attributes:
    backbone: module called as `backbone(x, train=...)`, returning `[B, h, w, D]` or `[B, D]`.
    head: a name in `HEADS`, or a module mapping `[B, D]` float32 features to `[B, K]` logits.
    num_classes: K; used when `head` is a name.

  Raises:
    ValueError: on construction, for a head name outside `HEADS` or num_classes < 1.
  """

  backbone: nn.Module
  head: str | nn.Module
  num_classes: int

  def __post_init__(self):
    # Checked on construction: at the first init the error would surface far from the config.
    _check_head(self.head)
    _checks.positive_int('num_classes', self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_feature_map: bool = False):
    """Logits and pooled features.

    Args:
      x: inputs of the backbone, e.g. `[B, H, W, C]` float images.
      train: batch statistics and dropout on (needs mutable=['batch_stats'] and a 'dropout' rng
        where the backbone has them).
      return_feature_map: also return the backbone's map before pooling, for class activation maps.

    Returns:
      `(logits [B, K], features [B, D])`, plus `feature_map [B, h, w, D]` (or `[B, D]` for a
      vector backbone) when `return_feature_map`; all float32 whatever the backbone's dtype,
      because the heads compute distances and the losses softmaxes that bfloat16 would coarsen.
    """
    feature_map = self.backbone(x, train=train).astype(jnp.float32)
    if feature_map.ndim == 4:
      features = jnp.mean(feature_map, axis=(1, 2))
    elif feature_map.ndim == 2:
      features = feature_map
    else:
      raise ValueError('the backbone must return a [B, h, w, D] feature map or [B, D] features, '
                       f'got shape {feature_map.shape}.')
    if isinstance(self.head, str):
      head = _HEAD_MODULES[self.head](self.num_classes, features.shape[-1])
    else:
      head = self.head
    logits = head(features)
    if return_feature_map:
      return logits, features, feature_map
    return logits, features
