"""One row per score: a method's score and the post-hoc detector that computes the same number are one row."""

import types

import numpy as np

from ood_jax import metrics
from ood_jax import scores
from ood_jax.evaluation import leaderboard


def _results(method_scores, detector_scores, *, tuning=None):
  rng = np.random.default_rng(0)
  logits = {s: (rng.normal(size=(40, 5)) + 1.0, rng.normal(size=(30, 5))) for s in ('n1', 'f1')}
  block = lambda fns: {s: {name: metrics.ood_metrics(fn(z_in), fn(z_out)) for name, fn in fns.items()}
                       for s, (z_in, z_out) in logits.items()}
  detectors = block(detector_scores)
  return {'ood': block(method_scores),
          'detectors': {'ood': detectors, 'ood_mean': metrics.mean_over_sets(detectors), 'tuning': tuning or {}}}


def test_a_method_score_and_its_post_hoc_twin_are_one_row():
  msp = lambda z: np.asarray(scores.max_softmax(z), np.float64)
  energy = lambda z: np.asarray(scores.energy(z), np.float64)
  results = _results({'max_softmax': msp, 'energy': energy}, {'msp': msp, 'energy': energy,
                                                              'max_logit': lambda z: np.max(z, axis=1)})
  block = leaderboard.benchmark_block(results, protocol='', groups={'near': ('n1',), 'far': ('f1',)}, validation=())
  names = [(row['name'], row['kind'], row['same_as']) for row in block['rows']]
  assert names == [('max_softmax', 'method', 'msp'), ('energy', 'method', 'energy'), ('max_logit', 'post-hoc', None)]
  table = leaderboard.markdown(block)
  assert '| max_softmax (= msp) | method |' in table and '| energy | method |' in table
  assert table.count('| msp') == 0 and 'post-hoc' in table
  matrix = leaderboard.compare_markdown({'run': {**results, 'benchmark': block}})
  assert '| max_softmax (= msp) (method) |' in matrix and '(post-hoc)' in matrix


def test_a_twin_with_other_numbers_keeps_its_own_row():
  # A tuned detector, or one whose numbers differ (another temperature), is not the method's score.
  msp = lambda z: np.asarray(scores.max_softmax(z), np.float64)
  results = _results({'max_softmax': msp}, {'msp': lambda z: np.asarray(scores.max_softmax(z / 2.0), np.float64)})
  block = leaderboard.benchmark_block(results, protocol='', groups={'near': ('n1',)}, validation=())
  assert [(row['name'], row['kind']) for row in block['rows']] == [('max_softmax', 'method'), ('msp', 'post-hoc')]


def test_twin_detectors_only_where_the_hyperparameters_agree():
  det = lambda name, defaults=None, grid=None: types.SimpleNamespace(name=name, defaults=defaults or {},
                                                                     grid=grid or {})
  chosen = [det('msp'), det('energy', {'temperature': 2.0}), det('max_logit'), det('react', grid={'p': (1, 2)})]
  assert leaderboard.twin_detectors(('max_softmax', 'energy', 'max_logit'), chosen) == {
      'msp': 'max_softmax', 'max_logit': 'max_logit'}
  assert leaderboard.twin_detectors(('energy',), [det('energy', {'temperature': 1.0})]) == {'energy': 'energy'}
