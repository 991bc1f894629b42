"""Property-based tests (hypothesis) of ood_jax's losses, scores and metrics on their valid input ranges.

Each property holds for every input the strategy can draw: no NaN or inf in values and gradients,
float64 NumPy / scikit-learn references where a closed form exists, the ranges and monotonicity the
definitions imply, invariance of the detection metrics to strictly increasing transforms of the
scores and to permutations, and per-example losses that follow a permutation of the batch. Shapes
are fixed per property so that every jitted function compiles once; `derandomize=True` makes the
draws the same on every run (no example database), so a CI failure reproduces locally. `scores.knn`
is fuzzed with its own tests (tests/test_scores.py).
"""

import functools

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special
from sklearn import metrics as sk_metrics

from ood_jax import losses
from ood_jax import metrics
from ood_jax import scores

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

N, K = 8, 5  # batch and classes of every jitted property: one compile each

# Logits on a grid of 1/8 up to ±1e4: exactly representable in float32 (8·1e4 < 2²⁴), so integer
# shifts below are exact and the draws mix tiny, ordinary and ±1e4 scales.
_GRID = st.integers(-80_000, 80_000).map(lambda k: k / 8.0)
_SMALL = st.integers(-40, 40).map(lambda k: k / 8.0)
_ELEMENT = st.one_of(_GRID, _SMALL, st.sampled_from([0.0, 1e4, -1e4]))


def _logits(shape=(N, K), nonpositive=False):
  """Independent grid values, or rows of small values around a per-row offset of 0 or ±9990.

  The second kind (near-uniform rows at ±1e4) is where differences of large numbers cancel.
  """
  independent = hnp.arrays(np.float32, shape, elements=_ELEMENT)
  offsets = hnp.arrays(np.float32, shape[:-1] + (1,), elements=st.sampled_from([0.0, 9990.0, -9990.0]))
  near = st.tuples(offsets, hnp.arrays(np.float32, shape, elements=_SMALL)).map(lambda t: t[0] + t[1])
  drawn = st.one_of(independent, near)
  return drawn.map(lambda z: -np.abs(z)) if nonpositive else drawn


def _labels(size=N, num_classes=K):
  return hnp.arrays(np.int32, (size,), elements=st.integers(0, num_classes - 1))


_PERMUTATION = st.permutations(list(range(N))).map(np.asarray)


def _tolerance(z, scale=1.0):
  """Absolute rounding allowance of a float32 computation on logits of magnitude max|scale·z|."""
  return 16 * float(np.spacing(np.float32(scale * np.max(np.abs(z)) + 1.0))) + 1e-6


# ------------------------------------------------------------------------------------------------
# Float64 references (independent of the library).


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  shifted = z - z.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _pick(a, y):
  return np.take_along_axis(a, y[:, None], axis=-1)[:, 0]


def _np_ova(z, y):
  z = np.asarray(z, np.float64)
  onehot = np.eye(z.shape[-1], dtype=bool)[y]
  return np.sum(np.where(onehot, np.logaddexp(0, -z), np.logaddexp(0, z)), axis=-1)  # −log σ, −log(1 − σ)


def _np_distance_ova(z, y, eps=1e-6):
  d = -np.asarray(z, np.float64)
  onehot = np.eye(z.shape[-1], dtype=bool)[y]
  target = np.logaddexp(0, d) - np.log(2)  # −log 2σ(−d)
  other = -np.log(np.tanh(np.maximum(d, eps) / 2))  # −log(1 − 2σ(−d))
  return np.sum(np.where(onehot, target, other), axis=-1)


LABELLED = {
    'softmax_cross_entropy': (losses.softmax_cross_entropy, lambda z, y: -_pick(_np_log_softmax(z), y), False, 1.0),
    'isomax': (losses.isomax, lambda z, y: -_pick(_np_log_softmax(10.0 * np.float64(z)), y), True, 10.0),
    'one_vs_all': (losses.one_vs_all, _np_ova, False, 1.0),
    'distance_one_vs_all': (losses.distance_one_vs_all, _np_distance_ova, True, 1.0),
    'ice_in': (losses.ice_in, lambda z, y: -_pick(np.float64(z), y), True, 1.0),
}


def _np_energy(z):
  return -special.logsumexp(np.asarray(z, np.float64), axis=-1)


UNLABELLED = {
    'outlier_exposure': (losses.outlier_exposure, lambda z: -np.mean(_np_log_softmax(z), axis=-1), False),
    'energy_in_margin': (losses.energy_in_margin, lambda z: np.maximum(_np_energy(z) + 25.0, 0) ** 2, False),
    'energy_out_margin': (losses.energy_out_margin, lambda z: np.maximum(-7.0 - _np_energy(z), 0) ** 2, False),
    'ice_out': (losses.ice_out, lambda z: -np.log(-np.expm1(np.minimum(np.float64(z).max(-1), -1e-6))), True),
}


# ------------------------------------------------------------------------------------------------
# Losses.


@functools.cache
def _jitted(name):
  fn = {**{k: v[0] for k, v in LABELLED.items()}, **{k: v[0] for k, v in UNLABELLED.items()}}[name]
  if name in LABELLED:
    return jax.jit(fn), jax.jit(jax.grad(lambda z, y: fn(z, y).mean()))
  return jax.jit(fn), jax.jit(jax.grad(lambda z: fn(z).mean()))


@pytest.mark.parametrize('name', sorted(LABELLED))
def test_labelled_losses_are_finite_exact_and_follow_batch_permutations(name):
  _, reference, nonpositive, scale = LABELLED[name]
  value_fn, grad_fn = _jitted(name)

  @FUZZ
  @given(z=_logits(nonpositive=nonpositive), y=_labels(), perm=_PERMUTATION,
         wild=hnp.arrays(np.int32, (N,), elements=st.one_of(st.integers(-3, K + 2), st.integers(-2**31, 2**31 - 1))))
  def check(z, y, perm, wild):
    # Any int32 labels under jit: NaN exactly where a label is outside [0, K), finite elsewhere.
    out = np.asarray(value_fn(z, wild))
    invalid = (wild < 0) | (wild >= K)
    np.testing.assert_array_equal(np.isnan(out), invalid)
    assert np.all(np.isfinite(out[~invalid]))
    values = np.asarray(value_fn(z, y))
    grads = np.asarray(grad_fn(z, y))
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    # On the 1/8 grid every max-shift (and IsoMax's ×10) is exact, so float32 keeps ~1e-7 relative.
    np.testing.assert_allclose(values, reference(z, y), rtol=2e-6, atol=1e-5)
    assert np.all(values >= 0)  # every one is a sum of −log(probability ≤ 1) terms
    permuted = np.asarray(value_fn(z[perm], y[perm]))
    np.testing.assert_allclose(permuted, values[perm], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(permuted.mean(), values.mean(), rtol=1e-6, atol=1e-6)

  check()


@pytest.mark.parametrize('name', sorted(UNLABELLED))
def test_unlabelled_losses_are_finite_exact_and_follow_batch_permutations(name):
  _, reference, nonpositive = UNLABELLED[name]
  value_fn, grad_fn = _jitted(name)

  @FUZZ
  @given(z=_logits(nonpositive=nonpositive), perm=_PERMUTATION)
  def check(z, perm):
    values = np.asarray(value_fn(z))
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(np.asarray(grad_fn(z))))
    np.testing.assert_allclose(values, reference(z), rtol=2e-6, atol=1e-5)
    floor = np.log(K) if name == 'outlier_exposure' else 0.0  # CE to uniform ≥ entropy of uniform
    assert np.all(values >= floor * (1 - 1e-6))
    np.testing.assert_allclose(value_fn(z[perm]), values[perm], rtol=1e-6, atol=1e-6)

  check()


_unit_rows = hnp.arrays(np.float32, (6, 2, 4), elements=st.floats(-1, 1, width=32)).filter(
    lambda e: np.all(np.linalg.norm(e, axis=-1) > 0.1)).map(lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True))


@pytest.mark.parametrize('variant', ['supcon', 'paper', 'openood'])
def test_contrastive_losses_are_finite_and_follow_example_permutations(variant):
  if variant == 'supcon':
    fn = losses.supervised_contrastive
  else:
    fn = functools.partial(losses.reweighted_contrastive, variant=variant)
  value_fn = jax.jit(fn)
  grad_fn = jax.jit(jax.grad(lambda e, y: fn(e, y).mean()))

  @FUZZ
  @given(e=_unit_rows, y=_labels(6, 3), perm=st.permutations(list(range(6))).map(np.asarray))
  def check(e, y, perm):
    values = np.asarray(value_fn(e, y))
    assert values.shape == (12,)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(np.asarray(grad_fn(e, y))))
    if variant == 'supcon':
      assert np.all(values >= -1e-5)  # −mean log(p_pos) with every p_pos ≤ 1
    # Anchor n·V + v follows example n.
    permuted = np.asarray(value_fn(e[perm], y[perm])).reshape(6, 2)
    np.testing.assert_allclose(permuted, values.reshape(6, 2)[perm], rtol=1e-5, atol=1e-5)

  check()


def test_smot_smoothing_is_a_decreasing_map_into_the_unit_interval_and_the_loss_is_finite():
  smoothing = jax.jit(losses.smot_smoothing)
  loss = jax.jit(losses.smooth_training)
  grad = jax.jit(jax.grad(lambda z, m, y, e: losses.smooth_training(z, m, y, e).mean(), argnums=(0, 1)))

  @FUZZ
  @given(t=hnp.arrays(np.float32, (N,), elements=st.floats(0, 255, width=32)), z=_logits(), masked=_logits(),
         y=_labels(), perm=_PERMUTATION)
  def check(t, z, masked, y, perm):
    eps = np.asarray(smoothing(t))
    assert np.all((eps >= 0) & (eps <= 1))  # 1 − e^−25.5 at t = 0 rounds to 1 in float32
    order = np.argsort(t)
    assert np.all(np.diff(eps[order]) <= 0)  # more smoothing for lower thresholds
    np.testing.assert_allclose(eps, -np.expm1((np.float64(t) - 255) / 10), rtol=1e-5, atol=1e-7)
    values = np.asarray(loss(z, masked, y, eps))
    assert np.all(np.isfinite(values)) and all(np.all(np.isfinite(g)) for g in grad(z, masked, y, eps))
    assert np.all(values >= -_tolerance(np.r_[z, masked]) * K)
    np.testing.assert_allclose(loss(z[perm], masked[perm], y[perm], eps[perm]), values[perm], rtol=1e-6, atol=1e-6)

  check()


# ------------------------------------------------------------------------------------------------
# Logit scores.

LOGIT_SCORES = ('max_softmax', 'max_logit', 'entropic_score', 'energy', 'max_sigmoid')


@functools.cache
def _all_scores():
  def every(z):
    return {name: getattr(scores, name)(z) for name in LOGIT_SCORES}
  return jax.jit(every)


def test_logit_scores_ranges_references_and_invariances():
  every = _all_scores()

  @FUZZ
  @given(z=_logits(), shift=_SMALL.map(lambda c: 8 * c), perm=st.permutations(list(range(K))).map(np.asarray),
         bump=st.integers(1, 80).map(lambda k: k / 8.0))
  def check(z, shift, perm, bump):
    out = {k: np.asarray(v, np.float64) for k, v in every(z).items()}
    assert all(np.all(np.isfinite(v)) for v in out.values())
    z64 = np.float64(z)
    log_p = _np_log_softmax(z64)
    top = z64.max(-1)
    np.testing.assert_allclose(out['max_softmax'], np.exp(log_p.max(-1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out['max_logit'], top)
    np.testing.assert_allclose(out['entropic_score'], np.sum(special.xlogy(np.exp(log_p), np.exp(log_p)), -1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out['energy'], special.logsumexp(z64, axis=-1), rtol=1e-6, atol=_tolerance(z))
    assert np.all((out['max_softmax'] >= 1 / K - 1e-6) & (out['max_softmax'] <= 1))
    assert np.all((out['entropic_score'] >= -np.log(K) - 1e-5) & (out['entropic_score'] <= 0))
    assert np.all((out['energy'] >= top - _tolerance(z)) & (out['energy'] <= top + np.log(K) + _tolerance(z)))
    # max σ(z) is an increasing function of max z: equal ranks (ties allowed by saturation).
    for a, b in [(i, j) for i in range(N) for j in range(N) if top[i] < top[j]]:
      assert out['max_sigmoid'][a] <= out['max_sigmoid'][b]

    # An exact shift of every logit: MSP and the entropic score do not move; max logit and energy move by it.
    moved = {k: np.asarray(v, np.float64) for k, v in every(z + np.float32(shift)).items()}
    np.testing.assert_array_equal(moved['max_softmax'], out['max_softmax'])
    np.testing.assert_array_equal(moved['entropic_score'], out['entropic_score'])
    np.testing.assert_array_equal(moved['max_logit'], out['max_logit'] + shift)
    np.testing.assert_allclose(moved['energy'], out['energy'] + shift, rtol=1e-6, atol=_tolerance(z + shift))
    # Relabelling the classes changes nothing.
    relabelled = every(z[:, perm])
    for name in LOGIT_SCORES:
      allowance = _tolerance(z) if name == 'energy' else 1e-7
      np.testing.assert_allclose(relabelled[name], out[name], rtol=1e-6, atol=allowance)
    # Raising the top logit never lowers MSP, the entropic score, the energy or the max logit.
    raised = z.copy()
    rows = np.arange(N)
    raised[rows, z.argmax(-1)] += np.float32(bump)
    higher = every(raised)
    for name in LOGIT_SCORES:
      allowance = _tolerance(raised) if name == 'energy' else 1e-6
      assert np.all(np.asarray(higher[name], np.float64) >= out[name] - allowance), name

  check()


@pytest.mark.parametrize('name', ['max_distance_sigmoid', 'max_likelihood'])
def test_distance_scores_are_increasing_in_the_max_logit(name):
  fn = jax.jit(getattr(scores, name))
  reference = {'max_distance_sigmoid': lambda t: 2 * special.expit(t), 'max_likelihood': np.exp}[name]

  @FUZZ
  @given(z=_logits(nonpositive=True))
  def check(z):
    out = np.asarray(fn(z), np.float64)
    top = np.float64(z).max(-1)
    assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))
    np.testing.assert_allclose(out, reference(top), rtol=1e-6, atol=1e-7)
    order = np.argsort(top, kind='stable')
    assert np.all(np.diff(out[order]) >= 0)

  check()


def test_mahalanobis_fit_is_order_free_and_the_score_matches_the_explicit_inverse():
  mahalanobis = jax.jit(scores.mahalanobis)

  @FUZZ
  @given(seed=st.integers(0, 2**32 - 1), splits=st.lists(st.integers(1, 59), max_size=4))
  def check(seed, splits):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(3), rng.integers(0, 3, size=57)].astype(np.int32)  # every class present
    features = rng.normal(size=(60, 4)) * rng.uniform(0.1, 10) + rng.normal(size=4) * 100
    whole = scores.fit_gaussian(features, labels, num_classes=3)
    order = rng.permutation(60)
    bounds = [0, *sorted(set(splits)), 60]
    chunks = [(features[order][lo:hi], labels[order][lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    streamed = scores.fit_gaussian(iter(chunks), num_classes=3)
    for a, b in zip(whole, streamed):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(a))))
    queries = rng.normal(size=(N, 4)) * 20 + features.mean(0)
    out = np.asarray(mahalanobis(jnp.asarray(queries, jnp.float32), whole), np.float64)
    means, cov = np.asarray(whole.means, np.float64), np.asarray(whole.covariance, np.float64)
    diff = queries[:, None, :] - means[None]
    want = -np.min(np.einsum('nki,ij,nkj->nk', diff, np.linalg.inv(cov), diff), axis=-1)
    assert np.all(np.isfinite(out)) and np.all(out <= 1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-3)
    relabelled = scores.Gaussian(whole.means[::-1], whole.covariance, whole.cholesky)
    np.testing.assert_allclose(mahalanobis(jnp.asarray(queries, jnp.float32), relabelled), out, rtol=1e-6)

  check()


def test_odin_scores_are_probabilities_and_follow_the_batch():
  odin = jax.jit(lambda w, b, x, t, eps: scores.odin(lambda v: v @ w + b, x, temperature=t, epsilon=eps))

  @FUZZ
  @given(seed=st.integers(0, 2**32 - 1), temperature=st.sampled_from([1.0, 10.0, 1000.0]),
         epsilon=st.floats(0.0, 0.1), perm=_PERMUTATION)
  def check(seed, temperature, epsilon, perm):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(3, K)) * 3, jnp.float32)
    b = jnp.asarray(rng.normal(size=K), jnp.float32)
    x = np.asarray(rng.normal(size=(N, 3)), np.float32)
    out = np.asarray(odin(w, b, x, temperature, epsilon))
    assert np.all(np.isfinite(out)) and np.all((out >= 1 / K - 1e-6) & (out <= 1))
    np.testing.assert_allclose(odin(w, b, x[perm], temperature, epsilon), out[perm], rtol=1e-6)
    if epsilon == 0:
      logits = (x @ np.float64(w) + np.float64(b)) / temperature
      np.testing.assert_allclose(out, np.exp(_np_log_softmax(logits)).max(-1), rtol=1e-5)

  check()


# ------------------------------------------------------------------------------------------------
# Metrics (host NumPy: no compile, so sizes vary).

_SCORE = st.integers(-40, 40).map(lambda k: k / 4.0)  # a coarse grid: plenty of ties
_SCORES = hnp.arrays(np.float64, st.integers(1, 25), elements=_SCORE)
_SCORES_WITH_INF = hnp.arrays(np.float64, st.integers(1, 25),
                              elements=st.one_of(_SCORE, st.sampled_from([np.inf, -np.inf])))
# Strictly increasing maps that are injective on the grid in float64 (and keep ±inf in order).
TRANSFORMS = {
    'affine': lambda s: 3.0 * s + 1.0,
    'cube': lambda s: s ** 3,
    'exp': lambda s: np.exp(s / 8.0),
    'arctan': lambda s: np.arctan(s / 7.0),
}
OOD_METRICS = {
    'auroc': metrics.auroc,
    'aupr_in': metrics.aupr_in,
    'aupr_out': metrics.aupr_out,
    'fpr_at_tpr': metrics.fpr_at_tpr,
    'fpr_at_tpr_ood': functools.partial(metrics.fpr_at_tpr, positive='ood'),
    'tnr_at_tpr': metrics.tnr_at_tpr,
    'detection_accuracy': metrics.detection_accuracy,
}


def _sklearn_fpr(y, s, tpr):
  fpr, tprs, _ = sk_metrics.roc_curve(y, s, drop_intermediate=False)
  return fpr[np.argmax(tprs >= tpr)]


def _brute_dtacc(ins, outs):
  candidates = np.r_[np.unique(np.r_[ins, outs]), np.inf]
  return 1 - min(0.5 * np.mean(ins < d) + 0.5 * np.mean(outs >= d) for d in candidates)


@FUZZ
@given(ins=_SCORES, outs=_SCORES, tpr=st.sampled_from([0.5, 0.8, 0.95, 0.99]))
def test_detection_metrics_match_sklearn_and_brute_force(ins, outs, tpr):
  y = np.r_[np.ones(ins.size), np.zeros(outs.size)]
  s = np.r_[ins, outs]
  assert metrics.auroc(ins, outs) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
  assert metrics.aupr_in(ins, outs) == pytest.approx(sk_metrics.average_precision_score(y, s), abs=1e-12)
  assert metrics.aupr_out(ins, outs) == pytest.approx(sk_metrics.average_precision_score(1 - y, -s), abs=1e-12)
  assert metrics.fpr_at_tpr(ins, outs, tpr=tpr) == pytest.approx(_sklearn_fpr(y, s, tpr), abs=1e-12)
  assert metrics.fpr_at_tpr(ins, outs, tpr=tpr, positive='ood') == pytest.approx(
      _sklearn_fpr(1 - y, -s, tpr), abs=1e-12)
  assert metrics.detection_accuracy(ins, outs) == pytest.approx(_brute_dtacc(ins, outs), abs=1e-12)


@FUZZ
@given(ins=_SCORES_WITH_INF, outs=_SCORES_WITH_INF, transform=st.sampled_from(sorted(TRANSFORMS)),
       seed=st.integers(0, 2**32 - 1))
def test_detection_metrics_are_invariant_to_increasing_transforms_and_permutations(ins, outs, transform, seed):
  rng = np.random.default_rng(seed)
  f = TRANSFORMS[transform]
  with np.errstate(over='ignore'):
    moved_in, moved_out = f(ins), f(outs)
  for name, fn in OOD_METRICS.items():
    value = fn(ins, outs)
    assert np.isfinite(value) and 0.0 <= value <= 1.0, name
    assert fn(moved_in, moved_out) == value, (name, transform)  # ranks alone decide every metric
    assert fn(rng.permutation(ins), rng.permutation(outs)) == value, name
  # The class-swap identities of the definitions.
  assert metrics.auroc(outs, ins) == pytest.approx(1.0 - metrics.auroc(ins, outs), abs=1e-12)
  assert metrics.aupr_out(ins, outs) == metrics.aupr_in(-outs, -ins)
  assert metrics.fpr_at_tpr(ins, outs, positive='ood') == metrics.fpr_at_tpr(-outs, -ins)
  assert metrics.tnr_at_tpr(ins, outs) == pytest.approx(1.0 - metrics.fpr_at_tpr(ins, outs), abs=1e-15)
  assert metrics.detection_accuracy(ins, outs) == metrics.detection_accuracy(-outs, -ins)
  assert metrics.detection_accuracy(ins, outs) >= 0.5


def _np_ece(probs, labels, num_bins=15):
  confidence = probs.max(axis=1)
  correct = probs.argmax(axis=1) == labels
  bins = np.minimum(np.floor(confidence * num_bins), num_bins - 1)
  total = 0.0
  for b in range(num_bins):
    members = bins == b
    if members.any():
      total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
  return total


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 40), softmax=st.booleans(),
       num_bins=st.sampled_from([1, 10, 15]))
def test_expected_calibration_error_matches_the_binned_formula(seed, size, softmax, num_bins):
  rng = np.random.default_rng(seed)
  if softmax:
    probs = np.exp(_np_log_softmax(rng.normal(size=(size, 4)) * rng.uniform(0.1, 10)))
  else:  # one-vs-all rows need not sum to one; include the bin edges 0, 1/15 and 1 exactly
    probs = rng.choice(np.r_[rng.uniform(size=20), 0.0, 1.0 / 15, 1.0], size=(size, 4))
  labels = rng.integers(0, 4, size=size)
  ece = metrics.expected_calibration_error(probs, labels, num_bins=num_bins)
  assert np.isfinite(ece) and 0.0 <= ece <= 1.0
  assert ece == pytest.approx(_np_ece(probs, labels, num_bins), abs=1e-12)
  perm = rng.permutation(size)
  permuted = metrics.expected_calibration_error(probs[perm], labels[perm], num_bins=num_bins)
  assert permuted == pytest.approx(ece, abs=1e-12)
