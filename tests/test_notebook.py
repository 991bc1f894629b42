"""The CIFAR-10-C calibration notebook runs top to bottom in SMOKE mode (mock data, CPU)."""

import ast
import os
import pathlib
import re
import sys

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


def _install_cell():
  """The notebook's install cell, run up to (not including) its statements that act: its functions."""
  notebook = nbformat.read(REPO / 'colab' / 'cifar10c_calibration.ipynb', as_version=4)
  cell = next(c.source for c in notebook.cells if c.cell_type == 'code' and 'def install_commands' in c.source)
  tree = ast.parse(cell)
  tree.body = [node for node in tree.body if not isinstance(node, ast.If)]
  namespace = {}
  exec(compile(tree, 'install cell', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def test_install_cell_uses_a_local_checkout_and_keeps_an_installed_tensorflow(tmp_path):
  cell = _install_cell()
  # A local checkout (here this one, standing in for the clone) is used as it is: nothing is cloned.
  checkout, commands = cell['install_commands'](str(REPO), str(tmp_path / 'clone'), tensorflow_installed=True)
  assert checkout == str(REPO)
  assert commands == [[sys.executable, '-m', 'pip', 'install', '--quiet', '-e', f'{REPO}[colab,plots]']]
  assert not any('tensorflow' in part for command in commands for part in command)
  # Without TensorFlow the 'train' extra brings the CPU build; a URL is cloned once.
  url = cell['OOD_JAX_REPO']
  checkout, commands = cell['install_commands'](url, str(tmp_path / 'clone'), tensorflow_installed=False)
  assert checkout == str(tmp_path / 'clone')
  assert commands[0] == ['git', 'clone', '--quiet', '--depth=1', url, str(tmp_path / 'clone')]
  assert commands[1][-1] == f'{tmp_path / "clone"}[train,plots]'
  (tmp_path / 'clone').mkdir()
  assert len(cell['install_commands'](url, str(tmp_path / 'clone'), tensorflow_installed=True)[1]) == 1
  assert cell['have_tensorflow']()  # this environment has TensorFlow (tensorflow-cpu): 'colab' would be chosen


def test_notebook_readme_and_setup_name_the_same_repository():
  url = _install_cell()['OOD_JAX_REPO']
  setup = (REPO / 'setup.py').read_text(encoding='utf-8')
  assert f"URL = '{url}'" in setup
  owner_name = url.removeprefix('https://github.com/')
  badge = f'https://colab.research.google.com/github/{owner_name}/blob/main/colab/cifar10c_calibration.ipynb'
  assert f'(https://colab.research.google.com/assets/colab-badge.svg)]({badge})' in (REPO / 'README.md').read_text(
      encoding='utf-8')
