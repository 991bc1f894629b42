"""Tests for ood_jax.evaluation.detection and the scoring path it shares with tuning: each detector's kernel
compiles once per process (for every set size and every grid point that differs in a traced value), scoring in
padded row blocks equals one call, and the metrics are scikit-learn's on float64 references of the scores."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
from scipy import special
from sklearn import metrics as sk_metrics

from ood_jax import detectors
from ood_jax.evaluation import detection
from ood_jax.evaluation import tuning

_COMPILE = '/jax/core/compile/backend_compile_duration'
_AVAILABLE = ('logits', 'features', 'head')


@contextlib.contextmanager
def compilations():
  """The XLA compilations made inside the block (jax.monitoring's backend-compile event, one per compilation)."""
  seen = []

  def listen(event, duration, **kwargs):
    del kwargs
    if event == _COMPILE:
      seen.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def _sets(seed, *, dim=24, classes=4, train=400, test=70, ood=(50, 30), validation=40, validation_ood=45):
  """Non-negative class clusters and a random head; OOD sets shifted and spread."""
  rng = np.random.default_rng(seed)
  centres = 2.0 * np.random.default_rng(0).standard_normal((classes, dim))
  w = (np.random.default_rng(1).standard_normal((dim, classes)) / np.sqrt(dim)).astype(np.float32)
  b = np.linspace(-0.2, 0.2, classes).astype(np.float32)

  def draw(n, shift=0.0, spread=1.0):
    y = rng.integers(0, classes, n)
    h = np.maximum(centres[y] + shift + spread * rng.standard_normal((n, dim)), 0.0).astype(np.float32)
    return {'features': h, 'logits': h @ w + b, 'labels': y.astype(np.int32)}

  return dict(train=draw(train), test=draw(test), ood={f'ood{i}': draw(n, 0.5 + i, 1.5) for i, n in enumerate(ood)},
              validation=draw(validation), validation_ood={'v': draw(validation_ood, 0.8, 1.8)},
              num_classes=classes, head=(w, b))


@pytest.mark.filterwarnings('ignore:temperature_msp')  # random head: no temperature beats uniform
def test_every_kernel_compiles_once_per_process_whatever_the_set_sizes():
  first = _sets(0)
  with compilations() as seen:
    block = detection.evaluate_detectors('all', **first)
  names = [det.name for det in detectors.resolve('all', available=_AVAILABLE)]
  assert not block.get('errors', {}).keys() - {'nnguide'}  # NNGuide's 1 % bank of 400 rows holds no k
  assert set(block['ood_mean']) == set(names) - {'nnguide'}
  # One kernel per detector, three for ASH's variants, and KNN's two normalisations plus one per k in its grid
  # that 400 training rows allow (50, 100, 200); calibration's temperature fit stages one scalar.
  assert len(seen) <= len(names) + 2 + 2 + 3 + 1, len(seen)
  # Other set sizes (test, OOD, validation) and another run: every kernel is reused.
  second = _sets(1, test=333, ood=(7, 120, 64), validation=90, validation_ood=21)
  with compilations() as seen:
    again = detection.evaluate_detectors('all', **second)
  assert seen == [] and set(again['ood_mean']) == set(block['ood_mean'])


_TUNED = ('react', 'ash_b', 'scale', 'dice', 'vra', 'gen', 'vim', 'residual', 'neco', 'fdbd', 'nci')


@pytest.mark.parametrize('name', _TUNED)
def test_grid_points_share_one_compilation(name):
  # A feature width no other test uses (above 128, so ViM's grid keeps 64 and 128), so the kernel compiles here.
  data = _sets(2, dim=130 + _TUNED.index(name), classes=5, train=150)
  det = detectors.get(name)
  fit = lambda **hp: det.fit([data['train']], head=data['head'], num_classes=5, **hp)
  validation_in = {k: data['validation'][k] for k in ('logits', 'features')}
  with compilations() as seen:
    _, record = tuning.select(det, fit, validation_in=validation_in, validation_ood=data['validation_ood'],
                              feature_dim=data['train']['features'].shape[1], num_classes=5, num_train=150)
  assert record['candidates'] > 1 and len(seen) == 1, (record, len(seen))


@pytest.mark.filterwarnings('ignore:temperature_msp')
def test_scoring_in_padded_blocks_equals_one_call(monkeypatch):
  monkeypatch.setattr(tuning, 'BLOCK', 32)  # 3 full blocks and a padded one
  data = _sets(3, train=200)
  inputs = {k: np.concatenate([data['test'][k], data['ood']['ood0'][k]])[:110] for k in ('logits', 'features')}
  for det in detectors.resolve('all', available=_AVAILABLE):
    if det.name in ('nnguide', 'mc_dropout_features'):
      continue  # a bank too small for any k; dropout masks drawn per block position
    state = det.fit([data['train']], head=data['head'], num_classes=4)
    whole = np.asarray(det.score(state, inputs), np.float64)
    np.testing.assert_allclose(tuning.score_rows(det, state, inputs), whole, rtol=2e-6, atol=2e-6, err_msg=det.name)
  det = detectors.get('mc_dropout_features')
  out = tuning.score_rows(det, det.fit(head=data['head']), inputs)
  assert out.shape == (110,) and np.all((out > 0) & (out <= 1))


def test_metrics_are_sklearn_on_float64_scores_and_small_banks_still_tune():
  data = _sets(4, train=120)
  block = detection.evaluate_detectors(('energy', 'knn'), **data)
  # 120 training rows: KNN's grid keeps k = 50 and 100, and tuning chooses among them.
  assert block['tuning']['knn']['candidates'] == 2 and block['tuning']['knn']['hparams']['k'] in (50, 100)
  k = block['tuning']['knn']['hparams']['k']
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  bank = unit(data['train']['features'].astype(np.float64))

  def knn(x):
    return -np.sort(np.linalg.norm(unit(x['features'].astype(np.float64))[:, None] - bank[None], axis=-1), 1)[:, k - 1]

  energy = lambda x: special.logsumexp(x['logits'].astype(np.float64), axis=1)
  for name, out in data['ood'].items():
    for det, ref in (('energy', energy), ('knn', knn)):
      ins, outs = ref(data['test']), ref(out)
      labels = np.r_[np.ones(len(ins)), np.zeros(len(outs))]
      want = sk_metrics.roc_auc_score(labels, np.r_[ins, outs])
      assert block['ood'][name][det]['auroc'] == pytest.approx(want, abs=1e-6), (name, det)
