"""VOS, NPOS and CIDER: their memories (class feature queues, EMA prototypes), the outliers synthesised from them
and the methods' objectives, each against a float64 NumPy reference written from the papers (Du et al. 2022;
Tao et al. 2023; Ming et al. 2023) and OpenOOD's reference loops; and the three methods' real training steps.

Cheap by design: K = 3 classes, D = 4 features, queues of 3–8 entries, one compilation per check.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ood_jax import layers
from ood_jax import losses
from ood_jax import methods
from ood_jax import models
from ood_jax.trainer import step

K, D = 3, 4


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_kth_distance(queries, bank, k):
  """Brute force: squared distance of each normalised query to its k-th nearest normalised bank row."""
  d = ((_unit(queries)[:, None, :] - _unit(bank)[None, :, :]) ** 2).sum(-1)
  return np.sort(d, axis=1)[:, k - 1]


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def _np_compactness(e, p, y, tau):  # CIDER eq. 5: −log softmax_k(z·μ̂_k / τ)_y
  logits = _unit(e) @ _unit(p).T / tau
  return -_np_log_softmax(logits)[np.arange(len(y)), y]


def _np_dispersion(p, tau):  # CIDER eq. 4: log 1/(K−1) Σ_{j≠i} exp(μ_i·μ_j / τ), per prototype
  p = np.asarray(p, np.float64)
  k = len(p)
  return np.array([np.log(sum(np.exp(p[i] @ p[j] / tau) for j in range(k) if j != i) / (k - 1)) for i in range(k)])


def _np_ema(prototypes, embeddings, labels, m):
  """CIDER eq. 6 / OpenOOD's DisLoss loop, one example after the other, in float64."""
  p = np.array(prototypes, np.float64)
  for z, y in zip(np.asarray(embeddings, np.float64), labels):
    if 0 <= y < len(p):
      row = m * p[y] + (1 - m) * z
      p[y] = row / np.linalg.norm(row)
  return p


# ------------------------------------------------------------------------------------------
# The class queues (VOS / NPOS) and the outliers drawn from them.


def test_enqueue_keeps_the_reference_queues():
  size = 4
  rng = np.random.default_rng(0)
  # OpenOOD's VOS/NPOS trainers: while the queues are not all full (checked before the batch), an example goes to
  # the next free slot of its class and is dropped if its class is full; afterwards each example shifts its class
  # queue by one (drop the oldest, append). -1 (padding) is never stored.
  batches = [np.array([0, 0, 1, -1, 0, 2]), np.array([0, 0, 0, 1, 1, 2]),  # class 0 overflows while filling
             np.array([1, 1, 2, 2, 2, 0]), np.array([2, 0, 1, -1, 1, 1]),  # all full only after this one
             np.array([0, 0, 0, 0, 0, 0]), np.array([2, 1, -1, 1, 2, 2])]  # six of class 0 in a queue of four
  reference = [[] for _ in range(K)]
  queue, count, pointer = jnp.zeros((K, size, D)), jnp.zeros(K, jnp.int32), jnp.zeros(K, jnp.int32)
  push = jax.jit(layers.enqueue)
  phases = []
  for labels in batches:
    features = rng.normal(size=(len(labels), D)).astype(np.float32)
    full = all(len(q) == size for q in reference)
    phases.append(full)
    for x, y in zip(features, labels):
      if y < 0:
        continue
      if full:
        reference[y] = reference[y][1:] + [x]
      elif len(reference[y]) < size:
        reference[y].append(x)
    queue, count, pointer = push(queue, count, pointer, features, labels.astype(np.int32))
    np.testing.assert_array_equal(count, [len(q) for q in reference])
    for k in range(K):  # the ring buffer read from its oldest slot is the reference's shifted tensor
      ordered = np.roll(np.asarray(queue[k]), -int(pointer[k]), axis=0)[:len(reference[k])]
      np.testing.assert_array_equal(ordered, np.reshape(reference[k], (-1, D)))
  assert phases == [False, False, False, True, True, True]  # both phases, and the switch, were exercised
  with pytest.raises(ValueError, match='count and pointer'):
    layers.enqueue(queue, count[:2], pointer, features, labels)
  with pytest.raises(ValueError, match='features must have shape'):
    layers.enqueue(queue, count, pointer, features[:, :2], labels)


def test_virtual_outliers_are_the_least_likely_draws_of_the_class_gaussians():
  size, num_samples, select, ridge = 6, 64, 2, 1e-4
  rng = np.random.default_rng(1)
  queue = (rng.normal(size=(K, 1, D)) * 3 + rng.normal(size=(K, size, D)) * [1.0, 0.5, 2.0, 1.0]).astype(np.float32)
  key = jax.random.key(2)
  fitted, outliers = jax.jit(lambda q, key: (layers.class_gaussians(q, ridge=ridge), layers.virtual_outliers(
      q, key, num_samples=num_samples, select=select, ridge=ridge)))(queue, key)
  # VOS eqs. 2–3: class means and one covariance pooled over all K·S centred entries (plus the ridge).
  q = queue.astype(np.float64)
  means = q.mean(1)
  centred = (q - means[:, None]).reshape(-1, D)
  covariance = centred.T @ centred / (K * size) + ridge * np.eye(D)
  np.testing.assert_allclose(fitted[0], means, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fitted[1], covariance, rtol=1e-5, atol=1e-6)
  # The same draws, μ_k + L·ε (the draws are the only thing shared with the implementation), re-ranked by their
  # float64 Gaussian log-density: the `select` least likely of each class are the outliers, least likely first.
  assert outliers.shape == (K * select, D)
  cholesky = np.linalg.cholesky(covariance)
  precision = np.linalg.inv(covariance)
  for k, class_key in enumerate(jax.random.split(key, K)):
    eps = np.asarray(jax.random.normal(class_key, (num_samples, D)), np.float64)
    draws = means[k] + eps @ cholesky.T
    log_density = -0.5 * np.einsum('nd,de,ne->n', draws - means[k], precision, draws - means[k])
    order = np.argsort(log_density)
    assert log_density[order[select]] - log_density[order[select - 1]] > 1e-3  # a clear cut
    np.testing.assert_allclose(outliers[k * select:(k + 1) * select], draws[order[:select]], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='select'):
    layers.virtual_outliers(queue, key, num_samples=4, select=5)


def test_npos_boundary_and_knn_distances_follow_the_reference_search():
  size, k, boundary, candidates, noise, keep = 8, 3, 2, 16, 0.5, 5
  rng = np.random.default_rng(3)
  queue = rng.normal(size=(K, size, D)).astype(np.float32)
  queries = rng.normal(size=(5, D)).astype(np.float32)
  key = jax.random.key(4)
  distance, outliers = jax.jit(lambda q, x, key: (
      layers.kth_neighbour_distance(x, q[0], k=k),
      layers.npos_outliers(q, key, k=k, boundary=boundary, pick=boundary, num_candidates=candidates, noise=noise,
                           keep=keep)))(queue, queries, key)
  np.testing.assert_allclose(distance, _np_kth_distance(queries, queue[0], k), rtol=1e-5, atol=1e-6)
  # Tao et al. 2023, Sec. 3.2 (OpenOOD's generate_outliers): boundary = the points with the largest k-NN distance
  # within their class queue (a point is its own first neighbour); each perturbed by the same noise·ε per
  # candidate slot; kept: the candidates farthest (k-NN) from the queue, farthest first. With pick = boundary every
  # boundary point is perturbed, so the result depends on the draws only through ε, which is recovered below
  # from the documented shared-ε draw (jax.random.split(key)[0]).
  eps = np.asarray(jax.random.normal(jax.random.split(key)[0], (candidates, D)), np.float64)
  groups = np.asarray(outliers, np.float64).reshape(K, boundary, keep, D)
  for c in range(K):
    points = queue[c].astype(np.float64)
    spread = _np_kth_distance(points, points, k)
    edge = np.argsort(-spread)
    assert spread[edge[boundary - 1]] - spread[edge[boundary]] > 1e-3  # a clear boundary
    expected = []
    for b in edge[:boundary]:
      cand = points[b] + noise * eps
      far = _np_kth_distance(cand, points, k)
      order = np.argsort(-far)
      assert far[order[keep - 1]] - far[order[keep]] > 1e-4
      expected.append(cand[order[:keep]])
    # The picked points come in a random order: match each group to its boundary point.
    got = sorted(groups[c].tolist(), key=lambda g: g[0])
    expected = sorted(np.asarray(expected).tolist(), key=lambda g: g[0])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='k'):
    layers.kth_neighbour_distance(queries, queue[0], k=size + 1)
  with pytest.raises(ValueError, match='pick'):
    layers.npos_outliers(queue, key, k=1, boundary=2, pick=3, num_candidates=4, keep=2)


def test_ema_prototypes_follow_the_sequential_update_and_carry_its_gradient():
  rng = np.random.default_rng(5)
  momentum, tau = 0.9, 0.5
  start = _unit(rng.normal(size=(K, D)))
  start[2] = 0.0  # a class not seen yet: its first embedding becomes its prototype
  z = _unit(rng.normal(size=(6, D)))
  y = np.array([2, 0, -1, 2, 1, 0], np.int32)  # -1 leaves the prototypes alone

  def objective(p, z):
    moved = layers.ema_prototypes(p, z, y, momentum=momentum)
    return moved, jnp.mean(losses.prototype_dispersion(moved, temperature=tau))

  moved, grad = jax.jit(lambda p, z: (objective(p, z)[0], jax.grad(lambda z: objective(p, z)[1])(z)))(
      start.astype(np.float32), z.astype(np.float32))
  np.testing.assert_allclose(moved, _np_ema(start, z, y, momentum), rtol=1e-5, atol=1e-6)
  # The dispersion of this step's prototypes reaches the embeddings through the update (the reference's in-graph
  # loop): central differences of the float64 reference.
  reference = lambda z: _np_dispersion(_np_ema(start, z, y, momentum), tau).mean()
  h, numeric = 1e-6, np.zeros_like(z)
  for index in np.ndindex(*z.shape):
    step_ = np.zeros_like(z)
    step_[index] = h
    numeric[index] = (reference(z + step_) - reference(z - step_)) / (2 * h)
  assert np.abs(numeric).max() > 1e-2 and np.all(numeric[2] == 0)  # a real gradient; none for the skipped row
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match='momentum'):
    layers.ema_prototypes(start, z, y, momentum=1.0)
  with pytest.raises(ValueError, match='embeddings must have shape'):
    layers.ema_prototypes(start, z[:, :2], y)


# ------------------------------------------------------------------------------------------
# The methods: objectives composed by hand, and real training steps.


def test_vos_npos_and_cider_objectives_compose_the_references_terms():
  rng = np.random.default_rng(6)
  b, m, e = 4, 3, 5
  labels = np.array([0, 2, 1, 2], np.int32)
  tau = 0.1
  # VOS: CE of the batch's class logits + β·mean over B + M rows of the logistic loss of the uncertainty logit s
  # (inliers: −log σ(s), virtual outliers: −log σ(−s); the reference's two-class cross-entropy).
  vos = methods.get_method('vos')
  outputs = (rng.normal(size=(b + m, K + 1)) * 2).astype(np.float32)
  vos_loss = jax.jit(lambda o, batch: vos.loss(o, None, batch, **vos.hparams))
  s = outputs[:, -1].astype(np.float64)
  cross_entropy = -_np_log_softmax(outputs[:b, :K])[np.arange(b), labels].mean()
  uncertainty = np.concatenate([_np_softplus(-s[:b]), _np_softplus(s[b:])]).mean()
  for active in (False, True):
    loss, aux = vos_loss(outputs, {'label': labels, 'synthesis': jnp.asarray(active)})
    np.testing.assert_allclose(loss, cross_entropy + vos.hparams['weight'] * uncertainty * active, rtol=1e-5)
    np.testing.assert_allclose(aux['uncertainty_loss'], uncertainty, rtol=1e-5)
  # CIDER: w·(τ/0.07)·mean L_comp(z, detached updated prototypes) + mean L_dis(prototypes), two views per example
  # (row b·2 + v has example b's label).
  rows = np.repeat(labels, 2)
  z = _unit(rng.normal(size=(2 * b, e))).astype(np.float32)
  protos = _unit(rng.normal(size=(K, e))).astype(np.float32)
  cider = methods.get_method('cider')
  loss, aux = jax.jit(lambda z, batch: cider.loss(z, None, batch, **cider.hparams))(
      z, {'label': labels, 'prototypes': protos})
  compact, disperse = _np_compactness(z, protos, rows, tau).mean(), _np_dispersion(protos, tau).mean()
  np.testing.assert_allclose(loss, cider.hparams['weight'] * tau / 0.07 * compact + disperse, rtol=1e-5)
  np.testing.assert_allclose([aux['compactness'], aux['dispersion']], [compact, disperse], rtol=1e-5)
  # NPOS: the same two terms (w_comp = 1, w_disp = 0.5) + β·mean logistic loss of the MLP logit (inliers: the
  # batch's rows, outliers: the synthesised rows after them), counted only once synthesis is on.
  npos = methods.get_method('npos')
  scores = (rng.normal(size=2 * b + m) * 2).astype(np.float32)
  outputs = np.concatenate([np.concatenate([z, np.zeros((m, e), np.float32)]), scores[:, None]], axis=1)
  features = np.zeros((2 * b, D), np.float32)
  npos_loss = jax.jit(lambda o, batch: npos.loss(o, features, batch, **npos.hparams))
  binary = np.concatenate([_np_softplus(-scores[:2 * b]), _np_softplus(scores[2 * b:])]).mean()
  for active in (False, True):
    loss, aux = npos_loss(outputs, {'label': labels, 'prototypes': protos, 'synthesis': jnp.asarray(active)})
    want = tau / 0.07 * compact + 0.5 * disperse + npos.hparams['weight'] * binary * active
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux['outlier_loss'], binary, rtol=1e-5)


# Queues that fill in two steps (the batch has 2 rows of each class for VOS, 2 × 2 views for NPOS).
_SMALL = {'vos': {'queue_size': 3, 'num_samples': 16},
          'npos': {'queue_size': 6, 'neighbours': 2, 'boundary': 2, 'pick': 1, 'num_candidates': 4, 'keep': 2},
          'cider': {}}


@pytest.mark.parametrize('name', ['vos', 'npos', 'cider'])
def test_memory_methods_fill_their_state_in_the_training_step_and_repeat_bitwise(name):
  method = methods.get_method(name)
  hparams = {**method.hparams, **_SMALL[name]}
  model = models.make_classifier('mlp', method.head, K, hidden=(D,),
                                 head_kwargs={k: hparams[k] for k in method.head_hparams})
  views = 2 if method.augment == 'two_views' else 1
  rng = np.random.default_rng(7)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)  # every class twice a batch
  images = rng.normal(size=(6, views, 2, 2, 1)).astype(np.float32)
  batch = {'image': images if views == 2 else images[:, 0], 'label': labels}
  optimizer = optax.sgd(0.1)
  # Jitted: the eager init of these heads dispatches op by op, and costs more than its compilation.
  initial = jax.jit(functools.partial(step.create_state, model, optimizer, (2, 2, 1)))(jax.random.key(0))
  train_step = jax.jit(functools.partial(step.train_step, model=model, method=method, optimizer=optimizer,
                                         schedule=lambda s: 0.1, hparams=hparams, key=jax.random.key(1)))
  apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))

  def run(state):
    states, logged = [], []
    for _ in range(3):
      state, metrics = train_step(state, batch)
      states.append(state)
      logged.append(jax.tree.map(np.asarray, metrics))
    return states, logged

  (first, _, final), logged = run(initial)
  again, logged_again = run(initial)
  again = again[-1]
  # The same seed and batches: the same state bit for bit (what checkpoint resume relies on).
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, final), jax.tree.map(np.asarray, again))
  jax.tree.map(np.testing.assert_array_equal, logged, logged_again)
  assert int(final.bad_step) == -1 and all(np.isfinite(row['loss']) for row in logged)
  rows = batch['image'].reshape((-1, 2, 2, 1))  # row b·V + v: example b, view v
  row_labels = np.repeat(labels, views)
  embeddings, features = apply(step.model_variables(initial.params, initial.batch_stats), rows)
  head = first.batch_stats['head']
  if 'queue' in head:
    # After one step each queue holds the rows of its class, with the step's (initial) features, the rest empty.
    filled = 2 * views
    assert [int(x) for x in head['count']] == [filled] * K and int(head['steps']) == 1
    for k in range(K):
      np.testing.assert_allclose(head['queue'][k, :filled], np.asarray(features)[row_labels == k], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_array_equal(head['queue'][k, filled:], 0.0)
    # The outlier loss counts from the first step that starts with full queues: the third.
    assert [float(row['synthesis']) for row in logged] == [0.0, 0.0, 1.0]
    size = hparams['queue_size']
    assert [int(x) for x in final.batch_stats['head']['count']] == [size] * K
    assert int(final.batch_stats['head']['steps']) == 3
  if 'prototypes' in head:  # CIDER's and NPOS's prototypes, moved by the rows of the step in order
    np.testing.assert_allclose(head['prototypes'], _np_ema(np.zeros((K, 128)), embeddings, row_labels,
                                                           hparams['momentum']), rtol=1e-4, atol=1e-5)
  # Inference: class logits (VOS) or unit embeddings (NPOS, CIDER), no outliers and no state change.
  out, _ = apply(step.model_variables(final.params, final.batch_stats), rows)  # the shape compiled above
  if name == 'vos':
    assert out.shape == (len(rows), K)
  else:
    assert out.shape == (len(rows), 128)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
