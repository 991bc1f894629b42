"""Backbones and the `Classifier(backbone, head)` wrapper of ood_jax.

Backbones map `[B, H, W, C]` float images to the feature map before global pooling (the MLP maps
vectors to features) and are called as `backbone(x, train=...)`; `Classifier` pools and applies a
logit head. Build them by name:

  model = make_classifier('resnet18', 'distance', num_classes=10, dtype=jnp.bfloat16)
  variables = model.init(rng, images, train=False)
  logits, features = model.apply(variables, images)
"""

from ood_jax.models.classifier import Classifier
from ood_jax.models.classifier import HEADS
from ood_jax.models.densenet import DenseNet
from ood_jax.models.registry import BACKBONES
from ood_jax.models.registry import get_backbone
from ood_jax.models.registry import make_classifier
from ood_jax.models.resnet import ResNet
from ood_jax.models.small import DigitsCNN
from ood_jax.models.small import MLP
from ood_jax.models.wide_resnet import WideResNet

__all__ = [
    'BACKBONES',
    'Classifier',
    'DenseNet',
    'DigitsCNN',
    'HEADS',
    'MLP',
    'ResNet',
    'WideResNet',
    'get_backbone',
    'make_classifier',
]
