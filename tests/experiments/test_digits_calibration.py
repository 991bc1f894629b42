"""Tests for experiments/digits_calibration.py: the offline digits-C calibration figure, in smoke mode."""

from __future__ import annotations

import json

from PIL import Image

from experiments import digits_calibration
from ood_jax import plots


def test_smoke_run_trains_the_four_losses_and_writes_what_the_readme_shows(tmp_path):
  results = digits_calibration.run(str(tmp_path / 'runs'), str(tmp_path / 'docs'), smoke=True)
  assert list(results) == ['CE', 'DM', 'OvA', 'OvA DM']
  for label, method in digits_calibration.METHODS.items():
    saved = json.loads((tmp_path / 'runs' / method / 'config.json').read_text())
    assert saved['method'] == method
    assert saved['optimizer']['learning_rate'] == digits_calibration.LEARNING_RATES[method]
    assert set(results[label]['corrupted']['per_severity']) == {'1', '2', '3', '4', '5'}
    # Temperature scaling for the softmax heads, per-class Platt for the one-vs-all heads.
    expected = 'platt' if 'one_vs_all' in method else 'temperature'
    assert results[label]['calibration']['calibrator'] == expected
  assert [plots.calibrated_label(label, r) for label, r in results.items()] == [
      'CE+TS', 'DM+TS', 'OvA+Platt', 'OvA DM+Platt']
  for name in ('ece', 'accuracy', 'ece_calibrated'):
    with Image.open(tmp_path / 'docs' / f'digits_c_{name}.png') as image:
      assert image.format == 'PNG' and image.width > 500
  # The summary prints exactly the evaluator's numbers, raw and calibrated.
  lines = (tmp_path / 'docs' / 'digits_c_summary.md').read_text().splitlines()
  header = [cell.strip() for cell in lines[0].strip('|').split('|')]
  assert header == list(digits_calibration.SUMMARY_COLUMNS)
  rows = [line for line in lines[2:] if line.startswith('|')]
  assert len(rows) == 4
  for row, (label, r) in zip(rows, results.items()):
    cells = dict(zip(header, (cell.strip() for cell in row.strip('|').split('|'))))
    ind, shifted = r['in_distribution'], r['corrupted']['mean']
    assert cells['loss'] == label
    assert cells['calibrator'] == ('Platt' if r['calibration']['calibrator'] == 'platt'
                                   else f"TS (T = {r['calibration']['temperature']:.3g})")
    assert cells['test accuracy'] == f"{100 * ind['accuracy']:.2f} %"
    assert float(cells['test ECE']) == round(ind['ece'], 4)
    assert float(cells['test ECE calibrated']) == round(ind['calibrated']['ece'], 4)
    assert cells['digits-C accuracy'] == f"{100 * shifted['accuracy']:.2f} %"
    assert float(cells['digits-C ECE']) == round(shifted['ece'], 4)
    assert float(cells['digits-C ECE calibrated']) == round(shifted['calibrated']['ece'], 4)
    assert float(cells['digits-C Brier']) == round(shifted['brier'], 4)
    assert float(cells['digits-C AURC']) == round(shifted['aurc'], 4)

  # A second run reuses the finished runs instead of training again.
  again = digits_calibration.run(str(tmp_path / 'runs'), str(tmp_path / 'docs2'), smoke=True)
  assert again['CE']['in_distribution'] == results['CE']['in_distribution']


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
