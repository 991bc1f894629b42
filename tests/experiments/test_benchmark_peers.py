"""experiments.benchmark_peers at --quick sizes: every row runs, agrees with its peer, and missing peers are skipped.

Timings are not asserted (the sizes are tiny and the machine is shared); only that they are real numbers.
"""

import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import benchmark_peers
from ood_jax import models

REPO = pathlib.Path(__file__).resolve().parents[2]
PEERS = ('sklearn', 'faiss', 'torch')


def _installed(name):
  try:
    __import__(name)
  except ImportError:
    return False
  return True


def test_quick_run_times_and_checks_every_row():
  rows = benchmark_peers.run(quick=True)
  names = [row.benchmark for row in rows]
  assert len(names) == len(set(names)) == 13, names
  for prefix, count in (('metrics', 2), ('knn', 1), ('mahalanobis', 2), ('train step', 4), ('inference', 4)):
    assert sum(name.startswith(prefix) for name in names) == count, prefix
  for row in rows:
    if row.benchmark.endswith('XLA defaults (vs PyTorch)') or row.benchmark.startswith('train step resnet18'):
      # One compilation per network when quick (or no PyTorch at all, as in CI).
      assert row.skipped and ('not timed with --quick' in row.check or not _installed('torch')), row
      continue
    peer = 'faiss' if row.benchmark.startswith('knn') else 'torch' if 'PyTorch' in row.benchmark else 'sklearn'
    if not _installed(peer):
      assert row.skipped and row.check.startswith('skipped:') and 'not importable' in row.check
      continue
    assert not row.skipped, row
    assert row.ours > 0 and row.peer > 0 and math.isfinite(row.ratio) and row.ratio > 0, row
    assert row.passed is True and row.check.startswith('✓'), row
  markdown = benchmark_peers.format_markdown(rows).splitlines()
  assert markdown[0] == '| benchmark | ood_jax | peer | ratio | check |' and len(markdown) == 2 + len(rows)
  assert benchmark_peers.format_text(rows).splitlines()[0].startswith('benchmark')


def test_missing_peers_are_reported_as_skipped(monkeypatch):
  for name in PEERS:
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
  rows = benchmark_peers.run(quick=True)
  assert len(rows) == 13
  for row in rows:
    assert row.skipped and row.passed is None and row.ratio is None, row
    assert row.check.startswith('skipped:'), row
  assert all('not importable' in row.check for row in rows if 'PyTorch' not in row.benchmark)
  assert all('torch is not importable' in row.check for row in rows if 'PyTorch' in row.benchmark)
  assert '—' in benchmark_peers.format_markdown(rows)


def test_unknown_section_is_an_error():
  with pytest.raises(ValueError, match='unknown sections'):
    benchmark_peers.run(['metrics', 'sorting'], quick=True)


def test_unknown_network_is_an_error():
  with pytest.raises(ValueError, match=r"unknown networks \['vgg'\]; valid: resnet20, resnet18, wrn40_2"):
    benchmark_peers.run(['train'], quick=True, networks=['resnet20', 'vgg'])


def test_unknown_ablation_is_an_error():
  with pytest.raises(ValueError, match=r"unknown ablations \['dropout'\]; valid: batchnorm, kernel_grads"):
    benchmark_peers.run(['train'], quick=True, ablate=['batchnorm', 'dropout'])


@pytest.fixture(scope='module')
def digits_cnn_step_inputs():
  model = models.make_classifier('digits_cnn', 'dense', 10, dtype=jnp.float32)
  variables = benchmark_peers.init_variables(model, (8, 8, 1))
  optimizer = optax.sgd(0.1, momentum=0.9)
  images = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  labels = jnp.arange(16) % 10
  state = (variables['params'], variables['batch_stats'], optimizer.init(variables['params']))
  return model, optimizer, state, (images, labels)


def test_kernel_grads_ablation_updates_everything_but_the_conv_kernels(digits_cnn_step_inputs):
  model, optimizer, state, batch = digits_cnn_step_inputs
  step = benchmark_peers._ablated_step(model, optimizer, 'kernel_grads', state, batch, None)
  params = step(*jax.tree.map(jnp.copy, state), *batch)[0]
  moved = {jax.tree_util.keystr(path): (leaf.ndim, bool(np.any(leaf != old)))
           for (path, leaf), old in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(state[0]))}
  assert any(ndim == 4 for ndim, _ in moved.values()), moved
  assert all(changed == (ndim != 4) for ndim, changed in moved.values()), moved


def test_batchnorm_ablation_makes_the_network_ignore_batchnorm(digits_cnn_step_inputs):
  model, optimizer, state, batch = digits_cnn_step_inputs
  step = benchmark_peers._ablated_step(model, optimizer, 'batchnorm', state, batch, None)
  full = benchmark_peers.train_benchmark.make_step(model, optimizer)
  # Another BatchNorm scale changes the full network's loss but not the ablated one's.
  params, batch_stats, opt_state = state
  rescaled = jax.tree_util.tree_map_with_path(
      lambda path, leaf: 3.0 * leaf if 'bn' in jax.tree_util.keystr(path) and 'scale' in jax.tree_util.keystr(path)
      else leaf, params)
  losses = {name: [float(fn(*jax.tree.map(jnp.copy, (p, batch_stats, opt_state)), *batch)[-1])
                   for p in (params, rescaled)] for name, fn in (('ablated', step), ('full', full))}
  assert losses['ablated'][0] == losses['ablated'][1], losses
  assert abs(losses['full'][0] - losses['full'][1]) > 1e-3, losses
  # And the ablated step leaves the running statistics as they were (no BatchNorm ran).
  new_stats = step(*jax.tree.map(jnp.copy, state), *batch)[1]
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(batch_stats)))


@pytest.mark.skipif(not _installed('torch'), reason='the ablations are timed against PyTorch')
def test_quick_ablation_rows_agree_with_pytorch():
  rows = benchmark_peers.run(['train'], quick=True, networks=['resnet20'], ablate=['batchnorm', 'kernel_grads'])
  ablated = [row for row in rows if 'BatchNorm as identity' in row.benchmark or 'no conv-kernel' in row.benchmark]
  assert len(ablated) == 2, [row.benchmark for row in rows]
  for row in ablated:
    assert row.passed is True and row.check.startswith('✓ step-2 loss') and row.ours > 0 and row.peer > 0, row


@pytest.mark.skipif(not _installed('sklearn'), reason='scikit-learn is the metrics peer')
def test_script_parses_its_flags_and_writes_markdown(tmp_path):
  output = tmp_path / 'table.md'
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-m', 'experiments.benchmark_peers', '--quick', '--only=metrics',
                           f'--output={output}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'device: ' in result.stdout and 'metrics 10,000+10,000 ties' in result.stdout
  text = output.read_text()
  assert text.startswith('device: ') and text.count('| metrics ') == 2 and '✓' in text
