"""Classifier = backbone → global average pooling → logit head.

The head decides the method family: 'dense' (affine logits: softmax, OvA, outlier exposure,
energy), 'distance' (IsoMax / distance-OvA, `ood_jax.layers.DistanceLogits`) or 'mahalanobis'
(ICE, `ood_jax.layers.MahalanobisLogits`) or 'projection' (SupCon / ReweightOOD: the
`ood_jax.layers.ProjectionHead` MLP to 128-d unit embeddings, returned in place of logits), or one of
the heads of OpenOOD's training baselines, 't2fnorm', 'confidence', 'godin' and 'rotation'
(`ood_jax.layers.FeatureNormDense`, `ConfidenceBranch`, `GodinHead`, `RotationHead`). Heads with a memory
of past batches in 'batch_stats': 'virtual_outlier' (VOS), 'npos' and 'prototype_projection' (CIDER)
(`ood_jax.layers.synthesis`). Any other Linen module mapping
`[B, D]` features to `[B, K]` logits can be passed instead of a name. A head whose `__call__` takes
`train` gets the classifier's: those heads compute something else in training (normalised features,
a confidence output, quotient logits) than at inference. The head's parameters live under 'head', so
the class activation map of SMOT for a dense head is
`feature_map @ params['params']['head']['kernel'][:, y]`.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax import layers

# name → factory(num_classes, feature_dim, **head_kwargs): the projection head's width follows the
# features (SupCon); head_kwargs are the method's head hyperparameters (`Method.head_hparams`).
_HEAD_MODULES = {
    'dense': lambda k, d: nn.Dense(k, name='head'),
    'distance': lambda k, d: layers.DistanceLogits(k, name='head'),
    'mahalanobis': lambda k, d: layers.MahalanobisLogits(k, name='head'),
    'projection': lambda k, d: layers.ProjectionHead(hidden_dim=d, output_dim=128, name='head'),
    't2fnorm': lambda k, d, **kw: layers.FeatureNormDense(k, name='head', **kw),
    'confidence': lambda k, d, **kw: layers.ConfidenceBranch(k, name='head', **kw),
    'godin': lambda k, d: layers.GodinHead(k, name='head'),
    'rotation': lambda k, d: layers.RotationHead(k, name='head'),
    'virtual_outlier': lambda k, d, **kw: layers.VirtualOutlierHead(k, name='head', **kw),
    'npos': lambda k, d, **kw: layers.NPOSHead(k, name='head', **kw),
    'prototype_projection': lambda k, d: layers.PrototypeProjectionHead(k, name='head'),
}
HEADS = tuple(_HEAD_MODULES)


def _takes_train(head: nn.Module) -> bool:
  return 'train' in inspect.signature(type(head).__call__).parameters


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
    head_kwargs: `((name, value), ...)` keyword arguments of a named head (e.g. T2FNorm's temperature).

  Raises:
    ValueError: on construction, for a head name outside `HEADS` or num_classes < 1.
  """

  backbone: nn.Module
  head: str | nn.Module
  num_classes: int
  head_kwargs: tuple = ()  # pairs, not a dict: the module must stay hashable (inference caches by model)

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
      head = _HEAD_MODULES[self.head](self.num_classes, features.shape[-1], **dict(self.head_kwargs))
    else:
      head = self.head
    logits = head(features, train=train) if _takes_train(head) else head(features)
    if return_feature_map:
      return logits, features, feature_map
    return logits, features
