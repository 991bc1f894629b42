"""Tests for experiments/digits_calibration.py: the offline digits-C calibration figure over seeds, in smoke mode."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from experiments import digits_calibration
from experiments import seeds
from ood_jax import corruptions
from ood_jax import plots
from ood_jax.trainer import experiment


def _mean_std(values, spec: str) -> str:
  """'mean ± std' of `values` from NumPy (sample std, ddof=1): the reference the summary must print."""
  return f'{np.mean(values):{spec}} ± {np.std(values, ddof=1):{spec}}'


def test_every_loss_is_configured_with_its_learning_rate_and_seed():
  for label, method in digits_calibration.METHODS.items():
    config = digits_calibration._config(method, smoke=False, seed=2)  # pylint: disable=protected-access
    experiment.check_config(config)
    assert (config.method, config.seed) == (method, 2), label
    assert config.optimizer.learning_rate == digits_calibration.LEARNING_RATES[method]
    assert tuple(config.eval.corruptions) == corruptions.BENCHMARK_CORRUPTIONS


# Two seeds of a softmax head (temperature scaling) and a one-vs-all head (per-class Platt): both calibrators;
# DM and OvA DM differ from them only in the configuration checked above.
_LABELS = ('CE', 'OvA')
_SEEDS = (0, 1)


def test_smoke_runs_write_the_figures_and_the_summary_of_mean_and_std_over_seeds(tmp_path):
  runs = tmp_path / 'runs'
  results = digits_calibration.run(str(runs), str(tmp_path / 'docs'), smoke=True, seeds=_SEEDS, labels=_LABELS)
  assert list(results) == list(_LABELS)
  per_seed = {label: [json.loads((runs / digits_calibration.METHODS[label] / f'seed{seed}' / 'results.json')
                                 .read_text()) for seed in _SEEDS] for label in _LABELS}
  for label, method in digits_calibration.METHODS.items():
    if label in _LABELS:
      saved = json.loads((runs / method / 'seed1' / 'config.json').read_text())
      assert (saved['method'], saved['seed']) == (method, 1)
      assert set(per_seed[label][1]['corrupted']['per_severity']) == {'1', '2', '3', '4', '5'}
  # Temperature scaling for the softmax head, per-class Platt for the one-vs-all head.
  assert [plots.calibrated_label(label, seeds.means(r)) for label, r in results.items()] == ['CE+TS', 'OvA+Platt']
  for name in ('ece', 'accuracy', 'ece_calibrated'):
    with Image.open(tmp_path / 'docs' / f'digits_c_{name}.png') as image:
      assert image.format == 'PNG' and image.width > 500

  text = (tmp_path / 'docs' / 'digits_c_summary.md').read_text()
  assert text.startswith('Written by `python -m experiments.digits_calibration --workdir=' + str(runs))
  assert '--seeds=0,1 --smoke` (tiny smoke runs' in text and 'over n = 2 seed(s), 0, 1,' in text
  lines = text.splitlines()[2:]
  header = [cell.strip() for cell in lines[0].strip('|').split('|')]
  assert header == list(digits_calibration.SUMMARY_COLUMNS)
  rows = [line for line in lines[2:] if line.startswith('|')]
  assert len(rows) == len(_LABELS)
  for row, label in zip(rows, _LABELS):
    cells = dict(zip(header, (cell.strip() for cell in row.strip('|').split('|'))))
    ind = [r['in_distribution'] for r in per_seed[label]]
    shifted = [r['corrupted']['mean'] for r in per_seed[label]]
    assert cells['loss'] == label
    temperatures = [r['calibration'].get('temperature') for r in per_seed[label]]
    assert cells['calibrator'] == ('Platt' if label == 'OvA' else f"TS (T = {_mean_std(temperatures, '.3g')})")
    assert cells['test accuracy'] == _mean_std([100 * b['accuracy'] for b in ind], '.2f') + ' %'
    assert cells['test ECE'] == _mean_std([b['ece'] for b in ind], '.4f')
    assert cells['test ECE calibrated'] == _mean_std([b['calibrated']['ece'] for b in ind], '.4f')
    assert cells['digits-C accuracy'] == _mean_std([100 * b['accuracy'] for b in shifted], '.2f') + ' %'
    assert cells['digits-C ECE'] == _mean_std([b['ece'] for b in shifted], '.4f')
    assert cells['digits-C ECE calibrated'] == _mean_std([b['calibrated']['ece'] for b in shifted], '.4f')
    assert cells['digits-C Brier'] == _mean_std([b['brier'] for b in shifted], '.4f')
    assert cells['digits-C AURC'] == _mean_std([b['aurc'] for b in shifted], '.4f')

  # A second run reuses the finished runs instead of training again.
  again = digits_calibration.run(str(runs), str(tmp_path / 'docs2'), smoke=True, seeds=_SEEDS, labels=_LABELS)
  assert f"{again['CE']['in_distribution']['ece']:.6f}" == f"{results['CE']['in_distribution']['ece']:.6f}"


def test_summary_lists_the_evaluators_calibration_warnings():
  # Mock results (made-up numbers): one run whose temperature fit stopped at its bound.
  block = {'accuracy': 0.5, 'ece': 0.1, 'brier': 0.6, 'aurc': 0.3}
  mock = {'in_distribution': {**block, 'calibrated': block}, 'corrupted': {'mean': {**block, 'calibrated': block}}}
  results = {'CE': {**mock, 'calibration': {'calibrator': 'temperature', 'temperature': 0.01,
                                            'warning': 'temperature at its lower bound 0.01'}},
             'OvA': {**mock, 'calibration': {'calibrator': 'platt'}}}
  table = digits_calibration.summary_table(results)
  assert '| CE | TS (T = 0.01) | 50.00 % |' in table and '| OvA | Platt |' in table
  assert table.rstrip().splitlines()[-1] == 'CE: temperature at its lower bound 0.01'
