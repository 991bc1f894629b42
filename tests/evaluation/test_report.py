"""Results files and tables: the comparison table, loading results, the markdown of one run."""

import json

import numpy as np
import pytest

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
  assert lines[0] == ('| run | method | accuracy | ECE | score | svhn AUROC / FPR95 | dtd AUROC / FPR95 | '
                      'mean AUROC / FPR95 | shifted accuracy | shifted ECE |')
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

