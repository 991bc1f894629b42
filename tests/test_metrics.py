"""Tests for ood_jax.metrics against scikit-learn, brute-force loops and hand-computed values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from ood_jax import metrics

SEEDS = (0, 1, 2)
KINDS = ('continuous', 'round1', 'integer', 'all_equal', 'tiny', 'unbalanced', 'separated')
TPRS = (0.95, 0.5, 0.8, 0.99, 1e-3)


def _make_scores(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """ID / OOD score pairs covering continuous data, heavy ties and degenerate cases."""
  rng = np.random.default_rng(seed)
  if kind == 'tiny':
    return rng.normal(size=1), rng.normal(size=1)
  n_in, n_out = (300, 20) if kind == 'unbalanced' else (257, 311)
  ins = rng.normal(0.7, 1.0, n_in)
  outs = rng.normal(0.0, 1.0, n_out)
  if kind == 'round1':
    ins, outs = np.round(ins, 1), np.round(outs, 1)
  elif kind == 'integer':
    # Five distinct values over 500+ scores: nearly every threshold is a tie.
    ins = rng.integers(0, 5, n_in)
    outs = rng.integers(-1, 4, n_out)
  elif kind == 'all_equal':
    ins, outs = np.full(n_in, 2.5), np.full(n_out, 2.5)
  elif kind == 'separated':
    ins = ins + 100.0
  return ins, outs


def _sklearn(ins, outs, tpr=0.95) -> dict[str, float]:
  """The project's definitions, spelled with scikit-learn (the independent oracle)."""
  ins = np.asarray(ins, np.float64)
  outs = np.asarray(outs, np.float64)
  y = np.concatenate([np.ones(ins.size), np.zeros(outs.size)])
  s = np.concatenate([ins, outs])
  fpr, tpr_curve, _ = skm.roc_curve(y, s, drop_intermediate=False)
  # OpenOOD's convention: OOD positive on the negated scores.
  fpr_ood, tpr_ood, _ = skm.roc_curve(1 - y, -s, drop_intermediate=False)
  return {
      'auroc': skm.roc_auc_score(y, s),
      'aupr_in': skm.average_precision_score(y, s),
      'aupr_out': skm.average_precision_score(1 - y, -s),
      'fpr': fpr[np.argmax(tpr_curve >= tpr)],
      'fpr_ood_positive': fpr_ood[np.argmax(tpr_ood >= tpr)],
  }


def _ours(ins, outs, tpr=0.95) -> dict[str, float]:
  return {
      'auroc': metrics.auroc(ins, outs),
      'aupr_in': metrics.aupr_in(ins, outs),
      'aupr_out': metrics.aupr_out(ins, outs),
      'fpr': metrics.fpr_at_tpr(ins, outs, tpr=tpr),
      'fpr_ood_positive': metrics.fpr_at_tpr(ins, outs, tpr=tpr, positive='ood'),
  }


def _assert_matches_sklearn(ins, outs, tpr=0.95, ref_ins=None, ref_outs=None):
  ref = _sklearn(ins if ref_ins is None else ref_ins, outs if ref_outs is None else ref_outs, tpr)
  ours = _ours(ins, outs, tpr)
  for key, value in ref.items():
    assert isinstance(ours[key], float), key
    np.testing.assert_allclose(ours[key], value, rtol=1e-12, atol=1e-15, err_msg=key)


def _dtacc_brute_force(ins, outs) -> float:
  """Eq. 8 by enumeration: accept-as-ID iff s >= delta for every score value, or nothing."""
  ins = np.asarray(ins, np.float64)
  outs = np.asarray(outs, np.float64)
  errors = [0.5]  # delta above every score: all ID rejected, no OOD accepted.
  for delta in np.concatenate([ins, outs]):
    errors.append(0.5 * np.mean(ins < delta) + 0.5 * np.mean(outs >= delta))
  return 1.0 - min(errors)


# ---------------------------------------------------------------------------------------------
# Detection metrics against scikit-learn.


def test_fpr_conventions_by_hand():
  # ID 10, 9, ..., 1; OOD 8.5, 0.5, 0, -1 (one OOD among the ID scores, three below them).
  ins, outs = np.arange(10, 0, -1.0), np.array([8.5, 0.5, 0.0, -1.0])
  # ID positive, 90 % of ID kept (s >= 2): of the OOD only 8.5 is accepted -> 1/4.
  assert metrics.fpr_at_tpr(ins, outs, tpr=0.9) == 0.25
  # OOD positive, 75 % of OOD caught (s <= 0.5): no ID score is that low -> 0.
  assert metrics.fpr_at_tpr(ins, outs, tpr=0.75, positive='ood') == 0.0
  # 100 % of OOD needs s <= 8.5: ID 1..8 are rejected as well -> 8/10.
  assert metrics.fpr_at_tpr(ins, outs, tpr=0.99, positive='ood') == 0.8
  assert metrics.tnr_at_tpr(ins, outs, tpr=0.99, positive='ood') == pytest.approx(0.2)
  # Each convention is the other with the classes swapped and the scores negated.
  for tpr in (0.5, 0.75, 0.9, 0.99):
    assert metrics.fpr_at_tpr(ins, outs, tpr=tpr, positive='ood') == metrics.fpr_at_tpr(-outs, -ins, tpr=tpr)
  with pytest.raises(ValueError, match="'id' or 'ood'"):
    metrics.fpr_at_tpr(ins, outs, positive='in')


@pytest.mark.parametrize('kind', KINDS)
def test_ood_metrics_equal_the_functions_bitwise(kind):
  ins, outs = _make_scores(kind, 0)
  got = metrics.ood_metrics(ins, outs)
  assert got == {name: fn(ins, outs) for name, fn in metrics.OOD_METRICS.items()}
  assert got['fpr95_id_positive'] == metrics.fpr_at_tpr(ins, outs)
  assert got['fpr95_ood_positive'] == metrics.fpr_at_tpr(-outs, -ins)
  assert got['tnr95_id_positive'] == 1.0 - got['fpr95_id_positive']


def test_sklearn_argument_order_is_refused():
  rng = np.random.default_rng(0)
  y, s = rng.integers(0, 2, 50), rng.normal(size=50)
  for fn in (metrics.auroc, metrics.ood_metrics, metrics.fpr_at_tpr):
    with pytest.raises(TypeError, match=r'auroc\(s\[y == 1\], s\[y == 0\]\)'):
      fn(y, s)
  # A saturated model's ID scores are exactly 1.0: legitimate, even beside OOD scores of equal length.
  assert metrics.auroc(np.ones(50, np.float32), s.astype(np.float32)) > 0.5
  # Integer scores stay legal when they are not 0/1 labels beside a float vector of equal length.
  assert metrics.auroc(np.array([2, 3, 1]), np.array([0, 1, 0])) == pytest.approx(8.5 / 9)
  assert metrics.auroc(np.array([1, 1, 0]), np.array([0.5, 0.1])) == pytest.approx(4 / 6)


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('kind', KINDS)
def test_detection_metrics_match_sklearn(kind, seed):
  ins, outs = _make_scores(kind, seed)
  for tpr in TPRS:
    _assert_matches_sklearn(ins, outs, tpr)
    assert metrics.tnr_at_tpr(ins, outs, tpr=tpr) == 1.0 - metrics.fpr_at_tpr(ins, outs, tpr=tpr)


@pytest.mark.parametrize('seed', SEEDS)
def test_detection_metrics_match_sklearn_large_with_ties(seed):
  # 2e5 scores on a coarse grid: long tie runs and big counts in the integer trapezoid sum.
  rng = np.random.default_rng(seed)
  ins = np.round(rng.normal(0.3, 1.0, 120_000), 2)
  outs = np.round(rng.normal(0.0, 1.0, 80_000), 2)
  _assert_matches_sklearn(ins, outs)
  assert metrics.detection_accuracy(ins, outs) == pytest.approx(_dtacc_via_roc(ins, outs), abs=1e-12)


def _dtacc_via_roc(ins, outs) -> float:
  """DTACC = 0.5 + 0.5 max(TPR - FPR) using scikit-learn's full ROC curve (includes (0, 0))."""
  y = np.concatenate([np.ones(len(ins)), np.zeros(len(outs))])
  fpr, tpr, _ = skm.roc_curve(y, np.concatenate([ins, outs]), drop_intermediate=False)
  return 0.5 + 0.5 * np.max(tpr - fpr)


def test_hand_computed_detection_example():
  ins = [3.0, 2.0, 2.0, 1.0]
  outs = [2.0, 0.0]
  # Pairs (in > out) + 0.5 (in == out): vs 2.0 -> 1 + .5 + .5 + 0 = 2; vs 0.0 -> 4. AUROC = 6 / 8.
  assert metrics.auroc(ins, outs) == 0.75
  # Thresholds 3, 2, 1, 0: (tp, fp) = (1, 0), (3, 1), (4, 1), (4, 2).
  # AP-In = 1/4 * 1 + 2/4 * 3/4 + 1/4 * 4/5 = 0.25 + 0.375 + 0.2 = 0.825.
  assert metrics.aupr_in(ins, outs) == pytest.approx(0.825, abs=1e-15)
  # OOD positive on -s; thresholds -0, -1, -2, -3: (tp, fp) = (1, 0), (1, 1), (2, 3), (2, 4).
  # AP-Out = 1/2 * 1 + 1/2 * 2/5 = 0.7.
  assert metrics.aupr_out(ins, outs) == pytest.approx(0.7, abs=1e-15)
  # TPR 0.95 first reached at threshold 1 (TPR 1), where one of two OOD scores is accepted.
  assert metrics.fpr_at_tpr(ins, outs) == 0.5
  assert metrics.tnr_at_tpr(ins, outs) == 0.5
  # TPR 0.5 is reached at threshold 2 (3/4 of ID), where FPR = 1/2 as well; TPR 0.25 at 3 (FPR 0).
  assert metrics.fpr_at_tpr(ins, outs, tpr=0.5) == 0.5
  assert metrics.fpr_at_tpr(ins, outs, tpr=0.25) == 0.0
  # Best threshold 1: 0.5 * 0 + 0.5 * 1/2 = 0.25 error; threshold 3 gives 0.5 * 3/4 = 0.375.
  assert metrics.detection_accuracy(ins, outs) == 0.75


def test_infinite_scores():
  # Infinite ties must form one threshold (a np.diff-based sweep would see inf - inf = NaN).
  assert metrics.auroc([np.inf, np.inf], [np.inf]) == 0.5
  assert metrics.fpr_at_tpr([np.inf, np.inf], [np.inf]) == 1.0
  assert metrics.detection_accuracy([np.inf, np.inf], [np.inf]) == 0.5
  # Pairs: (inf, -inf) 1, (inf, 1) 1, (1, -inf) 1, (1, 1) 0.5 -> 3.5 / 4.
  assert metrics.auroc([np.inf, 1.0], [-np.inf, 1.0]) == 0.875
  assert metrics.detection_accuracy([np.inf, 1.0], [-np.inf, 1.0]) == 0.75
  assert metrics.auroc([np.inf], [-np.inf]) == 1.0
  assert metrics.auroc([-np.inf], [np.inf]) == 0.0


@pytest.mark.parametrize('seed', SEEDS)
def test_infinite_scores_match_sklearn_on_order_preserving_finite_map(seed):
  # scikit-learn rejects inf, but every metric here depends only on the order of the scores, so
  # replacing ±inf by finite values beyond the range gives the oracle.
  rng = np.random.default_rng(seed)
  ins = np.round(rng.normal(0.5, 1.0, 200), 1)
  outs = np.round(rng.normal(0.0, 1.0, 150), 1)
  ins[rng.choice(200, 15, replace=False)] = np.inf
  ins[rng.choice(200, 5, replace=False)] = -np.inf
  outs[rng.choice(150, 10, replace=False)] = np.inf
  outs[rng.choice(150, 10, replace=False)] = -np.inf

  def finite(x):
    return np.where(np.isposinf(x), 1e3, np.where(np.isneginf(x), -1e3, x))

  for tpr in TPRS:
    _assert_matches_sklearn(ins, outs, tpr, ref_ins=finite(ins), ref_outs=finite(outs))
  assert metrics.detection_accuracy(ins, outs) == pytest.approx(_dtacc_brute_force(ins, outs), abs=1e-12)


def test_all_equal_scores_values():
  ins, outs = np.zeros(7), np.zeros(3)
  assert metrics.auroc(ins, outs) == 0.5
  assert metrics.aupr_in(ins, outs) == pytest.approx(0.7, abs=1e-15)  # = prevalence of ID.
  assert metrics.aupr_out(ins, outs) == pytest.approx(0.3, abs=1e-15)
  assert metrics.fpr_at_tpr(ins, outs) == 1.0
  assert metrics.detection_accuracy(ins, outs) == 0.5


def test_perfect_and_inverted_separation():
  assert metrics.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
  assert metrics.aupr_in([2.0, 3.0], [0.0, 1.0]) == 1.0
  assert metrics.aupr_out([2.0, 3.0], [0.0, 1.0]) == 1.0
  assert metrics.fpr_at_tpr([2.0, 3.0], [0.0, 1.0]) == 0.0
  assert metrics.detection_accuracy([2.0, 3.0], [0.0, 1.0]) == 1.0
  assert metrics.auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
  assert metrics.fpr_at_tpr([0.0, 1.0], [2.0, 3.0]) == 1.0
  # Inverted scores: rejecting everything (error 0.5) beats any threshold.
  assert metrics.detection_accuracy([0.0, 1.0], [2.0, 3.0]) == 0.5


# ---------------------------------------------------------------------------------------------
# Detection accuracy against brute force.


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('kind', KINDS)
def test_detection_accuracy_matches_brute_force(kind, seed):
  ins, outs = _make_scores(kind, seed)
  got = metrics.detection_accuracy(ins, outs)
  assert isinstance(got, float)
  assert got == pytest.approx(_dtacc_brute_force(ins, outs), abs=1e-12)
  # The paper writes eq. 8 as P_in(s <= delta) + P_out(s > delta) over real delta; enumerate that
  # form too (delta at every score and below the minimum) to confirm both forms agree.
  ins, outs = np.asarray(ins, float), np.asarray(outs, float)
  scores = np.concatenate([ins, outs])
  deltas = np.append(scores, scores.min() - 1.0)
  paper = 1.0 - min(0.5 * np.mean(ins <= d) + 0.5 * np.mean(outs > d) for d in deltas)
  assert got == pytest.approx(paper, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Calibration.


def _ece_brute_force(probs, labels, num_bins):
  """Loop over bins with explicit edges [b / n, (b + 1) / n), the last bin closed at 1."""
  probs = np.asarray(probs, np.float64)
  conf = probs.max(axis=1)
  correct = probs.argmax(axis=1) == np.asarray(labels)
  ece, counts, accs, confs = 0.0, [], [], []
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    in_bin = (conf >= lo) & ((conf < hi) if b < num_bins - 1 else (conf <= hi))
    counts.append(int(in_bin.sum()))
    if in_bin.any():
      accs.append(correct[in_bin].mean())
      confs.append(conf[in_bin].mean())
      ece += in_bin.sum() / len(conf) * abs(accs[-1] - confs[-1])
    else:
      accs.append(0.0)
      confs.append(0.0)
  return ece, np.array(counts), np.array(accs), np.array(confs)


def test_ece_hand_computed():
  probs = np.array([
      [0.95, 0.05],  # label 0: correct, conf .95
      [0.05, 0.95],  # label 0: wrong,   conf .95
      [0.35, 0.65],  # label 1: correct, conf .65
      [0.55, 0.45],  # label 1: wrong,   conf .55
  ])
  labels = np.array([0, 0, 1, 1])
  # 10 bins: bin 9 {.95, .95} acc .5 -> 2/4 * .45; bin 6 {.65} acc 1 -> 1/4 * .35;
  # bin 5 {.55} acc 0 -> 1/4 * .55. ECE = (.9 + .35 + .55) / 4 = 0.45.
  assert metrics.expected_calibration_error(probs, labels, num_bins=10) == pytest.approx(0.45, abs=1e-15)
  # 15 bins group them the same way (bins 14, 9 and 8).
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.45, abs=1e-15)
  diagram = metrics.reliability_diagram(probs, labels, num_bins=10)
  np.testing.assert_array_equal(diagram['counts'], [0, 0, 0, 0, 0, 1, 1, 0, 0, 2])
  np.testing.assert_allclose(diagram['accuracy'], [0, 0, 0, 0, 0, 0, 1, 0, 0, 0.5])
  np.testing.assert_allclose(diagram['confidence'], [0, 0, 0, 0, 0, 0.55, 0.65, 0, 0, 0.95])
  assert diagram['ece'] == pytest.approx(0.45, abs=1e-15)


@pytest.mark.parametrize('num_bins', (15, 10, 4))
def test_ece_bin_boundaries(num_bins):
  # Confidence exactly b / num_bins lands in bin b; 1.0 (b = num_bins) lands in the last bin, 0.0 in
  # the first. Rows need not sum to 1 (one-vs-all sigmoids), which lets confidence reach 0.
  for b in range(num_bins + 1):
    conf = b / num_bins
    diagram = metrics.reliability_diagram([[conf, 0.0]], [0], num_bins=num_bins)
    expected = np.zeros(num_bins, np.int64)
    expected[min(b, num_bins - 1)] = 1
    np.testing.assert_array_equal(diagram['counts'], expected, err_msg=f'b={b}')
    # Argmax of [conf, 0] is 0 (first of tied maxima when conf == 0), so label 0 is correct.
    assert diagram['ece'] == pytest.approx(1.0 - conf, abs=1e-15)


def test_ece_confidence_one_and_two_fifteenths():
  probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2 / 15, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
  labels = np.array([0, 2, 0, 1])
  diagram = metrics.reliability_diagram(probs, labels)
  expected_counts = np.zeros(15, np.int64)
  expected_counts[14] = 2  # both confidence-1.0 rows
  expected_counts[2] = 1   # 2/15
  expected_counts[5] = 1   # 1/3 = 5/15
  np.testing.assert_array_equal(diagram['counts'], expected_counts)
  # Bin 14: acc 1/2, conf 1 -> 2/4 * 0.5; bin 2: acc 1, conf 2/15 -> 1/4 * 13/15;
  # bin 5: argmax of the tie is class 0 != 1, acc 0, conf 1/3 -> 1/4 * 1/3.
  expected = 0.25 + 0.25 * 13 / 15 + 0.25 / 3
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize('seed', SEEDS)
@pytest.mark.parametrize('num_bins', (15, 7, 1))
def test_ece_and_reliability_match_brute_force(seed, num_bins):
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.full(5, 0.3), size=400)
  labels = rng.integers(0, 5, 400)
  ece, counts, accs, confs = _ece_brute_force(probs, labels, num_bins)
  got = metrics.expected_calibration_error(probs, labels, num_bins=num_bins)
  assert isinstance(got, float)
  assert got == pytest.approx(ece, abs=1e-12)
  diagram = metrics.reliability_diagram(probs, labels, num_bins=num_bins)
  assert diagram['counts'].dtype.kind == 'i'
  assert diagram['counts'].sum() == 400
  np.testing.assert_array_equal(diagram['counts'], counts)
  np.testing.assert_allclose(diagram['accuracy'], accs, atol=1e-12)
  np.testing.assert_allclose(diagram['confidence'], confs, atol=1e-12)
  np.testing.assert_allclose(diagram['bin_edges'], np.arange(num_bins + 1) / num_bins, atol=1e-15)
  assert not np.isnan(diagram['confidence']).any()
  assert diagram['ece'] == got


def test_ece_perfectly_calibrated_is_zero_and_one_hot_wrong_is_one():
  probs = np.eye(3)[[0, 1, 2, 0]]
  assert metrics.expected_calibration_error(probs, [0, 1, 2, 0]) == 0.0
  assert metrics.expected_calibration_error(probs, [1, 2, 0, 1]) == 1.0


# ---------------------------------------------------------------------------------------------
# Embedding statistics.


def _embedding_data(seed, num_classes=4, dim=6, n=90):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
  emb = rng.normal(size=(n, dim)) + 2.0 * rng.normal(size=(num_classes, dim))[labels]
  return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


@pytest.mark.parametrize('seed', SEEDS)
def test_mes_radius_and_dispersion_match_loops(seed):
  emb, labels = _embedding_data(seed)
  means = [emb[labels == c].mean(axis=0) for c in range(4)]
  radius = [max(np.sqrt(np.sum((h - means[c])**2)) for h in emb[labels == c]) for c in range(4)]
  got = metrics.mes_radius(emb, labels)
  assert isinstance(got, np.ndarray) and got.shape == (4,)
  np.testing.assert_allclose(got, radius, rtol=1e-12)
  np.testing.assert_allclose(metrics.mes_radius(emb, labels, num_classes=4), radius, rtol=1e-12)

  cosine = np.array([[np.dot(means[a], means[b]) / (np.linalg.norm(means[a]) * np.linalg.norm(means[b]))
                      for b in range(4)] for a in range(4)])
  pairs = [cosine[a, b] for a in range(4) for b in range(4) if a != b]
  out = metrics.centroid_dispersion(emb, labels)
  assert set(out) == {'matrix', 'mean'}
  np.testing.assert_allclose(out['matrix'], cosine, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(np.diag(out['matrix']), np.ones(4))
  assert isinstance(out['mean'], float)
  assert out['mean'] == pytest.approx(np.mean(pairs), abs=1e-12)


def test_embedding_statistics_hand_computed():
  # Class 0: points (1, 0) and (0, 1) -> centroid (.5, .5), radius sqrt(.5).
  # Class 1: single point (-1, 0) -> radius 0. cos((.5, .5), (-1, 0)) = -1/sqrt(2).
  emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  labels = np.array([0, 0, 1])
  np.testing.assert_allclose(metrics.mes_radius(emb, labels), [np.sqrt(0.5), 0.0], rtol=1e-15)
  out = metrics.centroid_dispersion(emb, labels)
  np.testing.assert_allclose(out['matrix'], [[1, -np.sqrt(0.5)], [-np.sqrt(0.5), 1]], rtol=1e-15)
  assert out['mean'] == pytest.approx(-np.sqrt(0.5), abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Input types.


@pytest.mark.parametrize('dtype', (jnp.bfloat16, jnp.float16, jnp.float32))
def test_detection_metrics_accept_jax_arrays(dtype):
  ins, outs = _make_scores('continuous', 3)
  jin, jout = jnp.asarray(ins, dtype), jnp.asarray(outs, dtype)
  # The oracle sees the same (rounded) values; rounding to bfloat16 creates many ties.
  rin, rout = np.asarray(jin, np.float64), np.asarray(jout, np.float64)
  _assert_matches_sklearn(jin, jout, ref_ins=rin, ref_outs=rout)
  assert metrics.detection_accuracy(jin, jout) == pytest.approx(_dtacc_brute_force(rin, rout), abs=1e-12)


def test_detection_metrics_accept_lists_and_integers():
  ins, outs = [3, 1, 4, 1, 5], [9, 2, 6]
  ref = _sklearn(ins, outs)
  assert metrics.auroc(ins, outs) == pytest.approx(ref['auroc'], abs=1e-15)
  assert metrics.aupr_in(np.array(ins, np.int32), outs) == pytest.approx(ref['aupr_in'], abs=1e-15)
  assert metrics.fpr_at_tpr(jnp.array(ins), tuple(outs)) == ref['fpr']
  assert metrics.auroc(np.array(ins, np.float16), np.array(outs, np.float32)) == ref['auroc']


def test_calibration_and_embeddings_accept_jax_bfloat16():
  rng = np.random.default_rng(4)
  probs = jnp.asarray(rng.dirichlet(np.ones(4), size=200), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 4, 200))
  rounded = np.asarray(probs, np.float64)
  ece = _ece_brute_force(rounded, np.asarray(labels), 15)[0]
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(ece, abs=1e-12)
  assert metrics.reliability_diagram(probs, labels)['ece'] == pytest.approx(ece, abs=1e-12)

  emb, emb_labels = _embedding_data(5)
  jemb = jnp.asarray(emb, jnp.bfloat16)
  np.testing.assert_allclose(metrics.mes_radius(jemb, jnp.asarray(emb_labels)),
                             metrics.mes_radius(np.asarray(jemb, np.float64), emb_labels), rtol=1e-12)
  np.testing.assert_allclose(metrics.centroid_dispersion(jemb, emb_labels)['matrix'],
                             metrics.centroid_dispersion(np.asarray(jemb, np.float64), emb_labels)['matrix'],
                             rtol=1e-12)


def test_tracer_inputs_raise():
  with pytest.raises(TypeError, match='in_scores is a tracer'):
    jax.jit(lambda x: metrics.auroc(x, np.zeros(3)))(jnp.zeros(3))


# ---------------------------------------------------------------------------------------------
# Argument errors.

_OK = np.array([0.1, 0.2, 0.3])
_PROBS = np.array([[0.7, 0.3], [0.4, 0.6]])
_EMB = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])

_DETECTION = (metrics.auroc, metrics.aupr_in, metrics.aupr_out, metrics.fpr_at_tpr,
              metrics.tnr_at_tpr, metrics.detection_accuracy)


@pytest.mark.parametrize('fn', _DETECTION, ids=lambda f: f.__name__)
@pytest.mark.parametrize('bad, error, match', [
    (np.zeros((2, 2)), ValueError, 'must have rank 1'),
    (np.array(1.0), ValueError, 'must have rank 1'),
    (np.zeros(0), ValueError, 'is empty'),
    ([], ValueError, 'is empty'),
    (np.array([0.1, np.nan]), ValueError, 'contains NaN'),
    (np.array([True, False]), TypeError, 'must have a floating or integer dtype'),
    (np.array([1 + 1j]), TypeError, 'must have a floating or integer dtype'),
    (['a', 'b'], TypeError, 'must have a floating or integer dtype'),
])
def test_score_errors_name_the_argument(fn, bad, error, match):
  with pytest.raises(error, match='in_scores ' + match):
    fn(bad, _OK)
  with pytest.raises(error, match='out_scores ' + match):
    fn(_OK, bad)


@pytest.mark.parametrize('fn', (metrics.fpr_at_tpr, metrics.tnr_at_tpr))
@pytest.mark.parametrize('tpr, error', [
    (0.0, ValueError), (1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
    (float('nan'), ValueError), (np.array([0.5, 0.9]), TypeError), ('0.9', TypeError)])
def test_tpr_errors(fn, tpr, error):
  with pytest.raises(error, match='tpr must'):
    fn(_OK, _OK, tpr=tpr)


@pytest.mark.parametrize('fn', (metrics.expected_calibration_error, metrics.reliability_diagram),
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize('probs, labels, kwargs, error, match', [
    (_PROBS[0], [0], {}, ValueError, 'probs must have rank 2'),
    (np.zeros((0, 2)), np.zeros(0, int), {}, ValueError, 'probs is empty'),
    (np.zeros((2, 0)), [0, 0], {}, ValueError, 'probs has no classes'),
    (np.array([[0.5, np.nan], [0.4, 0.6]]), [0, 1], {}, ValueError, 'probs contains NaN'),
    (np.array([[1, 0], [0, 1]]), [0, 1], {}, TypeError, 'probs must have a floating dtype'),
    (np.array([[1.5, 0.0], [0.4, 0.6]]), [0, 1], {}, ValueError, r'probs must lie in \[0, 1\]'),
    (np.array([[-0.1, 0.0], [0.4, 0.6]]), [0, 1], {}, ValueError, r'probs must lie in \[0, 1\]'),
    (_PROBS, [0.0, 1.0], {}, TypeError, 'labels must have an integer dtype'),
    (_PROBS, [[0, 1]], {}, ValueError, 'labels must have rank 1'),
    (_PROBS, [0, 1, 1], {}, ValueError, r'labels must have shape \(2,\) to match probs'),
    (_PROBS, [0, 2], {}, ValueError, r'labels must lie in \[0, 2\)'),
    (_PROBS, [-1, 0], {}, ValueError, r'labels must lie in \[0, 2\)'),
    (_PROBS, [0, 1], {'num_bins': 0}, ValueError, 'num_bins must be >= 1'),
    (_PROBS, [0, 1], {'num_bins': 2.5}, TypeError, 'num_bins must be an int'),
    (_PROBS, [0, 1], {'num_bins': True}, TypeError, 'num_bins must be an int'),
])
def test_calibration_errors(fn, probs, labels, kwargs, error, match):
  with pytest.raises(error, match=match):
    fn(probs, labels, **kwargs)


@pytest.mark.parametrize('fn', (metrics.mes_radius, metrics.centroid_dispersion), ids=lambda f: f.__name__)
@pytest.mark.parametrize('emb, labels, kwargs, error, match', [
    (_EMB[0], [0], {}, ValueError, 'embeddings must have rank 2'),
    (np.zeros((0, 2)), np.zeros(0, int), {}, ValueError, 'embeddings is empty'),
    (np.array([[0, 1], [1, 0]]), [0, 1], {}, TypeError, 'embeddings must have a floating dtype'),
    (np.array([[np.nan, 1.0], [1.0, 0.0]]), [0, 1], {}, ValueError, 'embeddings contains NaN'),
    (np.array([[np.inf, 1.0], [1.0, 0.0]]), [0, 1], {}, ValueError, 'embeddings contains inf'),
    (_EMB, [0, 1, 0], {}, ValueError, r'labels must have shape \(4,\) to match embeddings'),
    (_EMB, [0.0, 1.0, 0.0, 1.0], {}, TypeError, 'labels must have an integer dtype'),
    (_EMB, [0, 1, 0, -1], {}, ValueError, 'labels must be >= 0'),
    (_EMB, [0, 2, 0, 2], {}, ValueError, 'labels has no example of class 1'),
    (_EMB, [0, 1, 0, 1], {'num_classes': 3}, ValueError, 'labels has no example of class 2'),
    (_EMB, [0, 1, 0, 3], {'num_classes': 3}, ValueError, r'labels must lie in \[0, 3\)'),
    (_EMB, [0, 1, 0, 1], {'num_classes': 0}, ValueError, 'num_classes must be >= 1'),
    (_EMB, [0, 1, 0, 1], {'num_classes': 2.0}, TypeError, 'num_classes must be an int'),
])
def test_embedding_errors(fn, emb, labels, kwargs, error, match):
  with pytest.raises(error, match=match):
    fn(emb, labels, **kwargs)


def test_centroid_dispersion_specific_errors():
  with pytest.raises(ValueError, match='at least 2 classes'):
    metrics.centroid_dispersion(_EMB, [0, 0, 0, 0])
  # Class 0 holds (1, 0) and (-1, 0): its centroid is the zero vector.
  with pytest.raises(ValueError, match='centroid of class 0 is the zero vector'):
    metrics.centroid_dispersion(_EMB, [0, 1, 0, 1])
  # mes_radius is fine with a single class and with a zero centroid.
  np.testing.assert_allclose(metrics.mes_radius(_EMB, [0, 1, 0, 1]), [1.0, 1.0], rtol=1e-15)
  np.testing.assert_allclose(metrics.mes_radius(_EMB, [0, 0, 0, 0]), [1.0], rtol=1e-15)
