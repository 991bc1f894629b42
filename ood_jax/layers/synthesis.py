"""Memories of past batches and the outliers synthesised from them: the state of VOS, NPOS and CIDER.

Three training methods keep a memory of the training features as the head's state in the 'batch_stats'
collection (so it is checkpointed, resumed bit for bit and guarded against non-finite steps with the batch
statistics, and updated inside the jitted step by the method's `update_state`):

* a per-class FIFO queue of the last S penultimate features (`enqueue`), from which

  - VOS (Du, Wang, Cai & Li 2022, "VOS: Learning What You Don't Know by Virtual Outlier Synthesis", Sec. 3.1)
    fits class-conditional Gaussians with one shared covariance and keeps the least likely of many samples
    (`virtual_outliers`, `class_gaussians`);
  - NPOS (Tao, Du, Zhu & Li 2023, "Non-Parametric Outlier Synthesis", Sec. 3.2) perturbs the boundary points of
    each class (largest k-NN distance in the queue) with Gaussian noise and keeps the candidates farthest from
    the queue (`npos_outliers`, `kth_neighbour_distance`);

* class prototypes on the unit sphere, moved towards each embedding of their class by an exponential moving
  average (`ema_prototypes`; CIDER, Ming, Sun, Dia & Li 2023, eq. 6, and NPOS).

The heads `layers.VirtualOutlierHead` and `layers.NPOSHead` synthesise from their queue in the training
forward pass, with the 'dropout' key the trainer derives from fold_in(seed key, step), so a step's outliers
are a pure function of (seed, step). Everything here is pure and jit-able, with static sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ood_jax import _checks
from ood_jax.layers.functional import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST


def _queue_args(queue, count, pointer):
  queue = _checks.floating('queue', queue, ndim=3)
  count = _checks.integer('count', count, ndim=1)
  pointer = _checks.integer('pointer', pointer, ndim=1)
  if count.shape != queue.shape[:1] or pointer.shape != queue.shape[:1]:
    raise ValueError(f'count and pointer must have shape [K] = ({queue.shape[0]},) of the queue [K, S, D] '
                     f'{tuple(queue.shape)}, got {tuple(count.shape)} and {tuple(pointer.shape)}.')
  return queue, count, pointer


def enqueue(queue, count, pointer, features, labels):
  """Per-class queues after adding `features` in order, each to the queue of its label.

  The semantics of the VOS and NPOS reference code: while some class has fewer than S entries, an example fills
  the next free slot of its class (those that find their class full are not stored); once every class is full
  (checked before the batch), each example replaces the oldest entry of its class. Stored as a ring buffer per
  class, which holds the same set of vectors as the reference's shifted tensor (and the statistics drawn from a
  queue do not depend on its order).

  Args:
    queue: `[K, S, D]` entries.
    count: `[K]` int32, entries filled per class (≤ S).
    pointer: `[K]` int32, the slot of the oldest entry of each queue once all are full.
    features: `[N, D]` features to add.
    labels: `[N]` integer classes; a label outside [0, K) (−1 for padding or outliers) is skipped.

  Returns:
    `(queue, count, pointer)` after the batch.
  """
  queue, count, pointer = _queue_args(queue, count, pointer)
  num_classes, size, dim = queue.shape
  features = _checks.floating('features', features, ndim=2)
  labels = _checks.integer('labels', labels, ndim=1)
  if features.shape != (labels.shape[0], dim):
    raise ValueError(f'features must have shape [N, D] = ({labels.shape[0]}, {dim}) (labels [N], queue D), '
                     f'got {tuple(features.shape)}.')
  valid = (labels >= 0) & (labels < num_classes)
  y = jnp.where(valid, labels, 0)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.int32) * valid[:, None].astype(jnp.int32)
  per_class = jnp.sum(onehot, axis=0)
  rank = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)  # earlier examples of the same class
  full = jnp.all(count >= size)
  # Full: the last S examples of a class in the batch overwrite its oldest entries, in order.
  slot_full, write_full = (pointer[y] + rank) % size, rank >= per_class[y] - size
  # Filling: the next free slots, while there are any.
  slot_fill = count[y] + rank
  write = valid & jnp.where(full, write_full, slot_fill < size)
  slot = jnp.where(write, jnp.where(full, slot_full, slot_fill), size)  # slot S is out of range: dropped
  queue = queue.at[y, slot].set(features.astype(queue.dtype), mode='drop')
  count = jnp.where(full, count, jnp.minimum(count + per_class, size)).astype(count.dtype)
  pointer = jnp.where(full, (pointer + per_class) % size, pointer).astype(pointer.dtype)
  return queue, count, pointer


def class_gaussians(queue, *, ridge=1e-4):
  """Class means `[K, D]` and the shared covariance `[D, D]` of the queue (VOS, eqs. 2–3).

  Σ = (1/(K·S)) Σ_k Σ_i (x_ki − μ_k)(x_ki − μ_k)ᵀ + ridge·I, the reference's estimate (its ridge 1e-4 keeps Σ
  positive definite when S·K < D or features are collinear).
  """
  queue = _checks.floating('queue', queue, ndim=3)
  _checks.positive('ridge', ridge)
  num_classes, size, dim = queue.shape
  queue = queue.astype(_checks.compute_dtype(queue))
  means = jnp.mean(queue, axis=1)
  centred = (queue - means[:, None, :]).reshape(num_classes * size, dim)
  covariance = jnp.matmul(centred.T, centred, precision=_HIGHEST) / (num_classes * size)
  return means, covariance + ridge * jnp.eye(dim, dtype=queue.dtype)


def virtual_outliers(queue, key, *, num_samples=10000, select=1, ridge=1e-4):
  """VOS's virtual outliers: per class, the `select` least likely of `num_samples` draws from N(μ_k, Σ).

  Draws are μ_k + Lε with ε ~ N(0, I) and Σ = LLᵀ; their log-density is −½‖ε‖² + const with a constant shared
  by all draws of a class (one Σ), so the least likely draws are exactly those with the largest ‖ε‖ — the
  reference's top-k of −log p, without forming the density. Classes are drawn one after another
  (`lax.map`), so memory holds `num_samples × D` normals at a time.

  Args:
    queue: `[K, S, D]` features per class (`enqueue`).
    key: a PRNG key.
    num_samples: draws per class (10 000 in VOS and OpenOOD).
    select: outliers kept per class (1 in VOS and OpenOOD).
    ridge: added to the covariance's diagonal (1e-4 in the reference).

  Returns:
    `[K·select, D]` outliers, class by class.
  """
  queue = _checks.floating('queue', queue, ndim=3)
  num_samples = _checks.positive_int('num_samples', num_samples)
  select = _checks.positive_int('select', select)
  if select > num_samples:
    raise ValueError(f'select ({select}) must be <= num_samples ({num_samples}).')
  num_classes, _, dim = queue.shape
  means, covariance = class_gaussians(queue, ridge=ridge)
  cholesky = jnp.linalg.cholesky(covariance)

  def one_class(args):
    mean, class_key = args
    eps = jax.random.normal(class_key, (num_samples, dim), means.dtype)
    _, far = jax.lax.top_k(jnp.sum(jnp.square(eps), axis=-1), select)
    return mean + jnp.matmul(eps[far], cholesky.T, precision=_HIGHEST)

  outliers = jax.lax.map(one_class, (means, jax.random.split(key, num_classes)))
  return outliers.reshape(num_classes * select, dim)


def kth_neighbour_distance(queries, bank, *, k):
  """Squared Euclidean distance from each of `queries` `[Q, D]` to its k-th nearest row of `bank` `[S, D]`.

  Both sides are L2-normalised first, as NPOS's (and OpenOOD's faiss) search; a query that is itself in the
  bank counts itself as its first neighbour, as there. ‖u − v‖² = 2 − 2·u·v on the sphere.
  """
  queries = _checks.floating('queries', queries, ndim=2)
  bank = _checks.floating('bank', bank, ndim=2)
  k = _checks.positive_int('k', k)
  if k > bank.shape[0]:
    raise ValueError(f'k ({k}) must be <= the number of bank rows ({bank.shape[0]}).')
  similarity = jnp.matmul(l2_normalize(queries), l2_normalize(bank).T, precision=_HIGHEST)
  nearest, _ = jax.lax.top_k(similarity, k)  # the k largest similarities = the k smallest distances
  return jnp.maximum(2.0 - 2.0 * nearest[:, -1], 0.0)


def npos_outliers(queue, key, *, k=300, boundary=200, pick=2, num_candidates=600, noise=0.1, keep=200):
  """NPOS's outliers (Tao et al. 2023, Sec. 3.2; OpenOOD's `generate_outliers`), class by class.

  For each class: the `boundary` queue points with the largest k-NN distance to the class's queue are its
  boundary; `pick` of them, drawn at random, each get `num_candidates` candidates x + noise·ε, ε ~ N(0, I)
  (one ε per candidate slot, shared by all classes and points as in the reference); of each point's
  candidates the `keep` with the largest k-NN distance to the queue are the outliers. Distances are taken on
  normalised vectors, the outliers returned unnormalised (they live in the penultimate space).

  Args:
    queue: `[K, S, D]` features per class (`enqueue`).
    key: a PRNG key.
    k: the neighbour whose distance counts (300 in OpenOOD's NPOS recipe); ≤ S.
    boundary: boundary points per class (OpenOOD's `select`, 200); ≤ S.
    pick: boundary points perturbed per step (OpenOOD's `pick_nums`, 2); ≤ boundary.
    num_candidates: candidates per picked point (OpenOOD's `sample_from`, 600).
    noise: standard deviation of the perturbation (OpenOOD's `cov_mat`, 0.1).
    keep: outliers kept per picked point (OpenOOD's `ID_points_num`, 200); ≤ num_candidates.

  Returns:
    `[K·pick·keep, D]` outliers.
  """
  queue = _checks.floating('queue', queue, ndim=3)
  num_classes, size, dim = queue.shape
  for name, value, bound, bound_name in (('k', k, size, 'the queue size S'),
                                         ('boundary', boundary, size, 'the queue size S'),
                                         ('pick', pick, boundary, 'boundary'),
                                         ('keep', keep, num_candidates, 'num_candidates')):
    _checks.positive_int(name, value)
    if value > bound:
      raise ValueError(f'{name} ({value}) must be <= {bound_name} ({bound}).')
  _checks.positive_int('num_candidates', num_candidates)
  _checks.positive('noise', noise)
  noise_key, pick_key = jax.random.split(key)
  eps = jax.random.normal(noise_key, (num_candidates, dim), queue.dtype)

  def one_class(args):
    points, class_key = args
    _, edge = jax.lax.top_k(kth_neighbour_distance(points, points, k=k), boundary)
    chosen = edge[jax.random.choice(class_key, boundary, (pick,), replace=False)]
    candidates = points[chosen][:, None, :] + noise * eps[None]  # [pick, C, D]
    distance = kth_neighbour_distance(candidates.reshape(pick * num_candidates, dim), points, k=k)
    _, far = jax.lax.top_k(distance.reshape(pick, num_candidates), keep)
    return jnp.take_along_axis(candidates, far[..., None], axis=1)

  outliers = jax.lax.map(one_class, (queue, jax.random.split(pick_key, num_classes)))
  return outliers.reshape(num_classes * pick * keep, dim)


def ema_prototypes(prototypes, embeddings, labels, *, momentum=0.95):
  """Prototypes after p_y ← normalise(m·p_y + (1 − m)·z) for each embedding z of class y, in order.

  CIDER's prototype update (Ming et al. 2023, eq. 6; OpenOOD's `DisLoss` loop, example after example). The
  result is differentiable in the embeddings (the dispersion loss of the step sees this step's update, as
  the reference's in-graph loop); a zero prototype (a class not seen yet) becomes the first normalised
  embedding of its class. Labels outside [0, K) leave the prototypes unchanged.

  Args:
    prototypes: `[K, E]`.
    embeddings: `[N, E]` unit embeddings.
    labels: `[N]` integer classes.
    momentum: m ∈ [0, 1) (0.95 in CIDER's and OpenOOD's recipes).

  Returns:
    `[K, E]` prototypes.
  """
  prototypes = _checks.floating('prototypes', prototypes, ndim=2)
  embeddings = _checks.floating('embeddings', embeddings, ndim=2)
  labels = _checks.integer('labels', labels, ndim=1)
  _checks.nonnegative('momentum', momentum)
  if _checks.is_concrete(momentum) and not float(momentum) < 1:
    raise ValueError(f'momentum must be < 1, got {momentum}.')
  if embeddings.shape != (labels.shape[0], prototypes.shape[1]):
    raise ValueError(f'embeddings must have shape [N, E] = ({labels.shape[0]}, {prototypes.shape[1]}) '
                     f'(labels [N], prototypes [K, E]), got {tuple(embeddings.shape)}.')
  num_classes = prototypes.shape[0]
  dtype = _checks.compute_dtype(prototypes, embeddings)

  def step(p, example):
    z, y = example
    valid = (y >= 0) & (y < num_classes)
    y = jnp.where(valid, y, 0)
    row = l2_normalize(momentum * p[y] + (1 - momentum) * z)
    return p.at[y].set(jnp.where(valid, row, p[y])), None

  return jax.lax.scan(step, prototypes.astype(dtype), (embeddings.astype(dtype), labels))[0]


def weighted_logsumexp(logits, weights):
  """log Σ_k max(w_k, 0)·exp(z_k): VOS's negative weighted energy (Du et al. 2022, eq. 6), a training quantity.

  Differentiable in both z and w (the weights are learned; a weight ≤ 0 gets no gradient through the ReLU, as
  in the reference). The sum is floored at the smallest normal float, so all weights ≤ 0 give a large negative
  finite value rather than −inf. The post-hoc score with fixed weights is the detector 'weighted_energy'.

  Args:
    logits: `[..., K]`.
    weights: `[K]`.
  """
  z = _checks.floating('logits', logits, min_ndim=1)
  w = _checks.floating('weights', weights, ndim=1)
  if w.shape[0] != z.shape[-1]:
    raise ValueError(f'weights must have shape [K] = ({z.shape[-1]},), got {tuple(w.shape)}.')
  dtype = _checks.compute_dtype(z, w)
  z, w = z.astype(dtype), w.astype(dtype)
  top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  total = jnp.sum(jax.nn.relu(w) * jnp.exp(z - top), axis=-1)
  return top[..., 0] + jnp.log(jnp.maximum(total, jnp.finfo(dtype).tiny))
