"""Tests for the ood_jax.detectors registry, and every registered detector end to end on a digits model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

from ood_jax import detectors
from ood_jax import metrics
from ood_jax import models
from ood_jax.detectors import adapter


def test_names_get_resolve():
  names = detectors.names()
  assert len(names) == len(set(names)) >= 35
  for name in ('msp', 'gen', 'kl_matching', 'react', 'ash_s', 'dice', 'scale', 'vra', 'rankfeat', 'mahalanobis',
               'rmds', 'mahalanobis_ensemble', 'knn', 'vim', 'residual', 'she', 'nnguide', 'fdbd', 'neco', 'nci',
               'gradnorm', 'odin', 'mc_dropout', 'ensemble_mi'):
    assert name in names
  with pytest.raises(ValueError, match='valid detectors: msp, max_logit'):
    detectors.get('mystery')
  assert [d.name for d in detectors.resolve(('react', 'vim', 'react'))] == ['react', 'vim']
  assert detectors.resolve('all') == tuple(detectors.get(n) for n in names)
  cheap = detectors.resolve('all', available=('logits', 'features', 'head'))
  assert {d.name for d in cheap} >= {'msp', 'vim', 'knn'} and 'odin' not in {d.name for d in cheap}
  with pytest.raises(ValueError, match='model'):
    detectors.resolve(('odin',), available=('logits',))
  for det in detectors.resolve('all'):
    assert det.needs <= set(detectors.NEEDS), det.name
    assert set(det.fit_params) <= set(det.defaults), det.name
    assert set(det.grid) <= set(det.defaults), det.name
    assert det.paper and 2015 <= det.year <= 2025
  grid = detectors.get('vim').grid_for(feature_dim=128)
  assert grid['dim'] == (None, 64, 128)


def test_hyperparameter_and_input_errors():
  react = detectors.get('react')
  with pytest.raises(ValueError, match=r"no hyperparameter\(s\) \['k'\]"):
    react.fit([], head=(np.ones((3, 2)), np.ones(2)), k=3)
  with pytest.raises(ValueError, match="'react' needs features"):
    react.score((), logits=np.ones((2, 2), np.float32))
  with pytest.raises(ValueError, match='needs the final layer'):
    react.fit([{'features': np.ones((2, 3), np.float32)}])


def _digits(n_train=240, n_test=64):
  images, labels = datasets.load_digits(return_X_y=True)
  # The 8 × 8 originals: the detectors, not the resolution, are under test, and compiles stay fast.
  images = (images.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
  return images[:n_train], labels[:n_train], images[n_train:n_train + n_test]


def test_every_detector_end_to_end_on_a_digits_model(random_variables):
  x_train, y_train, x_test = _digits()
  x_ood = np.random.default_rng(0).uniform(size=x_test.shape).astype(np.float32)
  model = models.make_classifier('digits_cnn', 'dense', 10, widths=(8, 16))
  variables = random_variables(model, x_train[:2])
  extract = adapter.feature_extractor(model, variables, head='head', maps=('backbone/bn1', 'backbone'))
  head = adapter.head_weights(variables, 'head')
  size = 80
  train = [{**extract(x_train[i:i + size]), 'labels': y_train[i:i + size]} for i in range(0, len(x_train), size)]
  outputs = {'id': extract(x_test), 'ood': extract(x_ood)}
  inputs = {'id': x_test, 'ood': x_ood}

  def stochastic(x, key):
    return extract(x + 0.05 * jax.random.normal(key, x.shape))['logits']

  members = {k: jnp.stack([extract(v + 0.01 * i)['logits'] for i in range(3)]) for k, v in inputs.items()}
  for det in detectors.resolve('all'):
    hp = {'map_name': 'backbone'} if det.name == 'rankfeat' else {}
    if det.name.startswith('mc_dropout') and det.name != 'mc_dropout_features':
      hp['num_samples'] = 3
    state = det.fit(train, head=head, num_classes=10, **hp)
    # One compilation per detector: ID and OOD inputs share a shape.
    score = jax.jit(lambda s, out, x, m, det=det, hp=hp: det.score(
        s, logits=out['logits'], features=out['features'], feature_maps=out['feature_maps'], member_logits=m,
        inputs=x, apply_fn=extract, stochastic_apply_fn=stochastic, rng=jax.random.PRNGKey(1), **hp))
    result = {}
    for split, out in outputs.items():
      result[split] = score(state, out, inputs[split], members[split])
      assert result[split].shape == (len(inputs[split]),), det.name
      assert np.all(np.isfinite(np.asarray(result[split]))), det.name
    assert 0.0 <= float(metrics.auroc(result['id'], result['ood'])) <= 1.0
