"""experiments.torch_references: the PyTorch twins compute what the flax backbones compute, from the same weights.

PyTorch is an optional peer (not installed by the README's extras, so CI skips this file).
"""

import functools

import jax
import numpy as np
import pytest

from experiments import benchmark_peers
from experiments import torch_references
from ood_jax import models

torch = pytest.importorskip('torch')

CIFAR_BACKBONES = (models.ResNet, models.WideResNet, models.DenseNet)
TWINNED = [name for name, entry in models.BACKBONES.items()
           if isinstance(entry, functools.partial) and entry.func in CIFAR_BACKBONES]


def _pair(name, seed=0):
  model = models.make_classifier(name, 'dense', 10)
  variables = benchmark_peers.init_variables(model, (32, 32, 3), seed=seed)
  twin = torch_references.torch_classifier(torch, name, 10)
  torch_references.load_torch_weights(torch, twin, variables)
  return model, variables, twin


def test_every_cifar_backbone_has_a_twin_with_its_parameter_count():
  assert set(TWINNED) >= {'resnet20', 'resnet18', 'wrn28_10', 'wrn40_2', 'densenet_bc100'}
  assert set(benchmark_peers.TRAIN_BATCH) <= set(TWINNED)
  for name in TWINNED:
    model, variables, twin = _pair(name)  # load_torch_weights matches every tensor by name and shape
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables['params']))
    assert count == sum(p.numel() for p in twin.parameters()), name


@pytest.mark.parametrize('name', ['wrn40_2', 'densenet_bc100'])
def test_eval_and_train_logits_agree(name):
  model, variables, twin = _pair(name, seed=1)
  images = np.random.default_rng(2).standard_normal((4, 32, 32, 3), np.float32)
  torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

  @jax.jit
  def logits(variables, images):
    eval_logits = model.apply(variables, images, train=False)[0]
    (train_logits, _), _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return eval_logits, train_logits

  eval_logits, train_logits = logits(variables, images)
  with torch.no_grad():
    twin.eval()
    torch_eval = twin(torch_images).numpy()
    twin.train()  # batch statistics, as flax's train=True
    torch_train = twin(torch_images).numpy()
  for ours, theirs in ((eval_logits, torch_eval), (train_logits, torch_train)):
    ours = np.asarray(ours)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max(), name
  assert np.abs(torch_eval - torch_train).max() > 1e-3  # the two modes differ, so both were checked


def test_mismatched_architectures_and_unknown_backbones_are_errors():
  _, variables, _ = _pair('resnet20')
  with pytest.raises(ValueError, match='no PyTorch counterpart'):
    torch_references.load_torch_weights(torch, torch_references.torch_classifier(torch, 'wrn40_2', 10), variables)
  with pytest.raises(ValueError, match='without a flax counterpart'):
    variables = dict(variables, params={**variables['params']})
    del variables['params']['head']
    torch_references.load_torch_weights(torch, torch_references.torch_classifier(torch, 'resnet20', 10), variables)
  with pytest.raises(ValueError, match="no PyTorch reference of backbone 'mlp'.*resnet20"):
    torch_references.torch_classifier(torch, 'mlp', 10)

