"""Nearest-neighbour detectors: KNN, NNGuide, Relation and CF-OOD, and the library's one exact chunked k-NN kernel.

On penultimate features h `[N, D]` against a bank of training features (higher = more in-distribution):

* KNN (Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors", Section 3 and
  Algorithm 1): −‖ĥ − b̂_(k)‖, the distance to the k-th nearest L2-normalised bank feature. The kernel
  `knn_scores` (also `ood_jax.scores.knn`) never materialises the query × bank matrix and re-scores
  its candidates exactly, so a query in the bank is at exactly 0.
* NNGuide (Park et al. 2023, "Nearest neighbor guidance for out-of-distribution detection", eq. 4–5):
  energy × mean of the k largest inner products with a confidence-scaled training bank.
* Relation (Kim et al. 2023, "Neural relation graph: a unified framework for identifying label noise and
  outlier data"): Σ_j (max(cos(h, h_j), 0)·⟨p, p_j⟩)^power over the bank's edges above a threshold.
* CF-OOD (Angiulli, Fassetti & Zupi 2025, "CF-OOD: concentration-free density estimation for reliable
  out-of-distribution detection", SISAP), as the authors' OpenOOD postprocessor computes it: −κ, the
  smallest neighbourhood fraction κ for which the query would fall among the ⌊κn⌋ nearest neighbours
  of at least a fraction k of the bank's points (a reverse-neighbour density).

Banks are the only fits that keep examples (float32), and all of them can subsample.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax import layers
from ood_jax.detectors import _base as base
from ood_jax.detectors import registry

__all__ = [
    'CFOODState',
    'KNNState',
    'NNGuideState',
    'RelationState',
    'cfood',
    'fit_cfood',
    'fit_knn',
    'fit_nnguide',
    'fit_relation',
    'knn',
    'knn_scores',
    'nnguide',
    'relation',
]


# ------------------------------------------------------------------------------------------------
# The exact chunked k-NN kernel.
# ------------------------------------------------------------------------------------------------


# Candidates kept per query beyond k before the exact re-scoring: the float32 scores that select them
# are off by ~1e-6, so the true k-th neighbour is among them unless more than this many bank entries
# lie within that rounding of it (and then every choice among those ties is within the rounding).
_KNN_SPARE_CANDIDATES = 8


@functools.partial(jax.jit, static_argnames='dtype')
def _knn_normalize(x, *, dtype):
  """x / max(‖x‖, 1e-12) row by row in `dtype`, bitwise the same for equal rows whatever the array's shape.

  XLA sums a row in an order that depends on the row count (vectorised blocks of rows, remainders),
  so `layers.l2_normalize` can give a query and its copy in the bank norms one ulp apart, and the pair
  a distance of ~1e-7 instead of 0. A fixed pairwise tree of elementwise adds over a zero-padded,
  power-of-two width, then a correctly rounded sqrt and division, computes every row the same way.
  """
  x = x.astype(dtype)
  sq = jnp.square(x)
  width = 1 << max(int(x.shape[1]) - 1, 0).bit_length()
  sq = jnp.pad(sq, ((0, 0), (0, width - x.shape[1])))
  while width > 1:
    width //= 2
    sq = sq[:, :width] + sq[:, width:]
  return x / jnp.sqrt(jnp.maximum(sq, 1e-24))


def _knn_group_size(chunk_size: int, num_candidates: int) -> int:
  """Power of two G near sqrt(chunk / candidates): balances the two top-k passes of `_knn_chunk_top`."""
  group = 1
  while group < 64 and (2 * group) ** 2 * num_candidates <= chunk_size:
    group *= 2
  return group


def _knn_chunk_top(q, rows, half_sq_norms, *, num, group):
  """Approximate top-`num` bank rows of one chunk for each query, by q·b − ½‖b‖² (float32).

  With `group` G > 1 the chunk's C columns are split into C / G strided groups of G; the best `num`
  candidates lie in the `num` groups with the largest maxima (each of them is its group's maximum or
  below it), so one top-k runs over C / G group maxima and one over num·G members instead of one
  over C, which on CPU costs several times the matmul.
  """
  s = jnp.dot(q, rows.T, precision=jax.lax.Precision.HIGHEST)  # [qc, C]
  if group == 1:
    v, i = jax.lax.top_k(s - half_sq_norms, num)
    return v, i
  width = s.shape[1] // group
  # Elementwise maxima of G contiguous column slabs vectorise; a reduce over a minor axis of G does not.
  maxima = functools.reduce(jnp.maximum, [s[:, g * width:(g + 1) * width] - half_sq_norms[g * width:(g + 1) * width]
                                          for g in range(group)])
  _, best_groups = jax.lax.top_k(maxima, num)  # [qc, num]
  members = (best_groups[:, :, None] + width * jnp.arange(group, dtype=best_groups.dtype)).reshape(q.shape[0], -1)
  scores = jnp.take_along_axis(s, members, axis=1, mode='promise_in_bounds') - half_sq_norms[members]
  v, pos = jax.lax.top_k(scores, num)
  return v, jnp.take_along_axis(members, pos, axis=1, mode='promise_in_bounds')


@functools.partial(jax.jit, static_argnames=('k', 'query_chunk_size', 'bank_chunk_size'))
def _kth_squared_distance(queries, bank, *, k, query_chunk_size, bank_chunk_size):
  """Exact k-th smallest ‖q − b‖² of each (unit or zero) query against (unit or zero) bank rows, in chunks."""
  num_queries, dim = queries.shape
  bank_size = bank.shape[0]
  num = min(k + _KNN_SPARE_CANDIDATES, bank_size)
  num_b_chunks = -(-bank_size // bank_chunk_size)
  chunk = -(-bank_size // num_b_chunks)  # even chunks: at most num_b_chunks − 1 padded rows per chunk
  group = _knn_group_size(chunk, num)
  chunk = -(-chunk // group) * group
  num_q_chunks = -(-num_queries // query_chunk_size)
  padded = num_b_chunks * chunk
  # ‖q − b‖² = ‖q‖² + 2(½‖b‖² − q·b): ranking by q·b − ½‖b‖² ranks zero bank rows (half norm 0)
  # correctly against unit ones (half norm ½). Padded rows get +inf, so they are never selected:
  # num <= bank_size real rows always score higher.
  half = 0.5 * jnp.sum(jnp.square(bank), axis=1)
  bank = jnp.pad(bank, ((0, padded - bank_size), (0, 0)))
  half = jnp.pad(half, (0, padded - bank_size), constant_values=jnp.inf)
  queries = jnp.pad(queries, ((0, num_q_chunks * query_chunk_size - num_queries), (0, 0)))
  queries = queries.reshape(num_q_chunks, query_chunk_size, dim)
  chunks = (bank.reshape(num_b_chunks, chunk, dim), half.reshape(num_b_chunks, chunk),
            jnp.arange(num_b_chunks, dtype=jnp.int32) * chunk)
  width = min(num, chunk)

  def query_chunk(q):
    def bank_step(best, xs):
      rows, half_rows, start = xs
      v, i = _knn_chunk_top(q, rows, half_rows, num=width, group=group if chunk // group >= width else 1)
      merged, pos = jax.lax.top_k(jnp.concatenate([best[0], v], axis=1), num)
      index = jnp.take_along_axis(jnp.concatenate([best[1], i + start], axis=1), pos, axis=1,
                                  mode='promise_in_bounds')
      return (merged, index), None

    init = (jnp.full((query_chunk_size, num), -jnp.inf, q.dtype), jnp.zeros((query_chunk_size, num), jnp.int32))
    if num_b_chunks == 1:
      (_, index), _ = bank_step(init, jax.tree.map(lambda a: a[0], chunks))
    else:
      (_, index), _ = jax.lax.scan(bank_step, init, chunks)
    # Exact re-scoring from the differences: no cancellation, so a query equal to a bank row is at
    # exactly 0 and near pairs keep their relative precision.
    sq = jnp.sum(jnp.square(q[:, None, :] - bank[index]), axis=2)  # [qc, num]
    return -jax.lax.top_k(-sq, k)[0][:, k - 1]

  return jax.lax.map(query_chunk, queries).reshape(-1)[:num_queries]


def knn_scores(features, bank, *, k: int, query_chunk_size: int = 256, bank_chunk_size: int = 65536):
  """KNN score: −(distance to the k-th nearest bank entry) on L2-normalised features (Sun et al. 2022).

  Features and bank rows are normalised to unit length (zero vectors stay zero) and the score is
  −‖q̂ − b̂_(k)‖, the Euclidean distance to the k-th nearest normalised bank row, as scikit-learn's
  `NearestNeighbors` or faiss' `IndexFlatL2` give it on the normalised arrays. Queries are processed
  in chunks of `query_chunk_size`; for each, the bank is scanned in chunks of `bank_chunk_size`: one
  float32 matmul per chunk ranks the rows by q̂·b̂ − ½‖b̂‖², a top-k over strided groups of columns
  keeps the k + 8 best candidates (merged across chunks), and those candidates are re-scored exactly
  as ‖q̂ − b̂‖² from the differences. So the query × bank matrix is never materialised (peak working
  memory O(query_chunk_size × bank_chunk_size), 64 MiB at the defaults, beyond normalised, padded
  copies of the inputs) and distances carry float32 rounding only: a query that is in the bank is at
  exactly 0, near pairs are at their true distance (no √(2 − 2·cos) cancellation), and a zero
  vector is at distance 1 from every unit row (0 from zero rows). The k-th distance is exact unless
  more than 8 bank rows tie with it within the ~1e-6 rounding of the selection scores, and then
  within that rounding. `ood_jax.scores.knn` is this function; its speed against faiss is measured by
  `python -m experiments.benchmark_peers`.

  Jittable with `k`, `query_chunk_size` and `bank_chunk_size` static (they set array shapes).

  Args:
    features: `[num_queries, dim]` floating query features.
    bank: `[bank_size, dim]` floating training features (the memory bank).
    k: which neighbour, 1 ≤ k ≤ bank_size. ReweightOOD (Regmi et al. 2024) and KNN (Sun et al. 2022) use
      k = 100 for CIFAR-10 and 300 for CIFAR-100 (50 for KNN+).
    query_chunk_size: queries per chunk (clipped to num_queries).
    bank_chunk_size: bank rows per chunk (clipped to bank_size; the bank is split into equal chunks).

  Returns:
    `[num_queries]` scores in [−2, 0], in at least float32.
  """
  features = base.floating_arg('features', features, ndim=2)
  bank = base.floating_arg('bank', bank, ndim=2)
  if features.shape[1] != bank.shape[1]:
    raise ValueError(f'features have dimension {features.shape[1]} but bank has dimension '
                     f'{bank.shape[1]} (shape {tuple(bank.shape)}).')
  _checks.nonempty('bank', bank)
  k = _checks.positive_int('k', k)
  if k > bank.shape[0]:
    raise ValueError(f'k must be <= the bank size {bank.shape[0]}, got k={k}.')
  query_chunk_size = _checks.positive_int('query_chunk_size', query_chunk_size)
  bank_chunk_size = _checks.positive_int('bank_chunk_size', bank_chunk_size)

  dtype = jax.dtypes.canonicalize_dtype(_checks.compute_dtype(features, bank))
  return _unit_bank_scores(features, _knn_normalize(bank, dtype=dtype), k=k, query_chunk_size=query_chunk_size,
                           bank_chunk_size=bank_chunk_size)


def _unit_bank_scores(features, unit_bank, *, k, query_chunk_size=256, bank_chunk_size=65536):
  """`knn_scores` against a bank normalised already (the detector's, normalised once when fitted)."""
  dtype = jax.dtypes.canonicalize_dtype(_checks.compute_dtype(features, unit_bank))
  if features.shape[0] == 0:
    return base.to_device(np.zeros((0,)), dtype)
  # Normalised by its own kernel: fused into the distance kernel, XLA recomputes the normalisation inside its
  # consumers with other arithmetic, and a query in the bank is no longer at exactly 0.
  return _knn(_knn_normalize(features, dtype=dtype), unit_bank, k=k,
              query_chunk_size=min(query_chunk_size, features.shape[0]),
              bank_chunk_size=min(bank_chunk_size, unit_bank.shape[0]))


@functools.partial(jax.jit, static_argnames=('k', 'query_chunk_size', 'bank_chunk_size'))
def _knn(queries, unit_bank, *, k, query_chunk_size, bank_chunk_size):
  return -jnp.sqrt(_kth_squared_distance(queries, unit_bank.astype(queries.dtype), k=k,
                                         query_chunk_size=query_chunk_size, bank_chunk_size=bank_chunk_size))


# ------------------------------------------------------------------------------------------------
# KNN and NNGuide.
# ------------------------------------------------------------------------------------------------


class KNNState(NamedTuple):
  """The training bank `[M, D]`, float32, its rows normalised to unit length when fitted (zero rows stay zero),
  as `knn_scores` normalises its bank on every call: scoring in blocks does not normalise it again per block."""

  bank: jax.Array


def _bernoulli_bank(batches, fraction, seed, detector, transform):
  if not 0 < float(fraction) <= 1:
    raise ValueError(f'the bank fraction must lie in (0, 1], got {fraction}.')
  rng = np.random.default_rng(seed)
  rows, dim = [], None
  for index, batch in enumerate(base.batch_source(batches, detector=detector)()):
    features = base.host(batch, 'features', index, detector=detector)
    dim = base.check_dim('features', features, dim, index)
    keep = rng.random(features.shape[0]) < fraction if fraction < 1 else slice(None)
    rows.append(transform(batch, index, features)[keep].astype(np.float32))
  if not rows or not sum(len(r) for r in rows):
    raise ValueError(f'detector {detector!r}: the bank is empty (no examples, or the fraction {fraction} '
                     f'sampled none).')
  return np.concatenate(rows)


def fit_knn(batches, *, fraction=1.0, seed=0):
  """The KNN bank: every training feature, or a Bernoulli(`fraction`) random subset (Sun et al. 2022
  use 1 % of ImageNet), normalised to unit rows and stored float32."""
  bank = _bernoulli_bank(batches, fraction, seed, 'knn', lambda b, i, f: f)
  return KNNState(_knn_normalize(base.to_device(bank, np.float32), dtype=np.dtype(np.float32)))


def _bank_k(detector: str, k, bank_size: int) -> int:
  """k, checked against the bank: a k-th neighbour beyond the bank does not exist, and clipping it silently
  would score with another k than the one asked for (and reported)."""
  k = _checks.positive_int('k', k)
  if k > bank_size:
    raise ValueError(f'detector {detector!r}: k={k} exceeds the bank of {bank_size} training rows; pass a k of at '
                     f'most {bank_size} (detectors.get({detector!r}, k=...)) or fit the bank on more rows (a larger '
                     f'fraction, or more training data).')
  return k


def knn(state: KNNState, features, *, k=50):
  """−‖ĥ − b̂_(k)‖, the k-th nearest normalised bank feature (Sun et al. 2022), by `knn_scores`.

  k = 50 is the paper's CIFAR-10 setting and OpenOOD's default (ImageNet: 1 000 with 1 % of the
  training set). k larger than the bank raises a ValueError naming both (`Detector.grid_for(num_train=)`
  drops such grid values before tuning).
  """
  state = base.check_state(state, KNNState, detector='knn')
  h = base.features_arg(features, detector='knn', dim=state.bank.shape[1])
  return _unit_bank_scores(h, state.bank, k=_bank_k('knn', k, state.bank.shape[0]))


# The paper's / OpenOOD's k grid.
registry.register('knn', needs={'features'}, fit=fit_knn, score=knn, defaults={'fraction': 1.0, 'seed': 0, 'k': 50},
                  fit_params=('fraction', 'seed'), grid={'k': (50, 100, 200, 500, 1000)}, paper='Sun et al. 2022',
                  year=2022)


class NNGuideState(NamedTuple):
  """NNGuide's guide bank `[M, D]`: unit training features times their energy confidence."""

  bank: jax.Array
  head: base.Head


def fit_nnguide(batches, *, head, fraction=0.01, seed=0):
  """The guide bank ĥ_i·E(x_i), ĥ the unit feature and E = logsumexp(z) (Park et al. 2023, eq. 4).

  The bank is a Bernoulli(`fraction`) random subset of the training set (α = 1 % as OpenOOD's default
  and the paper's ImageNet setting; OpenOOD takes the first batches instead of a random subset).
  """
  name = 'nnguide'
  head = base.as_head(head, detector=name)
  w = np.asarray(head.kernel, np.float64)
  b = np.asarray(head.bias, np.float64)

  def guide(batch, index, features):
    del batch, index
    z = features @ w + b
    m = z.max(axis=1, keepdims=True)
    conf = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))
    norm = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features / norm * conf

  return NNGuideState(base.to_device(_bernoulli_bank(batches, fraction, seed, name, guide), np.float32), head)


@functools.partial(jax.jit, static_argnames=('k', 'chunk'))
def _topk_mean_inner(queries, bank, *, k, chunk):
  """Mean of the k largest ⟨q, b_i⟩ per query, scanning the bank in chunks (never `[N, M]`)."""
  size = bank.shape[0]
  num_chunks = -(-size // chunk)
  padded = jnp.pad(bank, ((0, num_chunks * chunk - size), (0, 0))).reshape(num_chunks, chunk, -1)

  def step(best, xs):
    start, b = xs
    sims = jnp.dot(queries, b.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(start + jnp.arange(chunk) < size, sims, -jnp.inf)
    return jax.lax.top_k(jnp.concatenate([best, sims], axis=-1), k)[0], None

  init = jnp.full((queries.shape[0], k), -jnp.inf, queries.dtype)
  best, _ = jax.lax.scan(step, init, (jnp.arange(num_chunks) * chunk, padded))
  return jnp.mean(best, axis=-1)


def nnguide(state: NNGuideState, features, *, k=100, logits=None, chunk=2048):
  """NNGuide: E(x)·mean of the k largest ⟨ĥ(x), bank_i⟩ (Park et al. 2023, eq. 5).

  E(x) = logsumexp(z) is the energy confidence; k = 100 is OpenOOD's default (the paper's ImageNet
  setting); k larger than the bank (a `fraction` of the training set) raises a ValueError. The inner
  products against the confidence-scaled bank are computed in chunks of `chunk` bank rows.

  Args:
    state: from `fit_nnguide`.
    features: `[N, D]`.
    k: neighbours, at most the bank size.
    logits: optional `[N, K]` logits (default: the head applied to the features).
    chunk: bank rows per chunk.

  Returns:
    `[N]` scores.
  """
  state = base.check_state(state, NNGuideState, detector='nnguide')
  h = base.features_arg(features, detector='nnguide', dim=state.bank.shape[1])
  k = _bank_k('nnguide', k, state.bank.shape[0])
  logits = None if logits is None else base.logits_arg(logits, detector='nnguide')
  return _nnguide(state, h, logits, k=k, chunk=min(_checks.positive_int('chunk', chunk), state.bank.shape[0]))


@functools.partial(jax.jit, static_argnames=('k', 'chunk'))
def _nnguide(state, h, logits, *, k, chunk):
  h = base.compute(h)
  z = base.head_logits(h, state.head) if logits is None else base.compute(logits)
  guidance = _topk_mean_inner(layers.l2_normalize(h), state.bank.astype(h.dtype), k=k, chunk=chunk)
  return jax.nn.logsumexp(z, axis=-1) * guidance


registry.register('nnguide', needs={'features', 'head'}, fit=fit_nnguide, score=nnguide,
                  defaults={'fraction': 0.01, 'seed': 0, 'k': 100}, fit_params=('fraction', 'seed'),
                  grid={'k': (10, 50, 100)}, paper='Park et al. 2023', year=2023)


# ------------------------------------------------------------------------------------------------
# Relation (neural relation graph).
# ------------------------------------------------------------------------------------------------


class RelationState(NamedTuple):
  """Relation's training bank: unit features `[M, D]` and softmax probabilities `[M, K]`, float32."""

  features: jax.Array
  probs: jax.Array


def _relation_unit(x, xp):
  """x / sqrt(‖x‖² + 1e-10), the authors' (and OpenOOD's) normalisation: a zero row stays zero."""
  return x / xp.sqrt(xp.sum(xp.square(x), axis=-1, keepdims=True) + 1e-10)


def fit_relation(batches, *, head=None, fraction=1.0, seed=0):
  """Relation's bank: unit training features and their softmax probabilities, all rows or a
  Bernoulli(`fraction`) random subset as KNN's bank (OpenOOD keeps the whole training set, `fraction=1`).

  Batches need 'features' and 'logits' (or `head` to compute the logits from the features).
  """
  name = 'relation'
  head = None if head is None else base.as_head(head, detector=name)
  dim = []

  def rows(batch, index, features):
    z = base.host_logits(batch, index, head, detector=name)
    if z.shape[0] != features.shape[0]:
      raise ValueError(f'logits (batch {index}) have {z.shape[0]} rows for {features.shape[0]} features.')
    base.check_dim('logits', z, dim[0] if dim else None, index)
    dim[:] = [z.shape[1]]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return np.concatenate([_relation_unit(features, np), p / p.sum(axis=1, keepdims=True)], axis=1)

  bank = _bernoulli_bank(batches, fraction, seed, name, rows)
  split = bank.shape[1] - dim[0]
  return RelationState(base.to_device(bank[:, :split], np.float32), base.to_device(bank[:, split:], np.float32))


def relation(state: RelationState, features, *, logits, power=1.0, threshold=0.03, query_chunk_size=256,
             bank_chunk_size=8192):
  """Σ_j r_j^power over bank rows j with r_j > threshold, r_j = max(cos(h, h_j), 0)·⟨p, p_j⟩ (Kim et al. 2023).

  The relation kernel of the neural relation graph between the test example and each training example:
  the (clipped) cosine similarity of their features times the agreement ⟨p, p_j⟩ of their softmax
  probabilities; edges at or below `threshold` are cut and the rest summed after raising to `power`.
  Follows the authors' code as OpenOOD runs it (the power applies to the whole kernel, threshold 0.03,
  power 1 tuned over {1, 2, 4, 6, 8}). `power` and `threshold` are traced: the grid compiles once.
  Queries are processed `query_chunk_size` at a time against the bank in chunks of `bank_chunk_size`
  rows, so the query × bank matrix is never formed.

  Args:
    state: from `fit_relation`.
    features: `[N, D]`.
    logits: `[N, K]` (their softmax is p).
    power: exponent > 0.
    threshold: edges r ≤ threshold are dropped (≥ 0).
    query_chunk_size: queries per chunk.
    bank_chunk_size: bank rows per chunk.

  Returns:
    `[N]` scores ≥ 0.
  """
  state = base.check_state(state, RelationState, detector='relation')
  h = base.features_arg(features, detector='relation', dim=state.features.shape[1])
  z = base.logits_arg(logits, detector='relation', num_classes=state.probs.shape[1])
  if z.shape[0] != h.shape[0]:
    raise ValueError(f'logits have {z.shape[0]} rows but features have {h.shape[0]}.')
  _checks.positive('power', power)
  _checks.nonnegative('threshold', threshold)
  query_chunk = min(_checks.positive_int('query_chunk_size', query_chunk_size), max(h.shape[0], 1))
  bank_chunk = min(_checks.positive_int('bank_chunk_size', bank_chunk_size), state.features.shape[0])
  if h.shape[0] == 0:
    return base.to_device(np.zeros((0,)), _checks.compute_dtype(h))
  return _relation(state, h, z, base.as_float(power), base.as_float(threshold), query_chunk=query_chunk,
                   bank_chunk=bank_chunk)


@functools.partial(jax.jit, static_argnames=('query_chunk', 'bank_chunk'))
def _relation(state, h, logits, power, threshold, *, query_chunk, bank_chunk):
  h = base.compute(h)
  dtype = h.dtype
  q = _relation_unit(h, jnp)
  p = jax.nn.softmax(base.compute(logits).astype(dtype), axis=-1)
  size = state.features.shape[0]
  num_b = -(-size // bank_chunk)
  # Zero padding rows have r = 0, which no threshold ≥ 0 keeps.
  bank_f = jnp.pad(state.features.astype(dtype), ((0, num_b * bank_chunk - size), (0, 0)))
  bank_p = jnp.pad(state.probs.astype(dtype), ((0, num_b * bank_chunk - size), (0, 0)))
  chunks = (bank_f.reshape(num_b, bank_chunk, -1), bank_p.reshape(num_b, bank_chunk, -1))
  power = jnp.asarray(power, dtype)
  threshold = jnp.asarray(threshold, dtype)
  n = h.shape[0]
  num_q = -(-n // query_chunk)
  pad = num_q * query_chunk - n
  qs = jnp.pad(q, ((0, pad), (0, 0))).reshape(num_q, query_chunk, -1)
  ps = jnp.pad(p, ((0, pad), (0, 0))).reshape(num_q, query_chunk, -1)

  def query_step(args):
    qc, pc = args

    def bank_step(total, xs):
      f, pb = xs
      cos = jnp.maximum(jnp.dot(qc, f.T, precision=jax.lax.Precision.HIGHEST), 0.0)
      r = cos * jnp.dot(pc, pb.T, precision=jax.lax.Precision.HIGHEST)
      keep = r > threshold
      return total + jnp.sum(jnp.where(keep, jnp.power(jnp.where(keep, r, 1.0), power), 0.0), axis=-1), None

    total, _ = jax.lax.scan(bank_step, jnp.zeros((query_chunk,), dtype), chunks)
    return total

  return jax.lax.map(query_step, (qs, ps)).reshape(-1)[:n]


# OpenOOD's power grid; the whole training set as bank (OpenOOD's), subsample with `fraction` on large sets.
registry.register('relation', needs={'features', 'logits'}, fit=fit_relation, score=relation,
                  defaults={'fraction': 1.0, 'seed': 0, 'power': 1.0, 'threshold': 0.03},
                  fit_params=('fraction', 'seed'), grid={'power': (1.0, 2.0, 4.0, 6.0, 8.0)},
                  paper='Kim et al. 2023', year=2023)


# ------------------------------------------------------------------------------------------------
# CF-OOD.
# ------------------------------------------------------------------------------------------------


def _cfood_fractions(n: int):
  """The neighbourhood fractions κ of the authors' code and their 0-based neighbour ranks ⌊κn − 1⌋,
  strictly increasing (fractions whose rank repeats an earlier one are dropped)."""
  fractions = np.concatenate([np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81),
                              np.linspace(0.51, 0.99, 49)])
  ranks = (fractions * n - 1).astype(np.int64)  # truncation toward zero, as the authors' int cast
  keep = np.concatenate([[True], ranks[:-1] < ranks[1:]])
  return fractions[keep], ranks[keep]


class CFOODState(NamedTuple):
  """CF-OOD's bank and neighbourhood radii.

  Attributes:
    bank: `[n, D]` unit training features (h / (‖h‖ + 1e-10)).
    radii: `[n, J]` squared distance from each bank point to its (r_j + 1)-th nearest other bank point, for
      the neighbour ranks r_j of the fractions (ascending along J).
    fractions: `[J + 1]` the fractions κ_j, then 1 (the score of a query in no neighbourhood).
  """

  bank: jax.Array
  radii: jax.Array
  fractions: jax.Array


def fit_cfood(batches, *, fraction=0.1, seed=0):
  """The bank, a Bernoulli(`fraction`) random subset of the unit training features (the authors' α = 0.1
  is an exact-size random subset), and each bank point's neighbourhood radii (its sorted squared distances
  to the bank, itself excluded, at the fractions' ranks), computed on the device in row blocks."""
  name = 'cfood'
  bank = _bernoulli_bank(batches, fraction, seed, name,
                         lambda b, i, f: f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-10))
  if bank.shape[0] < 2:
    raise ValueError(f'detector {name!r}: the bank has {bank.shape[0]} row(s); neighbourhoods need at least 2 '
                     f'(a larger fraction, or more training data).')
  fractions, ranks = _cfood_fractions(bank.shape[0])
  bank = base.to_device(bank, np.float32)
  radii = _cfood_radii(bank, base.to_device(ranks + 1, np.int32))
  return CFOODState(bank, radii, base.to_device(np.r_[fractions, 1.0], np.float32))


def _sq_distances(q, bank):
  """`[B, n]` squared distances ‖q‖² + ‖b‖² − 2q·b at full float32 precision, ≥ 0."""
  dot = jnp.dot(q, bank.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(q * q, -1, keepdims=True) + jnp.sum(bank * bank, -1) - 2.0 * dot, 0.0)


@jax.jit
def _cfood_radii(bank, positions):
  n = bank.shape[0]
  chunk = min(n, 256)
  padded = jnp.pad(bank, ((0, -n % chunk), (0, 0)))
  blocks = padded.reshape(-1, chunk, bank.shape[1])
  radii = jax.lax.map(lambda q: jnp.sort(_sq_distances(q, bank), axis=-1)[:, positions], blocks)
  return radii.reshape(-1, positions.shape[0])[:n]


def cfood(state: CFOODState, features, *, k=0.01):
  """CF-OOD: −κ, κ the smallest fraction whose neighbourhoods contain the query for ≥ k of the bank.

  For the unit query v and bank point b_i, v is in b_i's κ_j-neighbourhood when ‖v − b_i‖² ≤ radii_ij;
  count_j = (1/n)·#{i: v in it}, and κ = κ_j for the first j with count_j ≥ k (1 if none), following the
  authors' OpenOOD postprocessor (they sweep k ∈ {0.001, 0.005, 0.01, 0.05}; 0.01 their default). k is
  traced: a grid over it compiles once. Queries are scored in blocks of 256.

  Returns:
    `[N]` scores in [−1, −0.001].
  """
  state = base.check_state(state, CFOODState, detector='cfood')
  h = base.features_arg(features, detector='cfood', dim=state.bank.shape[1])
  if _checks.is_concrete(k) and not 0 < float(k) <= 1:
    raise ValueError(f'k must lie in (0, 1], got {k!r}.')
  return _cfood(state, h, base.as_float(k))


@jax.jit
def _cfood(state, h, k):
  h = base.compute(h)
  v = h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-10)
  n = state.radii.shape[0]
  # count_j ≥ k ⇔ at least m bank points have their first containing neighbourhood at j or before, m the
  # smallest count with m/n ≥ k (compared as the authors' code does, not ⌈k·n⌉ with its rounding).
  m = jnp.clip(jnp.sum(jnp.arange(1, n + 1, dtype=h.dtype) / n < jnp.asarray(k, h.dtype)) + 1, 1, n)
  search = jax.vmap(functools.partial(jnp.searchsorted, side='left'), in_axes=(0, 1), out_axes=1)

  def block(q):
    first = search(state.radii.astype(q.dtype), _sq_distances(q, state.bank.astype(q.dtype)))  # [B, n] in [0, J]
    return jnp.sort(first, axis=-1)[:, m - 1]

  size = h.shape[0]
  chunk = max(min(size, 256), 1)
  blocks = jnp.pad(v, ((0, -size % chunk), (0, 0))).reshape(-1, chunk, v.shape[1])
  index = jax.lax.map(block, blocks).reshape(-1)[:size]
  return -state.fractions.astype(h.dtype)[index]


# The authors' k sweep; α = 10 % of the training set as the bank (their default).
registry.register('cfood', needs={'features'}, fit=fit_cfood, score=cfood, defaults={'fraction': 0.1, 'seed': 0,
                  'k': 0.01}, fit_params=('fraction', 'seed'), grid={'k': (0.001, 0.005, 0.01, 0.05)},
                  paper='Angiulli, Fassetti & Zupi 2025', year=2025)
