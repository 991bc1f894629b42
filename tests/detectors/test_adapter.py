"""Tests for ood_jax.detectors.adapter on our Classifier, a user's Linen module and an NNX module."""

from __future__ import annotations

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax import models
from ood_jax.detectors import adapter


class UserCNN(nn.Module):
  """A model written without any ood_jax contract: auto-named conv, a hidden layer, a Dense 'fc'."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(6, name='hidden')(x))
    return nn.Dense(3, name='fc')(x)


class UserNNX(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 6, rngs=rngs)])
    self.fc = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.conv(x)).mean((1, 2))
    return self.fc(nnx.relu(self.blocks[0](y)))


def _images(n=3, c=1):
  return jax.random.normal(jax.random.PRNGKey(1), (n, 8, 8, c))


def test_classifier(random_variables):
  model = models.make_classifier('digits_cnn', 'dense', 10, widths=(8, 16))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
  variables = random_variables(model, x)
  extract = adapter.feature_extractor(model, variables, head='head', maps=('backbone',), train=False)
  out = extract(x)
  logits, features, feature_map = jax.jit(lambda v, x: model.apply(v, x, return_feature_map=True))(variables, x)
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-6)
  np.testing.assert_allclose(out['features'], features, rtol=1e-6)
  np.testing.assert_allclose(out['feature_maps']['backbone'], feature_map, rtol=1e-6)
  kernel, bias = adapter.head_weights(variables, 'head')
  assert kernel.shape == (16, 10) and bias.shape == (10,)
  np.testing.assert_allclose(out['features'] @ kernel + bias, logits, rtol=1e-5, atol=1e-6)


def test_user_linen_module(random_variables):
  model = UserCNN()
  x = _images()
  variables = random_variables(model, x)
  out = adapter.feature_extractor(model, variables, head='fc', maps=('Conv_0', 'hidden'))(x)
  # Reference through Flax's own capture_intermediates, independent of the interceptor.
  logits, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True))(variables, x)
  inter = state['intermediates']
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-6)
  np.testing.assert_allclose(out['features'], nn.relu(inter['hidden']['__call__'][0]), rtol=1e-6)
  np.testing.assert_allclose(out['feature_maps']['Conv_0'], inter['Conv_0']['__call__'][0], rtol=1e-6)
  kernel, bias = adapter.head_weights(variables['params'], 'fc')
  np.testing.assert_allclose(out['features'] @ kernel + bias, logits, rtol=1e-5, atol=1e-6)
  # `features=` picks a submodule's output instead of the head's input (pre-ReLU here).
  pre = adapter.feature_extractor(model, variables, head='fc', features='hidden')(x)
  np.testing.assert_allclose(pre['features'], inter['hidden']['__call__'][0], rtol=1e-6)


def test_nnx_module():
  model = UserNNX(nnx.Rngs(0))
  x = _images()
  out = adapter.feature_extractor(model, head='fc', maps=('conv', 'blocks/0'))(x)
  hidden = nnx.relu(model.blocks[0](nnx.relu(model.conv(x)).mean((1, 2))))
  np.testing.assert_allclose(out['logits'], model(x), rtol=1e-6)
  np.testing.assert_allclose(out['features'], hidden, rtol=1e-6)
  np.testing.assert_allclose(out['feature_maps']['conv'], model.conv(x), rtol=1e-6)
  kernel, bias = adapter.head_weights(model, 'fc')
  np.testing.assert_allclose(out['features'] @ kernel + bias, model(x), rtol=1e-5, atol=1e-6)
  # The user's module is untouched by the extractor.
  assert isinstance(model.fc, nnx.Linear) and isinstance(model.blocks[0], nnx.Linear)


class DropoutNNX(nnx.Module):
  """Dropout and BatchNorm before the head: a module left in train mode must still extract deterministically."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(16, 3, rngs=rngs)

  def features(self, x):
    return self.drop(nnx.relu(self.norm(self.hidden(x.reshape(x.shape[0], -1)))))

  def __call__(self, x):
    return self.fc(self.features(x))


def test_nnx_module_left_in_train_mode_is_extracted_in_eval_mode():
  x = _images(n=6)
  model = DropoutNNX(nnx.Rngs(0))
  model.norm.mean[...] = 0.3  # running averages unlike any batch's statistics, so train mode would differ
  model.norm.var[...] = 2.0
  assert not model.drop.deterministic  # nnx modules start in train mode
  out = adapter.feature_extractor(model, head='fc')(x)
  again = adapter.feature_extractor(model, head='fc')(x)
  assert not model.drop.deterministic and not model.norm.use_running_average  # the user's module keeps its mode
  reference = nnx.clone(model)
  reference.eval()
  np.testing.assert_allclose(out['features'], reference.features(x), rtol=1e-6)
  np.testing.assert_allclose(out['logits'], reference(x), rtol=1e-6)
  np.testing.assert_array_equal(out['features'], again['features'])
  model.eval()
  evaluated = adapter.feature_extractor(model, head='fc')(x)
  np.testing.assert_array_equal(evaluated['features'], out['features'])
  # In train mode the model itself would drop half the units and use batch statistics: not what is extracted.
  model.train()
  assert not np.allclose(model.features(x), out['features'])


def test_errors(random_variables):
  model = UserCNN()
  x = _images()
  variables = random_variables(model, x)
  with pytest.raises(ValueError, match="'head' was never called"):
    adapter.feature_extractor(model, variables)(x)
  with pytest.raises(ValueError, match='never called'):
    adapter.feature_extractor(model, variables, head='fc', maps=('nope',))(x)
  with pytest.raises(ValueError, match=r"available: \['Conv_0', 'fc', 'hidden'\]"):
    adapter.head_weights(variables, 'head')
  with pytest.raises(ValueError, match='2-D kernel'):
    adapter.head_weights(variables, 'Conv_0')
  with pytest.raises(ValueError, match='variables'):
    adapter.feature_extractor(model)
  nnx_model = UserNNX(nnx.Rngs(0))
  with pytest.raises(ValueError, match='variables=None'):
    adapter.feature_extractor(nnx_model, variables)
  with pytest.raises(ValueError, match='no submodule'):
    adapter.feature_extractor(nnx_model, head='missing')(x)
  with pytest.raises(ValueError, match='no submodule'):
    adapter.head_weights(nnx_model, 'blocks/5')
  with pytest.raises(TypeError, match='Module'):
    adapter.feature_extractor(lambda v: v, {})
