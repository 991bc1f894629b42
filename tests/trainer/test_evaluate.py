"""The evaluator's blocks against independent computations on the same model outputs.

A small MLP on the digits benchmark (random weights: the numbers only need to be the right ones).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from sklearn import metrics as sk_metrics

from configs import digits as digits_config
from ood_jax.evaluation import detection
from ood_jax.evaluation import evaluator
from ood_jax.trainer import evaluate
from ood_jax.trainer import experiment
from ood_jax import metrics
from ood_jax.trainer import sharding
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import digits
from ood_jax.trainer.data import registry


def _logits(exp, variables, images):
  x = (images.astype(np.float32) / 255.0 - np.asarray(exp.mean, np.float32)) / np.asarray(exp.std, np.float32)
  logits, features = exp.model.apply(variables, x)
  return np.asarray(logits, np.float64), np.asarray(features, np.float64)


@pytest.fixture(scope='module')
def evaluated():
  config = digits_config.get_config('smoke')
  config.backbone, config.backbone_kwargs = 'mlp', {'hidden': (24,)}
  config.eval.ood_sets = ('digits/near',)
  config.eval.corruptions, config.eval.severities = ('fog',), (3,)
  config.eval.detectors = 'msp,energy,knn'
  exp = experiment.make_experiment(config)
  variables = exp.model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 1)))
  return exp, variables, evaluate.evaluate_model(exp, variables, sharding.make_mesh())


def test_temperature_is_fitted_on_the_validation_split_only(evaluated):
  exp, variables, results = evaluated
  _, validation = catalog.load_train_and_validation(registry.get_info('digits'), validation_fraction=0.1)
  z, _ = _logits(exp, variables, validation.images)
  nll = lambda t: -np.mean(scipy.special.log_softmax(z / t, axis=1)[np.arange(len(z)), validation.labels])
  best = scipy.optimize.minimize_scalar(nll, bounds=(0.01, 100.0), method='bounded', options={'xatol': 1e-9})
  assert results['calibration']['calibrator'] == 'temperature'
  assert results['calibration']['validation_examples'] == 72
  np.testing.assert_allclose(results['calibration']['temperature'], best.x, rtol=1e-4)

  test = digits.load_split('test')
  z_test, _ = _logits(exp, variables, test.images)
  probs = scipy.special.softmax(z_test / best.x, axis=1)
  calibrated = results['in_distribution']['calibrated']
  np.testing.assert_allclose(calibrated['nll'], -np.mean(np.log(probs[np.arange(len(z_test)), test.labels])),
                             rtol=1e-4)
  assert calibrated['accuracy'] == results['in_distribution']['accuracy']  # scaling keeps the argmax
  raw = scipy.special.softmax(z_test, axis=1)
  onehot = np.eye(6)[test.labels]
  np.testing.assert_allclose(results['in_distribution']['brier'], np.mean(np.sum((raw - onehot) ** 2, 1)), rtol=1e-4)


def test_corrupted_levels_hold_raw_and_calibrated_metrics(evaluated):
  _, _, results = evaluated
  level = results['corrupted']['per_pair']['fog_3']
  assert set(level) == set(metrics.CLASSIFICATION_METRICS) | {'calibrated'}
  assert set(level['calibrated']) == set(metrics.CLASSIFICATION_METRICS)
  spread = results['corrupted']['per_severity']['3']
  assert spread['ece']['mean'] == level['ece'] and spread['calibrated']['ece']['mean'] == level['calibrated']['ece']
  assert results['corrupted']['mean']['calibrated']['nll'] == level['calibrated']['nll']


def test_detector_rows_equal_the_metrics_of_their_scores(evaluated):
  exp, variables, results = evaluated
  block = results['detectors']
  # msp and energy compute the method's own max_softmax and energy: they are its rows, not second ones.
  assert set(block['ood']['digits/near']) == {'knn'} and 'errors' not in block
  method = results['ood']['digits/near']
  z_in, _ = _logits(exp, variables, digits.load_split('test').images)
  z_out, _ = _logits(exp, variables, digits.load_ood('near').images)
  msp_in, msp_out = scipy.special.softmax(z_in, 1).max(1), scipy.special.softmax(z_out, 1).max(1)
  truth = np.r_[np.ones(len(msp_in)), np.zeros(len(msp_out))]
  np.testing.assert_allclose(method['max_softmax']['auroc'],
                             sk_metrics.roc_auc_score(truth, np.r_[msp_in, msp_out]), rtol=1e-6)
  energy = lambda z: scipy.special.logsumexp(z, axis=1)
  np.testing.assert_allclose(method['energy']['auroc'],
                             sk_metrics.roc_auc_score(truth, np.r_[energy(z_in), energy(z_out)]), rtol=1e-6)
  if 'benchmark' in results:
    rows = {(row['name'], row['kind'], row['same_as']) for row in results['benchmark']['rows']}
    assert ('max_softmax', 'method', 'msp') in rows
  assert block['ood_mean']['knn'] == block['ood']['digits/near']['knn']


def test_failing_detector_is_reported_not_fatal():
  rng = np.random.default_rng(0)
  train = {'features': rng.normal(size=(30, 4)).astype(np.float32), 'labels': np.arange(30, dtype=np.int32) % 3}
  test = {'features': rng.normal(size=(10, 4)).astype(np.float32)}
  ood = {'noise': {'features': rng.normal(size=(12, 4)).astype(np.float32) + 3}}
  # k = 5 pinned: a bank of 30 rows has no 50th neighbour (the default k), which is an error of its own.
  block = detection.evaluate_detectors(('knn',), train=train, test=test, ood=ood, num_classes=3,
                                       pinned={'knn': {'k': 5}})
  assert 0.0 <= block['ood']['noise']['knn']['auroc'] <= 1.0
  too_few = detection.evaluate_detectors(('knn',), train=train, test=test, ood=ood, num_classes=3)
  assert 'k=50 exceeds the bank of 30 training rows' in too_few['errors']['knn']
  train_bad = {**train, 'features': train['features'][:, :0]}  # no feature dimensions at all
  bad = detection.evaluate_detectors(('knn',), train=train_bad, test={'features': test['features'][:, :0]},
                                    ood={'noise': {'features': ood['noise']['features'][:, :0]}}, num_classes=3)
  assert 'knn' in bad['errors'] and bad['ood']['noise'] == {}


def test_detector_names_are_checked_before_training():
  config = digits_config.get_config('smoke')
  config.eval.detectors = 'react,vimm'
  with pytest.raises(ValueError, match="eval.detectors='react,vimm'.*vimm"):
    experiment.check_config(config)
  config.method, config.eval.detectors = 'isomax', 'react'  # a distance head has no affine weights
  with pytest.raises(ValueError, match="needs \\['head'\\]"):
    experiment.check_config(config)
  config.eval.detectors = 'all'
  experiment.check_config(config)  # 'all' keeps what the model allows


def test_protocol_front_door_is_the_one_call_on_the_protocols_sets():
  class Mlp(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name='head')(nn.relu(nn.Dense(32)(x.reshape(len(x), -1))))

  model = Mlp()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  report = evaluate.evaluate_protocol(model, variables, protocol='digits', dataset='digits',
                                      detectors=('msp', 'knn'), batch_size=128)
  results = report.results
  assert results['benchmark']['groups'] == {'near': ['digits/near'],
                                            'far': ['digits/photos', 'digits/gaussian_noise', 'digits/uniform_noise']}
  assert results['benchmark']['validation'] == ['digits/validation'] and 'knn' in results['detectors']['tuning']
  # The same numbers as the one call on the same sets, preprocessed as the trainer does.
  info = registry.get_info('digits')
  prep = lambda x: (x.astype(np.float32) / 255.0 - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
  train, validation = catalog.load_train_and_validation(info, validation_fraction=0.1)
  test = digits.load_split('test')
  direct = evaluator.evaluate(
      model, variables, train=(prep(train.images), train.labels), test=(prep(test.images), test.labels),
      validation=(prep(validation.images), validation.labels),
      ood={name: prep(digits.load_ood(name.split('/')[1]).images) for name in results['benchmark']['groups']['near']},
      validation_ood={'digits/validation': prep(digits.load_ood('validation').images)}, detectors=('msp', 'knn'))
  assert direct.results['detectors']['ood']['digits/near'] == results['detectors']['ood']['digits/near']
