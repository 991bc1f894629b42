"""Tests for experiments/digits_calibration.py: the offline digits-C calibration figure, in smoke mode."""

from __future__ import annotations

import json

from PIL import Image

from experiments import digits_calibration


def test_smoke_run_trains_the_four_losses_and_writes_what_the_readme_shows(tmp_path):
  results = digits_calibration.run(str(tmp_path / 'runs'), str(tmp_path / 'docs'), smoke=True)
  assert list(results) == ['CE', 'DM', 'OvA', 'OvA DM']
  for label, method in digits_calibration.METHODS.items():
    saved = json.loads((tmp_path / 'runs' / method / 'config.json').read_text())
    assert saved['method'] == method
    assert saved['optimizer']['learning_rate'] == digits_calibration.LEARNING_RATES[method]
    assert set(results[label]['corrupted']['per_severity']) == {'1', '2', '3', '4', '5'}
  for metric in ('ece', 'accuracy'):
    with Image.open(tmp_path / 'docs' / f'digits_c_{metric}.png') as image:
      assert image.format == 'PNG' and image.width > 500
  # The summary prints exactly the evaluator's numbers.
  rows = (tmp_path / 'docs' / 'digits_c_summary.md').read_text().splitlines()[2:]
  assert len(rows) == 4
  for row, (label, r) in zip(rows, results.items()):
    cells = [cell.strip() for cell in row.strip('|').split('|')]
    assert cells[0] == label
    assert cells[1] == f"{100 * r['in_distribution']['accuracy']:.2f} %"
    assert float(cells[4]) == round(r['corrupted']['mean']['ece'], 4)

  # A second run reuses the finished runs instead of training again.
  again = digits_calibration.run(str(tmp_path / 'runs'), str(tmp_path / 'docs2'), smoke=True)
  assert again['CE']['in_distribution'] == results['CE']['in_distribution']
