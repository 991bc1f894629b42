"""OOD-detection, calibration and embedding-quality metrics, computed on the host.

Metrics are evaluated once per run on scores already gathered from the devices, so they live in
NumPy (float64 internally) rather than in traced JAX code: exact tie handling needs sorting and
data-dependent shapes, which are natural on the host and awkward under `jax.jit`. Every detection
metric is an O(n log n) sweep over the distinct score values, fast enough for millions of scores.

Conventions:

* Scores are "higher = more in-distribution". Detection metrics take `(in_scores, out_scores)`
  (not scikit-learn's `(y_true, y_score)`: 0/1 labels as the first argument raise TypeError).
  AUROC and DTACC do not depend on which class is positive; FPR@95 does, and the field uses both:
  `positive='id'` (the default; the IsoMax, ODIN, Mahalanobis and Energy papers) and
  `positive='ood'` (OpenOOD v1.5, pytorch-ood). `ood_metrics` reports both, named
  'fpr95_id_positive' and 'fpr95_ood_positive'.
* `auroc` counts ties as one half (equal to `sklearn.metrics.roc_auc_score` with ID = 1).
* `aupr_in` / `aupr_out` are average precision (`sklearn.metrics.average_precision_score`) with ID
  positive on the scores, and with OOD positive on the negated scores.
* `fpr_at_tpr` picks the first threshold reaching `tpr` of the positive class and reports the
  negatives on the wrong side of it; tied scores always share one threshold.
* `detection_accuracy` is eq. 8 of the IsoMax paper (Macêdo et al., "Entropic Out-of-Distribution
  Detection") with equal priors:
  DTACC = 1 - min_delta {0.5 P_in(s < delta) + 0.5 P_out(s >= delta)}.
* `expected_calibration_error` bins the top-label confidence into equal-width bins as
  robustness_metrics / uncertainty-baselines do (not torchmetrics, which mishandles 0 and 1).
* `mes_radius` and `centroid_dispersion` are the embedding statistics of the ReweightOOD paper
  ("Loss Reweighting for Distance-Based OOD Detection", section 4.1): eq. 4, the radius of each
  class's minimum enclosing sphere, and eq. 5, the cosine similarity of class centroids.

All functions accept NumPy arrays, JAX arrays (including bfloat16 / float16) and Python lists, and
raise `ValueError` / `TypeError` naming the offending argument. They cannot be called on tracers.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ood_jax import _checks
from ood_jax import calibration

__all__ = [
    'auroc',
    'aupr_in',
    'aupr_out',
    'fpr_at_tpr',
    'tnr_at_tpr',
    'detection_accuracy',
    'expected_calibration_error',
    'reliability_diagram',
    'mes_radius',
    'centroid_dispersion',
    'CLASSIFICATION_METRICS',
    'OOD_METRICS',
    'classification_metrics',
    'ood_metrics',
    'mean_over_sets',
    'score_histogram',
    'summary',
]


# ----------------------------------------------------------------------------------------------
# Argument conversion.


def _scores(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray]:
  """Both score vectors as float64; ±inf is legal (it sorts), NaN is not."""
  ins = _checks.host_float64('in_scores', in_scores, ndim=1, allow_integer=True, allow_inf=True)
  outs = _checks.host_float64('out_scores', out_scores, ndim=1, allow_integer=True, allow_inf=True)
  _check_argument_order(in_scores, out_scores)  # after the checks above: both are concrete, rank 1
  return ins, outs


def _check_argument_order(in_scores, out_scores) -> None:
  """TypeError for scikit-learn's `(y_true, y_score)` order, which would otherwise return a number.

  The tell: a first argument of integer labels, both 0 and 1 and nothing else, as long as a floating
  second argument. Float 0/1 first arguments are let through: a confident model's ID MSP scores are
  legitimately all exactly 1.0 in float32, beside non-binary OOD scores.
  """
  first, second = np.asarray(in_scores), np.asarray(out_scores)
  if (np.issubdtype(first.dtype, np.integer) and first.shape == second.shape
      and np.issubdtype(second.dtype, np.floating) and set(np.unique(first).tolist()) == {0, 1}):
    raise TypeError(
        "in_scores looks like 0/1 labels: ood_jax.metrics take (in_scores, out_scores), not scikit-learn's "
        '(y_true, y_score). With labels y (1 = in-distribution) and scores s, call e.g. '
        'metrics.auroc(s[y == 1], s[y == 0]).')


# ----------------------------------------------------------------------------------------------
# OOD detection.
#
# Every metric is a function of one `_Curve`: both score sets sorted once and the ID / OOD counts
# at every distinct threshold. The public functions build it per call; `ood_metrics` builds it once
# and derives every metric from it (one sort instead of one per metric).

POSITIVE_CLASSES = ('id', 'ood')


class _Curve:
  """Counts at every distinct score value, in both directions.

  Attributes (P ID scores, N OOD scores, T distinct values v_0 > v_1 > ... > v_{T-1}):
    num_in, num_out: P and N.
    tp, fp: [T] int64, number of ID / OOD scores >= v_i (ID positive, threshold walking down).
    ood_tp, ood_fp: [T] int64, number of OOD / ID scores <= u_j for the same values in increasing
      order u_j = v_{T-1-j} (OOD positive on the negated scores, threshold walking up).
  """

  def __init__(self, ins: np.ndarray, outs: np.ndarray):
    self.num_in, self.num_out = ins.size, outs.size
    self.tp, self.fp = _roc_counts(ins, outs)
    # #OOD <= v_i = N - #OOD > v_i = N - fp[i-1]: the other direction needs no second sort.
    previous = lambda counts: np.concatenate([[0], counts[:-1]])
    self.ood_tp = (self.num_out - previous(self.fp))[::-1]
    self.ood_fp = (self.num_in - previous(self.tp))[::-1]


def _roc_counts(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Cumulative ID / OOD counts at every distinct threshold, from the highest score down.

  Entry i describes the classifier "accept as ID iff s >= v_i", where v_0 > v_1 > ... are the
  distinct values among all scores; so tied scores always enter together, which is what makes every
  metric below count ties exactly as scikit-learn does. Sorting the two sets separately and
  counting with `searchsorted` is several times faster than an argsort of the merged scores.

  Args:
    in_scores: [P] float64 ID scores.
    out_scores: [N] float64 OOD scores.

  Returns:
    tp: [T] int64, number of ID scores >= v_i (non-decreasing, ends at P).
    fp: [T] int64, number of OOD scores >= v_i (non-decreasing, ends at N).
  """
  ins = np.sort(in_scores)
  outs = np.sort(out_scores)
  # Merging two sorted runs is cheap for the stable sort (timsort). Compare with `!=` rather than
  # np.diff, whose inf - inf = NaN would warn and split a run of infinite scores.
  merged = np.sort(np.concatenate([ins, outs]), kind='stable')
  distinct = merged[np.append(merged[1:] != merged[:-1], True)][::-1]
  tp = ins.size - np.searchsorted(ins, distinct, side='left')
  fp = outs.size - np.searchsorted(outs, distinct, side='left')
  return tp.astype(np.int64), fp.astype(np.int64)


def _curve(in_scores, out_scores) -> _Curve:
  return _Curve(*_scores(in_scores, out_scores))


def _auroc(curve: _Curve) -> float:
  # Trapezoids in integer arithmetic are exact: each step adds d_fp * (tp_prev + tp) / 2, which
  # is exactly half a tie's worth of area. int64 holds 2 * P * N for P, N up to ~2e9.
  tp_prev = np.concatenate([[0], curve.tp[:-1]])
  dfp = np.diff(curve.fp, prepend=0)
  twice_area = int(np.sum(dfp * (curve.tp + tp_prev)))
  return twice_area / (2.0 * curve.num_in * curve.num_out)


def _average_precision(tp: np.ndarray, fp: np.ndarray, num_positive: int) -> float:
  """Average precision Σ_n (R_n - R_{n-1}) P_n from the positive / negative counts per threshold."""
  precision = tp / (tp + fp)
  recall_step = np.diff(tp, prepend=0) / num_positive
  return float(np.sum(recall_step * precision))


def _fpr(curve: _Curve, tpr: float, positive: str) -> float:
  tp, fp, num_pos, num_neg = ((curve.tp, curve.fp, curve.num_in, curve.num_out) if positive == 'id' else
                              (curve.ood_tp, curve.ood_fp, curve.num_out, curve.num_in))
  # Same float expression as scikit-learn (tp / P) so the ">=" comparison agrees bit for bit;
  # the last entry has tp / P == 1 > tpr, so argmax always finds a True.
  first = int(np.argmax(tp / num_pos >= tpr))
  return float(fp[first] / num_neg)


def _dtacc(curve: _Curve) -> float:
  error = 0.5 * (curve.num_in - curve.tp) / curve.num_in + 0.5 * curve.fp / curve.num_out
  # 0.5 is the "reject everything" candidate. It ties with the last entry ("accept everything",
  # error exactly 0.5), so it never changes the minimum; it is kept to spell out the candidate set.
  return float(1.0 - min(0.5, float(error.min())))


def auroc(in_scores, out_scores) -> float:
  """Area under the ROC curve; ties count one half. The same whichever class is positive.

  Equal to the Mann-Whitney probability P(s_in > s_out) + 0.5 P(s_in = s_out), i.e.
  `sklearn.metrics.roc_auc_score(y, s)` with y = 1 for ID (and `roc_auc_score(1 - y, -s)`).

  Args:
    in_scores: [P] scores of in-distribution examples (higher = more ID).
    out_scores: [N] scores of OOD examples.

  Returns:
    AUROC in [0, 1] as a Python float.

  Example:
    >>> metrics.auroc([0.9, 0.8], [0.1, 0.85])   # 3 of 4 pairs ordered
    0.75
  """
  return _auroc(_curve(in_scores, out_scores))


def aupr_in(in_scores, out_scores) -> float:
  """Area under the precision-recall curve with ID as the positive class (average precision).

  Step-wise, as `sklearn.metrics.average_precision_score(y, s)` with y = 1 for ID:
  AP = Σ_n (R_n - R_{n-1}) P_n over the distinct thresholds, from the highest score down. Not the
  trapezoidal area (`sklearn.metrics.auc(recall, precision)`, which OpenOOD and pytorch-ood
  report): that is optimistic for PR curves and slightly higher.

  Args:
    in_scores: [P] scores of in-distribution examples (higher = more ID).
    out_scores: [N] scores of OOD examples.

  Returns:
    AUPR-In in (0, 1] as a Python float.
  """
  curve = _curve(in_scores, out_scores)
  return _average_precision(curve.tp, curve.fp, curve.num_in)


def aupr_out(in_scores, out_scores) -> float:
  """Area under the precision-recall curve with OOD as the positive class, on negated scores.

  Equal to `sklearn.metrics.average_precision_score(y, -s)` with y = 1 for OOD.

  Args:
    in_scores: [P] scores of in-distribution examples (higher = more ID).
    out_scores: [N] scores of OOD examples.

  Returns:
    AUPR-Out in (0, 1] as a Python float.
  """
  curve = _curve(in_scores, out_scores)
  return _average_precision(curve.ood_tp, curve.ood_fp, curve.num_out)


def _tpr_arg(tpr) -> float:
  if np.ndim(tpr) != 0 or isinstance(tpr, (bool, np.bool_, str)):
    raise TypeError(f'tpr must be a real scalar, got {tpr!r}.')
  tpr = float(tpr)
  if not 0.0 < tpr < 1.0:  # NaN fails too.
    raise ValueError(f'tpr must lie in the open interval (0, 1), got {tpr}.')
  return tpr


def _positive_arg(positive) -> str:
  if positive not in POSITIVE_CLASSES:
    raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}.")
  return positive


def fpr_at_tpr(in_scores, out_scores, *, tpr: float = 0.95, positive: str = 'id') -> float:
  """False-positive rate at the first threshold reaching the given true-positive rate.

  The field uses two conventions, and they give different numbers:

  * `positive='id'` (the IsoMax, ODIN, Mahalanobis and Energy papers): the fraction of OOD accepted
    as ID when `tpr` of the ID examples are kept. The threshold t is the largest score with
    P_in(s >= t) >= tpr; the result is P_out(s >= t).
  * `positive='ood'` (OpenOOD v1.5, pytorch-ood, torch-uncertainty): the fraction of ID rejected
    when `tpr` of the OOD examples are caught. The threshold t is the smallest score with
    P_out(s <= t) >= tpr; the result is P_in(s <= t).

  Each equals the FPR of `sklearn.metrics.roc_curve(y, s, drop_intermediate=False)` at the first
  point whose TPR >= tpr, with y = 1 for ID (positive='id') or `roc_curve(y, -s, ...)` with y = 1
  for OOD (positive='ood'). OpenOOD keeps scikit-learn's default drop_intermediate=True, which can
  skip the first such point only when two consecutive thresholds add the same (ID, OOD) counts,
  i.e. with repeated ties. Tied scores share one threshold, so with heavy ties the achieved TPR may
  exceed `tpr`.

  Args:
    in_scores: [P] scores of in-distribution examples (higher = more ID).
    out_scores: [N] scores of OOD examples.
    tpr: target true-positive rate in (0, 1).
    positive: 'id' or 'ood', the positive class.

  Returns:
    FPR in [0, 1] as a Python float.

  Example:
    >>> ins, outs = [4.0, 3.0, 2.0, 1.0], [2.5, 0.0, -1.0, -2.0]
    >>> metrics.fpr_at_tpr(ins, outs, tpr=0.75)                  # keep 3 ID (s >= 2): 1 OOD in
    0.25
    >>> metrics.fpr_at_tpr(ins, outs, tpr=0.75, positive='ood')  # catch 3 OOD (s <= 0): no ID out
    0.0
  """
  tpr, positive = _tpr_arg(tpr), _positive_arg(positive)
  return _fpr(_curve(in_scores, out_scores), tpr, positive)


def tnr_at_tpr(in_scores, out_scores, *, tpr: float = 0.95, positive: str = 'id') -> float:
  """True-negative rate at the TPR threshold: 1 - `fpr_at_tpr` (same conventions).

  Args:
    in_scores: [P] scores of in-distribution examples (higher = more ID).
    out_scores: [N] scores of OOD examples.
    tpr: target true-positive rate in (0, 1).
    positive: 'id' (OOD rejected when `tpr` of ID is kept: the IsoMax paper's "TNR@TPR95") or 'ood'.

  Returns:
    TNR in [0, 1] as a Python float.
  """
  return 1.0 - fpr_at_tpr(in_scores, out_scores, tpr=tpr, positive=positive)


def detection_accuracy(in_scores, out_scores) -> float:
  """Detection accuracy (DTACC), IsoMax paper eq. 8 with equal priors.

  DTACC = 1 - min_delta {0.5 P_in(s < delta) + 0.5 P_out(s >= delta)}, the best balanced accuracy
  of a threshold rule "ID iff s >= delta". Only the accepted set matters, so delta ranges over
  every distinct score plus one value above all scores (everything rejected, error 0.5); the
  paper's form with "<=" and ">" over real delta gives the same accepted sets. Equivalently
  DTACC = 0.5 + 0.5 max(0, max_delta (TPR - FPR)), so DTACC >= 0.5. Symmetric in the classes.

  Args:
    in_scores: [P] scores of in-distribution examples (higher = more ID).
    out_scores: [N] scores of OOD examples.

  Returns:
    DTACC in [0.5, 1] as a Python float.
  """
  return _dtacc(_curve(in_scores, out_scores))


# ----------------------------------------------------------------------------------------------
# Calibration.


def _calibration_bins(probs, labels, num_bins) -> dict[str, np.ndarray]:
  """Per-bin example counts, confidence sums and correct-prediction sums.

  The one place that defines the binning: bin = clip(floor(conf * num_bins), 0, num_bins - 1), so
  a confidence of exactly 1.0 falls in the last bin and exactly b / num_bins in bin b.

  Args:
    probs: [N, K] predictive probabilities (rows need not sum to 1, e.g. one-vs-all sigmoids).
    labels: [N] integer labels in [0, K).
    num_bins: number of equal-width bins on [0, 1].

  Returns:
    Dict with 'counts' [num_bins] int64, 'confidence_sum' and 'correct_sum' [num_bins] float64.
  """
  num_bins = _checks.positive_int('num_bins', num_bins)
  probs = _checks.host_float64('probs', probs, ndim=2)
  if probs.shape[1] == 0:
    raise ValueError('probs has no classes (shape[1] == 0).')
  if probs.min() < 0.0 or probs.max() > 1.0:
    raise ValueError(f'probs must lie in [0, 1], got values in [{probs.min()}, {probs.max()}].')
  labels = _checks.host_labels('labels', labels, size=probs.shape[0], num_classes=probs.shape[1], match='probs')
  confidence = probs.max(axis=1)
  # argmax takes the first of tied maxima, as jnp.argmax / np.argmax do elsewhere in the project.
  correct = (probs.argmax(axis=1) == labels).astype(np.float64)
  bins = np.clip(np.floor(confidence * num_bins), 0, num_bins - 1).astype(np.int64)
  return {
      'counts': np.bincount(bins, minlength=num_bins),
      'confidence_sum': np.bincount(bins, weights=confidence, minlength=num_bins),
      'correct_sum': np.bincount(bins, weights=correct, minlength=num_bins),
  }


def _ece_from_bins(bins: dict[str, np.ndarray]) -> float:
  # (n_b / N) |acc_b - conf_b| = |Σ correct_b - Σ conf_b| / N: no division by empty bins needed.
  return float(np.sum(np.abs(bins['correct_sum'] - bins['confidence_sum'])) / bins['counts'].sum())


def expected_calibration_error(probs, labels, *, num_bins: int = 15) -> float:
  """Top-label expected calibration error with equal-width bins.

  ECE = Σ_b (n_b / N) |acc_b - conf_b| over non-empty bins, where confidence = max_k probs[:, k],
  prediction = argmax_k probs[:, k] and bin = clip(floor(confidence * num_bins), 0, num_bins - 1)
  (so 1.0 lands in the last bin and 0.0 in the first), as robustness_metrics and
  uncertainty-baselines compute it.

  Args:
    probs: [N, K] predictive probabilities in [0, 1]. Rows need not sum to 1 (one-vs-all models
      give independent sigmoids); only the top-label confidence and the argmax are used.
    labels: [N] integer labels in [0, K).
    num_bins: number of equal-width bins on [0, 1].

  Returns:
    ECE in [0, 1] as a Python float.
  """
  return _ece_from_bins(_calibration_bins(probs, labels, num_bins))


def reliability_diagram(probs, labels, *, num_bins: int = 15) -> dict[str, np.ndarray | float]:
  """Per-bin accuracy and confidence for a reliability diagram, binned as in the ECE.

  Args:
    probs: [N, K] predictive probabilities in [0, 1] (see `expected_calibration_error`).
    labels: [N] integer labels in [0, K).
    num_bins: number of equal-width bins on [0, 1].

  Returns:
    Dict with
      'bin_edges': [num_bins + 1] float64, 0 to 1.
      'counts': [num_bins] int64 examples per bin (sums to N).
      'accuracy': [num_bins] float64 mean correctness per bin; 0 for empty bins.
      'confidence': [num_bins] float64 mean confidence per bin; 0 for empty bins (rather than NaN,
        so plots and sums never see NaN; use `counts == 0` to mask empty bins).
      'ece': Python float, identical to `expected_calibration_error(probs, labels, ...)`.
  """
  bins = _calibration_bins(probs, labels, num_bins)
  counts = bins['counts']
  nonempty = counts > 0
  denom = np.where(nonempty, counts, 1)
  return {
      'bin_edges': np.linspace(0.0, 1.0, counts.size + 1),
      'counts': counts,
      'accuracy': np.where(nonempty, bins['correct_sum'] / denom, 0.0),
      'confidence': np.where(nonempty, bins['confidence_sum'] / denom, 0.0),
      'ece': _ece_from_bins(bins),
  }


# ----------------------------------------------------------------------------------------------
# Embedding quality (ReweightOOD paper, section 4.1).


def _class_means(embeddings, labels, num_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated float64 embeddings, labels and class means μ_c = mean of h_i over class c.

  Returns:
    embeddings [N, D] float64, labels [N] int64, means [K, D] float64.
  """
  emb = _checks.host_float64('embeddings', embeddings, ndim=2)  # an inf would turn centroids into silent NaNs
  if num_classes is not None:
    num_classes = _checks.positive_int('num_classes', num_classes)
  labels = _checks.host_labels('labels', labels, size=emb.shape[0], num_classes=num_classes, match='embeddings')
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  counts = np.bincount(labels, minlength=num_classes)
  missing = np.flatnonzero(counts == 0)
  if missing.size:
    # A class without examples has no centroid, so its radius / dispersion is undefined.
    shown = ', '.join(str(c) for c in missing[:10]) + (', ...' if missing.size > 10 else '')
    raise ValueError(f'labels has no example of class {shown} (of {num_classes} classes); every '
                     'class in [0, num_classes) needs at least one embedding.')
  sums = np.zeros((num_classes, emb.shape[1]))
  np.add.at(sums, labels, emb)
  return emb, labels, sums / counts[:, None]


def mes_radius(embeddings, labels, *, num_classes: int | None = None) -> np.ndarray:
  """Radius of each class's enclosing sphere around its centroid, ReweightOOD eq. 4.

  r_c = max_{i: y_i = c} ||h_i - μ_c||_2 with μ_c the mean of the class's embeddings. The paper
  applies it to L2-normalised embeddings; pass them normalised, this function uses them as given.
  Smaller is better; the paper reports the mean over classes (`radius.mean()`).

  Args:
    embeddings: [N, D] floating embeddings h_i.
    labels: [N] integer class labels.
    num_classes: K; defaults to labels.max() + 1. Every class in [0, K) must occur.

  Returns:
    [K] float64 NumPy array of radii.
  """
  emb, labels, means = _class_means(embeddings, labels, num_classes)
  distance = np.linalg.norm(emb - means[labels], axis=1)
  radius = np.zeros(means.shape[0])  # Distances are >= 0 and every class occurs.
  np.maximum.at(radius, labels, distance)
  return radius


def centroid_dispersion(embeddings, labels, *, num_classes: int | None = None) -> dict:
  """Cosine similarity between class centroids, ReweightOOD eq. 5, and its mean over class pairs.

  d_ab = μ_a · μ_b / (||μ_a||_2 ||μ_b||_2) for a != b. The paper's Table 2 reports the mean of d_ab
  over all pairs of distinct classes, returned here as 'mean' so callers need not mask the
  diagonal themselves. (The paper's prose calls this an angular distance where higher is better,
  but its eq. 5 is a cosine similarity; we implement the equation as written.)

  Args:
    embeddings: [N, D] floating embeddings h_i.
    labels: [N] integer class labels.
    num_classes: K >= 2; defaults to labels.max() + 1. Every class in [0, K) must occur.

  Returns:
    Dict with 'matrix': [K, K] float64 NumPy array of d_ab (diagonal exactly 1), and 'mean': Python
    float, the mean of d_ab over a != b.
  """
  _, _, means = _class_means(embeddings, labels, num_classes)
  num_classes = means.shape[0]
  if num_classes < 2:
    raise ValueError('centroid_dispersion needs at least 2 classes in labels, got 1.')
  norms = np.linalg.norm(means, axis=1)
  zero = np.flatnonzero(norms == 0)
  if zero.size:
    raise ValueError(f'the centroid of class {int(zero[0])} is the zero vector; its cosine '
                     'similarity is undefined (embeddings of that class average to 0).')
  unit = means / norms[:, None]
  # Clip: rounding can push |d_ab| a hair past 1 for (anti)parallel centroids.
  matrix = np.clip(unit @ unit.T, -1.0, 1.0)
  np.fill_diagonal(matrix, 1.0)  # cos(μ, μ) = 1 exactly; avoids 1 ± ulp on the diagonal.
  off_diagonal = (matrix.sum() - num_classes) / (num_classes * (num_classes - 1))
  return {'matrix': matrix, 'mean': float(off_diagonal)}


# ----------------------------------------------------------------------------------------------
# The blocks of a results file: the metrics the evaluator reports, grouped.


CLASSIFICATION_METRICS = ('accuracy', 'nll', 'ece', 'brier', 'adaptive_ece', 'classwise_ece', 'mce', 'aurc', 'eaurc',
                          'accuracy_at_95')


def classification_metrics(probs, labels, *, num_bins: int = 15) -> dict[str, Any]:
  """Accuracy, calibration and selective-prediction metrics of predictive probabilities.

  * 'accuracy', 'ece' (equal-width bins, `expected_calibration_error`) and 'reliability' (the
    `reliability_diagram` arrays as lists) on the probabilities as given;
  * 'nll' and 'brier' (`calibration.brier_score`, summed over classes) after normalising each row to
    sum to one, since one-vs-all rows need not; probabilities are floored at 1e-300, so a confident
    mistake costs ~690 nats, not inf;
  * 'adaptive_ece' (equal-mass bins), 'classwise_ece' and 'mce' (maximum calibration error) of
    `ood_jax.calibration`, and selective prediction by the top-label confidence: 'aurc', 'eaurc'
    (AURC minus that of the best ordering) and 'accuracy_at_95' (accuracy of the 95 % most
    confident examples).

  Args:
    probs: `[N, K]` predictive probabilities.
    labels: `[N]` integer labels in [0, K).
    num_bins: bins of the ECE variants and the diagram.

  Returns:
    The floats named in `CLASSIFICATION_METRICS` and 'reliability'.
  """
  diagram = reliability_diagram(probs, labels, num_bins=num_bins)
  probs64 = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  totals = probs64.sum(axis=-1, keepdims=True)
  # A row of underflowed one-vs-all probabilities carries no preference: read it as uniform.
  normalised = np.where(totals > 0, probs64 / np.maximum(totals, 1e-300), 1.0 / probs64.shape[-1])
  true = normalised[np.arange(len(labels)), labels]
  return {
      'accuracy': float(np.mean(np.argmax(probs64, axis=-1) == labels)),
      'nll': float(-np.mean(np.log(np.maximum(true, 1e-300)))),
      'ece': float(diagram['ece']),
      'brier': calibration.brier_score(normalised, labels),
      'adaptive_ece': calibration.adaptive_calibration_error(probs64, labels, num_bins=num_bins),
      'classwise_ece': calibration.classwise_calibration_error(probs64, labels, num_bins=num_bins),
      'mce': calibration.maximum_calibration_error(probs64, labels, num_bins=num_bins),
      'aurc': calibration.aurc(probs64, labels),
      'eaurc': calibration.excess_aurc(probs64, labels),
      'accuracy_at_95': calibration.accuracy_at_coverage(probs64, labels, coverage=0.95),
      'reliability': {k: np.asarray(v).tolist() for k, v in diagram.items() if k != 'ece'},
  }


OOD_METRICS = {
    'auroc': auroc,
    'aupr_in': aupr_in,
    'aupr_out': aupr_out,
    'fpr95_id_positive': functools.partial(fpr_at_tpr, positive='id'),
    'fpr95_ood_positive': functools.partial(fpr_at_tpr, positive='ood'),
    'tnr95_id_positive': functools.partial(tnr_at_tpr, positive='id'),
    'dtacc': detection_accuracy,
}


def ood_metrics(in_scores, out_scores) -> dict[str, float]:
  """Every metric of `OOD_METRICS` of one score on one OOD set, from one sort of the scores.

  Keys: 'auroc', 'aupr_in', 'aupr_out' (average precision, ID / OOD positive), 'fpr95_id_positive'
  (OOD accepted at 95 % ID kept: IsoMax, ODIN, Energy papers), 'fpr95_ood_positive' (ID rejected at
  95 % OOD caught: OpenOOD v1.5, pytorch-ood), 'tnr95_id_positive' (1 - fpr95_id_positive, the IsoMax
  paper's TNR@TPR95) and 'dtacc'. Each value equals the function of the same name on the same
  scores, bit for bit; this is several times faster than calling them one by one.
  """
  curve = _curve(in_scores, out_scores)
  fpr_id = _fpr(curve, 0.95, 'id')
  return {
      'auroc': _auroc(curve),
      'aupr_in': _average_precision(curve.tp, curve.fp, curve.num_in),
      'aupr_out': _average_precision(curve.ood_tp, curve.ood_fp, curve.num_out),
      'fpr95_id_positive': fpr_id,
      'fpr95_ood_positive': _fpr(curve, 0.95, 'ood'),
      'tnr95_id_positive': 1.0 - fpr_id,
      'dtacc': _dtacc(curve),
  }


def mean_over_sets(per_set: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
  """{score: {metric: mean over sets}} of {set: {score: {metric: value}}} (the results' 'ood_mean')."""
  sets = list(per_set.values())
  if not sets:
    raise ValueError('mean_over_sets needs at least one OOD set.')
  return {score: {metric: float(np.mean([s[score][metric] for s in sets])) for metric in sets[0][score]}
          for score in sets[0]}


def score_histogram(in_scores, out_scores_by_set, *, bins: int = 50) -> dict[str, Any]:
  """Densities of one score on the in-distribution set and on each OOD set, over shared bin edges.

  What `ood_jax.plots.score_histograms` draws, small enough to keep in results.json (the raw scores are not).

  Args:
    in_scores: `[N]` scores of the in-distribution test set.
    out_scores_by_set: {set name: `[M]` scores}.
    bins: number of equal-width bins over the range of every score.

  Returns:
    {'edges': [bins + 1], 'density': {'in-distribution': [bins], set name: [bins], ...}}, lists of floats;
    each density integrates to one over the edges.
  """
  bins = _checks.positive_int('bins', bins)
  named = {'in-distribution': _checks.host_float64('in_scores', in_scores, ndim=1, allow_integer=True)}
  for name, values in out_scores_by_set.items():
    named[name] = _checks.host_float64(f'out_scores_by_set[{name!r}]', values, ndim=1, allow_integer=True)
  edges = np.histogram_bin_edges(np.concatenate(list(named.values())), bins=bins)
  return {'edges': edges.tolist(),
          'density': {name: np.histogram(values, bins=edges, density=True)[0].tolist()
                      for name, values in named.items()}}


def summary(values) -> dict[str, float]:
  """Mean, median, quartiles and range of `values` (the spread of a metric over corruptions)."""
  values = np.asarray(values, np.float64)
  q1, median, q3 = np.percentile(values, [25, 50, 75])
  return {'mean': float(values.mean()), 'median': float(median), 'q1': float(q1), 'q3': float(q3),
          'min': float(values.min()), 'max': float(values.max())}
