"""The papers' figures, drawn from the evaluator's results or from plain arrays.

Every function returns a new `matplotlib.figure.Figure` built without pyplot: no global figure
state and no backend switch, so the functions are safe inside libraries, scripts and notebooks.
`fig.savefig('x.png')` renders with Agg whatever the session's backend. The `*_data` helpers return
exactly the numbers their figure draws, so tests and tables can use them without a figure.

* `reliability_diagram`: accuracy per confidence bin against the diagonal (Padhy et al. 2020, Fig. S2).
* `shift_box_plots` / `shift_box_data`: a classification metric (ECE, accuracy, NLL, Brier,
  adaptive / classwise ECE, MCE, AURC, ...) per shift intensity, one box per method over the
  corruptions (Padhy et al. 2020, Figs. 2–3).
* `calibrated` / `calibrated_label`: the results after the run's post-hoc calibrator, for the
  "+TS" / "+Platt" variants of any figure drawn from results.
* `risk_coverage` / `risk_coverage_data`: selective risk against coverage, AURC in the legend
  (Geifman & El-Yaniv 2017).
* `accuracy_vs_confidence` / `accuracy_vs_confidence_data`: accuracy of the examples whose
  confidence is at least τ, against τ (Padhy et al. 2020, Fig. 4).
* `score_histograms`: densities of an OOD score on in-distribution and OOD sets (Macêdo et al. 2021, Fig. 5).
* `confidence_landscape`: max predictive probability over a 2-D input grid (Padhy et al. 2020, Fig. 1).
* `learned_centres`: learned class centres vs the class means of the features, in the features'
  2-D PCA projection (Padhy et al. 2020, Fig. S1).
* `embedding_statistics`: mean MES radius and centroid dispersion per method (Regmi et al. 2024,
  Tables 1–2).

Papers: IsoMax (Macêdo et al. 2021), one-vs-all (Padhy et al. 2020), ReweightOOD (Regmi et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import copy
from typing import Any

import numpy as np

from ood_jax import _checks
from ood_jax import _extras
from ood_jax import calibration
from ood_jax import metrics

# The figures need the 'plots' extra: checked before matplotlib is imported, so its absence names the extra.
_extras.require(_extras.MODULES['ood_jax.plots'], needed_by='ood_jax.plots')

from matplotlib import patches as mpatches  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    'accuracy_vs_confidence',
    'accuracy_vs_confidence_data',
    'calibrated',
    'calibrated_label',
    'confidence_landscape',
    'embedding_statistics',
    'learned_centres',
    'reliability_diagram',
    'risk_coverage',
    'risk_coverage_data',
    'score_histograms',
    'shift_box_data',
    'shift_box_plots',
]

# Axis labels of the metrics a results file holds per shift level (`metrics.CLASSIFICATION_METRICS`).
_SHIFT_METRICS = {
    'accuracy': 'Accuracy',
    'nll': 'NLL',
    'ece': 'ECE',
    'brier': 'Brier score',
    'adaptive_ece': 'Adaptive ECE',
    'classwise_ece': 'Classwise ECE',
    'mce': 'MCE',
    'aurc': 'AURC',
    'eaurc': 'E-AURC',
    'accuracy_at_95': 'Accuracy at 95 % coverage',
}
# How a calibrated variant is named after the evaluator's `results['calibration']['calibrator']`.
_CALIBRATOR_SUFFIX = {'temperature': '+TS', 'platt': '+Platt'}
_DIAGRAM_KEYS = ('bin_edges', 'counts', 'accuracy', 'confidence')
_STATISTIC_TITLES = {'mes_radius': 'Mean MES radius (↓)', 'dispersion': 'Mean centroid dispersion (↑)'}
_PANEL_SIZE = 3.6  # inches per panel: readable tick labels at the default font size


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _figure(num_panels: int, *, width: float = _PANEL_SIZE, height: float = _PANEL_SIZE):
  """A constrained-layout figure with `num_panels` axes in one row, and the axes as a list."""
  fig = Figure(figsize=(width * num_panels, height), layout='constrained')
  axes = fig.subplots(1, num_panels, squeeze=False)[0]
  return fig, list(axes)


def _nonempty_mapping(name: str, value) -> Mapping:
  if not isinstance(value, Mapping):
    raise TypeError(f'{name} must be a mapping (e.g. a dict keyed by method), got {type(value).__name__}.')
  if not value:
    raise ValueError(f'{name} is empty.')
  return value


def _array(name: str, x, *, ndim: int) -> np.ndarray:
  """`x` as a finite float64 array of rank `ndim` (integer input allowed: counts, scores)."""
  return _checks.host_float64(name, x, ndim=ndim, allow_integer=True)


def _colors(n: int) -> list[str]:
  # The default property cycle's colours, in order, so a method keeps its colour across figures
  # that list the methods in the same order.
  return [f'C{i % 10}' for i in range(n)]


def _class_colors(labels) -> np.ndarray:
  """A colour per integer label, class k in the cycle's colour k (mod 10, as `_colors`)."""
  return np.asarray(_colors(10))[np.asarray(labels) % 10]


# ----------------------------------------------------------------------------------------------
# Reliability diagram (Padhy et al. 2020, Fig. S2).


def _diagram(results_or_diagram: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
  """bin_edges, counts, accuracy and confidence of an evaluator results dict or a diagram dict."""
  source = results_or_diagram
  if 'in_distribution' in source:
    source = source['in_distribution']['reliability']
  missing = [key for key in _DIAGRAM_KEYS if key not in source]
  if missing:
    raise ValueError('results_or_diagram must be evaluator results or a metrics.reliability_diagram '
                     f'dict; missing {", ".join(missing)}.')
  edges, counts, accuracy, confidence = (_array(key, source[key], ndim=1) for key in _DIAGRAM_KEYS)
  if not edges.size == counts.size + 1 == accuracy.size + 1 == confidence.size + 1:
    raise ValueError(f'bin_edges must have one entry more than counts, accuracy and confidence, got '
                     f'sizes {edges.size}, {counts.size}, {accuracy.size}, {confidence.size}.')
  if counts.sum() <= 0:
    raise ValueError('counts must hold at least one example.')
  return edges, counts, accuracy, confidence


def reliability_diagram(results_or_diagram: Mapping[str, Any], *, title: str | None = None) -> Figure:
  """Reliability diagram: accuracy per confidence bin, its gap to the mean confidence, the diagonal.

  Bars span their bins; the hatched "Gap" bar of a non-empty bin runs from its accuracy to its
  mean confidence (above the accuracy for overconfident bins, below for underconfident ones). The
  legend's title gives the ECE, Σ_b n_b |acc_b − conf_b| / N, recomputed from the bins (equal to
  `metrics.expected_calibration_error` on the same data).

  Args:
    results_or_diagram: the evaluator's results (its `['in_distribution']['reliability']` is
      drawn) or a `metrics.reliability_diagram` dict.
    title: axes title.

  Returns:
    A Figure with one Axes; `ax.containers[0]` holds the accuracy bars, `ax.containers[1]` the gap
    bars of the non-empty bins.
  """
  edges, counts, accuracy, confidence = _diagram(results_or_diagram)
  ece = float(np.sum(counts * np.abs(accuracy - confidence)) / np.sum(counts))
  fig, (ax,) = _figure(1)
  left, width = edges[:-1], np.diff(edges)
  ax.bar(left, accuracy, width=width, align='edge', color='C0', edgecolor='black', label='Accuracy')
  nonempty = counts > 0
  ax.bar(left[nonempty], (confidence - accuracy)[nonempty], bottom=accuracy[nonempty],
         width=width[nonempty], align='edge', color='C3', alpha=0.3, edgecolor='C3', hatch='//',
         label='Gap')
  ax.plot([0.0, 1.0], [0.0, 1.0], linestyle='--', color='gray', label='Perfect calibration')
  ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), xlabel='Confidence', ylabel='Accuracy')
  ax.legend(title=f'ECE = {ece:.4f}', loc='upper left')
  if title:
    ax.set_title(title)
  return fig


# ----------------------------------------------------------------------------------------------
# The "+TS" / "+Platt" variants: results after the run's post-hoc calibrator.

_NOT_CALIBRATED = ('no post-hoc calibrated metrics in these results ({where} has no "calibrated" block): the '
                   'evaluator fits a calibrator only on a validation split of the training data, so the run was '
                   'evaluated with validation_fraction=0, is an embedding (contrastive) model without class '
                   'probabilities, or predates calibration (re-evaluate it with `python -m experiments.evaluate`).')


def _calibrated_block(block, where: str) -> dict[str, Any]:
  if not isinstance(block, Mapping) or not isinstance(block.get('calibrated'), Mapping):
    raise ValueError(_NOT_CALIBRATED.format(where=where))
  return copy.deepcopy(dict(block['calibrated']))


def calibrated(results: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of evaluator results with every classification block replaced by its calibrated one.

  `results['in_distribution']`, each `results['corrupted']['per_pair'][pair]`, each
  `['per_severity'][s]` and `['mean']` become their `'calibrated'` blocks (the same metrics after the
  calibrator the evaluator fitted on the validation split: temperature scaling, or per-class Platt
  scaling for one-vs-all models), so every function of this module draws the calibrated variant
  unchanged, e.g. `shift_box_plots({'CE': r, 'CE+TS': calibrated(r)})` or
  `reliability_diagram(calibrated(r))`. 'num_examples' is kept (the same examples); everything else
  (OOD metrics, 'calibration', ...) is copied as is. The input is not modified, and the copy has no
  'calibrated' blocks left, so calibrating twice fails instead of passing silently.

  Args:
    results: the evaluator's results of a classifier run.

  Returns:
    A new results dict.

  Raises:
    ValueError: if a block has no 'calibrated' entry (evaluated with validation_fraction=0, an
      embedding model, or results written before calibration); the message says which block.
  """
  _nonempty_mapping('results', results)
  if 'in_distribution' not in results:
    raise ValueError('results must be the evaluator\'s results of a classifier (no "in_distribution" block).')
  out = copy.deepcopy(dict(results))
  raw = results['in_distribution']
  out['in_distribution'] = _calibrated_block(raw, "results['in_distribution']")
  if 'num_examples' in raw:
    out['in_distribution']['num_examples'] = raw['num_examples']
  corrupted = results.get('corrupted')
  if corrupted:
    shifted = out['corrupted']
    shifted['per_pair'] = {pair: _calibrated_block(block, f"results['corrupted']['per_pair'][{pair!r}]")
                           for pair, block in corrupted.get('per_pair', {}).items()}
    if 'per_severity' in corrupted:
      shifted['per_severity'] = {
          severity: _calibrated_block(block, f"results['corrupted']['per_severity'][{severity!r}]")
          for severity, block in corrupted['per_severity'].items()}
    if 'mean' in corrupted:
      shifted['mean'] = _calibrated_block(corrupted['mean'], "results['corrupted']['mean']")
  return out


def calibrated_label(name: str, results: Mapping[str, Any]) -> str:
  """The display name of a method's calibrated variant: `name` + '+TS' or '+Platt' (e.g. 'CE+TS').

  Read from `results['calibration']['calibrator']`, as the evaluator writes it; ValueError (with
  the reason, as `calibrated`) when the run has no calibrator.
  """
  calibrator = results.get('calibration', {}).get('calibrator')
  if calibrator is None:
    raise ValueError(_NOT_CALIBRATED.format(where="results['calibration']"))
  return name + _CALIBRATOR_SUFFIX.get(calibrator, f'+{calibrator}')


# ----------------------------------------------------------------------------------------------
# Calibration under dataset shift (Padhy et al. 2020, Figs. 2–3).


def shift_box_data(results_by_method: Mapping[str, Mapping[str, Any]],
                   metric: str = 'ece') -> dict[str, dict[int, list[float]]]:
  """The values a shift box plot draws: per method and severity, one value per corruption.

  Severity 0 is the clean test set (`results['in_distribution'][metric]`, a single value); severity
  s ≥ 1 holds `results['corrupted']['per_pair'][f'{c}_{s}'][metric]` for every corruption c, in the
  evaluator's order. Results without corrupted sets give severity 0 only.

  Args:
    results_by_method: evaluator results keyed by the method's display name; a method's
      calibrated variant is `calibrated(results)` under its own name.
    metric: a name of `metrics.CLASSIFICATION_METRICS`: 'accuracy', 'nll', 'ece', 'brier',
      'adaptive_ece', 'classwise_ece', 'mce', 'aurc', 'eaurc' or 'accuracy_at_95'.

  Returns:
    `{method: {severity: [values]}}` with severities in increasing order.
  """
  _nonempty_mapping('results_by_method', results_by_method)
  if metric not in _SHIFT_METRICS:
    raise ValueError(f'metric must be one of {", ".join(_SHIFT_METRICS)}, got {metric!r}.')
  data = {}
  for method, results in results_by_method.items():
    by_severity = {0: [_shift_value(method, 'in_distribution', results['in_distribution'], metric)]}
    for pair, values in results.get('corrupted', {}).get('per_pair', {}).items():
      # Corruption names contain underscores themselves (gaussian_noise_3): split at the last one.
      severity = int(pair.rsplit('_', 1)[1])
      by_severity.setdefault(severity, []).append(_shift_value(method, pair, values, metric))
    data[method] = dict(sorted(by_severity.items()))
  return data


def _shift_value(method: str, where: str, block: Mapping[str, Any], metric: str) -> float:
  if metric not in block:
    # Results written before the evaluator reported this metric: say so instead of a bare KeyError.
    raise ValueError(f'{method!r} has no {metric!r} in {where} (results written before the evaluator reported '
                     f'it? re-evaluate the run with `python -m experiments.evaluate`); it has {", ".join(block)}.')
  return float(block[metric])


def shift_box_plots(results_by_method: Mapping[str, Mapping[str, Any]], *, metric: str = 'ece',
                    title: str | None = None) -> Figure:
  """Box plots of a metric against shift intensity, one box per method at each intensity.

  As in Padhy et al. 2020, Figs. 2–3: boxes show the quartiles and median over corruptions, whiskers the
  minimum and maximum (no outliers are singled out); "Test" is the clean test set.

  Args:
    results_by_method: evaluator results keyed by the method's display name (legend order), e.g.
      `{'CE': r, 'CE+TS': calibrated(r)}` for temperature scaling next to the raw model.
    metric: a name of `metrics.CLASSIFICATION_METRICS` (see `shift_box_data`).
    title: axes title.

  Returns:
    A Figure with one Axes; its patches are the boxes, method by method, each method's in
    increasing severity, drawn from `shift_box_data(results_by_method, metric)`.
  """
  data = shift_box_data(results_by_method, metric)
  severities = sorted(set().union(*(by_severity.keys() for by_severity in data.values())))
  slot = 0.8 / len(data)  # the methods share 80 % of the unit spacing between intensities
  fig, (ax,) = _figure(1, width=max(_PANEL_SIZE, 0.4 * len(severities) * len(data) + 1.5))
  handles = []
  for i, ((method, by_severity), color) in enumerate(zip(data.items(), _colors(len(data)))):
    offset = (i - (len(data) - 1) / 2) * slot
    ax.boxplot(list(by_severity.values()),
               positions=[severities.index(s) + offset for s in by_severity],
               widths=0.85 * slot, whis=(0, 100), showfliers=False, patch_artist=True,
               manage_ticks=False, boxprops={'facecolor': color},
               medianprops={'color': 'black'})
    handles.append(mpatches.Patch(facecolor=color, edgecolor='black', label=method))
  ax.set_xticks(range(len(severities)), ['Test' if s == 0 else str(s) for s in severities])
  ax.set(xlabel='Shift intensity', ylabel=_SHIFT_METRICS[metric])
  ax.legend(handles=handles)
  if title:
    ax.set_title(title)
  return fig


# ----------------------------------------------------------------------------------------------
# Accuracy vs confidence (Padhy et al. 2020, Fig. 4).


def accuracy_vs_confidence_data(probs, labels, thresholds) -> dict[str, np.ndarray]:
  """Accuracy and fraction of the examples whose confidence max_k probs[:, k] is at least τ.

  OOD examples mixed into the test set (as in Padhy et al. 2020, Fig. 4) carry label −1: they are kept or
  dropped by their confidence like any example and are never correct.

  Args:
    probs: `[N, K]` predictive probabilities (rows of one-vs-all models need not sum to one).
    labels: `[N]` integer labels in [−1, K); −1 marks an OOD example.
    thresholds: `[T]` confidence thresholds τ.

  Returns:
    Dict of `[T]` float64 arrays: 'thresholds', 'accuracy' (NaN where no example is kept) and
    'fraction' (of the N examples kept).
  """
  probs = _array('probs', probs, ndim=2)
  thresholds = _array('thresholds', thresholds, ndim=1)
  labels = np.asarray(labels)
  if not probs.shape[0]:
    raise ValueError('probs holds no example.')
  if labels.shape != probs.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integers of shape {probs.shape[:1]}, got {labels.dtype} {labels.shape}.')
  if not -1 <= labels.min() <= labels.max() < probs.shape[1]:
    raise ValueError(f'labels must lie in [-1, {probs.shape[1]}), got [{labels.min()}, {labels.max()}].')
  confidence = probs.max(axis=1)
  correct = np.argmax(probs, axis=1) == labels
  # Sorting once makes every threshold a binary search: the kept examples are a suffix.
  order = np.argsort(confidence, kind='stable')
  correct_from = np.concatenate([np.cumsum(correct[order][::-1])[::-1], [0]])
  first_kept = np.searchsorted(confidence[order], thresholds, side='left')
  kept = labels.size - first_kept
  accuracy = np.divide(correct_from[first_kept], kept, out=np.full(kept.shape, np.nan), where=kept > 0)
  return {'thresholds': thresholds, 'accuracy': accuracy, 'fraction': kept / labels.size}


def accuracy_vs_confidence(probs_by_method: Mapping[str, tuple[Any, Any]], *,
                           thresholds=None) -> Figure:
  """Accuracy (left) and fraction of examples kept (right) at confidence ≥ τ, against τ.

  Args:
    probs_by_method: `{method: (probs [N, K], labels [N])}`; see `accuracy_vs_confidence_data`
      (label −1 marks an OOD example).
    thresholds: `[T]` confidence thresholds τ; None means 41 evenly spaced in [0, 1].

  Returns:
    A Figure with two Axes, one line per method on each, in the mapping's order.
  """
  _nonempty_mapping('probs_by_method', probs_by_method)
  thresholds = np.linspace(0.0, 1.0, 41) if thresholds is None else thresholds
  fig, (acc_ax, kept_ax) = _figure(2)
  for (method, (probs, labels)), color in zip(probs_by_method.items(), _colors(len(probs_by_method))):
    data = accuracy_vs_confidence_data(probs, labels, thresholds)
    acc_ax.plot(data['thresholds'], data['accuracy'], color=color, label=method)
    kept_ax.plot(data['thresholds'], data['fraction'], color=color, label=method)
  acc_ax.set(xlabel='Confidence threshold τ', ylabel='Accuracy (confidence ≥ τ)')
  kept_ax.set(xlabel='Confidence threshold τ', ylabel='Fraction of examples kept', ylim=(0.0, 1.02))
  acc_ax.legend()
  return fig


# ----------------------------------------------------------------------------------------------
# Risk–coverage curves (selective prediction; Geifman & El-Yaniv 2017).

_CURVE_KEYS = ('coverage', 'risk')


def risk_coverage_data(curves_by_method: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The curves a risk–coverage figure draws, and their AURC, per method.

  Args:
    curves_by_method: `{method: (probs [N, K], labels [N])}`, whose curve is
      `calibration.risk_coverage_curve(probs, labels)`, or `{method: curve}` with a precomputed
      dict holding 'coverage' and 'risk' (e.g. that function's output) and optionally 'aurc'. The
      two forms can be mixed.

  Returns:
    `{method: {'coverage': [N], 'risk': [N], 'aurc': float}}`: float64 arrays, and the AURC as the
    mean risk over the curve's points (equal to `calibration.aurc` for its curves) unless the
    curve dict gives one, which a subsampled curve needs.
  """
  _nonempty_mapping('curves_by_method', curves_by_method)
  data = {}
  for method, given in curves_by_method.items():
    if isinstance(given, Mapping):
      missing = [key for key in _CURVE_KEYS if key not in given]
      if missing:
        raise ValueError(f'curve of {method!r} must be a calibration.risk_coverage_curve dict; missing '
                         f'{", ".join(missing)}.')
      curve = dict(given)
    elif isinstance(given, (tuple, list)) and len(given) == 2:
      curve = calibration.risk_coverage_curve(*given)
    else:
      raise TypeError(f'curves_by_method[{method!r}] must be (probs, labels) or a risk-coverage curve dict, '
                      f'got {type(given).__name__}.')
    coverage = _array(f'{method}: coverage', curve['coverage'], ndim=1)
    risk = _array(f'{method}: risk', curve['risk'], ndim=1)
    if coverage.shape != risk.shape or not coverage.size:
      raise ValueError(f'{method}: coverage and risk must be non-empty and of one shape, got {coverage.shape} '
                       f'and {risk.shape}.')
    aurc = float(curve['aurc']) if 'aurc' in curve else float(np.mean(risk))
    data[method] = {'coverage': coverage, 'risk': risk, 'aurc': aurc}
  return data


def risk_coverage(curves_by_method: Mapping[str, Any], *, title: str | None = None) -> Figure:
  """Selective risk (error rate of the accepted examples) against coverage, one line per method.

  Examples are accepted from the most confident down (`calibration.risk_coverage_curve`); the
  legend gives each method's AURC (lower is better). A calibrator that keeps the ranking within
  the data (temperature scaling) leaves the curve unchanged; per-class Platt scaling can move it.

  Args:
    curves_by_method: `{method: (probs, labels)}` or `{method: curve dict}`, see
      `risk_coverage_data`; legend order.
    title: axes title.

  Returns:
    A Figure with one Axes; `ax.lines[i]` is the i-th method's curve, its legend entry
    '<method> (AURC 0.0123)'.
  """
  data = risk_coverage_data(curves_by_method)
  fig, (ax,) = _figure(1, width=1.2 * _PANEL_SIZE)
  for (method, curve), color in zip(data.items(), _colors(len(data))):
    ax.plot(curve['coverage'], curve['risk'], color=color, label=f'{method} (AURC {curve["aurc"]:.4f})')
  ax.set(xlim=(0.0, 1.0), xlabel='Coverage', ylabel='Selective risk (error rate)')
  ax.set_ylim(bottom=0.0)
  ax.legend()
  if title:
    ax.set_title(title)
  return fig


# ----------------------------------------------------------------------------------------------
# Score histograms (Macêdo et al. 2021, Fig. 5).


def score_histograms(in_scores, out_scores_by_set: Mapping[str, Any], *, score_name: str,
                     bins: int = 50) -> Figure:
  """Densities of one OOD score on the in-distribution test set and on each OOD set.

  All sets share one set of bin edges over the range of every score, and each histogram is a
  density (integrating to one), so sets of different sizes compare directly
  (`metrics.score_histogram` computes them; `score_histogram_figure` draws them).

  Args:
    in_scores: `[N]` scores of the in-distribution test set.
    out_scores_by_set: `{set name: [M] scores}`.
    score_name: x-axis label, e.g. 'max_softmax'.
    bins: number of bins.

  Returns:
    A Figure with one Axes whose patches are `StepPatch`es, in-distribution first then the OOD
    sets in order; `patch.get_data()` gives each density and the shared edges.
  """
  _nonempty_mapping('out_scores_by_set', out_scores_by_set)
  checked = {name: _array(f'out_scores_by_set[{name!r}]', v, ndim=1) for name, v in out_scores_by_set.items()}
  histogram = metrics.score_histogram(_array('in_scores', in_scores, ndim=1), checked, bins=bins)
  return score_histogram_figure(histogram, score_name=score_name)


def score_histogram_figure(histogram: Mapping[str, Any], *, score_name: str) -> Figure:
  """Draws a `metrics.score_histogram` block (as the evaluator keeps it in results['score_histogram'])."""
  edges = np.asarray(histogram['edges'], np.float64)
  fig, (ax,) = _figure(1, width=1.4 * _PANEL_SIZE)
  for (name, density), color in zip(histogram['density'].items(), _colors(len(histogram['density']))):
    ax.stairs(np.asarray(density, np.float64), edges, fill=True, alpha=0.4, color=color, label=name)
  ax.set(xlabel=score_name, ylabel='Density')
  ax.legend()
  return fig


def confidence_landscape(confidence_fn: Callable[[np.ndarray], Any] | Mapping[str, Callable],
                         *, xlim: tuple[float, float], ylim: tuple[float, float],
                         resolution: int = 200, points=None, labels=None) -> Figure:
  """Heat maps of a model's confidence over a 2-D input grid, with the training points on top.

  The grid is xs = linspace(*xlim, resolution) by ys = linspace(*ylim, resolution); image pixel
  [i, j] is the confidence at (xs[j], ys[i]) and is centred on that point (y grows upwards).

  Args:
    confidence_fn: maps float32 `[M, 2]` inputs to `[M]` confidences in [0, 1] (e.g. the max
      predictive probability); or `{panel title: function}` for one panel per function, side by
      side with a shared colour bar.
    xlim: (x_min, x_max) of the grid.
    ylim: (y_min, y_max) of the grid.
    resolution: grid points per axis.
    points: optional `[P, 2]` points (the training data) drawn on every panel.
    labels: optional `[P]` integer classes colouring `points` (white without labels).

  Returns:
    A Figure with one Axes per function (`ax.images[0].get_array()` is the `[resolution,
    resolution]` confidence grid) and a colour-bar Axes.
  """
  functions = confidence_fn if isinstance(confidence_fn, Mapping) else {None: confidence_fn}
  _nonempty_mapping('confidence_fn', functions)
  if resolution < 2:
    raise ValueError(f'resolution must be at least 2, got {resolution}.')
  xs, ys = np.linspace(*xlim, resolution), np.linspace(*ylim, resolution)
  grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.float32)
  # The image's extent reaches half a pixel past the outer grid points so pixels centre on them.
  dx, dy = (xs[1] - xs[0]) / 2, (ys[1] - ys[0]) / 2
  extent = (xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy)
  if points is not None:
    points = _array('points', points, ndim=2)
  fig, axes = _figure(len(functions), height=_PANEL_SIZE * 0.9)
  for ax, (title, fn) in zip(axes, functions.items()):
    confidence = _array('confidence_fn(grid)', fn(grid), ndim=1)
    if confidence.shape != (grid.shape[0],):
      raise ValueError(f'confidence_fn must return shape ({grid.shape[0]},), got {confidence.shape}.')
    image = ax.imshow(confidence.reshape(resolution, resolution), origin='lower', extent=extent,
                      vmin=0.0, vmax=1.0, cmap='viridis', interpolation='nearest', aspect='equal')
    if points is not None:
      colors = 'white' if labels is None else _class_colors(labels)
      ax.scatter(points[:, 0], points[:, 1], s=1.5, c=colors, edgecolors='none', alpha=0.6)
    ax.set(xlim=extent[:2], ylim=extent[2:])
    if title is not None:
      ax.set_title(title)
  fig.colorbar(image, ax=axes, label='Max predictive probability', shrink=0.85)
  return fig


def _pca(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[D]` and top-2 principal directions `[D, 2]` of `[N, D]` features."""
  mean = features.mean(axis=0)
  _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
  return mean, vt[:2].T


def learned_centres(panels: Mapping[str, tuple[Any, Any, Any]]) -> Figure:
  """Learned class centres vs the class means of the features, in the features' PCA plane.

  As in Padhy et al. 2020, Fig. S1: the penultimate features of the training data are projected onto their
  top two principal directions, together with the head's learned centres (distance-head
  prototypes) and the per-class means of the features. A centre that represents its class sits on
  its class mean.

  Args:
    panels: `{title: (features [N, D], labels [N] in [0, K), centres [K, D])}`, one panel each.

  Returns:
    A Figure with one Axes per panel; each Axes' collections are the projected features, the
    class means (crosses) and the learned centres (solid circles), in that order.
  """
  _nonempty_mapping('panels', panels)
  fig, axes = _figure(len(panels))
  for ax, (title, (features, labels, centres)) in zip(axes, panels.items()):
    features = _array('features', features, ndim=2)
    centres = _array('centres', centres, ndim=2)
    labels = np.asarray(labels)
    classes = np.arange(centres.shape[0])
    if features.shape[1] != centres.shape[1] or labels.shape != features.shape[:1]:
      raise ValueError(f'features {features.shape}, labels {labels.shape} and centres {centres.shape} '
                       'must agree as [N, D], [N] and [K, D].')
    if not np.array_equal(np.unique(labels), classes):
      raise ValueError(f'labels must cover every class in [0, {classes.size}) and nothing else.')
    means = np.stack([features[labels == k].mean(axis=0) for k in classes])
    mean, directions = _pca(features)
    planar_features, planar_means, planar_centres = (
        (x - mean) @ directions for x in (features, means, centres))
    ax.scatter(*planar_features.T, c=_class_colors(labels), s=2, alpha=0.25, edgecolors='none')
    ax.scatter(*planar_means.T, c=_class_colors(classes), marker='X', s=70, edgecolors='black',
               label='Class mean of features')
    ax.scatter(*planar_centres.T, c=_class_colors(classes), marker='o', s=70, edgecolors='black',
               label='Learned centre')
    ax.set(xlabel='PC 1', ylabel='PC 2', title=title)
    ax.legend(loc='best', fontsize='small')
  return fig


# ----------------------------------------------------------------------------------------------
# Embedding statistics (Regmi et al. 2024, Tables 1–2).


def _mean_statistic(name: str, value) -> float:
  value = np.asarray(value, dtype=np.float64)
  if value.ndim > 1 or not value.size or not np.isfinite(value).all():
    raise ValueError(f'{name} must be a finite scalar or a non-empty [K] array, got shape {value.shape}.')
  return float(value.mean())


def embedding_statistics(stats_by_method: Mapping[str, Mapping[str, Any]]) -> Figure:
  """Bars of embedding statistics per method: one panel per statistic, one bar per method.

  A per-class statistic (e.g. `metrics.mes_radius`, `[K]`) is drawn as its mean over classes, the
  "Mean" column of Table 1 of Regmi et al. 2024; a scalar (e.g. `metrics.centroid_dispersion(...)['mean']`)
  as is. Each bar is labelled with its value.

  Args:
    stats_by_method: `{method: {statistic: float or [K] array}}`, the same statistics for every
      method, e.g. `{'SupCon': {'mes_radius': radii, 'dispersion': 0.42}}`.

  Returns:
    A Figure with one Axes per statistic (in the first method's order), each with one bar per
    method in `ax.containers[0]`.
  """
  _nonempty_mapping('stats_by_method', stats_by_method)
  methods = list(stats_by_method)
  statistics = list(stats_by_method[methods[0]])
  for method, stats in stats_by_method.items():
    if list(stats) != statistics:
      raise ValueError(f'every method needs the statistics {statistics}; {method!r} has {list(stats)}.')
  fig, axes = _figure(len(statistics), width=max(_PANEL_SIZE, 0.9 * len(methods) + 1.0))
  for ax, statistic in zip(axes, statistics):
    values = [_mean_statistic(f'{method}: {statistic}', stats_by_method[method][statistic])
              for method in methods]
    bars = ax.bar(methods, values, color=_colors(len(methods)), edgecolor='black')
    ax.bar_label(bars, fmt='%.3f')
    ax.set_title(_STATISTIC_TITLES.get(statistic, statistic))
    ax.tick_params(axis='x', labelrotation=30)
    ax.margins(y=0.15)  # room for the value labels above the tallest bar
  return fig
