r"""Fit and score time and peak memory of the post-hoc detectors, against NumPy / scikit-learn baselines.

  python -m experiments.benchmark_detectors --scale=cifar10 [--detectors=mahalanobis,knn,vim] [--smoke]
  python -m experiments.benchmark_detectors --scale=imagenet --detectors=mahalanobis,rmds,vim --test=2000

Scales: cifar10 / cifar100 (50 000 × 512 training features, 10 000 test, 10 / 100 classes) and imagenet
(100 000 × 2 048, 1 000 classes). Features are synthetic non-negative class clusters streamed in
batches of `--batch` rows (a pool of 8 distinct batches is cycled, so generating data costs nothing);
logits come from a random head. Each detector is fitted through the registry (`det.fit`, streamed) and
scored under `jax.jit` (compiled first; the time is the best of `--rounds` runs). Peak memory is the
resident-set growth over the phase, sampled every 5 ms (NumPy and XLA buffers alike). Baselines compute
the same formula the way the peers do, every training feature concatenated in memory: NumPy / SciPy /
scikit-learn (faiss for KNN when installed). The machine is shared, so timings are noisy.
"""

from __future__ import annotations

import threading
import time

from absl import app
from absl import flags
import jax
import numpy as np
from scipy import linalg
from scipy import special
from scipy.spatial import distance as sp_distance

from ood_jax import detectors

_SCALES = {'cifar10': (50_000, 512, 10), 'cifar100': (50_000, 512, 100), 'imagenet': (100_000, 2048, 1000)}
FLAGS = flags.FLAGS


def _rss():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * 4096


def measure(fn):
  """(result, seconds, peak resident-set growth in bytes) of fn()."""
  base, peak, done = _rss(), [0], threading.Event()

  def watch():
    while not done.is_set():
      peak[0] = max(peak[0], _rss() - base)
      time.sleep(0.005)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  seconds = time.perf_counter() - start
  done.set()
  thread.join()
  return out, seconds, max(peak[0], _rss() - base)


def make_data(n, d, k, n_test, batch, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((k, d)).astype(np.float32)
  w = (rng.standard_normal((d, k)) / np.sqrt(d)).astype(np.float32)
  b = (0.1 * rng.standard_normal(k)).astype(np.float32)

  def draw(m):
    y = rng.integers(0, k, m)
    h = np.maximum(centres[y] + rng.standard_normal((m, d), np.float32), 0.0)
    return {'features': h, 'logits': h @ w + b, 'labels': y}

  pool = [draw(min(batch, n)) for _ in range(8)]
  sizes = [min(batch, n - i) for i in range(0, n, batch)]
  batches = lambda: ({key: v[:s] for key, v in pool[i % 8].items()} for i, s in enumerate(sizes))
  return batches, draw(n_test), (w, b)


def _concat(batches, key):
  return np.concatenate([x[key] for x in batches()]).astype(np.float64)


def _chol_min_sq(x, means, cov):
  lower = np.linalg.cholesky(cov)
  white = linalg.solve_triangular(lower, x.T, lower=True).T
  white_m = linalg.solve_triangular(lower, means.T, lower=True).T
  return sp_distance.cdist(white, white_m, 'sqeuclidean')


def _baseline_mahalanobis(batches, test, k, background=False):
  h, y = _concat(batches, 'features'), np.concatenate([x['labels'] for x in batches()])
  means = np.stack([h[y == c].mean(0) for c in range(k)])
  centred = h - means[y]
  cov = centred.T @ centred / len(h) + 1e-6 * np.eye(h.shape[1])
  out = -_chol_min_sq(test['features'], means, cov).min(1)
  if background:
    mu = h.mean(0)
    cov0 = np.cov(h.T, bias=True) + 1e-6 * np.eye(h.shape[1])
    out = out + _chol_min_sq(test['features'], mu[None], cov0)[:, 0]
  return out


def _baseline_knn(batches, test, k=50):
  bank = _concat(batches, 'features').astype(np.float32)
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  q = test['features'] / np.linalg.norm(test['features'], axis=1, keepdims=True)
  try:
    import faiss  # pylint: disable=g-import-not-at-top
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    return -np.sqrt(index.search(q.astype(np.float32), k)[0][:, -1])
  except ImportError:
    from sklearn.neighbors import NearestNeighbors  # pylint: disable=g-import-not-at-top
    return -NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(q)[0][:, -1]


def _baseline_vim(batches, test, head, dim):
  w, b = (x.astype(np.float64) for x in head)
  h = _concat(batches, 'features')
  u = -np.linalg.pinv(w.T) @ b
  vals, vecs = np.linalg.eigh((h - u).T @ (h - u) / len(h))
  null = vecs[:, np.argsort(-vals)[dim:]]
  alpha = (h @ w + b).max(1).mean() / np.linalg.norm((h - u) @ null, axis=1).mean()
  t = test['features'].astype(np.float64)
  return special.logsumexp(t @ w + b, axis=1) - alpha * np.linalg.norm((t - u) @ null, axis=1)


def _baseline_react(batches, test, head):
  c = np.percentile(_concat(batches, 'features'), 90)
  return special.logsumexp(np.minimum(test['features'], c) @ head[0] + head[1], axis=1)


def baselines(batches, test, head, k, d):
  return {
      'msp': lambda: special.softmax(test['logits'].astype(np.float64), axis=1).max(1),
      'energy': lambda: special.logsumexp(test['logits'].astype(np.float64), axis=1),
      'react': lambda: _baseline_react(batches, test, head),
      'mahalanobis': lambda: _baseline_mahalanobis(batches, test, k),
      'rmds': lambda: _baseline_mahalanobis(batches, test, k, background=True),
      'knn': lambda: _baseline_knn(batches, test),
      'vim': lambda: _baseline_vim(batches, test, head, detectors.subspace.vim_default_dim(d)),
  }


def main(argv):
  del argv
  n, d, k = (2000, 32, 10) if FLAGS.smoke else _SCALES[FLAGS.scale]
  n_test = 500 if FLAGS.smoke else FLAGS.test
  batches, test, head = make_data(n, d, k, n_test, FLAGS.batch)
  names = FLAGS.detectors or [x.name for x in detectors.resolve('all', available=('logits', 'features', 'head'))]
  base = baselines(batches, test, head, k, d) if FLAGS.baselines else {}
  print(f'{n} × {d} train, {n_test} test, {k} classes; {jax.devices()[0].platform}')
  print('| detector | fit s | fit MiB | score s | score MiB | baseline s | baseline MiB | speed-up | max |Δ| |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name in names:
    det = detectors.get(name)
    state, fit_s, fit_mem = measure(lambda det=det: det.fit(batches, head=head, num_classes=k))
    score = jax.jit(lambda s, z, h, det=det: det.score(s, {'logits': z, 'features': h}))
    jax.block_until_ready(score(state, test['logits'], test['features']))  # Compile.
    runs = [measure(lambda score=score, state=state: score(state, test['logits'], test['features']))
            for _ in range(FLAGS.rounds)]
    out, score_s, score_mem = min(runs, key=lambda r: r[1])
    row = f'| {name} | {fit_s:.2f} | {fit_mem / 2**20:.0f} | {score_s:.3f} | {score_mem / 2**20:.0f} |'
    if name in base:
      ref, ref_s, ref_mem = measure(base[name])
      err = float(np.max(np.abs(np.asarray(out, np.float64) - ref)))
      row += f' {ref_s:.2f} | {ref_mem / 2**20:.0f} | {ref_s / (fit_s + score_s):.1f}× | {err:.2g} |'
    else:
      row += ' – | – | – | – |'
    print(row, flush=True)


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_enum('scale', 'cifar10', list(_SCALES), 'Problem size.')
  flags.DEFINE_list('detectors', [], 'Registry names (default: every detector needing only logits/features/head).')
  flags.DEFINE_integer('test', 10_000, 'Test examples.')
  flags.DEFINE_integer('batch', 1000, 'Rows per training batch.')
  flags.DEFINE_integer('rounds', 2, 'Timed scoring runs (best is reported).')
  flags.DEFINE_bool('baselines', True, 'Also time the NumPy / scikit-learn baselines.')
  flags.DEFINE_bool('smoke', False, 'Tiny sizes (2 000 × 32, 10 classes, 500 test) for a quick check.')
  app.run(main)
