"""The one-call evaluator on models of a user's own (not ood_jax's Classifier), trained here on scikit-learn's digits.

Every number is checked against scores computed independently of the library (NumPy from the model's own
outputs) and against scikit-learn's `roc_auc_score`.
"""

import json

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import datasets
from sklearn.metrics import roc_auc_score

import ood_jax
from ood_jax import metrics
from ood_jax.evaluation import evaluator


@pytest.fixture(scope='module')
def digits():
  """Digits 0–5 in-distribution (train / validation / test); 6–7 validation OOD; 8–9 and noise test OOD."""
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(x))
  x, y = x[order], y[order]
  known = y < 6
  xi, yi = x[known], y[known].astype(np.int32)
  n = len(xi)
  split = {'train': (xi[:n // 2], yi[:n // 2]), 'validation': (xi[n // 2:n // 2 + 150], yi[n // 2:n // 2 + 150]),
           'test': (xi[n // 2 + 150:], yi[n // 2 + 150:])}
  split['validation_ood'] = {'digits 6-7': x[(y == 6) | (y == 7)]}
  split['ood'] = {'digits 8-9': x[y >= 8], 'noise': rng.random((300, 64), dtype=np.float32)}
  return split


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(6, name='head')(x)


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 64, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(64, 6, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(nnx.relu(self.hidden(x))))


def _train_linen(data):
  model = LinenMLP()
  x, y = data['train']
  params = model.init(jax.random.key(0), x[:1])
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean())(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state)
  assert float(loss) < 0.1
  return model, params


def _train_nnx(data):
  model = NNXMLP(nnx.Rngs(0))
  x, y = data['train']
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(150):
    loss = step(model, optimizer)
  assert float(loss) < 0.2
  model.eval()
  return model


def _msp(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  return p.max(axis=1)


def _mahalanobis(train_features, train_labels, features):
  """The tied-covariance Mahalanobis score of Lee et al. (2018), eq. 2, in float64 from scratch."""
  h, y = np.asarray(train_features, np.float64), np.asarray(train_labels)
  means = np.stack([h[y == k].mean(0) for k in range(6)])
  centred = h - means[y]
  cov = centred.T @ centred / len(h)
  cov += 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov))  # the detector's default ridge
  precision = np.linalg.inv(cov)
  f = np.asarray(features, np.float64)
  d = [np.einsum('nd,de,ne->n', f - m, precision, f - m) for m in means]
  return -np.min(np.stack(d, 1), axis=1)


def _check_against_independent_scores(report, logits_fn, features_fn, data):
  results = report.results
  test_x, test_y = data['test']
  msp_in = _msp(logits_fn(test_x))
  for name, x in data['ood'].items():
    msp_out = _msp(logits_fn(x))
    labels = np.r_[np.ones(len(msp_in)), np.zeros(len(msp_out))]
    want = roc_auc_score(labels, np.r_[msp_in, msp_out])
    got = results['detectors']['ood'][name]['msp']
    assert got['auroc'] == pytest.approx(want, abs=2e-4), name
    assert got['fpr95_ood_positive'] == pytest.approx(metrics.fpr_at_tpr(msp_in, msp_out, positive='ood'), abs=1e-2)
  train_x, train_y = data['train']
  in_scores = _mahalanobis(features_fn(train_x), train_y, features_fn(test_x))
  for name, x in data['ood'].items():
    out_scores = _mahalanobis(features_fn(train_x), train_y, features_fn(x))
    want = metrics.ood_metrics(in_scores, out_scores)
    got = results['detectors']['ood'][name]['mahalanobis']
    for metric in ('auroc', 'aupr_in', 'aupr_out'):
      assert got[metric] == pytest.approx(want[metric], abs=2e-3), (name, metric)
  accuracy = np.mean(np.argmax(logits_fn(test_x), axis=1) == test_y)
  assert results['in_distribution']['accuracy'] == pytest.approx(accuracy, abs=1e-12)


def test_linen_model_of_ones_own_gets_the_tuned_table_in_one_call(digits, tmp_path):
  model, variables = _train_linen(digits)
  report = ood_jax.evaluation.evaluate(
      model, variables, train=digits['train'], test=digits['test'], ood=digits['ood'],
      validation=digits['validation'], validation_ood=digits['validation_ood'],
      groups={'near': ('digits 8-9',), 'far': ('noise',)}, detectors='all', head='head', batch_size=128,
      detector_kwargs={'nnguide': {'fraction': 0.5}})  # NNGuide's default 1 % of ~540 rows is fewer than any k
  results = report.results
  chosen = set(results['detectors']['ood_mean'])
  assert {'msp', 'energy', 'react', 'knn', 'mahalanobis', 'vim', 'gen'} <= chosen
  assert not results['detectors'].get('errors'), results['detectors'].get('errors')
  assert set(results['detectors']['tuning']) >= {'react', 'knn', 'gen'}  # tuned on validation OOD
  rows = results['benchmark']['rows']
  assert len(rows) == len(chosen) and {row['kind'] for row in rows} == {'post-hoc'}
  assert results['calibration']['calibrator'] == 'temperature' and 'calibrated' in results['in_distribution']

  hidden = lambda x: np.asarray(nn.relu(x @ variables['params']['Dense_0']['kernel']
                                        + variables['params']['Dense_0']['bias']))
  _check_against_independent_scores(report, lambda x: np.asarray(model.apply(variables, x)), hidden, digits)

  text = report.markdown()
  assert 'near AUROC' in text and 'FPR@95 (ID+)' in text and 'FPR@95 (OOD+)' in text and 'tuned on digits 6-7' in text
  report.save(tmp_path / 'run')
  assert json.loads((tmp_path / 'run' / 'results.json').read_text()) == json.loads(json.dumps(results))
  assert (tmp_path / 'run' / 'reliability.png').exists() and '](reliability.png)' in (
      tmp_path / 'run' / 'results.md').read_text()


def test_nnx_model_of_ones_own_gets_the_same_table(digits):
  model = _train_nnx(digits)
  report = ood_jax.evaluation.evaluate(
      model, train=digits['train'], test=iter([digits['test']]), ood=digits['ood'],
      validation=digits['validation'], validation_ood=digits['validation_ood'],
      detectors=('msp', 'mahalanobis', 'react', 'knn'), detector_kwargs={'react': {'percentile': 90.0}})
  hidden = lambda x: np.asarray(nnx.relu(model.hidden(jnp.asarray(x))))
  _check_against_independent_scores(report, lambda x: np.asarray(model(jnp.asarray(x))), hidden, digits)
  tuning = report.results['detectors']['tuning']
  assert 'react' not in tuning and 'knn' in tuning  # react's percentile pinned, knn's k tuned


def test_function_models_and_batches_of_data(digits):
  model, variables = _train_linen(digits)
  apply = lambda x: model.apply(variables, x)
  batches = lambda xs: [xs[i:i + 50] for i in range(0, len(xs), 50)]
  train_x, train_y = digits['train']
  report = ood_jax.evaluation.evaluate(
      apply, train=[(train_x[i:i + 100], train_y[i:i + 100]) for i in range(0, len(train_x), 100)],
      test=digits['test'], ood={name: batches(x) for name, x in digits['ood'].items()}, detectors=('msp', 'energy'),
      batch_size=64)
  want = evaluator.extract(jax.jit(apply), digits['test'][0], batch_size=64)['logits']
  np.testing.assert_allclose(want, np.asarray(apply(digits['test'][0])), rtol=1e-6, atol=1e-6)
  assert set(report.results['detectors']['ood_mean']) == {'msp', 'energy'}
  assert report.results['benchmark']['groups'] == {'ood': ['digits 8-9', 'noise']}


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(ood={}), ValueError, 'at least one OOD set'),
    (dict(validation_ood={'noise': np.zeros((2, 64), np.float32)}), ValueError, 'also test sets'),
    (dict(groups={'near': ('nope',)}), ValueError, "groups name sets that are not in ood: \\['nope'\\]"),
    (dict(test=np.zeros((3, 64), np.float32)), TypeError, 'test must be an \\(images, labels\\) pair'),
    (dict(ood={'x': (np.zeros((3, 64), np.float32), np.zeros(3, np.int32))}), TypeError, 'OOD sets carry no labels'),
])
def test_bad_arguments_say_what_is_wrong(digits, kwargs, error, match):
  model, variables = LinenMLP(), LinenMLP().init(jax.random.key(0), np.zeros((1, 64), np.float32))
  args = dict(train=digits['train'], test=digits['test'], ood=digits['ood'], detectors=('msp',))
  with pytest.raises(error, match=match):
    ood_jax.evaluation.evaluate(model, variables, **{**args, **kwargs})
