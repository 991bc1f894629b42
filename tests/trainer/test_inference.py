"""The inference loop: every row once, in order, padded batches masked out, one compilation per model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax.trainer import inference
from ood_jax import layers
from ood_jax import models
from ood_jax.trainer import sharding


class _TinyModel(nn.Module):
  """Stands in for a Classifier with a projection head: (unit embeddings, features)."""

  @nn.compact
  def __call__(self, x):
    features = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
    return layers.l2_normalize(nn.Dense(3)(features)), features


@pytest.mark.parametrize('with_labels', [True, False])
def test_run_returns_every_row_once_in_order(with_labels):
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  num = 21  # Not divisible by the batch size: the last batch carries 3 padded rows.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(num, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, size=num) if with_labels else None
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  model = _TinyModel()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))

  out = inference.run(model.apply, variables, images, labels, mesh=mesh, batch_size=8, mean=mean, std=std,
                      names=('embeddings', 'features'))

  inputs = (images.astype(np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  want_embeddings, want_features = model.apply(variables, inputs)
  assert set(out) == ({'embeddings', 'features', 'labels'} if with_labels else {'embeddings', 'features'})
  assert out['features'].shape == (num, 6) and out['features'].dtype == np.float32
  assert out['embeddings'].shape == (num, 3) and out['embeddings'].dtype == np.float32
  np.testing.assert_allclose(out['features'], want_features, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['embeddings'], want_embeddings, rtol=1e-5, atol=1e-5)
  if with_labels:
    np.testing.assert_array_equal(out['labels'], labels)


def test_run_rejects_an_apply_fn_without_one_output_per_name():
  images = np.zeros((8, 2, 2, 1), np.uint8)
  with pytest.raises(TypeError, match=r'\(embeddings \[B, ·\], features \[B, ·\]\)'):
    inference.run(lambda v, x: x.reshape(x.shape[0], -1), {}, images, mesh=sharding.make_mesh(),
                  batch_size=8, mean=(0.0,), std=(1.0,), names=('embeddings', 'features'))


def test_one_compilation_per_model_and_mesh():
  """Every evaluated set (CIFAR-10-C alone has 75) reuses one compiled program per model."""
  model = models.make_classifier('mlp', 'dense', 3, hidden=(4,))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
  mesh = sharding.make_mesh()
  assert inference.model_apply(model) is inference.model_apply(models.make_classifier('mlp', 'dense', 3, hidden=(4,)))
  images = np.zeros((20, 2, 2, 1), np.uint8)
  inference.run(inference.model_apply(model), variables, images, mesh=mesh, batch_size=8, mean=(0.0,), std=(1.0,))
  compiled = inference._compiled(inference.model_apply(model), mesh)  # pylint: disable=protected-access
  before = compiled._cache_size()  # pylint: disable=protected-access
  out = inference.run(inference.model_apply(model), variables, images[:11], mesh=mesh, batch_size=8, mean=(0.0,),
                      std=(1.0,))
  assert compiled._cache_size() == before == 1  # pylint: disable=protected-access
  assert out['logits'].shape == (11, 3) and out['features'].shape == (11, 4) and 'labels' not in out
