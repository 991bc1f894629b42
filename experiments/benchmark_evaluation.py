r"""XLA compilations and wall time of one `evaluate_detectors` call: every detector, tuning included.

  python -m experiments.benchmark_evaluation --workdir=runs/digits     # a trained digits run's cached features
  python -m experiments.benchmark_evaluation --scales=cifar             # CIFAR size only
  python -m experiments.benchmark_evaluation --smoke                    # tiny sizes, for CI

Scales:
* digits: the features of a trained digits run (`--workdir` with a feature cache, keyed as
  `ood_jax.trainer.evaluate` keys it, and the head from its checkpoint), else synthetic features of the same
  sizes (652 × 128 training rows, K = 6, 359 test, OOD sets of 237, 456, 500 and 500, validation 72 ID and
  119 OOD rows). The output says which.
* cifar: synthetic, 50 000 × 512 training features, 10 000 test, 6 OOD sets of 10 000, K = 10, validation
  1 000 ID and 1 000 OOD rows. After the timed call, a NumPy float64 pass computes the same scores at their
  defaults for msp, energy, mahalanobis, knn, vim and react (fit on every training row, scored on test + OOD)
  and is timed against ood_jax's fit + score of the same detectors (kernels compiled by then).

Every detector that logits, features and the head allow is evaluated ('all'), tuned on the validation sets.
Compilations are counted with `jax.monitoring`'s backend-compile event (one per XLA compilation, whatever
the logging settings). Each scale's call is then repeated in the same process: it should compile nothing.
The machine is shared, so timings are noisy; docs/benchmark_evaluation.md has the numbers and the command.
"""

from __future__ import annotations

import glob
import os
import time
import warnings

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import benchmark_detectors
from ood_jax import detectors
from ood_jax.detectors import adapter
from ood_jax.evaluation import detection
from ood_jax.evaluation import tuning
from ood_jax.trainer import checkpoint
from ood_jax.trainer import experiment
from ood_jax.trainer import feature_cache
from ood_jax.trainer.data import registry as data_registry

FLAGS = flags.FLAGS
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_COMPILES = []
# (train, dim, classes, test, OOD set sizes, validation ID, validation OOD) of each scale, and the smoke sizes.
_SIZES = {'digits': (652, 128, 6, 359, (237, 456, 500, 500), 72, 119),
          'cifar': (50_000, 512, 10, 10_000, (10_000,) * 6, 1_000, 1_000)}
_SMOKE = {'digits': (120, 16, 4, 40, (30, 50), 20, 24), 'cifar': (300, 32, 5, 60, (40,) * 3, 30, 30)}
_BASELINES = ('msp', 'energy', 'mahalanobis', 'knn', 'vim', 'react')


def _count_compiles(event, duration, **kwargs):
  del kwargs
  if event == _COMPILE_EVENT:
    _COMPILES.append(duration)


def synthetic(train, dim, classes, test, ood, validation, validation_ood, seed=0):
  """Non-negative class clusters (ReLU features), logits from a random head; OOD sets shifted and spread."""
  rng = np.random.default_rng(seed)
  centres = 2.0 * rng.standard_normal((classes, dim)).astype(np.float32)
  w = (rng.standard_normal((dim, classes)) / np.sqrt(dim)).astype(np.float32)
  b = (0.1 * rng.standard_normal(classes)).astype(np.float32)

  def draw(n, shift=0.0, spread=1.0):
    y = rng.integers(0, classes, n)
    h = np.maximum(centres[y] + shift + spread * rng.standard_normal((n, dim), np.float32), 0.0)
    return {'features': h, 'logits': h @ w + b, 'labels': y.astype(np.int32)}

  sets = {'train': draw(train), 'test': draw(test), 'validation': draw(validation),
          'ood': {f'ood{i}': draw(n, 0.3 * (i + 1), 1.0 + 0.2 * i) for i, n in enumerate(ood)},
          'validation_ood': {'validation_ood': draw(validation_ood, 0.5, 1.5)}}
  return sets, (w, b)


def cached_run(workdir):
  """The digits run's cached outputs and its head from the checkpoint; or (None, why not).

  Sets are named as `ood_jax.trainer.evaluate` keys them. The cache keeps one model's outputs (its first write
  deletes older fingerprints' folders), so the newest folder is read, and the checkpoint's head must
  reproduce its training logits (it would not if the run was trained further after evaluation).
  """
  folders = sorted(glob.glob(os.path.join(workdir, feature_cache.FOLDER, '*')), key=os.path.getmtime)
  if not folders:
    return None, f'no feature cache in {workdir}'
  config = checkpoint.load_config(workdir)
  info, fraction = data_registry.get_info(config.dataset), config.validation_fraction
  plan = experiment.evaluation_sets(config.eval, config.dataset)
  cache = feature_cache.FeatureCache(workdir, os.path.basename(folders[-1]))
  keys = {'train': f'{info.name}:{info.train_split}-validation@{fraction}', 'test': f'{info.name}:{info.test_split}',
          'validation': f'{info.name}:validation@{fraction}'}
  sets = {name: cache.load(key) for name, key in keys.items()}
  sets['ood'] = {name: cache.load(name) for name in plan.test_sets}
  sets['validation_ood'] = {name: cache.load(name) for name in plan.validation}
  missing = [k for k, v in sets.items() if v is None] + [n for k in ('ood', 'validation_ood') for n, v in
                                                          sets[k].items() if v is None]
  if missing:
    return None, f'the cache of {workdir} misses {missing} (run experiments.evaluate on it first)'
  head = tuple(np.asarray(x) for x in adapter.head_weights(checkpoint.restore(workdir)['params'], 'head'))
  train = sets['train']
  if not np.allclose(train['features'] @ head[0] + head[1], train['logits'], rtol=1e-4, atol=1e-4):
    return None, f"the checkpoint's head does not give the cached logits of {workdir} (trained since?)"
  return (sets, head), f'cached features of {workdir}'


def timed_evaluation(sets, head):
  """(block, XLA compilations, seconds compiling, seconds) of `evaluate_detectors('all', ...)`, tuned on the
  validation sets."""
  del _COMPILES[:]
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # temperature_msp at its bound on memorised training logits
    block = detection.evaluate_detectors(
        'all', train=sets['train'], test=sets['test'], ood=sets['ood'], num_classes=head[1].shape[0], head=head,
        validation=sets['validation'], validation_ood=sets['validation_ood'])
  return block, len(_COMPILES), sum(_COMPILES), time.perf_counter() - start


def _knn64(bank, queries, k=50, chunk=500):
  """−distance to the k-th nearest normalised bank row, float64, queries in chunks (the matrix never whole)."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  bank, queries = unit(bank.astype(np.float64)), unit(queries.astype(np.float64))
  bank_sq = np.sum(bank * bank, axis=1)
  out = []
  for start in range(0, len(queries), chunk):
    q = queries[start:start + chunk]
    sq = np.sum(q * q, axis=1)[:, None] + bank_sq - 2.0 * q @ bank.T
    out.append(-np.sqrt(np.maximum(np.partition(sq, k - 1, axis=1)[:, k - 1], 0.0)))
  return np.concatenate(out)


def baseline_table(sets, head):
  """Rows of (detector, ood_jax s, NumPy float64 s, ratio, max |Δ| / score range) at the defaults."""
  train = sets['train']
  everything = [sets['test'], *sets['ood'].values()]
  scored = {key: np.concatenate([s[key] for s in everything]) for key in ('logits', 'features')}
  batches = [{key: train[key][i:i + 4096] for key in ('logits', 'features', 'labels')}
             for i in range(0, len(train['labels']), 4096)]
  numpy = benchmark_detectors.baselines(lambda: iter(batches), scored, head, head[1].shape[0],
                                        train['features'].shape[1])
  numpy['knn'] = lambda: _knn64(train['features'], scored['features'])  # theirs is faiss / scikit-learn
  rows = []
  for name in _BASELINES:
    det = detectors.get(name)
    start = time.perf_counter()
    state = det.fit(batches, head=head, num_classes=head[1].shape[0])
    ours = tuning.score_rows(det, state, scored)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = np.asarray(numpy[name](), np.float64)
    ref_s = time.perf_counter() - start
    delta = float(np.max(np.abs(ours - ref)) / max(np.ptp(ref), 1e-12))
    rows.append((name, ours_s, ref_s, ref_s / ours_s, delta))
  return rows


def describe(sets) -> str:
  ood = [len(s['labels']) for s in sets['ood'].values()]
  return (f"{len(sets['train']['labels'])} × {sets['train']['features'].shape[1]} train, "
          f"{len(sets['test']['labels'])} test, {len(ood)} OOD sets ({sum(ood)} rows), "
          f"K = {sets['train']['logits'].shape[1]}, validation {len(sets['validation']['labels'])} ID + "
          f"{sum(len(s['labels']) for s in sets['validation_ood'].values())} OOD")


def main(argv):
  del argv
  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  jax.devices()  # backend start-up is not the evaluation's
  print(f'{jax.devices()[0].platform}, {os.cpu_count()} CPUs, jax {jax.__version__}')
  unknown = sorted(set(FLAGS.scales) - set(_SIZES))
  if unknown:
    raise app.UsageError(f'unknown scales {unknown}; valid: {list(_SIZES)}.')
  for scale in FLAGS.scales:
    sizes = (_SMOKE if FLAGS.smoke else _SIZES)[scale]
    data, source = None, 'synthetic'
    if scale == 'digits' and FLAGS.workdir and not FLAGS.smoke:
      data, why = cached_run(FLAGS.workdir)
      source = why if data is not None else f'synthetic, digits sizes ({why})'
    elif scale == 'digits':
      source = 'synthetic, digits sizes'
    sets, head = data or synthetic(*sizes)
    print(f'{scale} ({source}): {describe(sets)}')
    block, compiles, compiling, seconds = timed_evaluation(sets, head)
    done = len(block['ood_mean']) if 'ood_mean' in block else 0
    print(f'  evaluate_detectors: {compiles} XLA compilations ({compiling:.2f} s compiling), {seconds:.2f} s '
          f"({done} detectors, {len(block.get('tuning', {}))} tuned, {len(block.get('errors', {}))} failed)")
    for name, error in block.get('errors', {}).items():
      print(f'    {name} failed: {error}')
    _, compiles, compiling, seconds = timed_evaluation(sets, head)
    print(f'  again, same process: {compiles} XLA compilations ({compiling:.2f} s compiling), {seconds:.2f} s')
    if scale == 'cifar':
      print('  | detector | ood_jax fit + score s | NumPy float64 s | ratio | max |Δ| / score range |')
      print('  |---|---|---|---|---|')
      for name, ours_s, ref_s, ratio, delta in baseline_table(sets, head):
        print(f'  | {name} | {ours_s:.2f} | {ref_s:.2f} | {ratio:.1f}× | {delta:.1e} |')


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_string('workdir', None, 'A trained digits run with a feature cache (default: synthetic features).')
  flags.DEFINE_list('scales', ['digits', 'cifar'], f'Problem sizes to run, of {list(_SIZES)}.')
  flags.DEFINE_bool('smoke', False, 'Tiny sizes (synthetic at both scales) for a quick check.')
  app.run(main)
