"""The CIFAR backbones of `ood_jax.models` written again in PyTorch, for `experiments.benchmark_peers`.

Each network has the modules of its flax twin under the same names (`backbone.stage1_block1.conv1`, ...),
so `load_torch_weights` copies a flax variable tree into it by name, and the benchmark's checks (equal
parameter counts, eval logits and first-step losses from the same weights) compare the architectures.
The architecture parameters (depths, widths, growth rate, ...) are read from `ood_jax.models.BACKBONES`,
so the two cannot drift apart. NCHW, as PyTorch's layers expect; torch is imported by the caller (an
optional dependency).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from ood_jax import models


def _layers(torch):
  nn, functional = torch.nn, torch.nn.functional

  def conv(in_channels, features, kernel_size, strides=1):
    # _common.conv: bias-free, symmetric padding of kernel_size // 2.
    return nn.Conv2d(in_channels, features, kernel_size, strides, kernel_size // 2, bias=False)

  def batch_norm(channels):
    return nn.BatchNorm2d(channels)  # eps 1e-5, momentum 0.1 ≙ flax momentum 0.9, as _common.batch_norm

  return nn, functional, conv, batch_norm


def _resnet(torch, stage_sizes, widths):
  nn, functional, conv, batch_norm = _layers(torch)

  class BasicBlock(nn.Module):
    """conv3×3–BN–ReLU–conv3×3–BN, add the identity or a 1×1 conv + BN projection, ReLU."""

    def __init__(self, in_channels, features, strides):
      super().__init__()
      self.conv1, self.bn1 = conv(in_channels, features, 3, strides), batch_norm(features)
      self.conv2, self.bn2 = conv(features, features, 3), batch_norm(features)
      self.project = strides != 1 or in_channels != features
      if self.project:
        self.shortcut_conv, self.shortcut_bn = conv(in_channels, features, 1, strides), batch_norm(features)

    def forward(self, x):
      y = functional.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.project:
        x = self.shortcut_bn(self.shortcut_conv(x))
      return functional.relu(x + y)

  class Backbone(nn.Module):
    """3×3 stem at stride 1 (no max-pool), then stages; the first block of later stages halves the size."""

    def __init__(self):
      super().__init__()
      self.stem_conv, self.stem_bn = conv(3, widths[0], 3), batch_norm(widths[0])
      self.blocks = []
      channels = widths[0]
      for stage, (num_blocks, width) in enumerate(zip(stage_sizes, widths)):
        for block in range(num_blocks):
          self.blocks.append(f'stage{stage + 1}_block{block + 1}')
          self.add_module(self.blocks[-1], BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
          channels = width

    def forward(self, x):
      x = functional.relu(self.stem_bn(self.stem_conv(x)))
      for name in self.blocks:
        x = getattr(self, name)(x)
      return x

  return Backbone(), widths[-1]


def _wide_resnet(torch, depth, width, dropout_rate=0.0):
  nn, functional, conv, batch_norm = _layers(torch)

  class WideBlock(nn.Module):
    """Pre-activation: BN–ReLU–conv3×3–BN–ReLU–(dropout)–conv3×3, plus x or a 1×1 conv of the pre-activation."""

    def __init__(self, in_channels, features, strides):
      super().__init__()
      self.bn1, self.conv1 = batch_norm(in_channels), conv(in_channels, features, 3, strides)
      self.bn2, self.conv2 = batch_norm(features), conv(features, features, 3)
      self.dropout = nn.Dropout(dropout_rate)
      self.project = strides != 1 or in_channels != features
      if self.project:
        self.shortcut_conv = conv(in_channels, features, 1, strides)

    def forward(self, x):
      preact = functional.relu(self.bn1(x))
      shortcut = self.shortcut_conv(preact) if self.project else x
      y = self.dropout(functional.relu(self.bn2(self.conv1(preact))))
      return self.conv2(y) + shortcut

  class Backbone(nn.Module):
    """3×3 stem to 16 channels, three groups of (depth − 4) / 6 blocks, final BN–ReLU."""

    def __init__(self):
      super().__init__()
      self.stem_conv = conv(3, 16, 3)
      self.blocks = []
      channels = 16
      for group, base in enumerate((16, 32, 64)):
        for block in range((depth - 4) // 6):
          self.blocks.append(f'group{group + 1}_block{block + 1}')
          self.add_module(self.blocks[-1], WideBlock(channels, base * width, 2 if group > 0 and block == 0 else 1))
          channels = base * width
      self.final_bn = batch_norm(channels)

    def forward(self, x):
      x = self.stem_conv(x)
      for name in self.blocks:
        x = getattr(self, name)(x)
      return functional.relu(self.final_bn(x))

  return Backbone(), 64 * width


def _densenet(torch, depth, growth_rate, bottleneck, compression):
  nn, functional, conv, batch_norm = _layers(torch)

  class DenseLayer(nn.Module):
    """BN–ReLU–(conv1×1 to 4k–BN–ReLU)–conv3×3 to k; the input with the k new channels appended."""

    def __init__(self, in_channels):
      super().__init__()
      self.bn1 = batch_norm(in_channels)
      channels = in_channels
      if bottleneck:
        self.bottleneck_conv, self.bn2 = conv(in_channels, 4 * growth_rate, 1), batch_norm(4 * growth_rate)
        channels = 4 * growth_rate
      self.conv = conv(channels, growth_rate, 3)

    def forward(self, x):
      y = functional.relu(self.bn1(x))
      if bottleneck:
        y = functional.relu(self.bn2(self.bottleneck_conv(y)))
      return torch.cat([x, self.conv(y)], dim=1)

  class Transition(nn.Module):
    """BN–ReLU–conv1×1–average pool 2×2."""

    def __init__(self, in_channels, features):
      super().__init__()
      self.bn, self.conv = batch_norm(in_channels), conv(in_channels, features, 1)

    def forward(self, x):
      return functional.avg_pool2d(self.conv(functional.relu(self.bn(x))), 2)

  class Backbone(nn.Module):
    """Stem conv, three dense blocks with transitions between them, final BN–ReLU."""

    def __init__(self):
      super().__init__()
      layers_per_block = (depth - 4) // (3 * (2 if bottleneck else 1))
      channels = 2 * growth_rate if bottleneck else 16
      self.stem_conv = conv(3, channels, 3)
      self.parts = []
      for block in range(3):
        for layer in range(layers_per_block):
          self.parts.append(f'block{block + 1}_layer{layer + 1}')
          self.add_module(self.parts[-1], DenseLayer(channels))
          channels += growth_rate
        if block < 2:
          features = int(np.floor(channels * compression))
          self.parts.append(f'transition{block + 1}')
          self.add_module(self.parts[-1], Transition(channels, features))
          channels = features
      self.final_bn = batch_norm(channels)
      self.channels = channels

    def forward(self, x):
      x = self.stem_conv(x)
      for name in self.parts:
        x = getattr(self, name)(x)
      return functional.relu(self.final_bn(x))

  backbone = Backbone()
  return backbone, backbone.channels


_BUILDERS = {models.ResNet: _resnet, models.WideResNet: _wide_resnet, models.DenseNet: _densenet}


def torch_classifier(torch, backbone_name: str, num_classes: int):
  """`models.make_classifier(backbone_name, 'dense', num_classes)` in PyTorch: backbone, mean pooling, linear head.

  Raises:
    ValueError: for a backbone that has no PyTorch twin here (the message lists those that do).
  """
  entry = models.BACKBONES.get(backbone_name)
  builder = _BUILDERS.get(entry.func) if isinstance(entry, functools.partial) else None
  if builder is None:
    valid = [name for name, e in models.BACKBONES.items()
             if isinstance(e, functools.partial) and e.func in _BUILDERS]
    raise ValueError(f'no PyTorch reference of backbone {backbone_name!r}; backbones with one: {", ".join(valid)}.')
  nn = torch.nn

  class Classifier(nn.Module):
    """Backbone, global average pooling, dense head."""

    def __init__(self):
      super().__init__()
      self.backbone, features = builder(torch, **entry.keywords)
      self.head = nn.Linear(features, num_classes)

    def forward(self, x):
      return self.head(self.backbone(x).mean(dim=(2, 3)))

  return Classifier()


def load_torch_weights(torch, torch_model, variables) -> None:
  """Copies flax variables into the PyTorch module of the same names (HWIO → OIHW, (in, out) → (out, in)).

  Raises:
    ValueError: when a PyTorch parameter or buffer has no flax counterpart (an architecture mismatch).
  """
  leaf_names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}
  targets = dict(torch_model.named_parameters())
  targets.update({k: v for k, v in torch_model.named_buffers() if not k.endswith('num_batches_tracked')})
  seen = set()
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]:
      keys = [str(getattr(p, 'key', p)) for p in path]
      target = '.'.join(keys[:-1] + [leaf_names[keys[-1]]])
      if target not in targets:
        raise ValueError(f'flax variable {"/".join(keys)} has no PyTorch counterpart {target}')
      value = np.asarray(leaf)
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2:
        value = value.T
      with torch.no_grad():
        targets[target].copy_(torch.from_numpy(np.array(value, np.float32)))
      seen.add(target)
  missing = set(targets) - seen
  if missing:
    raise ValueError(f'PyTorch tensors without a flax counterpart: {sorted(missing)}')
