"""Tests for ood_jax.plots: the numbers each figure draws, read back from its artists."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import numpy as np
import pytest
from sklearn import decomposition

from ood_jax import calibration
from ood_jax import metrics
from ood_jax import plots

CORRUPTIONS = ('gaussian_noise', 'motion_blur', 'jpeg_compression')
SEVERITIES = (1, 2, 3, 4, 5)


def _probs(rng, n=400, k=5, sharpness=3.0):
  logits = sharpness * rng.normal(size=(n, k))
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  return probs / probs.sum(axis=1, keepdims=True), rng.integers(0, k, n)


def _shift_block(probs, labels):
  block = metrics.classification_metrics(probs, labels)
  return {m: block[m] for m in metrics.CLASSIFICATION_METRICS}


def _results(seed, *, calibrate=False):
  """Evaluator-layout results (mock numbers): clean test metrics plus every corruption × severity pair.

  With `calibrate`, every level also holds the 'calibrated' block the evaluator writes: here the
  metrics after temperature scaling with T = 2 (halving the logits' scale).
  """
  rng = np.random.default_rng(seed)

  def block(sharpness, *, with_reliability=False):
    labels = rng.integers(0, 5, 400)
    logits = sharpness * rng.normal(size=(400, 5))
    measure = metrics.classification_metrics if with_reliability else _shift_block
    out = measure(np.asarray(calibration.apply_temperature(calibration.TemperatureState(1.0), logits)), labels)
    if calibrate:
      out['calibrated'] = measure(np.asarray(calibration.apply_temperature(calibration.TemperatureState(2.0),
                                                                           logits)), labels)
    return out

  results = {'in_distribution': {'num_examples': 400, **block(3.0, with_reliability=True)}}
  per_pair = {f'{c}_{s}': block(3.0 / s) for c in CORRUPTIONS for s in SEVERITIES}
  views = [((), lambda b: b)] + ([(('calibrated',), lambda b: b['calibrated'])] if calibrate else [])
  per_severity, mean = {}, {}
  for path, view in views:
    spread = {str(s): {m: metrics.summary([view(per_pair[f'{c}_{s}'])[m] for c in CORRUPTIONS])
                       for m in metrics.CLASSIFICATION_METRICS} for s in SEVERITIES}
    average = {m: float(np.mean([view(b)[m] for b in per_pair.values()])) for m in metrics.CLASSIFICATION_METRICS}
    if path:
      for s in spread:
        per_severity[s]['calibrated'] = spread[s]
      mean['calibrated'] = average
    else:
      per_severity, mean = spread, average
  results['corrupted'] = {'per_pair': per_pair, 'per_severity': per_severity, 'mean': mean}
  if calibrate:
    results['calibration'] = {'calibrator': 'temperature', 'temperature': 2.0, 'validation_examples': 40}
  results['ood'] = {'svhn': {'max_softmax': {'auroc': 0.9}}}
  return results


def test_no_pyplot_state():
  # Importing and drawing must leave pyplot (and its backend selection) untouched.
  code = ('import sys; from ood_jax import plots; import numpy as np; '
          'plots.score_histograms(np.arange(5.0), {"ood": np.arange(3.0)}, score_name="s"); '
          'assert "matplotlib.pyplot" not in sys.modules')
  subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('source', ['diagram', 'results'])
def test_reliability_diagram_draws_the_bins(source):
  rng = np.random.default_rng(0)
  probs, labels = _probs(rng)
  diagram = metrics.reliability_diagram(probs, labels, num_bins=15)
  given = diagram if source == 'diagram' else {'in_distribution': metrics.classification_metrics(probs, labels)}
  fig = plots.reliability_diagram(given, title='CE')
  (ax,) = fig.axes
  accuracy_bars, gap_bars = ax.containers
  np.testing.assert_allclose([b.get_height() for b in accuracy_bars], diagram['accuracy'])
  np.testing.assert_allclose([b.get_x() for b in accuracy_bars], diagram['bin_edges'][:-1])
  np.testing.assert_allclose([b.get_width() for b in accuracy_bars], np.diff(diagram['bin_edges']))
  nonempty = diagram['counts'] > 0
  assert len(gap_bars) == nonempty.sum() < 15  # sharp random softmaxes leave low bins empty
  np.testing.assert_allclose([b.get_y() for b in gap_bars], diagram['accuracy'][nonempty])
  np.testing.assert_allclose([b.get_y() + b.get_height() for b in gap_bars], diagram['confidence'][nonempty])
  ece = metrics.expected_calibration_error(probs, labels)
  assert ax.get_legend().get_title().get_text() == f'ECE = {ece:.4f}'
  assert ax.get_title() == 'CE'
  fig.savefig(io.BytesIO(), format='png')


def test_reliability_diagram_rejects_other_dicts():
  with pytest.raises(ValueError, match='missing'):
    plots.reliability_diagram({'accuracy': [1.0]})


def test_shift_box_data_is_the_evaluators_values():
  results = {'CE': _results(0), 'OvA DM': _results(1)}
  assert set(plots._SHIFT_METRICS) == set(metrics.CLASSIFICATION_METRICS)  # every metric the evaluator writes
  for metric in metrics.CLASSIFICATION_METRICS:
    data = plots.shift_box_data(results, metric)
    assert list(data) == ['CE', 'OvA DM']
    for method, by_severity in data.items():
      assert list(by_severity) == [0, *SEVERITIES]
      assert by_severity[0] == [results[method]['in_distribution'][metric]]
      for s in SEVERITIES:
        assert by_severity[s] == [results[method]['corrupted']['per_pair'][f'{c}_{s}'][metric] for c in CORRUPTIONS]
  with pytest.raises(ValueError, match='metric'):
    plots.shift_box_data(results, 'auroc')
  # Results written before the evaluator reported Brier: the error names the method, level and metric.
  old = {'in_distribution': {'accuracy': 0.9, 'ece': 0.1, 'nll': 0.3}}
  with pytest.raises(ValueError, match=r"'CE' has no 'brier' in in_distribution"):
    plots.shift_box_data({'CE': old}, 'brier')


@pytest.mark.parametrize('metric,label', [('brier', 'Brier score'), ('aurc', 'AURC'), ('adaptive_ece', 'Adaptive ECE')])
def test_shift_box_plots_of_the_new_metrics(metric, label):
  results = {'CE': _results(0), 'OvA': _results(2)}
  data = plots.shift_box_data(results, metric)
  fig = plots.shift_box_plots(results, metric=metric)
  (ax,) = fig.axes
  for box, box_values in zip(ax.patches, [v for by_severity in data.values() for v in by_severity.values()]):
    ys = box.get_path().vertices[:, 1]
    np.testing.assert_allclose([ys.min(), ys.max()], np.percentile(box_values, [25, 75]))
  assert ax.get_ylabel() == label


def test_calibrated_moves_exactly_the_calibrated_blocks():
  results = _results(0, calibrate=True)
  frozen = copy.deepcopy(results)
  out = plots.calibrated(results)
  assert results == frozen  # the input is untouched
  ind = results['in_distribution']
  assert out['in_distribution'] == {**ind['calibrated'], 'num_examples': 400}
  assert 'reliability' in out['in_distribution']  # reliability_diagram(calibrated(r)) draws the calibrated bins
  assert set(out['corrupted']['per_pair']) == set(results['corrupted']['per_pair'])
  for pair, block in results['corrupted']['per_pair'].items():
    assert out['corrupted']['per_pair'][pair] == block['calibrated']
  for s, block in results['corrupted']['per_severity'].items():
    assert out['corrupted']['per_severity'][s] == block['calibrated']
  assert out['corrupted']['mean'] == results['corrupted']['mean']['calibrated']
  for key in ('ood', 'calibration'):
    assert out[key] == results[key]
  # Temperature scaling keeps every argmax, and T = 2 softens these over-confident mock models.
  assert out['in_distribution']['accuracy'] == ind['accuracy']
  assert out['in_distribution']['ece'] != ind['ece']
  # The "+TS" variant is just another method of the box plots, drawing the calibrated values.
  data = plots.shift_box_data({'CE': results, 'CE+TS': out}, 'ece')
  assert data['CE+TS'][0] == [ind['calibrated']['ece']]
  assert data['CE+TS'][3] == [results['corrupted']['per_pair'][f'{c}_3']['calibrated']['ece'] for c in CORRUPTIONS]
  assert plots.calibrated_label('CE', results) == 'CE+TS'
  assert plots.calibrated_label('OvA', {'calibration': {'calibrator': 'platt'}}) == 'OvA+Platt'
  bars = plots.reliability_diagram(out).axes[0].containers[0]
  np.testing.assert_allclose([b.get_height() for b in bars], ind['calibrated']['reliability']['accuracy'])


def test_calibrated_says_why_there_is_nothing_to_move():
  raw = _results(0)  # evaluated with validation_fraction=0: no 'calibrated' blocks
  with pytest.raises(ValueError, match=r'validation_fraction=0.*embedding'):
    plots.calibrated(raw)
  with pytest.raises(ValueError, match='validation_fraction=0'):
    plots.calibrated_label('CE', raw)
  once = plots.calibrated(_results(0, calibrate=True))
  with pytest.raises(ValueError, match='no "calibrated" block'):
    plots.calibrated(once)  # calibrating twice is an error, not a silent no-op
  partial = _results(0, calibrate=True)
  del partial['corrupted']['per_pair']['motion_blur_2']['calibrated']
  with pytest.raises(ValueError, match='motion_blur_2'):
    plots.calibrated(partial)
  with pytest.raises(ValueError, match='in_distribution'):
    plots.calibrated({'ood': {}})  # an embedding model's results


def test_shift_box_plots_draw_quartiles_and_extremes():
  results = {'CE': _results(0), 'DM': _results(1), 'OvA': _results(2)}
  data = plots.shift_box_data(results, 'ece')
  fig = plots.shift_box_plots(results, metric='ece')
  (ax,) = fig.axes
  boxes = ax.patches  # method by method, severities in order
  values = [v for by_severity in data.values() for v in by_severity.values()]
  assert len(boxes) == len(values) == 3 * 6
  for box, box_values in zip(boxes, values):
    ys = box.get_path().vertices[:, 1]
    np.testing.assert_allclose([ys.min(), ys.max()], np.percentile(box_values, [25, 75]))
  drawn_y = np.concatenate([line.get_ydata() for line in ax.lines])
  for box_values in values:  # whiskers reach the minimum and maximum (caps drawn there)
    assert np.isclose(drawn_y, min(box_values)).any() and np.isclose(drawn_y, max(box_values)).any()
  centres = [box.get_path().vertices[:, 0].mean() for box in boxes]
  assert np.all(np.diff(np.reshape(centres, (3, 6)), axis=0) > 0)  # methods side by side per severity
  assert [t.get_text() for t in ax.get_xticklabels()] == ['Test', '1', '2', '3', '4', '5']
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['CE', 'DM', 'OvA']
  assert ax.get_ylabel() == 'ECE'


def test_shift_box_whiskers_span_outliers():
  # 1.0 lies far beyond 1.5 IQR of the rest: the paper's whiskers still reach it, not a flier.
  per_pair = {f'c{i}_1': {'ece': v} for i, v in enumerate([0.01, 0.02, 0.03, 0.04, 1.0])}
  fig = plots.shift_box_plots({'CE': {'in_distribution': {'ece': 0.05}, 'corrupted': {'per_pair': per_pair}}})
  (ax,) = fig.axes
  drawn_y = np.concatenate([line.get_ydata() for line in ax.lines])
  assert drawn_y.max() == 1.0 and drawn_y.min() == 0.01
  assert all(len(line.get_ydata()) == 0 or line.get_marker() in ('None', '', None) for line in ax.lines)


def _brute_accuracy_vs_confidence(probs, labels, thresholds):
  accuracy, fraction = [], []
  for tau in thresholds:
    kept = [i for i in range(len(labels)) if probs[i].max() >= tau]
    fraction.append(len(kept) / len(labels))
    accuracy.append(np.mean([probs[i].argmax() == labels[i] for i in kept]) if kept else np.nan)
  return np.array(accuracy), np.array(fraction)


@pytest.mark.parametrize('seed', [0, 1])
def test_accuracy_vs_confidence_data_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  probs, labels = _probs(rng, n=300, k=4)
  probs = np.round(probs, 1)  # ties with the thresholds themselves
  labels[:60] = -1  # OOD examples: never correct
  thresholds = np.concatenate([np.linspace(0.0, 1.0, 21), [1.5]])
  data = plots.accuracy_vs_confidence_data(probs, labels, thresholds)
  accuracy, fraction = _brute_accuracy_vs_confidence(probs, labels, thresholds)
  np.testing.assert_allclose(data['accuracy'], accuracy)  # NaN where nothing is kept (τ = 1.5)
  np.testing.assert_allclose(data['fraction'], fraction)
  assert np.isnan(data['accuracy'][-1]) and data['fraction'][-1] == 0.0


def test_accuracy_vs_confidence_plots_the_data():
  rng = np.random.default_rng(2)
  inputs = {'CE': _probs(rng), 'OvA': _probs(rng, sharpness=1.0)}
  fig = plots.accuracy_vs_confidence(inputs)
  acc_ax, kept_ax = fig.axes
  for i, (probs, labels) in enumerate(inputs.values()):
    data = plots.accuracy_vs_confidence_data(probs, labels, np.linspace(0, 1, 41))
    np.testing.assert_allclose(acc_ax.lines[i].get_ydata(), data['accuracy'])
    np.testing.assert_allclose(kept_ax.lines[i].get_ydata(), data['fraction'])
  with pytest.raises(ValueError, match=r'\[-1, 5\)'):
    plots.accuracy_vs_confidence_data(inputs['CE'][0], np.full(400, 5), [0.5])


def test_risk_coverage_lines_are_the_calibration_curves():
  rng = np.random.default_rng(5)
  probs, labels = _probs(rng, n=300, k=4, sharpness=1.0)
  probs = np.round(probs, 2)  # ties: the curve averages them
  ova = rng.uniform(size=(200, 3))  # one-vs-all rows need not sum to one
  ova_labels = rng.integers(0, 3, 200)
  precomputed = calibration.risk_coverage_curve(ova, ova_labels)
  subsampled = {'coverage': precomputed['coverage'][::10], 'risk': precomputed['risk'][::10], 'aurc': 0.25}
  fig = plots.risk_coverage({'CE': (probs, labels), 'OvA': precomputed, 'OvA (every 10th)': subsampled},
                            title='Test')
  (ax,) = fig.axes
  expected = calibration.risk_coverage_curve(probs, labels)
  np.testing.assert_array_equal(ax.lines[0].get_xdata(), expected['coverage'])
  np.testing.assert_array_equal(ax.lines[0].get_ydata(), expected['risk'])
  np.testing.assert_array_equal(ax.lines[1].get_ydata(), precomputed['risk'])
  np.testing.assert_array_equal(ax.lines[2].get_xdata(), precomputed['coverage'][::10])
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend == [f'CE (AURC {calibration.aurc(probs, labels):.4f})',
                    f'OvA (AURC {calibration.aurc(ova, ova_labels):.4f})', 'OvA (every 10th) (AURC 0.2500)']
  data = plots.risk_coverage_data({'CE': (probs, labels)})
  assert data['CE']['aurc'] == pytest.approx(calibration.aurc(probs, labels), abs=1e-15)
  assert ax.get_title() == 'Test' and ax.get_xlim() == (0.0, 1.0)
  fig.savefig(io.BytesIO(), format='png')


def test_risk_coverage_rejects_bad_curves():
  with pytest.raises(ValueError, match='missing risk'):
    plots.risk_coverage({'CE': {'coverage': [0.5, 1.0]}})
  with pytest.raises(ValueError, match='one shape'):
    plots.risk_coverage({'CE': {'coverage': [0.5, 1.0], 'risk': [0.1]}})
  with pytest.raises(TypeError, match=r'\(probs, labels\)'):
    plots.risk_coverage({'CE': np.zeros((3, 2))})
  with pytest.raises(ValueError, match='empty'):
    plots.risk_coverage({})


def test_score_histograms_are_densities_on_shared_bins():
  rng = np.random.default_rng(3)
  in_scores = rng.normal(2.0, 1.0, 500)
  out = {'svhn': rng.normal(0.0, 1.0, 300), 'noise': rng.normal(-1.0, 0.5, 100)}
  fig = plots.score_histograms(in_scores, out, score_name='max_logit', bins=20)
  (ax,) = fig.axes
  assert len(ax.patches) == 3
  edges = np.histogram_bin_edges(np.concatenate([in_scores, *out.values()]), bins=20)
  for patch, scores in zip(ax.patches, [in_scores, *out.values()]):
    values, patch_edges, _ = patch.get_data()
    np.testing.assert_allclose(patch_edges, edges)
    np.testing.assert_allclose(values, np.histogram(scores, bins=edges, density=True)[0])
    assert np.isclose(np.sum(values * np.diff(edges)), 1.0)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['in-distribution', 'svhn', 'noise']
  assert ax.get_xlabel() == 'max_logit'


def _radial(grid):
  return 1.0 / (1.0 + np.hypot(grid[:, 0], 0.5 * grid[:, 1]))


def test_confidence_landscape_image_is_the_function_on_the_grid():
  points = np.array([[0.0, 1.0], [2.0, -3.0], [-1.0, 0.5]])
  fig = plots.confidence_landscape(_radial, xlim=(-4, 4), ylim=(-2, 6), resolution=9,
                                   points=points, labels=np.array([0, 1, 2]))
  ax, colorbar = fig.axes
  xs, ys = np.linspace(-4, 4, 9), np.linspace(-2, 6, 9)
  expected = np.array([[_radial(np.array([[x, y]]))[0] for x in xs] for y in ys])
  np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=1e-6)
  np.testing.assert_allclose(ax.images[0].get_extent(), [-4.5, 4.5, -2.5, 6.5])  # pixels centred on grid points
  np.testing.assert_allclose(ax.collections[0].get_offsets(), points)
  assert colorbar.get_ylabel() == 'Max predictive probability'


def test_confidence_landscape_panels_share_a_colour_bar():
  fns = {'A': _radial, 'B': lambda g: np.full(len(g), 0.25)}
  fig = plots.confidence_landscape(fns, xlim=(-1, 1), ylim=(-1, 1), resolution=5)
  assert len(fig.axes) == 3
  assert [ax.get_title() for ax in fig.axes[:2]] == ['A', 'B']
  np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), np.full((5, 5), 0.25))
  with pytest.raises(ValueError, match='shape'):
    plots.confidence_landscape(lambda g: np.zeros(3), xlim=(-1, 1), ylim=(-1, 1), resolution=5)


def test_learned_centres_project_onto_the_features_pca_plane():
  rng = np.random.default_rng(4)
  labels = np.repeat(np.arange(3), 50)
  features = rng.normal(size=(150, 6)) + 3.0 * np.eye(6)[labels]
  centres = rng.normal(size=(3, 6))
  fig = plots.learned_centres({'DM': (features, labels, centres)})
  (ax,) = fig.axes
  pca = decomposition.PCA(n_components=2).fit(features)
  means = np.stack([features[labels == k].mean(axis=0) for k in range(3)])
  for collection, raw in zip(ax.collections, (features, means, centres)):
    drawn, expected = collection.get_offsets(), pca.transform(raw)
    signs = np.sign(np.sum(drawn * expected, axis=0))  # principal directions have no fixed sign
    np.testing.assert_allclose(drawn, expected * signs, atol=1e-9)
  with pytest.raises(ValueError, match='every class'):
    plots.learned_centres({'DM': (features, np.minimum(labels, 1), centres)})


def test_embedding_statistics_bars_are_the_means():
  radii = {'SupCon': np.array([0.97, 1.01, 0.97]), 'ReweightOOD': np.array([0.95, 0.90, 0.90])}
  stats = {m: {'mes_radius': radii[m], 'dispersion': d} for m, d in (('SupCon', 0.42), ('ReweightOOD', 0.63))}
  fig = plots.embedding_statistics(stats)
  radius_ax, dispersion_ax = fig.axes
  np.testing.assert_allclose([bar.get_height() for bar in radius_ax.containers[0]],
                             [radii['SupCon'].mean(), radii['ReweightOOD'].mean()])
  np.testing.assert_allclose([b.get_height() for b in dispersion_ax.containers[0]], [0.42, 0.63])
  assert [t.get_text() for t in dispersion_ax.get_xticklabels()] == ['SupCon', 'ReweightOOD']
  assert [t.get_text() for t in dispersion_ax.texts] == ['0.420', '0.630']
  with pytest.raises(ValueError, match='statistics'):
    plots.embedding_statistics({'A': {'mes_radius': 1.0}, 'B': {'dispersion': 0.1}})
