"""Results files and tables: the comparison table, loading results, the markdown of one run."""

import json

import numpy as np
import pytest

from ood_jax import _extras
from ood_jax import metrics
from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report


def _fake_results(method, score, accuracy, ood, corrupted=None):
  results = {'method': method, 'default_score': score, 'in_distribution': {'accuracy': accuracy, 'ece': 0.0123},
             'ood': {name: {score: {'auroc': a, 'fpr95_id_positive': f}} for name, (a, f) in ood.items()}}
  if ood:
    results['ood_mean'] = {score: {'auroc': np.mean([a for a, _ in ood.values()]),
                                   'fpr95_id_positive': np.mean([f for _, f in ood.values()])}}
  if corrupted:
    results['corrupted'] = {'mean': corrupted}
  return results


def test_comparison_table_puts_runs_side_by_side(tmp_path):
  runs = {'runs/softmax': _fake_results('softmax', 'max_softmax', 0.9, {'svhn': (0.8, 0.5), 'dtd': (0.6, 0.7)}),
          'runs/ice': _fake_results('ice', 'max_logit', 0.95, {'svhn': (0.99, 0.02)},
                                    corrupted={'accuracy': 0.5, 'ece': 0.25})}
  lines = report.comparison_markdown(runs).splitlines()
  assert lines[0] == ('| run | method | accuracy | ECE (raw) | score | svhn AUROC / FPR@95 (ID+) | '
                      'dtd AUROC / FPR@95 (ID+) | mean AUROC / FPR@95 (ID+) | shifted accuracy | shifted ECE (raw) |')
  assert lines[1] == '|---|---|---:|---:|---|---:|---:|---:|---:|---:|'
  assert lines[2] == ('| runs/softmax | softmax | 90.00 % | 0.0123 | max_softmax | 80.0 / 50.0 | 60.0 / 70.0 | '
                      '70.0 / 60.0 | – | – |')
  assert lines[3] == ('| runs/ice | ice | 95.00 % | 0.0123 | max_logit | 99.0 / 2.0 | – | 99.0 / 2.0 | '
                      '50.00 % | 0.2500 |')
  with pytest.raises(ValueError, match='at least one'):
    report.comparison_markdown({})

  for name, results in runs.items():
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / 'results.json').write_text(json.dumps(results))
  loaded = report.load_results([str(tmp_path / name) for name in runs])
  assert list(loaded.values()) == json.loads(json.dumps(list(runs.values())))
  with pytest.raises(FileNotFoundError, match='experiments.evaluate --workdir='):
    report.load_results([str(tmp_path / 'missing')])



def _classifier_results(rng, *, corrupted=True):
  """Results shaped as the evaluator writes them, from real metric functions on random data."""
  probs = rng.dirichlet(np.ones(3), size=200)
  labels = rng.integers(0, 3, 200)
  in_dist = {'num_examples': 200, **metrics.classification_metrics(probs, labels)}
  in_dist['calibrated'] = metrics.classification_metrics(np.sqrt(probs) / np.sqrt(probs).sum(1, keepdims=True),
                                                         labels)
  ins = rng.normal(1.0, 1.0, 200)
  outs = {'near': rng.normal(0.5, 1.0, 100), 'far': rng.normal(-1.0, 1.0, 100)}
  ood = {name: {'max_softmax': metrics.ood_metrics(ins, o)} for name, o in outs.items()}
  det = {name: {'vim': metrics.ood_metrics(ins, o + 0.3), 'knn': metrics.ood_metrics(ins, o - 0.3)}
         for name, o in outs.items()}
  results = {'method': 'softmax', 'backbone': 'cnn', 'dataset': 'digits', 'default_score': 'max_softmax',
             'in_distribution': in_dist, 'calibration': {'calibrator': 'temperature', 'temperature': 1.5,
                                                         'validation_examples': 50},
             'ood': ood, 'ood_mean': metrics.mean_over_sets(ood),
             'score_histogram': metrics.score_histogram(ins, outs),
             'detectors': {'ood': det, 'ood_mean': metrics.mean_over_sets(det), 'tuning': {}}}
  results['benchmark'] = leaderboard.benchmark_block(results, protocol='p', groups={'near': ('near',), 'far': ('far',)},
                                                     validation=())
  if corrupted:
    per_pair = {f'fog_{s}': {k: v * (1 + 0.1 * s) for k, v in in_dist.items() if k in metrics.CLASSIFICATION_METRICS}
                for s in (1, 2)}
    for block in per_pair.values():
      block['calibrated'] = dict(block)
    spread = lambda s: {k: {'mean': v} for k, v in per_pair[f'fog_{s}'].items() if k != 'calibrated'}
    results['corrupted'] = {'per_pair': per_pair,
                            'per_severity': {str(s): {**spread(s), 'calibrated': spread(s)} for s in (1, 2)},
                            'mean': {**per_pair['fog_1'], 'calibrated': per_pair['fog_1']}}
  return results


def test_summary_is_a_few_lines_naming_the_convention_and_where_the_tables_are():
  results = _classifier_results(np.random.default_rng(0))
  text = report.summary(results, results_dir='runs/x')
  lines = text.splitlines()
  assert len(lines) <= 8 and max(len(line) for line in lines) <= 160
  assert lines[0].startswith('softmax · cnn · digits: ID accuracy ') and 'temperature (T = 1.500)' in lines[0]
  assert 'AUROC % / FPR@95 % (OOD positive)' in lines[1]
  rows = [r for r in results['benchmark']['rows'] if r['kind'] == 'post-hoc']
  best = max(rows, key=lambda r: r['groups']['near']['auroc'])
  assert f"best detectors on near: {best['name']} {100 * best['groups']['near']['auroc']:.2f} /" in text
  assert "max_softmax (= msp) (the method's score): near" in text
  assert lines[-1] == 'Full tables: runs/x/results.md (figures beside it); every metric: runs/x/results.json.'


def test_results_md_links_the_figures_it_writes(tmp_path):
  results = _classifier_results(np.random.default_rng(1))
  report.write_results(results, str(tmp_path))
  names = ['reliability.png', 'reliability_calibrated.png', 'scores.png', 'shift_ece.png', 'shift_accuracy.png']
  assert all((tmp_path / name).stat().st_size > 1000 for name in names)
  text = (tmp_path / 'results.md').read_text()
  assert all(f']({name})' in text for name in names)
  assert 'Post-hoc detectors (fitted' not in text and '| vim | post-hoc |' in text  # the leaderboard, no 2nd table
  assert json.loads((tmp_path / 'results.json').read_text())['default_score'] == 'max_softmax'


def test_without_matplotlib_results_md_says_why_there_are_no_figures(tmp_path, monkeypatch):
  monkeypatch.setattr(_extras, 'installed', lambda name: name != 'matplotlib')
  report.write_results(_classifier_results(np.random.default_rng(2), corrupted=False), str(tmp_path))
  text = (tmp_path / 'results.md').read_text()
  assert 'Figures: none drawn. Drawing the figures of results.md needs matplotlib' in text
  assert "pip install 'ood_jax[plots]'" in text and not list(tmp_path.glob('*.png'))
