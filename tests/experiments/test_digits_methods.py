"""Tests for experiments/digits_methods.py and experiments/seeds.py: every method in one table, mean ± std."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from experiments import digits_methods
from experiments import seeds
from ood_jax.trainer import checkpoint
from ood_jax.trainer import experiment

REPO = pathlib.Path(__file__).resolve().parents[2]


def _mean_std(values, spec: str) -> str:
  """'mean ± std' of `values` from NumPy (sample std, ddof=1): the reference the tables must print."""
  return f'{np.mean(values):{spec}} ± {np.std(values, ddof=1):{spec}}'


def _cells(line: str) -> list[str]:
  return [cell.strip() for cell in line.strip('|').split('|')]


def test_every_run_is_a_valid_config(monkeypatch):
  # SMOT's base run (the softmax run) does not exist yet: stand in its saved config.
  monkeypatch.setattr(checkpoint, 'load_config', lambda workdir: ml_collections.ConfigDict({'method': 'softmax'}))
  for name, (method, overrides) in digits_methods.RUNS.items():
    config = digits_methods._config(method, overrides, '/runs', smoke=False, seed=2)  # pylint: disable=protected-access
    experiment.check_config(config)
    assert (config.method, config.seed) == (method, 2), name
  assert list(digits_methods.RUNS)[0] == 'softmax'  # trained first: others start from it
  # The runs that start from the softmax run start from the one of their own seed.
  ice = digits_methods._config(*digits_methods.RUNS['ice_finetuned'], '/runs', smoke=False, seed=2)  # pylint: disable=protected-access
  smot = digits_methods._config(*digits_methods.RUNS['smot'], '/runs', smoke=False, seed=1)  # pylint: disable=protected-access
  assert (ice.init_from, smot.base_model) == ('/runs/softmax/seed2', '/runs/softmax/seed1')


# A subset in CI (every run is checked as a config above), two seeds: the base run, SMOT that starts from it
# (per seed), and a contrastive run (no logits: '–' in the logit detectors' rows).
_SMOKE_RUNS = ('softmax', 'smot', 'reweightood')
_SEEDS = (0, 1)


def test_smoke_runs_print_mean_and_std_over_seeds_of_every_number(tmp_path):
  runs_dir, output, matrix_output = tmp_path / 'runs', tmp_path / 'table.md', tmp_path / 'leaderboard.md'
  table, matrix = digits_methods.run(str(runs_dir), str(output), leaderboard_output=str(matrix_output), smoke=True,
                                     names=_SMOKE_RUNS, seeds=_SEEDS)
  assert output.read_text() == table and matrix_output.read_text() == matrix
  per_seed = {name: [json.loads((runs_dir / name / f'seed{seed}' / 'results.json').read_text()) for seed in _SEEDS]
              for name in _SMOKE_RUNS}
  saved = json.loads((runs_dir / 'smot' / 'seed1' / 'config.json').read_text())
  assert (saved['seed'], saved['base_model']) == (1, str(runs_dir / 'softmax' / 'seed1'))

  lines = table.splitlines()
  header = _cells(lines[0])
  near_column = next(column for column in header if column.startswith('digits/near AUROC'))
  rows = {_cells(line)[0]: dict(zip(header, _cells(line))) for line in lines[2:]}
  assert list(rows) == list(_SMOKE_RUNS)
  for name, results in per_seed.items():
    row, score = rows[name], results[0]['default_score']
    assert (row['method'], row['score']) == (digits_methods.RUNS[name][0], score)
    assert row['accuracy'] == _mean_std([100 * r['in_distribution']['accuracy'] for r in results], '.2f') + ' %'
    assert row['ECE (raw)'] == _mean_std([r['in_distribution']['ece'] for r in results], '.4f')
    near = [r['ood']['digits/near'][score] for r in results]
    assert row[near_column] == (_mean_std([100 * n['auroc'] for n in near], '.1f') + ' / '
                                + _mean_std([100 * n['fpr95_id_positive'] for n in near], '.1f'))

  matrix_lines = matrix.splitlines()
  assert matrix_lines[2] == '| score / detector | ' + ' | '.join(_SMOKE_RUNS) + ' |'
  matrix_rows = {_cells(line)[0]: _cells(line)[1:] for line in matrix_lines[4:]}
  accuracy = [_mean_std([100 * r['benchmark']['id_accuracy'] for r in per_seed[name]], '.2f') + ' %'
              for name in _SMOKE_RUNS]
  assert matrix_rows['*ID accuracy*'] == accuracy
  for name, cell in zip(_SMOKE_RUNS, matrix_rows['knn (post-hoc)']):
    knn = [next(row for row in r['benchmark']['rows'] if (row['name'], row['kind']) == ('knn', 'post-hoc'))
           for r in per_seed[name]]
    assert cell == ' / '.join(_mean_std([100 * row['groups'][group]['auroc'] for row in knn], '.1f')
                              for group in ('near', 'far'))
  msp = next(cells for label, cells in matrix_rows.items() if label.startswith('max_softmax'))
  assert msp[2] == '–'  # reweightood has no logits


def test_provenance_names_the_command_the_seeds_the_machine_and_the_versions():
  command = 'python -m experiments.digits_methods --workdir=runs/digits_methods --seeds=0,1,2'
  real = digits_methods.provenance(command, (0, 1, 2), 25.44, smoke=False)
  assert real.startswith(f"Written by `{command}` (real data: scikit-learn's 8×8 digits; {len(digits_methods.RUNS)} "
                         'runs × 3 seeds; every number is the mean ± sample standard deviation over n = 3 seed(s), '
                         '0, 1, 2, trained and evaluated in 25.4 minutes on ')
  assert f'{len(os.sched_getaffinity(0))} CPU cores (' in real
  for library in ('jax', 'flax', 'optax', 'numpy'):
    assert f'{library} {importlib.metadata.version(library)}' in real
  reused = digits_methods.provenance(command, (0, 1, 2), 3.0, smoke=False, reused=54)
  assert '3.0 minutes on ' in reused and 'which found 54 runs already trained' in reused
  assert 'trained and evaluated in' not in reused
  smoke = digits_methods.provenance(command, (0, 1), 0.5, smoke=True)
  assert 'not results' in smoke and 'real data' not in smoke and 'n = 2 seed(s), 0, 1,' in smoke
  for path in ('docs/digits_methods.md', 'docs/digits_leaderboard.md'):  # the committed tables carry it
    assert (REPO / path).read_text(encoding='utf-8').startswith('Written by `python -m experiments.digits_methods')


def test_spread_folds_per_seed_results_into_mean_and_sample_std():
  per_seed = [
      {'acc': 0.9, 'name': 'a', 'warning': 'w0', 'rows': [{'name': 'knn', 'kind': 'post-hoc', 'v': 1.0},
                                                          {'name': 'msp', 'kind': 'method', 'v': 4.0}]},
      {'acc': 0.8, 'name': 'a', 'rows': [{'name': 'msp', 'kind': 'method', 'v': 6.0},
                                         {'name': 'knn', 'kind': 'post-hoc', 'v': 2.0}]},
      {'acc': 0.4, 'name': 'a', 'warning': 'w2', 'rows': [{'name': 'knn', 'kind': 'post-hoc', 'v': 6.0},
                                                          {'name': 'msp', 'kind': 'method', 'v': 5.0}]},
  ]
  folded = seeds.spread(per_seed, (0, 1, 2))
  assert f"{100 * folded['acc']:.2f}" == _mean_std([90.0, 80.0, 40.0], '.2f') == '70.00 ± 26.46'
  assert folded['name'] == 'a' and folded['warning'] == 'seed 0: w0; seed 2: w2'
  knn, msp = folded['rows']  # matched by name and kind, not by position
  assert (f"{knn['v']:.3f}", f"{msp['v']:.1f}") == (_mean_std([1.0, 2.0, 6.0], '.3f'), '5.0 ± 1.0')
  assert seeds.means(folded)['rows'][0]['v'] == pytest.approx(3.0)
  assert f'{seeds.spread([{"x": 0.25}], (7,))["x"]:.2f}' == '0.25'  # one seed: the value alone
  with pytest.raises(ValueError, match=r"results\['x'\] is missing in the results of seed\(s\) \[1\]"):
    seeds.spread([{'x': 1.0}, {}], (0, 1))
  with pytest.raises(TypeError):
    folded['acc'] + 1.0  # pylint: disable=pointless-statement
  assert seeds.parse_seeds(['3', '1']) == (3, 1)
  with pytest.raises(ValueError, match="--seeds takes comma-separated integers, e.g. 0,1,2; got '0,x'"):
    seeds.parse_seeds(['0', 'x'])
  with pytest.raises(ValueError, match=r'no repeats, got \[1, 1\]'):
    seeds.parse_seeds(['1', '1'])
