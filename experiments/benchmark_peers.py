r"""ood_jax against the libraries people would otherwise use: speed ratios and equality checks in one run.

  python -m experiments.benchmark_peers [--platform=cpu|gpu|tpu] [--only=metrics,knn,mahalanobis,train] \
      [--quick] [--output=table.md] [--rounds=N] [--torch_channels_last] \
      [--networks=resnet20,resnet18,wrn40_2,wrn28_10,densenet_bc100] [--ablate=batchnorm,kernel_grads]

Every row times one job done by ood_jax and by a peer on the same synthetic data, reports the ratio
peer time / ood_jax time (> 1: ood_jax is faster) and checks that both computed the same thing:

* metrics: `ood_jax.metrics.ood_metrics` (AUROC, AUPR-In/Out, FPR@95 and three more from one sort) against
  scikit-learn's `roc_auc_score`, `average_precision_score` twice (ID and OOD positive) and `roc_curve`
  (FPR at the first threshold with TPR ≥ 95 %, ID positive), on 10⁶ ID + 10⁶ OOD float32 scores, once
  continuous and once rounded to 3 decimals (many ties). Both run on the host: `ood_metrics` is NumPy
  (float64, exact tie handling), not traced JAX, so there is nothing to jit; it gets float32 NumPy
  scores, scikit-learn the concatenated scores and 0/1 labels, built before the clock starts.
* knn: `ood_jax.scores.knn` (jitted inside; the arrays already on the device) against faiss
  `IndexFlatL2` (normalising, `add` and `search`; then √ of the k-th squared distance), bank
  50 000 × 512, 10 000 queries, k = 50. faiss uses as many OpenMP threads as JAX has cores (and its GPU
  index with --platform=gpu when its build has one).
* mahalanobis fit: the fit of `detectors.get('mahalanobis')`, the one the evaluator runs (class means +
  shared covariance streamed in float64 on the host, its eigenvalue test, Cholesky factor and whitened
  means), with ridge = 0 so that it is the maximum-likelihood estimate, against NumPy class means +
  scikit-learn `EmpiricalCovariance(assume_centered=True)` on the class-centred float64 features (which
  also forms the precision matrix), 50 000 × 512, 10 classes. Means, covariance and precision are compared.
* mahalanobis score: that detector's score (one triangular solve and one matrix product, float32) against
  a NumPy float32 expansion fᵀPf − 2fᵀPμ_k + μ_kᵀPμ_k with P the precision matrix; checked against the
  float64 expansion.
* train / inference: the jitted training step of `experiments.benchmark.make_step` (forward, backward, SGD
  momentum 0.9, state donated) of `ood_jax.models.make_classifier(name, 'dense', 10)` on random 32×32×3
  images, compiled with `ood_jax.trainer.xla_options.compiler_options()` as the trainer compiles it, and again
  with XLA's defaults (a second row; CPU only, other backends get no options), against the same network
  written again in PyTorch (`experiments/torch_references.py`: eager, NCHW or `--torch_channels_last`,
  `torch.optim.SGD`, as many threads as JAX uses), whose weights are copied from the JAX initialisation.
  By default ResNet-20 at batch 128 and ResNet-18 at batch 32 on CPU (128 elsewhere); `--networks` adds
  WRN-40-2 (batch 128), WRN-28-10 (16 on CPU) and DenseNet-BC-100 (64) (`TRAIN_BATCH`); inference (eval
  mode) at batch 512. The checks: equal parameter counts, equal eval-mode logits and equal first-step
  losses (which only the same architecture with the same padding, strides and shortcuts gives). Rounds
  restart from the initial state, as in `experiments.benchmark` (a memorised batch would drive the loss
  into subnormal numbers).
* `--ablate=batchnorm,kernel_grads` adds, beside every timed training step, the step of the same network
  with its BatchNorm layers as the identity, or with no conv-kernel gradients (`stop_gradient` in JAX,
  `requires_grad_(False)` in PyTorch), on both sides, in the same rounds: full − ablated is what the part
  costs in each library. Checked by the second step's loss (after one update) of the two ablated networks.

Each contender is warmed up (compiled) first; then `rounds` rounds run every contender of a row in turn,
and the ratio uses each one's best (minimum) round: other load only ever adds time. A peer that is not
installed is reported as skipped, and a failed check (✗) makes the script exit non-zero. `--quick` shrinks
every size for a smoke test (10-20 s; timings meaningless): no warm-up, one round, each network compiled
once (no XLA-defaults rows) and only ResNet-20's training step timed. `run(only=..., quick=True)` returns the
rows for tests. Results and their reading: docs/benchmark_peers.md.

Runtime on 2 CPU cores with the default sizes: about 4 minutes, mostly the training and inference rows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import os
import platform as platform_lib
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import benchmark as train_benchmark
from experiments import torch_references
from ood_jax import detectors
from ood_jax import metrics
from ood_jax import models
from ood_jax import scores
from ood_jax.trainer import xla_options
from ood_jax.models import batch_norm as batch_norm_lib

SECTIONS = ('metrics', 'knn', 'mahalanobis', 'train')

# Training batch of every network with a PyTorch twin (experiments/torch_references.py): (CPU, GPU / TPU).
# On 2 CPU cores a round of 5 steps then takes 1.5-15 s.
TRAIN_BATCH = {'resnet20': (128, 128), 'resnet18': (32, 128), 'wrn40_2': (128, 128), 'wrn28_10': (16, 128),
               'densenet_bc100': (64, 64)}
NETWORKS = ('resnet20', 'resnet18')  # the default rows; --networks adds the others

# Training-step ablations (--ablate): one part of the network taken out in ood_jax and in PyTorch alike,
# timed in the same rounds as the full step, so full − ablated is what that part costs on each side.
ABLATIONS = {'batchnorm': 'BatchNorm as identity', 'kernel_grads': 'no conv-kernel gradients'}

# Agreement required of the equality checks (absolute unless said otherwise).
METRIC_TOLERANCE = {'auroc': 1e-6, 'aupr_in': 1e-6, 'aupr_out': 1e-6, 'fpr95': 1e-12}
KNN_TOLERANCE = 2e-6  # |Δ distance to the k-th neighbour|, distances ~1
GAUSSIAN_TOLERANCE = 1e-5  # max |Δ| / max |value| of means, covariance and precision (float32 output)
MAHALANOBIS_TOLERANCE = 1e-5  # max |Δ score| / max |score| against the float64 reference
LOGITS_TOLERANCE = 1e-4  # max |Δ logit| / max |logit|, and |Δ loss| / loss, float32 JAX vs float32 PyTorch


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Problem sizes and timing repetitions."""

  num_scores: int = 1_000_000  # ID scores, and as many OOD scores
  bank: int = 50_000
  queries: int = 10_000
  dim: int = 512
  k: int = 50
  num_classes: int = 10
  train_batch: int | None = None  # every network's training batch; None: its `TRAIN_BATCH` for the platform
  inference_batch: int = 512
  steps: int = 5  # training steps per round
  rounds: int = 5  # rounds of the fast rows (metrics, mahalanobis score, training)
  slow_rounds: int = 3  # rounds of knn, the Gaussian fit and inference
  xla_defaults: bool = True  # also time the networks compiled with XLA's default options
  warmup: bool = True  # one untimed call of every contender before the rounds
  trained: tuple[str, ...] | None = None  # networks whose training step is timed; None: every one
  ablations: tuple[str, ...] = ()  # keys of ABLATIONS, timed beside every trained network's step


# Compiling dominates a quick run: it compiles each network once, with the trainer's options, and times
# ResNet-18's inference only (its eval logits still check the PyTorch architecture).
QUICK = Sizes(num_scores=10_000, bank=2_000, queries=500, dim=64, k=50, train_batch=8,
              inference_batch=8, steps=1, rounds=1, slow_rounds=1, xla_defaults=False, warmup=False,
              trained=('resnet20',))


@dataclasses.dataclass
class Row:
  """One line of the table: seconds per call of each side, and the equality check."""

  benchmark: str
  ours: float | None = None  # seconds per call; None when skipped
  peer: float | None = None
  check: str = ''
  passed: bool | None = None  # None when skipped
  items: int | None = None  # images per call, to print a throughput

  @property
  def skipped(self) -> bool:
    return self.ours is None or self.peer is None

  @property
  def ratio(self) -> float | None:
    return None if self.skipped else self.peer / self.ours


def _skipped(benchmark: str, reason: str) -> Row:
  return Row(benchmark, check=f'skipped: {reason}')


def _optional(name: str):
  """The module `name`, or the reason it cannot be imported (a string)."""
  try:
    importlib.import_module(name.split('.')[0])
    return importlib.import_module(name)
  except ImportError as e:
    return f'{name} is not importable ({e})'


def num_threads() -> int:
  """Cores available to this process: what XLA's CPU thread pool uses, and what the peers are given."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _race(contenders: dict[str, Callable[[], float]], rounds: int, warmup: bool = True) -> dict[str, float]:
  """Best of `rounds` of each contender (each returns its own seconds), after one warm-up call each.

  Rounds run the contenders in turn, so a slow phase of the machine affects all of them alike.
  """
  if warmup:
    for fn in contenders.values():
      fn()
  best = {name: float('inf') for name in contenders}
  for _ in range(rounds):
    for name, fn in contenders.items():
      best[name] = min(best[name], fn())
  return best


def _timed(fn: Callable[[], Any], box: dict | None = None, key: str = '') -> Callable[[], float]:
  """A contender that calls `fn` (which must block until done), keeping its last result in box[key]."""

  def run_once():
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    if box is not None:
      box[key] = out
    return elapsed

  return run_once


def _mark(passed: bool) -> str:
  return '✓' if passed else '✗'


# ----------------------------------------------------------------------------------------------
# Metrics.


def _sklearn_ood_metrics(skm, labels, s):
  fpr, tpr, _ = skm.roc_curve(labels, s, drop_intermediate=False)  # dropping could skip the 95 % point
  return {
      'auroc': skm.roc_auc_score(labels, s),
      'aupr_in': skm.average_precision_score(labels, s),
      'aupr_out': skm.average_precision_score(1 - labels, -s),
      'fpr95': fpr[np.argmax(tpr >= 0.95)],
  }


def metrics_rows(sizes: Sizes, rng: np.random.Generator) -> list[Row]:
  n = sizes.num_scores
  names = [f'metrics {n:,}+{n:,} {variant} (vs scikit-learn)' for variant in ('continuous', 'ties (3 decimals)')]
  skm = _optional('sklearn.metrics')
  if isinstance(skm, str):
    return [_skipped(name, skm) for name in names]
  ins = rng.normal(1.0, 1.0, n).astype(np.float32)
  outs = rng.normal(0.0, 1.0, n).astype(np.float32)
  rows = []
  for name, (i, o) in zip(names, [(ins, outs), (np.round(ins, 3), np.round(outs, 3))]):
    labels = np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])
    s = np.concatenate([i, o])
    got = {}
    contenders = {'ours': _timed(functools.partial(metrics.ood_metrics, i, o), got, 'ours'),
                  'peer': _timed(functools.partial(_sklearn_ood_metrics, skm, labels, s), got, 'peer')}
    best = _race(contenders, sizes.rounds, sizes.warmup)
    ours = dict(got['ours'], fpr95=got['ours']['fpr95_id_positive'])
    delta = {key: abs(float(ours[key]) - float(got['peer'][key])) for key in METRIC_TOLERANCE}
    passed = all(delta[key] <= METRIC_TOLERANCE[key] for key in METRIC_TOLERANCE)
    check = (f'{_mark(passed)} |Δ| AUROC {delta["auroc"]:.0e}, AUPR-In {delta["aupr_in"]:.0e}, '
             f'AUPR-Out {delta["aupr_out"]:.0e}, FPR@95 {delta["fpr95"]:.0e} (AUROC {ours["auroc"]:.4f})')
    rows.append(Row(name, best['ours'], best['peer'], check, passed))
  return rows


# ----------------------------------------------------------------------------------------------
# Synthetic features: non-negative class clusters, like penultimate ReLU activations.


def _features(rng, n, centres, mixing):
  labels = rng.integers(0, centres.shape[0], n)
  noise = rng.standard_normal((n, centres.shape[1]), np.float32) @ mixing
  return np.maximum(centres[labels] + noise, 0.0).astype(np.float32), labels


def _clusters(rng, sizes):
  centres = (1.0 + rng.standard_normal((sizes.num_classes, sizes.dim))).astype(np.float32)
  # A correlated, well-conditioned within-class covariance: precision comparisons stay meaningful.
  mixing = (np.eye(sizes.dim) + 0.3 * rng.standard_normal((sizes.dim, sizes.dim)) / np.sqrt(sizes.dim))
  return centres, mixing.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# KNN.


def _faiss_knn(faiss, queries, bank, k, gpu_resources=None):
  normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  if gpu_resources is not None:
    index = faiss.GpuIndexFlatL2(gpu_resources, bank.shape[1])
  else:
    index = faiss.IndexFlatL2(bank.shape[1])
  index.add(normalise(bank))
  distances, _ = index.search(normalise(queries), k)
  return -np.sqrt(np.maximum(distances[:, k - 1], 0.0))


def knn_rows(sizes: Sizes, rng: np.random.Generator, *, platform: str) -> list[Row]:
  name = f'knn bank {sizes.bank:,}×{sizes.dim}, {sizes.queries:,} queries, k={sizes.k} (vs faiss IndexFlatL2)'
  faiss = _optional('faiss')
  if isinstance(faiss, str):
    return [_skipped(name, faiss)]
  faiss.omp_set_num_threads(num_threads())
  gpu_resources = None
  if platform == 'gpu':
    if hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0:
      gpu_resources = faiss.StandardGpuResources()
    else:
      name = name.replace('faiss IndexFlatL2', 'faiss IndexFlatL2 on the CPU: no faiss GPU build')
  centres, mixing = _clusters(rng, sizes)
  bank, _ = _features(rng, sizes.bank, centres, mixing)
  queries, _ = _features(rng, sizes.queries, centres, mixing)
  bank_device, queries_device = jax.device_put(bank), jax.device_put(queries)
  got = {}
  best = _race({
      'ours': _timed(lambda: scores.knn(queries_device, bank_device, k=sizes.k).block_until_ready(), got, 'ours'),
      'peer': _timed(lambda: _faiss_knn(faiss, queries, bank, sizes.k, gpu_resources), got, 'peer'),
  }, sizes.slow_rounds, sizes.warmup)
  delta = float(np.max(np.abs(np.asarray(got['ours'], np.float64) - got['peer'])))
  passed = delta <= KNN_TOLERANCE
  check = f'{_mark(passed)} max |Δ k-th distance| {delta:.1e} (≤ {KNN_TOLERANCE:.0e})'
  return [Row(name, best['ours'], best['peer'], check, passed)]


# ----------------------------------------------------------------------------------------------
# Mahalanobis.


def _sklearn_gaussian(covariance_module, features, labels, num_classes):
  x = features.astype(np.float64)
  counts = np.bincount(labels, minlength=num_classes)
  sums = np.zeros((num_classes, x.shape[1]))
  np.add.at(sums, labels, x)
  means = sums / counts[:, None]
  estimator = covariance_module.EmpiricalCovariance(assume_centered=True).fit(x - means[labels])
  return means, estimator.covariance_, estimator.precision_


def _numpy_mahalanobis(features, means, precision):
  """−min_k (f − μ_k)ᵀ P (f − μ_k) expanded as fᵀPf − 2 fᵀPμ_k + μ_kᵀPμ_k, in the inputs' dtype."""
  fp = features @ precision
  quadratic = np.sum(fp * features, axis=1)[:, None] - 2.0 * fp @ means.T + np.sum((means @ precision) * means, axis=1)
  return -np.min(quadratic, axis=1)


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def mahalanobis_rows(sizes: Sizes, rng: np.random.Generator) -> list[Row]:
  n, d, num_classes = sizes.bank, sizes.dim, sizes.num_classes
  names = [f'mahalanobis fit {n:,}×{d}, {num_classes} classes (vs scikit-learn EmpiricalCovariance)',
           f'mahalanobis score {sizes.queries:,}×{d} (vs NumPy float32)']
  covariance_module = _optional('sklearn.covariance')
  if isinstance(covariance_module, str):
    return [_skipped(name, covariance_module) for name in names]
  centres, mixing = _clusters(rng, sizes)
  features, labels = _features(rng, n, centres, mixing)
  queries, _ = _features(rng, sizes.queries, centres, mixing)
  detector = detectors.get('mahalanobis', ridge=0.0)
  got = {}
  best = _race({
      'ours': _timed(lambda: jax.block_until_ready(detector.fit({'features': features, 'labels': labels},
                                                                num_classes=num_classes)), got, 'ours'),
      'peer': _timed(lambda: _sklearn_gaussian(covariance_module, features, labels, num_classes), got, 'peer'),
  }, sizes.slow_rounds, sizes.warmup)
  state = got['ours']
  gaussian = state.gaussian
  means, covariance, precision = got['peer']
  cholesky = np.asarray(gaussian.cholesky, np.float64)
  inverse_cholesky = np.linalg.solve(cholesky, np.eye(d))
  ours_precision = inverse_cholesky.T @ inverse_cholesky  # Σ⁻¹ = L⁻ᵀ L⁻¹ from ood_jax's factor
  delta = {'means': _relative(gaussian.means, means), 'covariance': _relative(gaussian.covariance, covariance),
           'precision': _relative(ours_precision, precision)}
  passed = all(v <= GAUSSIAN_TOLERANCE for v in delta.values())
  fit_check = (f'{_mark(passed)} max |Δ| / max: means {delta["means"]:.0e}, covariance {delta["covariance"]:.0e}, '
               f'precision {delta["precision"]:.0e} (≤ {GAUSSIAN_TOLERANCE:.0e})')
  rows = [Row(names[0], best['ours'], best['peer'], fit_check, passed)]

  queries_device = jax.device_put(queries)
  means32, precision32 = means.astype(np.float32), precision.astype(np.float32)
  best = _race({
      'ours': _timed(lambda: detector.score(state, {'features': queries_device}).block_until_ready(), got, 'score'),
      'peer': _timed(lambda: _numpy_mahalanobis(queries, means32, precision32)),
  }, sizes.rounds, sizes.warmup)
  reference = _numpy_mahalanobis(queries.astype(np.float64), means, precision)
  delta = _relative(got['score'], reference)
  passed = delta <= MAHALANOBIS_TOLERANCE
  score_check = (f'{_mark(passed)} max |Δ| / max |score| {delta:.0e} vs float64 (≤ {MAHALANOBIS_TOLERANCE:.0e}; '
                 f'NumPy float32 {_relative(_numpy_mahalanobis(queries, means32, precision32), reference):.0e})')
  rows.append(Row(names[1], best['ours'], best['peer'], score_check, passed))
  return rows


# ----------------------------------------------------------------------------------------------
# Training step and inference: the ResNets in PyTorch.


def init_variables(model, image_shape, seed: int = 0):
  """Variables of `model` filled from NumPy: He-normal (fan-out) convs, as ood_jax initialises them.

  `jax.eval_shape` instead of `model.init`: compiling a ResNet's init takes ~10 s on a CPU, and the
  benchmark needs plausible weights, not flax's exact random stream.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'kernel':
      fan = np.prod(leaf.shape[:-2]) * leaf.shape[-1] if len(leaf.shape) == 4 else leaf.shape[0]
      scale = np.sqrt(2.0 / fan) if len(leaf.shape) == 4 else np.sqrt(1.0 / fan)
      value = scale * rng.standard_normal(leaf.shape)
    elif name == 'scale':
      value = 1.0 + 0.1 * rng.random(leaf.shape)
    elif name == 'var':
      value = 0.5 + rng.random(leaf.shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _jax_train_contender(step, state, batch, num_steps):
  """Seconds per step of `num_steps` steps from a copy of `state` (donated by the step)."""

  def run_once():
    current = jax.block_until_ready(jax.tree.map(jnp.copy, state))
    start = time.perf_counter()
    loss = None
    for _ in range(num_steps):
      *current, loss = step(*current, *batch)
    jax.block_until_ready((current, loss))
    return (time.perf_counter() - start) / num_steps

  return run_once


def _torch_train_contender(torch, model, initial, images, labels, num_steps, sync, box=None):
  functional = torch.nn.functional

  def run_once():
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sync()
    start = time.perf_counter()
    loss = None
    for _ in range(num_steps):
      optimizer.zero_grad(set_to_none=True)
      loss = functional.cross_entropy(model(images), labels)
      loss.backward()
      optimizer.step()
    loss_value = float(loss.item())
    sync()
    elapsed = (time.perf_counter() - start) / num_steps
    if box is not None:
      box['loss'] = loss_value
    return elapsed

  return run_once


def _losses(step, state, batch, torch, torch_model, initial, torch_batch, num_steps=1):
  """Loss of the `num_steps`-th training step from the same weights: JAX's and PyTorch's."""
  current = jax.tree.map(jnp.copy, state)
  for _ in range(num_steps):
    *current, jax_loss = step(*current, *batch)
  box = {}
  _torch_train_contender(torch, torch_model, initial, *torch_batch, num_steps, lambda: None, box)()
  return float(jax_loss), box['loss']


def _identity_batch_norm(next_fun, args, kwargs, context):
  """A flax method interceptor under which every BatchNorm returns its input (the 'batchnorm' ablation)."""
  if context.method_name == '__call__' and isinstance(context.module, (nn.BatchNorm, batch_norm_lib.BatchNorm)):
    return args[0]
  return next_fun(*args, **kwargs)


def _frozen_conv_kernels(params):
  """Every 4-D (convolution) kernel under stop_gradient (the 'kernel_grads' ablation)."""
  return jax.tree.map(lambda p: jax.lax.stop_gradient(p) if p.ndim == 4 else p, params)


def _ablated_step(model, optimizer, ablation, state, batch, options):
  """The compiled training step of `model` with `ablation` (a key of ABLATIONS) applied."""
  step = train_benchmark.make_step(model, optimizer, _frozen_conv_kernels if ablation == 'kernel_grads' else None)
  # The interceptor acts while the step is traced, i.e. inside `lower`.
  with nn.intercept_methods(_identity_batch_norm) if ablation == 'batchnorm' else contextlib.nullcontext():
    return step.lower(*state, *batch).compile(compiler_options=options)


def _snapshot(torch_model):
  """A copy of the PyTorch model's state (weights, BatchNorm statistics) to restart rounds from."""
  return {k: v.clone() for k, v in torch_model.state_dict().items()}


def _ablated_torch(torch, model, initial, ablation):
  """A copy of the PyTorch `model` with the weights `initial`, and `ablation` applied.

  'batchnorm': every BatchNorm2d becomes an Identity; 'kernel_grads': 4-D (conv) weights get requires_grad False.
  """
  model = copy.deepcopy(model)
  model.load_state_dict(initial)  # `model` itself may have trained since
  if ablation == 'batchnorm':
    for parent in list(model.modules()):
      for name, child in list(parent.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d):
          setattr(parent, name, torch.nn.Identity())
  else:
    for weight in model.parameters():
      if weight.dim() == 4:
        weight.requires_grad_(False)
  return model


def train_rows(sizes: Sizes, rng: np.random.Generator, *, platform: str, channels_last: bool = False,
               networks: Sequence[str] = NETWORKS) -> list[Row]:
  configs = [(name, sizes.train_batch or TRAIN_BATCH[name][platform != 'cpu']) for name in networks]
  options = xla_options.compiler_options()
  # On GPU / TPU the trainer passes no options, so there is no second variant to time.
  variants = [('XLA options', options), ('XLA defaults', None)] if options is not None else [('XLA defaults', None)]
  names = {}
  for model_name, batch_size in configs:
    for kind, size in (('train step', batch_size), ('inference', sizes.inference_batch)):
      for variant, _ in variants:
        names[model_name, kind, variant] = f'{kind} {model_name} b{size}, {variant} (vs PyTorch)'
    for ablation in sizes.ablations:  # with the trainer's compilation only
      names[model_name, 'train step', ablation] = (f'train step {model_name} b{batch_size}, {variants[0][0]}, '
                                                   f'{ABLATIONS[ablation]} (vs PyTorch, the same)')
  torch = _optional('torch')
  reason = torch if isinstance(torch, str) else None
  if reason is None and platform == 'tpu':
    reason = 'the PyTorch reference runs on CPU or CUDA only'
  if reason is None and platform == 'gpu' and not torch.cuda.is_available():
    reason = f'torch {torch.__version__} has no CUDA device'
  if reason is not None:
    return [_skipped(name, reason) for name in names.values()]

  torch.set_num_threads(num_threads())
  device = 'cuda' if platform == 'gpu' else 'cpu'
  if device == 'cuda':
    torch.backends.cudnn.benchmark = True
  optimizer = optax.sgd(0.01, momentum=0.9)
  timed = variants if sizes.xla_defaults else variants[:1]
  rows = []
  for model_name, batch_size in configs:
    train = sizes.trained is None or model_name in sizes.trained
    got = _model_rows(torch, model_name, batch_size, sizes, rng, timed, names, device, optimizer, channels_last,
                      train=train)
    for kind, variant in [('train step', variant) for variant, _ in variants] + [
        ('train step', ablation) for ablation in sizes.ablations] + [('inference', variant) for variant, _ in variants]:
      name = names[model_name, kind, variant]
      rows.append(got[name] if name in got else _skipped(name, 'not timed with --quick (compilation time)'))
  return rows


def _model_rows(torch, model_name, batch_size, sizes, rng, variants, names, device, optimizer, channels_last, *,
                train: bool) -> dict[str, Row]:
  """The inference rows of one backbone, and its training rows if `train`, by name."""
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  model = models.make_classifier(model_name, 'dense', sizes.num_classes, dtype=jnp.float32)
  variables = init_variables(model, (32, 32, 3), seed=int(rng.integers(1 << 31)))
  params, batch_stats = variables['params'], variables['batch_stats']
  state = (params, batch_stats, optimizer.init(params))
  images = rng.standard_normal((max(batch_size, sizes.inference_batch), 32, 32, 3), np.float32)
  labels = rng.integers(0, sizes.num_classes, batch_size).astype(np.int32)
  batch = (jnp.asarray(images[:batch_size]), jnp.asarray(labels))

  torch_model = torch_references.torch_classifier(torch, model_name, sizes.num_classes)
  torch_references.load_torch_weights(torch, torch_model, variables)
  torch_model.to(device)
  torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  if channels_last:
    torch_model.to(memory_format=torch.channels_last)
    torch_images = torch_images.contiguous(memory_format=torch.channels_last)
  initial = _snapshot(torch_model)
  torch_batch = (torch_images[:batch_size], torch.from_numpy(labels.astype(np.int64)).to(device))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  torch_count = sum(p.numel() for p in torch_model.parameters())
  print(f'{model_name}: {count:,} parameters in ood_jax, {torch_count:,} in PyTorch')

  # Training: the first step's loss from the same weights is part of the architecture check.
  if train:
    steps = {variant: train_benchmark.make_step(model, optimizer).lower(*state, *batch).compile(
        compiler_options=opts) for variant, opts in variants}
    jax_loss, torch_loss = _losses(steps[variants[0][0]], state, batch, torch, torch_model, initial, torch_batch)
    contenders = {variant: _jax_train_contender(steps[variant], state, batch, sizes.steps) for variant, _ in variants}
    contenders['torch'] = _torch_train_contender(torch, torch_model, initial, *torch_batch, sizes.steps, sync)
    # Each ablation is checked by the loss of its second step (the first update is in it) on both sides.
    ablation_checks = {}
    for ablation in sizes.ablations:
      step = _ablated_step(model, optimizer, ablation, state, batch, variants[0][1])
      ablated = _ablated_torch(torch, torch_model, initial, ablation)
      ablated_initial = _snapshot(ablated)
      losses = _losses(step, state, batch, torch, ablated, ablated_initial, torch_batch, num_steps=2)
      ablation_checks[ablation] = abs(losses[0] - losses[1]) / abs(losses[1])
      contenders[ablation] = _jax_train_contender(step, state, batch, sizes.steps)
      contenders['torch ' + ablation] = _torch_train_contender(torch, ablated, ablated_initial, *torch_batch,
                                                                sizes.steps, sync)
    train_best = _race(contenders, sizes.rounds, sizes.warmup)  # _losses warmed up the first variant
    del steps, contenders

  # Inference: eval mode, one batch per call; its logits are the other half of the check.
  infer_images = jnp.asarray(images[:sizes.inference_batch])
  torch_infer = torch_images[:sizes.inference_batch]
  apply = lambda v, x: model.apply(v, x, train=False)[0]
  got, contenders = {}, {}
  for variant, opts in variants:
    compiled = jax.jit(apply, compiler_options=opts).lower(variables, infer_images).compile()
    contenders[variant] = _timed(functools.partial(lambda f: jax.block_until_ready(f(variables, infer_images)),
                                                   compiled), got, variant)

  torch_model.load_state_dict(initial)  # the weights of `variables` again, after the training rounds

  def torch_inference():
    torch_model.eval()
    with torch.inference_mode():
      out = torch_model(torch_infer)
    sync()
    return out

  contenders['torch'] = _timed(torch_inference, got, 'torch')
  infer_best = _race(contenders, sizes.slow_rounds, sizes.warmup)

  torch_logits = got['torch'].cpu().numpy()
  logits_delta = max(_relative(got[variant], torch_logits) for variant, _ in variants)
  loss_delta = abs(jax_loss - torch_loss) / abs(torch_loss) if train else 0.0
  passed = count == torch_count and logits_delta <= LOGITS_TOLERANCE and loss_delta <= LOGITS_TOLERANCE
  loss_text = f', step-1 loss Δ {loss_delta:.0e}' if train else ''
  check = (f'{_mark(passed)} params {count:,} = {torch_count:,}, eval logits Δ {logits_delta:.0e}{loss_text} '
           f'(relative, ≤ {LOGITS_TOLERANCE:.0e})')
  rows = [Row(names[model_name, 'inference', variant], infer_best[variant], infer_best['torch'], check, passed,
              items=sizes.inference_batch) for variant, _ in variants]
  if train:
    rows += [Row(names[model_name, 'train step', variant], train_best[variant], train_best['torch'], check, passed,
                 items=batch_size) for variant, _ in variants]
    for ablation, delta in ablation_checks.items():
      ok = delta <= LOGITS_TOLERANCE
      rows.append(Row(names[model_name, 'train step', ablation], train_best[ablation], train_best['torch ' + ablation],
                      f'{_mark(ok)} step-2 loss Δ {delta:.0e} (relative, ≤ {LOGITS_TOLERANCE:.0e})', ok,
                      items=batch_size))
  return {row.benchmark: row for row in rows}


# ----------------------------------------------------------------------------------------------
# The run and the table.


def device_summary() -> str:
  device = jax.devices()[0]
  cpu = platform_lib.processor() or platform_lib.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  options = xla_options.compiler_options()
  peers = []
  for name in ('sklearn', 'faiss', 'torch'):
    module = _optional(name)
    peers.append(f'{name} absent' if isinstance(module, str) else f'{name} {getattr(module, "__version__", "?")}')
  return (f'device: {device} (platform {device.platform}, device_kind {device.device_kind}); '
          f'host CPU: {cpu}, {num_threads()} threads for JAX and the peers (torch.set_num_threads, faiss OpenMP); '
          f'jax {jax.__version__}, {", ".join(peers)}; XLA options of the trainer: {options}')


def run(only: Sequence[str] = SECTIONS, *, quick: bool = False, platform: str | None = None,
        rounds: int | None = None, seed: int = 0, torch_channels_last: bool = False,
        networks: Sequence[str] = NETWORKS, ablate: Sequence[str] = ()) -> list[Row]:
  """Runs the sections in `only` and returns their rows (printing nothing but the parameter counts).

  Args:
    only: sections to run, of `SECTIONS`.
    quick: the `QUICK` sizes (a smoke test).
    platform: 'cpu', 'gpu' or 'tpu': decides the training batches and where PyTorch and faiss run. Default:
      JAX's default backend (this does not switch JAX's platform; `main` does, before JAX starts).
    rounds: timing rounds of every row, instead of the sizes' `rounds` / `slow_rounds`.
    seed: seed of the synthetic data and weights.
    torch_channels_last: run the PyTorch networks in channels-last memory format instead of NCHW.
    networks: backbones of the train / inference rows, of `TRAIN_BATCH`.
    ablate: training-step ablations of `ABLATIONS`, a row each beside every timed training step.

  Returns:
    The rows, in the order of the table.
  """
  unknown = set(only) - set(SECTIONS)
  if unknown:
    raise ValueError(f'unknown sections {sorted(unknown)}; valid: {", ".join(SECTIONS)}.')
  platform = platform or jax.default_backend()
  networks = tuple(dict.fromkeys(networks))
  unknown = set(networks) - set(TRAIN_BATCH)
  if unknown or not networks:
    raise ValueError(f'unknown networks {sorted(unknown)}; valid: {", ".join(TRAIN_BATCH)}.')
  unknown = set(ablate) - set(ABLATIONS)
  if unknown:
    raise ValueError(f'unknown ablations {sorted(unknown)}; valid: {", ".join(ABLATIONS)}.')
  sizes = dataclasses.replace(QUICK if quick else Sizes(), ablations=tuple(dict.fromkeys(ablate)))
  if rounds is not None:
    sizes = dataclasses.replace(sizes, rounds=rounds, slow_rounds=rounds)
  rng = np.random.default_rng(seed)
  sections = {'metrics': metrics_rows, 'knn': functools.partial(knn_rows, platform=platform),
              'mahalanobis': mahalanobis_rows,
              'train': functools.partial(train_rows, platform=platform, channels_last=torch_channels_last,
                                         networks=networks)}
  rows = []
  for section in SECTIONS:
    if section in only:
      rows.extend(sections[section](sizes, rng))
  return rows


def _duration(seconds: float | None, items: int | None) -> str:
  if seconds is None:
    return '—'
  text = f'{1000 * seconds:.1f} ms' if seconds < 1 else f'{seconds:.2f} s'
  if items:
    text += f' ({items / seconds:,.0f}/s)'
  return text


def table(rows: Sequence[Row]) -> list[list[str]]:
  """[header, *rows] of `benchmark | ood_jax | peer | ratio | check`."""
  lines = [['benchmark', 'ood_jax', 'peer', 'ratio', 'check']]
  for row in rows:
    lines.append([row.benchmark, _duration(row.ours, row.items), _duration(row.peer, row.items),
                  '—' if row.ratio is None else f'{row.ratio:.2f}×', row.check])
  return lines


def format_text(rows: Sequence[Row]) -> str:
  lines = table(rows)
  widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
  return '\n'.join(' | '.join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def format_markdown(rows: Sequence[Row]) -> str:
  lines = table(rows)
  out = ['| ' + ' | '.join(lines[0]) + ' |', '|' + '|'.join(['---'] + ['---:'] * 3 + ['---']) + '|']
  out += ['| ' + ' | '.join(cell.replace('|', '\\|') for cell in line) + ' |' for line in lines[1:]]
  return '\n'.join(out)


def main(argv):
  del argv
  if FLAGS.platform:
    jax.config.update('jax_platforms', FLAGS.platform)
  only = list(dict.fromkeys(FLAGS.only))
  if set(only) - set(SECTIONS):
    raise app.UsageError(f'--only takes sections of {",".join(SECTIONS)}, got {",".join(only)}.')
  summary = device_summary()
  print(summary)
  start = time.perf_counter()
  try:
    rows = run(only, quick=FLAGS.quick, platform=FLAGS.platform, rounds=FLAGS.rounds,
               torch_channels_last=FLAGS.torch_channels_last, networks=FLAGS.networks, ablate=FLAGS.ablate)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  print(f'ratio = peer time / ood_jax time (> 1: ood_jax is faster); best of the rounds; '
        f'{time.perf_counter() - start:.0f} s in all')
  print(format_text(rows))
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      f.write(summary + '\n\n' + format_markdown(rows) + '\n')
  if any(row.passed is False for row in rows):
    raise SystemExit('an equality check failed (✗ above)')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_enum('platform', None, ['cpu', 'gpu', 'tpu'], "JAX platform (default: JAX's default backend).")
  flags.DEFINE_list('only', list(SECTIONS), f'Sections to run, of {",".join(SECTIONS)}.')
  flags.DEFINE_bool('quick', False, 'Tiny sizes and one round: a smoke test, not a measurement.')
  flags.DEFINE_integer('rounds', None, 'Timing rounds of every row (default: 5 for fast rows, 3 for slow ones).',
                       lower_bound=1)
  flags.DEFINE_string('output', None, 'Also write the table as markdown to this file.')
  flags.DEFINE_bool('torch_channels_last', False, 'PyTorch networks in channels-last memory format (default NCHW).')
  flags.DEFINE_list('networks', list(NETWORKS), f'Backbones of the train / inference rows, of {",".join(TRAIN_BATCH)}.')
  flags.DEFINE_list('ablate', [], f'Training-step ablations to time beside each network, of {",".join(ABLATIONS)} '
                    '(BatchNorm as identity; conv kernels under stop_gradient / requires_grad=False).')
  app.run(main)
