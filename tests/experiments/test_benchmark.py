"""The benchmark path: validation-only tuning, the feature cache, and leaderboard numbers.

Tuning and leaderboard arithmetic are checked on synthetic features (no model); the evaluator's
cache and benchmark block on a small MLP with random weights on the real digits benchmark.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits as digits_config
from ood_jax.evaluation import detection
from ood_jax import detectors
from ood_jax.trainer import evaluate
from ood_jax.trainer import experiment
from ood_jax.trainer import feature_cache
from ood_jax.trainer import inference
from ood_jax.evaluation import leaderboard
from ood_jax import metrics
from ood_jax.trainer import sharding
from ood_jax.evaluation import tuning


def _cloud(rng, n, centre, spread=1.0, dim=8):
  return {'features': (centre + spread * rng.normal(size=(n, dim))).astype(np.float32)}


def _synthetic(seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, 8)) * 3
  labels = rng.integers(0, 3, 300)
  train = {'features': (centres[labels] + rng.normal(size=(300, 8))).astype(np.float32), 'labels': labels}
  test_labels = rng.integers(0, 3, 60)
  test = {'features': (centres[test_labels] + rng.normal(size=(60, 8))).astype(np.float32)}
  validation_labels = rng.integers(0, 3, 40)
  validation = {'features': (centres[validation_labels] + rng.normal(size=(40, 8))).astype(np.float32)}
  return rng, train, test, validation


def test_candidates_put_the_defaults_first_without_repeats():
  knn = detectors.get('knn')
  got = tuning.candidates(knn)
  assert got[0] == {'k': 50} and [c['k'] for c in got] == [50, 100, 200, 500, 1000]
  gen = tuning.candidates(detectors.get('gen'), num_classes=6)
  assert gen[0] == {'gamma': 0.1, 'top_m': 100}  # the published default, although top_m > K
  # grid_for keeps one top_m above K = 6 (GEN clips it to K) and drops the rest.
  assert [(c['gamma'], c['top_m']) for c in gen[1:]] == [(g, 10) for g in (0.01, 0.1, 0.5, 1.0, 2.0)]


def test_tuning_never_sees_test_sets():
  rng, train, test, validation = _synthetic()
  validation_ood = {'val': _cloud(rng, 50, 1.5)}  # k = 50 wins on it
  clean_ood = {'far': _cloud(rng, 50, 0.0, spread=4.0)}
  # Training images of class 0 slightly perturbed: tuned on this set, k = 100 would win.
  near_class0 = {'features': train['features'][train['labels'] == 0][:50] + 0.3 * rng.normal(size=(50, 8))}
  # Poisoned test sets: a copy of the ID test set (chance for every k) and the set above.
  poisoned_ood = {'far': dict(test), 'other': near_class0}
  kwargs = dict(spec=('knn',), train=train, test=test, num_classes=3, validation=validation,
                validation_ood=validation_ood)
  clean = detection.evaluate_detectors(ood=clean_ood, **kwargs)
  poisoned = detection.evaluate_detectors(ood=poisoned_ood, **kwargs)
  assert clean['tuning'] == poisoned['tuning']
  assert clean['tuning']['knn']['candidates'] == 3  # k = 500 and 1000 exceed the 300 training rows
  # The choice does follow the validation sets (so the test above could fail).
  chosen = {detection.evaluate_detectors(ood=clean_ood, **{**kwargs, 'validation_ood': {'val': v}})['tuning']['knn']
            ['hparams']['k'] for v in (validation_ood['val'], near_class0)}
  assert chosen == {50, 100}


def test_tuned_choice_is_the_best_validation_auroc_and_scores_the_test_sets_with_it():
  rng, train, test, validation = _synthetic(1)
  validation_ood = {'a': _cloud(rng, 30, 1.0), 'b': _cloud(rng, 30, 0.0, spread=3.0)}
  ood = {'far': _cloud(rng, 40, 0.5, spread=2.0)}
  block = detection.evaluate_detectors(('knn',), train=train, test=test, ood=ood, num_classes=3,
                                      validation=validation, validation_ood=validation_ood)
  det = detectors.get('knn')
  state = det.fit([train], num_classes=3)
  by_k = {}
  for k in (50, 100, 200):  # k = 500, 1000 exceed the 300 training rows and are skipped
    score = lambda x, k=k: np.asarray(det.score(state, {'features': x['features']}, k=k), np.float64)
    by_k[k] = np.mean([metrics.auroc(score(validation), score(v)) for v in validation_ood.values()])
  best = max(by_k, key=by_k.get)
  record = block['tuning']['knn']
  assert record['hparams'] == {'k': best}
  assert record['validation_auroc'] == pytest.approx(by_k[best], abs=1e-12)
  s_in = np.asarray(det.score(state, {'features': test['features']}, k=best), np.float64)
  s_out = np.asarray(det.score(state, {'features': ood['far']['features']}, k=best), np.float64)
  assert block['ood']['far']['knn'] == pytest.approx(metrics.ood_metrics(s_in, s_out), abs=1e-6)


def _results(name_scores):
  """Results with per-set metrics of given (in, out) score pairs, as the evaluator writes them."""
  ood = {}
  for set_name, pairs in name_scores.items():
    ood[set_name] = {score: metrics.ood_metrics(*pair) for score, pair in pairs.items()}
  return {'ood': ood, 'in_distribution': {'accuracy': 0.9}}


def test_leaderboard_numbers_are_the_metrics_of_the_scores():
  rng = np.random.default_rng(0)
  pairs = {s: {'msp': (rng.normal(1, 1, 50), rng.normal(0, 1, 40))} for s in ('n1', 'n2', 'f1')}
  results = _results(pairs)
  block = leaderboard.benchmark_block(results, protocol='p', groups={'near': ('n1', 'n2'), 'far': ('f1',)},
                                      validation=('v',))
  (row,) = block['rows']
  for metric in metrics.OOD_METRICS:
    expected = np.mean([metrics.ood_metrics(*pairs[s]['msp'])[metric] for s in ('n1', 'n2')])
    assert row['groups']['near'][metric] == pytest.approx(expected, abs=1e-15)
  assert row['groups']['far'] == metrics.ood_metrics(*pairs['f1']['msp'])
  table = leaderboard.markdown(block)
  assert f"| 1 | msp | method | {100 * row['groups']['near']['auroc']:.2f} |" in table
  assert 'near-OOD = n1, n2; far-OOD = f1; tuned on v; ID accuracy 90.00 %' in table
  matrix = leaderboard.compare_markdown({'a': {**results, 'benchmark': block}, 'b': {**results, 'benchmark': block}})
  cell = f"{100 * row['groups']['near']['auroc']:.1f} / {100 * row['groups']['far']['auroc']:.1f}"
  assert f'| msp (method) | {cell} | {cell} |' in matrix
  with pytest.raises(ValueError, match='different protocols'):
    leaderboard.compare_markdown({'a': {'benchmark': block}, 'b': {'benchmark': {**block, 'protocol': 'q'}}})


@pytest.fixture(scope='module')
def digits_run():
  config = digits_config.get_config('smoke')
  config.backbone, config.backbone_kwargs = 'mlp', {'hidden': (24,)}
  config.eval.ood_sets = ()
  config.eval.benchmark = 'digits'
  config.eval.detectors = 'react,knn'
  exp = experiment.make_experiment(config)
  variables = exp.model.init(jax.random.key(5), jnp.zeros((1, 32, 32, 1)))
  return exp, variables


def _counting(monkeypatch):
  calls = []
  real = inference.run

  def spy(*args, **kwargs):
    calls.append(len(args[2]))
    return real(*args, **kwargs)

  monkeypatch.setattr(inference, 'run', spy)
  return calls


def test_benchmark_evaluation_is_cached_and_invalidated(digits_run, tmp_path, monkeypatch):
  exp, variables = digits_run
  mesh = sharding.make_mesh()
  calls = _counting(monkeypatch)
  first = evaluate.evaluate_model(exp, variables, mesh, workdir=str(tmp_path))
  # test, 4 test OOD sets, train, validation, validation OOD: each through the model once.
  assert len(calls) == 8
  bench = first['benchmark']
  assert bench['groups'] == {'near': ['digits/near'],
                             'far': ['digits/photos', 'digits/gaussian_noise', 'digits/uniform_noise']}
  assert bench['validation'] == ['digits/validation']
  names = {(row['name'], row['kind']) for row in bench['rows']}
  assert names == {(score, 'method') for score in exp.method.scores} | {('react', 'post-hoc'), ('knn', 'post-hoc')}
  react = next(row for row in bench['rows'] if row['name'] == 'react')
  assert react['hparams'] == first['detectors']['tuning']['react']['hparams']
  assert react['per_set']['digits/near'] == first['detectors']['ood']['digits/near']['react']
  assert 'Leaderboard digits' in evaluate.report.markdown(first)

  # Same weights: every set comes from the cache, and the numbers are the same.
  calls.clear()
  config = exp.config.copy_and_resolve_references()
  config.eval.detectors = 'react,knn,vim'  # a detector added later
  second = evaluate.evaluate_model(experiment.make_experiment(config), variables, mesh, workdir=str(tmp_path))
  assert calls == []
  assert second['detectors']['ood']['digits/near']['react'] == first['detectors']['ood']['digits/near']['react']
  assert 'vim' in second['detectors']['ood']['digits/near']

  # New weights (a checkpoint changed): the model runs again and the stale outputs are deleted.
  changed = jax.tree.map(lambda x: x * 1.01, variables)
  second_key = feature_cache.fingerprint(changed)
  assert second_key != feature_cache.fingerprint(variables)
  old = set((tmp_path / feature_cache.FOLDER).iterdir())
  evaluate.evaluate_model(exp, changed, mesh, workdir=str(tmp_path))
  assert len(calls) == 8
  new = set((tmp_path / feature_cache.FOLDER).iterdir())
  assert len(old) == len(new) == 1 and old != new
