"""Tests for experiments/digits_methods.py: every method of papers 001, 003 and 004 in one table."""

from __future__ import annotations

import json
import pathlib

import ml_collections

from experiments import digits_methods
from ood_jax.trainer import checkpoint
from ood_jax.trainer import experiment

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_run_is_a_valid_config(monkeypatch):
  # SMOT's base run (the softmax run) does not exist yet: stand in its saved config.
  monkeypatch.setattr(checkpoint, 'load_config', lambda workdir: ml_collections.ConfigDict({'method': 'softmax'}))
  for name, (method, overrides) in digits_methods.RUNS.items():
    config = digits_methods._config(method, overrides, '/runs', smoke=False)  # pylint: disable=protected-access
    experiment.check_config(config)
    assert config.method == method, name
  assert list(digits_methods.RUNS)[0] == 'softmax'  # trained first: others start from it


# A subset in CI (every run is checked as a config above): a base run, the two runs that start from
# it, a distance-head method and a contrastive one.
_SMOKE_RUNS = ('softmax', 'ice_finetuned', 'smot', 'isomax', 'reweightood')


def test_smoke_run_compares_every_method_in_one_table(tmp_path):
  output, matrix_output = tmp_path / 'table.md', tmp_path / 'leaderboard.md'
  table, matrix = digits_methods.run(str(tmp_path / 'runs'), str(output), leaderboard_output=str(matrix_output),
                                     smoke=True, names=_SMOKE_RUNS)
  assert output.read_text() == table and matrix_output.read_text() == matrix
  lines = table.splitlines()
  assert lines[0].startswith('| run | method | accuracy | ECE | score | digits/near AUROC / FPR95 |')
  rows = {line.split('|')[1].strip(): line for line in lines[2:]}
  assert list(rows) == list(_SMOKE_RUNS)
  assert matrix.splitlines()[2] == '| score / detector | ' + ' | '.join(_SMOKE_RUNS) + ' |'
  for name in _SMOKE_RUNS:
    method = digits_methods.RUNS[name][0]
    results = json.loads((tmp_path / 'runs' / name / 'results.json').read_text())
    cells = [cell.strip() for cell in rows[name].strip('|').split('|')]
    assert cells[1] == method and cells[4] == results['default_score']
    near = results['ood']['digits/near'][results['default_score']]
    assert cells[5] == f"{100 * near['auroc']:.1f} / {100 * near['fpr95_id_positive']:.1f}"
    assert results['benchmark']['protocol'] == 'digits'
    default = next(row for row in results['benchmark']['rows'] if row['name'] == results['default_score'])
    assert default['per_set']['digits/near'] == near
  # The fine-tuned ICE run and SMOT start from the softmax run of the same workdir.
  saved = {name: json.loads((tmp_path / 'runs' / name / 'config.json').read_text())
           for name in ('ice_finetuned', 'smot')}
  assert saved['ice_finetuned']['init_from'] == str(tmp_path / 'runs' / 'softmax')
  assert saved['ice_finetuned']['init_head'] == 'class_stats'
  assert saved['smot']['base_model'] == str(tmp_path / 'runs' / 'softmax')


def test_provenance_names_the_command_the_data_and_the_runtime():
  real, smoke = digits_methods.provenance(25.44, smoke=False), digits_methods.provenance(0.5, smoke=True)
  assert '`python -m experiments.digits_methods --workdir=runs/digits_methods' in real
  assert f"real data: scikit-learn's 8×8 digits; {len(digits_methods.RUNS)} runs" in real and '25.4 minutes' in real
  assert 'not results' in smoke and 'real data' not in smoke
  for path in ('docs/digits_methods.md', 'docs/digits_leaderboard.md'):  # the committed tables carry it
    assert (REPO / path).read_text(encoding='utf-8').startswith('Written by `python -m experiments.digits_methods')
