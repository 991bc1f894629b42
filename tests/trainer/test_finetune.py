"""Fine-tuning: merging pretrained variables under each head policy, the class-statistics head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax.trainer import finetune
from ood_jax import layers
from ood_jax import models
from ood_jax.trainer import sharding
from ood_jax.trainer.data import sources


def _tree(*shapes_by_name):
  return {name: np.full(shape, value, np.float32) for name, shape, value in shapes_by_name}


def test_merge_pretrained_restores_exactly_the_backbone_and_fitting_head():
  fresh = {'params': {'backbone': {'conv': _tree(('kernel', (3, 3), 0.0))}, 'head': _tree(('kernel', (3, 2), 0.0))},
           'batch_stats': {'backbone': {'bn': _tree(('mean', (3,), 0.0))}}}
  pretrained = {'params': {'backbone': {'conv': _tree(('kernel', (3, 3), 1.0))},
                           'head': _tree(('kernel', (3, 2), 2.0))},
                'batch_stats': {'backbone': {'bn': _tree(('mean', (3,), 3.0))}}}
  params, stats = finetune.merge_pretrained(fresh, pretrained, head_policy='auto')
  np.testing.assert_array_equal(params['backbone']['conv']['kernel'], 1.0)
  np.testing.assert_array_equal(params['head']['kernel'], 2.0)  # same head shape: kept (fine-tune)
  np.testing.assert_array_equal(stats['backbone']['bn']['mean'], 3.0)
  params, _ = finetune.merge_pretrained(fresh, pretrained, head_policy='reinit')
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  np.testing.assert_array_equal(params['backbone']['conv']['kernel'], 1.0)

  # A different head (e.g. Mahalanobis on a softmax backbone) is re-initialised under 'auto' ...
  other_head = {**pretrained, 'params': {**pretrained['params'], 'head': _tree(('means', (2, 3), 5.0))}}
  params, _ = finetune.merge_pretrained(fresh, other_head, head_policy='auto')
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  # ... and refused under 'keep'.
  with pytest.raises(ValueError, match='init_head=keep'):
    finetune.merge_pretrained(fresh, other_head, head_policy='keep')


def test_merge_pretrained_shape_mismatch_names_the_parameter():
  fresh = {'params': {'backbone': {'conv': _tree(('kernel', (3, 3), 0.0))}}, 'batch_stats': {}}
  wrong = {'params': {'backbone': {'conv': _tree(('kernel', (3, 4), 1.0))}}, 'batch_stats': {}}
  with pytest.raises(ValueError, match=r"shape mismatch at params/backbone\['conv'\]\['kernel'\].*\(3, 4\).*\(3, 3\)"):
    finetune.merge_pretrained(fresh, wrong)
  missing = {'params': {'other': {}}, 'batch_stats': {}}
  with pytest.raises(ValueError, match='has no params/backbone'):
    finetune.merge_pretrained(fresh, missing)


def test_class_statistics_head_is_the_gaussian_of_the_pretrained_features():
  """init_head='class_stats': means and covariance equal a float64 NumPy fit of the same features."""
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(70, 4, 4, 1), dtype=np.uint8)
  labels = np.arange(70, dtype=np.int32) % 3
  model = models.make_classifier('mlp', 'mahalanobis', 3, hidden=(6,))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  mean, std = (0.5,), (0.25,)
  head = finetune.class_statistics_head(model, variables, sources.ArrayData(images, labels, 'toy'),
                                        mesh=sharding.make_mesh(),
                                     batch_size=16, mean=mean, std=std, num_classes=3, ridge=1e-2)
  _, features = model.apply(variables, (images / 255.0 - 0.5) / 0.25)
  f = np.asarray(features, np.float64)
  means = np.stack([f[labels == k].mean(0) for k in range(3)])
  centred = f - means[labels]
  cov = centred.T @ centred / len(f)
  cov += 1e-2 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
  np.testing.assert_allclose(head['means'], means, rtol=1e-4, atol=1e-5)
  chol = np.asarray(layers.cholesky_from_raw(head['cholesky_raw']), np.float64)
  np.testing.assert_allclose(chol @ chol.T, cov, rtol=1e-3, atol=1e-5)
  # The head then scores each feature by its Gaussian log-density up to constants: −(f − μ_k)ᵀΣ⁻¹(f − μ_k).
  logits = model.apply({'params': {**variables['params'], 'head': head}}, (images / 255.0 - 0.5) / 0.25)[0]
  diff = f[:, None, :] - means[None]
  expected = -np.einsum('nkd,de,nke->nk', diff, np.linalg.inv(cov), diff)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-3, atol=1e-3)

