"""Backbones and classifiers by name, so configs can stay plain data.

Every entry is a constructor taking keyword overrides (`dtype`, `dropout_rate`, `hidden`, ...);
adding a model is one module or partial and one line here.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from ood_jax.models.classifier import Classifier
from ood_jax.models.densenet import DenseNet
from ood_jax.models.resnet import ResNet
from ood_jax.models.small import DigitsCNN
from ood_jax.models.small import MLP
from ood_jax.models.wide_resnet import WideResNet

BACKBONES = {
    'resnet20': functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64)),
    'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    'resnet34': functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512)),
    'wrn28_10': functools.partial(WideResNet, depth=28, width=10),
    'wrn40_2': functools.partial(WideResNet, depth=40, width=2),
    'wrn34_10': functools.partial(WideResNet, depth=34, width=10),
    'densenet_bc100': functools.partial(DenseNet, depth=100, growth_rate=12, bottleneck=True,
                                        compression=0.5),
    'densenet40_12': functools.partial(DenseNet, depth=40, growth_rate=12, bottleneck=False,
                                       compression=1.0),
    'digits_cnn': DigitsCNN,
    'mlp': MLP,
}


def get_backbone(name: str, **kwargs) -> nn.Module:
  """The backbone registered as `name`, with keyword overrides of its attributes.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  if name not in BACKBONES:
    raise ValueError(f'unknown backbone {name!r}; valid backbones: {", ".join(BACKBONES)}.')
  return BACKBONES[name](**kwargs)


def make_classifier(backbone_name: str, head: str | nn.Module, num_classes: int, *,
                    dtype: jnp.dtype = jnp.float32, head_kwargs=None, **backbone_kwargs) -> Classifier:
  """`Classifier(get_backbone(backbone_name, dtype=dtype, **backbone_kwargs), head, num_classes)`.

  Args:
    backbone_name: a key of `BACKBONES`.
    head: a name in `HEADS` or a Linen module.
    num_classes: K.
    dtype: computation dtype of the backbone; logits and features are float32 regardless.
    head_kwargs: keyword arguments of a named head (e.g. {'temperature': 0.1} for 't2fnorm').
    **backbone_kwargs: attribute overrides, e.g. `dropout_rate=0.3` for a WRN.

  Raises:
    ValueError: for an unknown backbone or head name, or num_classes < 1.
    TypeError: for an attribute the backbone does not have.
  """
  return Classifier(get_backbone(backbone_name, dtype=dtype, **backbone_kwargs), head, num_classes,
                    head_kwargs=tuple(sorted((head_kwargs or {}).items())))
