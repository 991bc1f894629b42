"""Tests for ood_jax.detectors.neighbours: KNN (its chunked exact kernel) and NNGuide
against float64 NumPy references, scikit-learn and faiss.

The KNN reference normalises in float64 (zero vectors stay zero) and sorts the full distance matrix, so
it is independent of the chunked, grouped top-k and the exact re-scoring under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ood_jax import detectors
from ood_jax import scores
from ood_jax.detectors import neighbours
from tests.detectors import problems


def _unit(x):
  x = np.asarray(x, np.float64)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def _ref_kth(features, bank, k):
  """k-th smallest ‖q̂ − b̂‖ in float64 from the differences (no cancellation)."""
  q, b = _unit(features), _unit(bank)
  dist = np.sqrt(np.sum((q[:, None, :] - b[None, :, :]) ** 2, axis=-1))
  return np.sort(dist, axis=1)[:, k - 1]


_knn = jax.jit(scores.knn, static_argnames=('k', 'query_chunk_size', 'bank_chunk_size'))

# (bank_chunk_size, query_chunk_size): one chunk with grouped top-k, several uneven chunks with
# grouped top-k, and chunks too small for groups (plain top-k).
_CHUNKS = [(4096, 256), (700, 64), (40, 7)]


@pytest.mark.parametrize('bank_chunk_size,query_chunk_size', _CHUNKS)
def test_query_in_bank_is_at_exactly_zero(bank_chunk_size, query_chunk_size):
  rng = np.random.default_rng(0)
  bank = rng.standard_normal((1500, 64)).astype(np.float32) * rng.uniform(0.1, 10.0, (1500, 1)).astype(np.float32)
  queries = bank[rng.choice(1500, 50, replace=False)]
  out = _knn(jnp.asarray(queries), jnp.asarray(bank), k=1, query_chunk_size=query_chunk_size,
             bank_chunk_size=bank_chunk_size)
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # was ~1e-3 with sqrt(2 − 2·cos) in float32


@pytest.mark.parametrize('bank_chunk_size,query_chunk_size', _CHUNKS)
def test_near_vectors_at_their_true_distance(bank_chunk_size, query_chunk_size):
  rng = np.random.default_rng(1)
  bank = rng.standard_normal((1200, 128)).astype(np.float32)
  rows = rng.choice(1200, 40, replace=False)
  scale = np.geomspace(1e-6, 1e-2, 40)[:, None]
  queries = (bank[rows] + scale * rng.standard_normal((40, 128))).astype(np.float32)
  out = np.asarray(_knn(jnp.asarray(queries), jnp.asarray(bank), k=1, query_chunk_size=query_chunk_size,
                        bank_chunk_size=bank_chunk_size))
  ref = _ref_kth(queries, bank, 1)
  assert ref.min() < 1e-6 and ref.max() > 1e-3
  # Absolute float32 rounding of unit vectors, 1e-7, instead of sqrt(float32 eps) ≈ 3e-4.
  np.testing.assert_allclose(-out, ref, rtol=1e-3, atol=2e-7)


def test_zero_vectors_are_at_their_true_distance():
  rng = np.random.default_rng(2)
  bank = rng.standard_normal((300, 32)).astype(np.float32)
  queries = np.concatenate([np.zeros((2, 32), np.float32), rng.standard_normal((3, 32)).astype(np.float32)])
  for k in (1, 300):
    out = np.asarray(scores.knn(jnp.asarray(queries), jnp.asarray(bank), k=k))
    np.testing.assert_allclose(out[:2], -1.0, atol=1e-6)  # distance 1 from the normalised bank, not √2
    np.testing.assert_allclose(-out, _ref_kth(queries, bank, k), atol=1e-6)
  # Zero bank rows are at distance 1 from unit queries and 0 from zero queries.
  bank[:5] = 0.0
  for k in (1, 6):
    out = np.asarray(scores.knn(jnp.asarray(queries), jnp.asarray(bank), k=k, bank_chunk_size=64))
    np.testing.assert_allclose(-out, _ref_kth(queries, bank, k), atol=1e-6)


@pytest.mark.parametrize('k', [1, 50, 200])
def test_matches_reference_on_random_features_with_ties(k):
  rng = np.random.default_rng(3)
  bank = rng.standard_normal((2000, 48)).astype(np.float32)
  bank[1000:1100] = bank[0]  # 101 equal rows: ties far beyond the spare candidates
  queries = np.concatenate([bank[:1] + 1e-3, rng.standard_normal((60, 48))]).astype(np.float32)
  ref = _ref_kth(queries, bank, k)
  for bank_chunk_size, query_chunk_size in _CHUNKS[:2]:
    out = _knn(jnp.asarray(queries), jnp.asarray(bank), k=k, query_chunk_size=query_chunk_size,
               bank_chunk_size=bank_chunk_size)
    assert out.shape == (61,) and out.dtype == jnp.float32
    np.testing.assert_allclose(-np.asarray(out), ref, rtol=1e-6, atol=2e-7)


def test_bfloat16_and_float32_agree_and_runs_are_bitwise_equal():
  rng = np.random.default_rng(4)
  bank = jnp.asarray(rng.standard_normal((500, 16)), jnp.bfloat16)
  queries = jnp.asarray(rng.standard_normal((30, 16)), jnp.bfloat16)
  out = scores.knn(queries, bank, k=5)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(-np.asarray(out), _ref_kth(np.asarray(queries, np.float32),
                                                        np.asarray(bank, np.float32), 5), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(scores.knn(queries, bank, k=5)))


def test_detector_scores_with_the_same_numerics():
  rng = np.random.default_rng(5)
  train = rng.standard_normal((400, 24)).astype(np.float32)
  state = neighbours.fit_knn([{'features': train}])
  test = np.concatenate([train[:3], np.zeros((1, 24), np.float32)])
  out = np.asarray(neighbours.knn(state, test, k=1))
  np.testing.assert_array_equal(out[:3], 0.0)
  np.testing.assert_allclose(out[3], -1.0, atol=1e-6)


def test_matches_faiss_index_flat_l2():
  faiss = pytest.importorskip('faiss', reason='faiss-cpu is an optional peer (pip install faiss-cpu)')
  rng = np.random.default_rng(6)
  bank = rng.standard_normal((3000, 64)).astype(np.float32)
  queries = rng.standard_normal((200, 64)).astype(np.float32)
  unit_bank, unit_queries = _unit(bank).astype(np.float32), _unit(queries).astype(np.float32)
  index = faiss.IndexFlatL2(64)
  index.add(unit_bank)
  squared, _ = index.search(unit_queries, 50)
  out = np.asarray(scores.knn(jnp.asarray(queries), jnp.asarray(bank), k=50))
  # faiss computes ‖q‖² + ‖b‖² − 2 q·b in float32, so it carries that cancellation; ours does not.
  np.testing.assert_allclose(-out, np.sqrt(np.maximum(squared[:, -1], 0.0)), atol=2e-6)
  np.testing.assert_allclose(-out, _ref_kth(queries, bank, 50), atol=2e-7)


def test_knn_detector_matches_brute_force():
  h, labels, w, b, test = problems.problem(seed=6)
  det, state = problems.fit('knn', h, labels, w, b)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  dist = np.linalg.norm(unit(test.astype(np.float64))[:, None] - unit(h.astype(np.float64))[None], axis=-1)
  for k in (1, 5):
    np.testing.assert_allclose(problems.jit_score(det, state, test, k=k), -np.sort(dist, 1)[:, k - 1], rtol=1e-4,
                               atol=1e-5)
  # k = the bank size is the farthest entry.
  np.testing.assert_allclose(det.score(state, {'features': test}, k=len(h)), -dist.max(1), rtol=1e-4, atol=1e-5)


def test_k_beyond_the_bank_raises_and_the_grid_drops_it():
  """A k-th neighbour beyond the bank does not exist: a ValueError naming k and the bank, never a silent clip."""
  h, labels, w, b, test = problems.problem(seed=6)
  for name, hp, size in (('knn', {}, len(h)), ('nnguide', {'fraction': 0.25, 'seed': 1}, None)):
    det, state = problems.fit(name, h, labels, w, b, **hp)
    size = size or state.bank.shape[0]
    assert det.score(state, {'features': test}, k=size).shape == (len(test),)
    with pytest.raises(ValueError, match=rf"'{name}': k={size + 1} exceeds the bank of {size} training rows.*fraction"):
      det.score(state, {'features': test}, k=size + 1)
  # The default k = 50 of KNN scores on a digits-sized training set (652 rows in configs/digits' runs).
  det, state = problems.fit('knn', *problems.problem(seed=6, n=652)[:4])
  assert np.all(np.isfinite(np.asarray(det.score(state, {'features': test}))))
  # grid_for drops the k values the bank cannot hold: all of the training rows for KNN, a fraction for NNGuide.
  assert detectors.get('knn').grid_for(num_train=240)['k'] == (50, 100, 200)
  assert detectors.get('knn').grid_for()['k'] == (50, 100, 200, 500, 1000)
  assert detectors.get('nnguide').grid_for(num_train=2000)['k'] == (10,)  # a bank of 1 % of 2 000 rows
  assert detectors.get('nnguide', fraction=1.0).grid_for(num_train=60)['k'] == (10, 50)


def test_scores_knn_is_the_detector_kernel():
  assert scores.knn is neighbours.knn_scores
  rng = np.random.default_rng(7)
  train = rng.standard_normal((300, 12)).astype(np.float32)
  test = rng.standard_normal((25, 12)).astype(np.float32)
  det = detectors.get('knn')
  state = det.fit([{'features': train[:100]}, {'features': train[100:]}])
  np.testing.assert_array_equal(det.score(state, {'features': test}, k=7), scores.knn(test, train, k=7))


def test_nnguide_matches_reference():
  h, labels, w, b, test = problems.problem(seed=10)
  det, state = problems.fit('nnguide', h, labels, w, b, fraction=1.0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  h64, t64 = h.astype(np.float64), test.astype(np.float64)
  bank = unit(h64) * special.logsumexp(h64 @ w + b, axis=1)[:, None]
  sims = unit(t64) @ bank.T
  for k in (1, 10):
    ref = special.logsumexp(t64 @ w + b, axis=1) * np.sort(sims, 1)[:, ::-1][:, :k].mean(1)
    np.testing.assert_allclose(problems.jit_score(det, state, test, k=k), ref, rtol=1e-4, atol=1e-4)
  small = det.fit(problems.batches(h, labels), head=(w, b), fraction=0.25, seed=1)
  assert 20 < small.bank.shape[0] < 100  # A Bernoulli(0.25) subset of 240 rows.


# ------------------------------------------------------------------------------------------------
# Relation.
# ------------------------------------------------------------------------------------------------


def test_relation_matches_reference():
  h, labels, w, b, test = problems.problem(seed=21)
  train = [{**batch, 'logits': batch['features'] @ w + b} for batch in problems.batches(h, labels)]
  det = detectors.get('relation')
  state = det.fit(train)
  test_logits = test @ w + b

  def unit(x):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).sum(1, keepdims=True) + 1e-10)

  # Kim et al. 2023 as OpenOOD runs it: r = max(cos, 0)·⟨p, p'⟩, edges r > 0.03 summed after ** power.
  r = np.maximum(unit(test) @ unit(h).T, 0) * (special.softmax(test_logits.astype(np.float64), 1)
                                               @ special.softmax(h.astype(np.float64) @ w + b, 1).T)
  score = jax.jit(lambda s, f, z, p, t: neighbours.relation(s, f, logits=z, power=p, threshold=t,
                                                             query_chunk_size=8, bank_chunk_size=64))
  for power, threshold in ((1.0, 0.03), (4.0, 0.3)):  # traced: one compilation; padded query and bank chunks
    ref = np.where(r > threshold, r ** power, 0).sum(1)
    np.testing.assert_allclose(score(state, test, test_logits, power, threshold), ref, rtol=1e-5, atol=1e-6)
  # The default chunks give the same numbers; a bank subsample keeps about `fraction` of the rows.
  np.testing.assert_allclose(det.score(state, {'features': test, 'logits': test_logits}),
                             np.where(r > 0.03, r, 0).sum(1), rtol=1e-5)
  assert 80 < det.fit(train, fraction=0.5).features.shape[0] < 160
  with pytest.raises(ValueError, match='power must be > 0'):
    det.score(state, {'features': test, 'logits': test_logits}, power=0.0)
  with pytest.raises(ValueError, match="'relation' needs logits"):
    det.score(state, {'features': test})


# ------------------------------------------------------------------------------------------------
# CF-OOD.
# ------------------------------------------------------------------------------------------------


def _cfood_reference(bank, test, k):
  """The authors' OpenOOD postprocessor in float64 NumPy: radii from full sorted self-distances, then the first
  fraction whose neighbourhoods hold the query for at least a fraction k of the bank."""
  unit = lambda x: np.asarray(x, np.float64) / (np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True)
                                                + 1e-10)
  b, t = unit(bank), unit(test)
  n = len(b)
  kval = np.concatenate([np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)])
  kpos = np.array(kval * n - 1, dtype=int)
  keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
  kval, kpos = kval[keep], kpos[keep]
  self_sq = np.sum((b[:, None] - b[None]) ** 2, axis=-1)
  radii = np.sort(self_sq, axis=1)[:, kpos + 1]
  out = []
  for v in t:
    count = (radii >= np.sum((v - b) ** 2, axis=1)[:, None]).sum(0) / n
    hit = np.flatnonzero(count >= k)
    out.append(-(kval[hit[0]] if hit.size else 1.0))
  return np.array(out)


def test_cfood_matches_reference():
  h, labels, _, _, test = problems.problem(seed=21)
  test = np.concatenate([test, 5.0 * np.random.default_rng(0).standard_normal((4, problems.D))]).astype(np.float32)
  det = detectors.get('cfood')
  state = det.fit(problems.batches(h, labels), fraction=1.0)  # the whole set: the reference's bank
  score = jax.jit(lambda s, f, k: det.score(s, {'features': f}, k=k))  # k traced: one compilation
  for k in (0.01, 0.05, 0.3):
    ref = _cfood_reference(h, test, k)
    assert len(np.unique(ref)) > 3
    np.testing.assert_allclose(score(state, test, k), ref, rtol=1e-6)
  assert score._cache_size() == 1  # pylint: disable=protected-access


def test_cfood_errors():
  h, labels, _, _, test = problems.problem(seed=21)
  det = detectors.get('cfood')
  with pytest.raises(ValueError, match='at least 2'):
    det.fit([{'features': h[:1]}], fraction=1.0)
  state = det.fit(problems.batches(h, labels))
  assert 10 <= state.bank.shape[0] <= 40  # Bernoulli(0.1) of 240 rows
  with pytest.raises(ValueError, match=r'k must lie in \(0, 1\]'):
    det.score(state, {'features': test}, k=0.0)
  with pytest.raises(ValueError, match='fitted on dimension'):
    det.score(state, {'features': test[:, :3]})
