"""The CIFAR-10-C calibration notebook runs top to bottom in SMOKE mode (mock data, CPU)."""

import os
import pathlib
import re

import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  monkeypatch.setenv('OOD_JAX_SMOKE', '1')
  monkeypatch.setenv('OOD_JAX_WORKDIR', str(tmp_path / 'runs'))
  monkeypatch.setenv('PYTHONPATH', str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  notebook = nbformat.read(REPO / 'colab' / 'cifar10c_calibration.ipynb', as_version=4)
  NotebookClient(notebook, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': str(REPO)}}).execute()
  outputs = {i: cell.get('outputs', []) for i, cell in enumerate(notebook.cells) if cell.cell_type == 'code'}
  assert all(o.get('output_type') != 'error' for out in outputs.values() for o in out)
  # The four models were trained and evaluated under shift, and the figures were drawn.
  for method in ('softmax', 'dm', 'one_vs_all', 'distance_one_vs_all'):
    assert (tmp_path / 'runs' / method / 'results.json').exists()
  images = [o for out in outputs.values() for o in out if 'image/png' in o.get('data', {})]
  # ECE and accuracy with CE+TS, ECE after calibration, 4 reliability diagrams, 2 risk-coverage panels.
  assert len(images) >= 9
  text = ''.join(o.get('text', '') for out in outputs.values() for o in out if o.get('output_type') == 'stream')
  # The risk-coverage panel restores the checkpoints: the recomputed AURC is the evaluator's.
  aurcs = re.findall(r'(\S+(?: DM)?): AURC recomputed ([\d.]+), evaluator ([\d.]+)', text)
  assert [name for name, _, _ in aurcs] == ['CE', 'DM', 'OvA', 'OvA DM']
  assert all(recomputed == evaluator for _, recomputed, evaluator in aurcs), aurcs
  summary = [output['data']['text/markdown'] for cell in outputs.values() for output in cell
             if 'text/markdown' in output.get('data', {})]
  assert summary and 'Mock data' in summary[-1]
  for row in ('| CE |', '| CE+TS |', '| DM+TS |', '| OvA+Platt |', '| OvA DM |', '| OvA DM+Platt |'):
    assert summary[-1].count(row) == 2, row  # clean test and CIFAR-10-C tables
