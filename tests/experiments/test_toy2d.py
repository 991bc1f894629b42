"""Tests for experiments/toy2d.py: the 2-D toy example of Padhy et al. 2020, trained briefly."""

from __future__ import annotations

import numpy as np
from PIL import Image

from experiments import toy2d


def test_toy_data_follows_appendix_e1():
  x, y = toy2d.make_data(0)
  assert x.shape == (10_000, 2) and x.dtype == np.float32
  assert np.array_equal(np.bincount(y), np.full(10, 1_000))
  angles = 2 * np.pi * np.arange(10) / 10
  means = np.stack([x[y == j].mean(axis=0) for j in range(10)])
  np.testing.assert_allclose(means, 20 * np.stack([np.cos(angles), np.sin(angles)], axis=1), atol=0.2)
  variances = np.stack([x[y == j].var(axis=0) for j in range(10)])
  np.testing.assert_allclose(variances, 2.0, rtol=0.15)


def test_run_trains_the_four_models_and_writes_the_figures(tmp_path):
  stats = toy2d.run(str(tmp_path), steps=1_000, seed=0)
  assert list(stats) == ['CE', 'DM', 'OvA', 'OvA DM']
  assert stats['CE']['accuracy'] > 0.9 and stats['OvA']['accuracy'] > 0.9
  assert all(row['accuracy'] > 0.5 for row in stats.values())  # 10 classes: chance is 0.1
  # The paper's point, already after 1 000 steps: far from the data (radius 40) the softmax model
  # stays confident while the distance one-vs-all model's confidence has fallen.
  assert stats['CE']['far_confidence'] > 0.9
  assert stats['OvA DM']['far_confidence'] < 0.5 * stats['OvA DM']['confidence']
  for name in ('toy2d_landscapes.png', 'toy2d_centres.png'):
    with Image.open(tmp_path / name) as image:
      assert image.format == 'PNG' and image.width > 500
