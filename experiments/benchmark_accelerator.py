r"""Training and evaluation throughput on a GPU or TPU, one device and all local devices, against PyTorch.

  python -m experiments.benchmark_accelerator --platform=gpu --output=docs/benchmark_accelerator.md
  python -m experiments.benchmark_accelerator --platform=tpu --devices=one,all
  python -m experiments.benchmark_accelerator --sections=train --networks=wrn28_10:128:bfloat16 --torch=compile
  python -m experiments.benchmark_accelerator --quick          # smoke test on any backend (timings meaningless)
  bash experiments/run_accelerator_benchmark.sh               # the whole GPU run, written to the docs

Three sections (`--sections`), each its own table:

* train: images/s and MFU of the jitted training step (forward, backward, SGD momentum 0.9, state donated) of
  `ood_jax.models.make_classifier(name, 'dense', 10, dtype=...)` on random CIFAR-sized images. On GPU / TPU:
  ResNet-18 at batch 512 in bfloat16 and float32, WRN-28-10 at batch 128 in both (`--networks` picks others,
  as name:batch:dtype). bfloat16 is the models' computation dtype (parameters, optimizer and loss stay
  float32). `--devices=one,all`: on one device, and data-parallel over every local device, as the trainer
  runs it: a one-axis `Mesh`, the global batch split with `NamedSharding(mesh, P('data'))`, parameters and
  optimizer state replicated, BatchNorm statistics over the global batch (the all-device step's loss is checked
  against the one-device step's). MFU per device is `ood_jax.trainer.throughput`'s: XLA's FLOP count of the
  lowered step / the devices, × steps/s / the device's dense peak at that dtype (TF32 for float32 on
  NVIDIA); `--peak_tflops` for a chip the table does not list (CPUs included).
* inference: images/s and MFU of the eval-mode forward pass (what the evaluator runs to extract logits and
  features) of the same networks, 1 024 images per call (128 on a CPU), on one device and on all.
* detectors: fit and score of mahalanobis, knn, vim and react (`--detectors`) on CIFAR-sized synthetic
  features (50 000 × 512 training rows streamed in batches of 1 000, 10 classes, 10 000 test rows;
  `experiments.benchmark_detectors.make_data`), the score jitted and timed after compilation (best of the
  rounds), against the NumPy / SciPy float64 baselines of `experiments.benchmark_detectors` on the host, whose
  scores must agree to `DETECTOR_TOLERANCE` of the score range.

PyTorch, when it is installed and has the device (CUDA for --platform=gpu, the CPU for --platform=cpu; never on
TPU): the same network (`experiments/torch_references.py`) with the same weights, once eager and once under
`torch.compile` (default mode; `--torch`), one device, `torch.optim.SGD` and cross-entropy; bfloat16 as
`torch.autocast`, the same mixed precision as the flax models'. On CUDA: channels-last memory format
(`--torch_memory_format`), `cudnn.benchmark` and TF32 matrix products (`set_float32_matmul_precision('high')`),
the settings a PyTorch user tunes for speed, and JAX's own default precision. Its MFU uses XLA's FLOP count of
the same network and batch (model FLOPs are the model's, whatever runs it). Equal parameter counts, and the
step-1 loss and eval logits of the same weights within `TORCH_TOLERANCE` (TF32 and bfloat16 round differently
in each library: a wrong stride or padding is off by O(1); the exact equality checks are
`experiments.benchmark_peers`'s, on CPU). Multi-device PyTorch (DDP, a process per device) is not run.

Timing: every program is compiled first (its compile time reported), its first call checked, then `rounds`
rounds of `steps` calls, each round from the initial state; the best round counts (other load only ever adds
time). A row that cannot run says why (skipped) and a row that raises is reported as failed, its traceback
printed: the run goes on, and exits non-zero at the end if any row failed. `--time_budget` (seconds) skips
the rows that would start after it, so a run on a time-limited machine ends in time; `--output` is rewritten after
every row, so a run that is stopped still leaves its table. Run order: the detectors (cheap); network by network
(in the order of `--networks`), training then inference, the ood_jax and eager PyTorch rows; last the
torch.compile rows, whose compilation takes longest (a run cut short by its budget loses those first).

GPU memory: unless `XLA_PYTHON_CLIENT_MEM_FRACTION` is set, JAX is given half of it (instead of 75 %), the rest
being PyTorch's. XLA's fastest (not deterministic) GPU kernels: the trainer's `deterministic=True` adds
`--xla_gpu_deterministic_ops=true`; set it in `XLA_FLAGS` to measure that (the header records `XLA_FLAGS`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import math
import os
import pathlib
import platform as platform_lib
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

import ood_jax
from experiments import benchmark_detectors
from experiments import torch_references
from ood_jax import detectors
from ood_jax import losses
from ood_jax import models


def _trainer_module(name: str):
  """`ood_jax.trainer.<name>`, or, without the trainer's extra, that file alone.

  throughput, sharding and xla_options import only jax, NumPy and absl, but their package's entrance requires
  the whole 'train' extra (TensorFlow, TFDS, clu, ml_collections), which accelerator images often lack and
  which this benchmark does not use.
  """
  try:
    return importlib.import_module(f'ood_jax.trainer.{name}')
  except ImportError:
    path = pathlib.Path(ood_jax.__file__).parent / 'trainer' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'_ood_jax_trainer_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _trainer_module('throughput')
sharding = _trainer_module('sharding')
xla_options = _trainer_module('xla_options')

SECTIONS = ('train', 'inference', 'detectors')
DEVICES = ('one', 'all')
TORCH_MODES = ('eager', 'compile')
DETECTORS = ('mahalanobis', 'knn', 'vim', 'react')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
IMAGE_SHAPES = {'digits_cnn': (8, 8, 1)}  # every other backbone: CIFAR's 32 × 32 × 3

# max |Δ| / max |reference| of PyTorch's step-1 loss and eval logits against ood_jax's, and of the all-device step's
# loss and logits against the one-device ones. Loose on purpose: TF32 and bfloat16 round differently in each library.
TORCH_TOLERANCE = {'float32': 1e-2, 'bfloat16': 1e-1}
# max |Δ| / score range of a detector's scores against the NumPy float64 baseline (ReAct's percentile is estimated
# from a subsample of the training activations, ~4e-4 at CIFAR size).
DETECTOR_TOLERANCE = 2e-3


@dataclasses.dataclass(frozen=True)
class Network:
  """A backbone of `ood_jax.models.BACKBONES`, its global training batch and computation dtype."""

  name: str
  batch: int
  dtype: str

  @property
  def label(self) -> str:
    return f'{self.name} b{self.batch} {self.dtype}'


def parse_network(spec: str) -> Network:
  """'resnet18:512:bfloat16' → Network('resnet18', 512, 'bfloat16'); ValueError naming what is wrong."""
  parts = spec.split(':')
  if len(parts) != 3:
    raise ValueError(f'networks are name:batch:dtype (e.g. resnet18:512:bfloat16), got {spec!r}.')
  name, batch, dtype = parts
  if name not in models.BACKBONES:
    raise ValueError(f'unknown network {name!r} in {spec!r}; valid: {", ".join(models.BACKBONES)}.')
  if not batch.isdigit() or int(batch) < 1:
    raise ValueError(f'the batch of {spec!r} must be a positive integer.')
  if dtype not in DTYPES:
    raise ValueError(f'unknown dtype {dtype!r} in {spec!r}; valid: {", ".join(DTYPES)}.')
  return Network(name, int(batch), dtype)


# Default networks of each platform: the CIFAR benchmark networks at the batches people train them with, and on a
# CPU at batches that keep a round of steps to seconds.
ACCELERATOR_NETWORKS = tuple(map(parse_network, ('resnet18:512:bfloat16', 'resnet18:512:float32',
                                                 'wrn28_10:128:bfloat16', 'wrn28_10:128:float32')))
CPU_NETWORKS = tuple(map(parse_network, ('resnet18:32:bfloat16', 'resnet18:32:float32', 'wrn28_10:16:bfloat16',
                                         'wrn28_10:16:float32')))


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Problem sizes and timing repetitions."""

  inference_batch: int = 1024  # images per eval-mode call
  steps: int = 10  # calls per timing round
  rounds: int = 5
  warmup: bool = True  # one untimed round after the first (checked) call
  train_rows: int = 50_000  # detectors: training features, streamed
  dim: int = 512
  classes: int = 10
  test_rows: int = 10_000
  fit_batch: int = 1_000
  detector_rounds: int = 3  # timed scoring calls


ACCELERATOR = Sizes()
CPU = dataclasses.replace(Sizes(), inference_batch=128, steps=3, rounds=3)
# A smoke test: one tiny network (no PyTorch twin, so its PyTorch rows are skipped), one call per row.
QUICK = Sizes(inference_batch=8, steps=1, rounds=1, warmup=False, train_rows=1_000, dim=32, test_rows=200,
              fit_batch=250, detector_rounds=1)
QUICK_NETWORKS = (Network('digits_cnn', 8, 'float32'),)


@dataclasses.dataclass
class Row:
  """One line of the train or inference table: seconds per call of one framework on one device count."""

  section: str  # 'train' or 'inference'
  network: str  # Network.label
  devices: int  # devices the program runs on (0: not run)
  framework: str  # 'ood_jax', 'PyTorch eager' or 'PyTorch torch.compile'
  seconds: float | None = None  # per call, best round; None: skipped or failed
  items: int = 0  # images per call (the global batch)
  flops: float | None = None  # per device per call (XLA's count of the lowered program / devices)
  peak: float | None = None  # the device's dense peak FLOP/s at the network's dtype
  compile_seconds: float | None = None  # compilation, or PyTorch's first call
  check: str = ''
  passed: bool | None = None  # None: skipped
  result: Any = dataclasses.field(default=None, repr=False)  # step-1 loss (train) or eval logits (inference)
  order: tuple = dataclasses.field(default=(), repr=False)  # place in its table: network, framework, devices

  @property
  def images_per_sec(self) -> float | None:
    return None if self.seconds is None else self.items / self.seconds

  @property
  def mfu(self) -> float | None:
    if self.seconds is None or self.flops is None or self.peak is None:
      return None
    return throughput.rates(1.0 / self.seconds, batch_size=self.items, flops=self.flops, peak=self.peak)['mfu']


@dataclasses.dataclass
class DetectorRow:
  """One line of the detectors table: fit and score of one detector, and its NumPy float64 baseline."""

  detector: str
  fit: float | None = None  # seconds
  score: float | None = None  # seconds, best of the rounds, compiled
  rows: int = 0  # test rows scored per call
  baseline: float | None = None  # NumPy fit + score, seconds
  delta: float | None = None  # max |Δ| / score range against the baseline
  check: str = ''
  passed: bool | None = None


def _mark(passed: bool) -> str:
  return '✓' if passed else '✗'


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class _Budget:
  """Wall-clock budget of a run: `spent()` once `seconds` have passed since it started (never when None)."""

  def __init__(self, seconds: float | None):
    self.seconds, self.start = seconds, time.perf_counter()

  def spent(self) -> bool:
    return self.seconds is not None and time.perf_counter() - self.start >= self.seconds

  def reason(self) -> str:
    return f'time budget of {self.seconds:g} s spent'


def _optional(name: str):
  """The module `name`, or the reason it cannot be imported (a string)."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    return f'{name} is not importable ({e})'


def random_variables(model, image_shape, seed: int = 0):
  """Variables of `model` filled from NumPy: He-normal (fan-out) convolutions, as ood_jax initialises them.

  `jax.eval_shape` instead of `model.init`: compiling a ResNet's init takes seconds, and a benchmark needs
  plausible weights (and BatchNorm statistics, for eval mode), not flax's random stream.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'kernel':
      fan = np.prod(leaf.shape[:-2]) * leaf.shape[-1] if len(leaf.shape) == 4 else leaf.shape[0]
      value = np.sqrt((2.0 if len(leaf.shape) == 4 else 1.0) / fan) * rng.standard_normal(leaf.shape)
    elif name in ('scale', 'var'):
      value = 0.5 + rng.random(leaf.shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(leaf.shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------------------------
# ood_jax: one program per (network, section, device count).


def train_step(model, optimizer):
  """(params, batch_stats, opt_state, images, labels) → the same, updated, and the loss (before the update).

  The cross-entropy is taken in float32 whatever the computation dtype, as the trainer does.
  """

  def loss_fn(params, batch_stats, images, labels):
    (logits, _), updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                       mutable=['batch_stats'])
    loss = jnp.mean(losses.softmax_cross_entropy(logits.astype(jnp.float32), labels))
    return loss, updates.get('batch_stats', batch_stats)

  def step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def _best(round_fn: Callable[[], float], rounds: int, warmup: bool) -> float:
  """Best (minimum) of `rounds` calls of `round_fn` (seconds per call each), after one untimed call if `warmup`."""
  if warmup:
    round_fn()
  return min(round_fn() for _ in range(rounds))


def _jax_train(model, variables, images, labels, mesh: Mesh, sizes: Sizes):
  """(seconds per step, FLOPs per device, compile seconds, step-1 loss) of the data-parallel step over `mesh`."""
  optimizer = optax.sgd(0.01, momentum=0.9)
  replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params, batch_stats = variables['params'], variables['batch_stats']
  state = jax.device_put((params, batch_stats, optimizer.init(params)), replicated)
  batch = jax.device_put(images, split), jax.device_put(labels, split)
  start = time.perf_counter()
  step = jax.jit(train_step(model, optimizer), in_shardings=(replicated,) * 3 + (split, split),
                 out_shardings=(replicated,) * 4, donate_argnums=(0, 1, 2),
                 compiler_options=xla_options.compiler_options())
  lowered = step.lower(*state, *batch)
  flops = throughput.device_flops(lowered, mesh.size)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  barrier = sharding.program_barrier(mesh)  # multi-device CPU programs must not overlap

  def run_round(num_steps=sizes.steps):
    current = jax.block_until_ready(jax.tree.map(jnp.copy, state))  # donated by the step
    begin, loss = time.perf_counter(), None
    for _ in range(num_steps):
      *current, loss = barrier(compiled(*current, *batch))
    jax.block_until_ready((current, loss))
    return (time.perf_counter() - begin) / num_steps, loss

  loss = float(run_round(1)[1])
  seconds = _best(lambda: run_round()[0], sizes.rounds, sizes.warmup)
  return seconds, flops, compile_seconds, loss


def _jax_inference(model, variables, images, mesh: Mesh, sizes: Sizes):
  """(seconds per batch, FLOPs per device, compile seconds, logits) of the eval-mode forward pass over `mesh`."""
  replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  placed, inputs = jax.device_put(variables, replicated), jax.device_put(images, split)
  start = time.perf_counter()
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0], in_shardings=(replicated, split),
                    out_shardings=split, compiler_options=xla_options.compiler_options())
  lowered = forward.lower(placed, inputs)
  flops = throughput.device_flops(lowered, mesh.size)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  barrier = sharding.program_barrier(mesh)

  def run_round():
    begin, out = time.perf_counter(), None
    for _ in range(sizes.steps):
      out = barrier(compiled(placed, inputs))
    jax.block_until_ready(out)
    return (time.perf_counter() - begin) / sizes.steps

  logits = np.asarray(compiled(placed, inputs), np.float32)
  seconds = _best(run_round, sizes.rounds, sizes.warmup)
  return seconds, flops, compile_seconds, logits


# ----------------------------------------------------------------------------------------------
# PyTorch: the same network and weights, eager and compiled, on one device.


def _has_twin(name: str) -> bool:
  """Whether `experiments/torch_references.py` writes backbone `name` in PyTorch."""
  entry = models.BACKBONES.get(name)
  return isinstance(entry, functools.partial) and entry.func in torch_references._BUILDERS  # pylint: disable=protected-access


def _torch_reason(torch, platform: str) -> str | None:
  """Why PyTorch cannot run on `platform` here (`torch`: the module, or why it is not importable), or None."""
  if isinstance(torch, str):
    return torch
  if platform == 'tpu':
    return 'the PyTorch reference runs on CUDA or the CPU, not TPU'
  if platform == 'gpu' and not torch.cuda.is_available():
    return f'torch {torch.__version__} has no CUDA device'
  return None


class _TorchNetwork:
  """A network's PyTorch twin on the benchmark's device, with its initial state and inputs."""

  def __init__(self, torch, network: Network, variables, images, labels, *, platform: str, classes: int,
               memory_format: str):
    self.torch, self.network = torch, network
    self.device = 'cuda' if platform == 'gpu' else 'cpu'
    self.sync = torch.cuda.synchronize if self.device == 'cuda' else (lambda: None)
    if self.device == 'cuda':
      torch.backends.cudnn.benchmark = True
      torch.set_float32_matmul_precision('high')  # TF32, as JAX's default precision on NVIDIA
    self.model = torch_references.torch_classifier(torch, network.name, classes)
    torch_references.load_torch_weights(torch, self.model, variables)
    self.model.to(self.device)
    channels_last = memory_format == 'channels_last' or (memory_format == 'auto' and self.device == 'cuda')
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model.to(memory_format=self.memory_format)
    self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    self.images = nchw.to(self.device).contiguous(memory_format=self.memory_format)
    self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
    self.parameters = sum(p.numel() for p in self.model.parameters())
    self.compiled = None

  def runner(self, mode: str):
    if mode == 'eager':
      return self.model
    if self.compiled is None:
      self.compiled = self.torch.compile(self.model)  # shares the parameters; train / eval compiled as called
    return self.compiled

  def autocast(self):
    return self.torch.autocast(device_type=self.device, dtype=self.torch.bfloat16,
                               enabled=self.network.dtype == 'bfloat16')

  def train(self, mode: str, sizes: Sizes):
    """(seconds per step, seconds of the first step, step-1 loss)."""
    torch, runner = self.torch, self.runner(mode)
    images, labels = self.images[:self.network.batch], self.labels

    def run_round(num_steps=sizes.steps):
      self.model.load_state_dict(self.initial)
      self.model.train()
      optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
      self.sync()
      begin, loss = time.perf_counter(), None
      for _ in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
          logits = runner(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
      self.sync()
      return (time.perf_counter() - begin) / num_steps, loss

    first, loss = run_round(1)  # compiles under torch.compile
    loss = float(loss.item())
    seconds = _best(lambda: run_round()[0], sizes.rounds, sizes.warmup)
    self.model.load_state_dict(self.initial)
    return seconds, first, loss

  def inference(self, mode: str, sizes: Sizes):
    """(seconds per batch, seconds of the first call, eval logits)."""
    torch, runner = self.torch, self.runner(mode)
    images = self.images[:sizes.inference_batch]
    self.model.load_state_dict(self.initial)
    self.model.eval()

    def call():
      with torch.inference_mode(), self.autocast():
        return runner(images)

    def run_round():
      self.sync()
      begin = time.perf_counter()
      for _ in range(sizes.steps):
        call()
      self.sync()
      return (time.perf_counter() - begin) / sizes.steps

    begin = time.perf_counter()
    logits = call().float().cpu().numpy()
    first = time.perf_counter() - begin
    return _best(run_round, sizes.rounds, sizes.warmup), first, logits


# ----------------------------------------------------------------------------------------------
# The rows of one network.


def _failure(error: Exception) -> str:
  """A table cell for a row that raised `error` (its first line: a cell holds no line break)."""
  message = str(error).strip().splitlines()
  return f'failed: {type(error).__name__}: {message[0] if message else ""}'[:300]


def _guarded(row, fn: Callable[[], None]):
  """Runs `fn` (which fills `row`); an exception marks the row failed, with its traceback on stderr."""
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except  (one failed row must not end a time-limited run)
    traceback.print_exc()
    row.passed, row.check = False, _failure(e)
    if isinstance(row, Row):
      row.seconds = None
  return row


# Rank of each framework's row within a network's rows of a table.
_FRAMEWORKS = ('ood_jax', 'PyTorch eager', 'PyTorch torch.compile', 'PyTorch')


class _NetworkBench:
  """One network's model, weights, data and PyTorch twin, and the rows that time them."""

  def __init__(self, network: Network, index: int, *, sizes: Sizes, platform: str, peak_tflops: float | None,
               torch_modes: Sequence[str], torch_memory_format: str, seed: int):
    self.network, self.index, self.sizes, self.platform = network, index, sizes, platform
    self.torch_memory_format = torch_memory_format
    self.model = models.make_classifier(network.name, 'dense', sizes.classes, dtype=DTYPES[network.dtype])
    image_shape = IMAGE_SHAPES.get(network.name, (32, 32, 3))
    rng = np.random.default_rng(seed)
    self.variables = random_variables(self.model, image_shape, seed)
    self.images = rng.standard_normal((max(network.batch, sizes.inference_batch), *image_shape), np.float32)
    self.labels = rng.integers(0, sizes.classes, network.batch).astype(np.int32)
    self.parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(self.variables['params']))
    self.local = jax.local_devices()
    self.peak = throughput.peak_flops(self.local[0], network.dtype, override_tflops=peak_tflops)
    self.tolerance = TORCH_TOLERANCE[network.dtype]
    self.references = {}  # section → the one-device ood_jax row, which the others are checked against
    self.torch, self.torch_reason, self.twin = None, None, None
    if not torch_modes:
      pass
    elif not _has_twin(network.name):
      self.torch_reason = f'no PyTorch twin of {network.name} in experiments/torch_references.py'
    else:
      self.torch = _optional('torch')
      self.torch_reason = _torch_reason(self.torch, platform)

  def _row(self, section: str, framework: str, devices: int, rank: int) -> Row:
    items = self.network.batch if section == 'train' else self.sizes.inference_batch
    return Row(section, self.network.label, devices, framework, items=items, peak=self.peak,
               order=(self.index, _FRAMEWORKS.index(framework), rank))

  def _compare(self, row: Row, ok: bool, text: str, label: str) -> None:
    """Checks `row.result` against the one-device ood_jax row's, when there is one; sets the check."""
    reference = self.references.get(row.section)
    if reference is not None and reference is not row and reference.result is not None:
      delta = _relative(row.result, reference.result)
      ok = ok and delta <= self.tolerance
      text += f'{label} Δ {delta:.0e} (≤ {self.tolerance:.0e})'
    row.check, row.passed = f'{_mark(ok)} {text}', ok

  def jax_row(self, section: str, choice: str, budget: _Budget) -> Row:
    count = 1 if choice == 'one' else len(self.local)
    row = self._row(section, 'ood_jax', count, DEVICES.index(choice))
    if choice == 'one':
      self.references[section] = row
    if choice == 'all' and len(self.local) == 1:
      row.check = 'skipped: one local device (the one-device row)'
    elif row.items % count:
      row.check = f'skipped: {row.items} images do not split over {count} devices'
    elif budget.spent():
      row.check = f'skipped: {budget.reason()}'
    else:

      def fill():
        mesh = sharding.make_mesh(self.local[:count])
        images = self.images[:row.items]
        if section == 'train':
          row.seconds, row.flops, row.compile_seconds, row.result = _jax_train(self.model, self.variables, images,
                                                                               self.labels, mesh, self.sizes)
          ok, text = math.isfinite(row.result), f'step-1 loss {row.result:.4f}'
        else:
          row.seconds, row.flops, row.compile_seconds, row.result = _jax_inference(self.model, self.variables,
                                                                                   images, mesh, self.sizes)
          ok = bool(np.all(np.isfinite(row.result)))
          text = f'eval logits {"finite" if ok else "not finite"}'
        self._compare(row, ok, text, '; vs 1 device:')

      _guarded(row, fill)
    return row

  def torch_row(self, section: str, mode: str, budget: _Budget) -> Row:
    row = self._row(section, 'PyTorch eager' if mode == 'eager' else 'PyTorch torch.compile', 1, 0)
    if self.torch_reason is not None:
      row.devices, row.check = 0, f'skipped: {self.torch_reason}'
      return row
    if budget.spent():
      row.check = f'skipped: {budget.reason()}'
      return row

    def fill():
      if self.twin is None:
        self.twin = _TorchNetwork(self.torch, self.network, self.variables, self.images, self.labels,
                                  platform=self.platform, classes=self.sizes.classes,
                                  memory_format=self.torch_memory_format)
      if section == 'train':
        row.seconds, row.compile_seconds, row.result = self.twin.train(mode, self.sizes)
      else:
        row.seconds, row.compile_seconds, row.result = self.twin.inference(mode, self.sizes)
      # Model FLOPs are the network's: XLA's count of the same program on one device.
      reference = self.references.get(section)
      row.flops = None if reference is None else reference.flops
      ok = self.twin.parameters == self.parameters
      text = f'params {self.twin.parameters:,} {"=" if ok else "≠"} {self.parameters:,}'
      self._compare(row, ok, text, ', step-1 loss' if section == 'train' else ', eval logits')

    return _guarded(row, fill)

  def ddp_row(self, section: str) -> Row:
    row = self._row(section, 'PyTorch', 0, 0)
    row.check = 'skipped: PyTorch data parallelism (DDP) needs a process per device; not run here'
    return row

  def release(self) -> None:
    """Frees the PyTorch twin's GPU memory."""
    if self.twin is not None and self.twin.device == 'cuda':
      self.twin = None
      gc.collect()
      self.torch.cuda.empty_cache()


def _network_jobs(benches: Sequence[_NetworkBench], sections: Sequence[str], devices: Sequence[str],
                  torch_modes: Sequence[str], budget: _Budget) -> list[Callable[[], Row]]:
  """The rows' jobs in run order: first every network's ood_jax and eager PyTorch rows, network by network
  (training, then inference), then the torch.compile rows, whose compilation takes longest: a run cut short by
  its time budget loses those first."""
  phases = ([mode for mode in torch_modes if mode == 'eager'], [mode for mode in torch_modes if mode != 'eager'])
  jobs = []
  for phase, modes in enumerate(phases):
    for bench in benches:
      for section in (s for s in ('train', 'inference') if s in sections):
        if phase == 0:
          jobs += [functools.partial(bench.jax_row, section, choice, budget) for choice in devices]
        jobs += [functools.partial(bench.torch_row, section, mode, budget) for mode in modes]
        if phase == 1 and 'all' in devices and len(bench.local) > 1 and torch_modes:
          jobs.append(functools.partial(bench.ddp_row, section))
  return jobs


# ----------------------------------------------------------------------------------------------
# Detectors.


def detector_rows(names: Sequence[str], *, sizes: Sizes, budget: _Budget, seed: int,
                  emit: Callable[[DetectorRow], None]) -> None:
  n, d, k = sizes.train_rows, sizes.dim, sizes.classes
  batches, test, head = benchmark_detectors.make_data(n, d, k, sizes.test_rows, sizes.fit_batch, seed=seed)
  baselines = benchmark_detectors.baselines(batches, test, head, k, d)
  logits, features = jax.device_put(test['logits']), jax.device_put(test['features'])
  for name in names:
    row = DetectorRow(name, rows=sizes.test_rows)
    if budget.spent():
      row.check = f'skipped: {budget.reason()}'
      emit(row)
      continue

    def fill(row=row, name=name):
      det = detectors.get(name)
      start = time.perf_counter()
      state = jax.block_until_ready(det.fit(batches, head=head, num_classes=k))
      row.fit = time.perf_counter() - start
      score = jax.jit(lambda s, z, h, det=det: det.score(s, {'logits': z, 'features': h}))
      out = np.asarray(score(state, logits, features), np.float64)  # compiles

      def once():
        begin = time.perf_counter()
        jax.block_until_ready(score(state, logits, features))
        return time.perf_counter() - begin

      row.score = min(once() for _ in range(sizes.detector_rounds))
      start = time.perf_counter()
      reference = np.asarray(baselines[name](), np.float64)
      row.baseline = time.perf_counter() - start
      row.delta = float(np.max(np.abs(out - reference)) / max(np.ptp(reference), 1e-12))
      row.passed = row.delta <= DETECTOR_TOLERANCE
      row.check = f'{_mark(row.passed)} max |Δ| / score range {row.delta:.1e} (≤ {DETECTOR_TOLERANCE:.0e})'

    emit(_guarded(row, fill))


# ----------------------------------------------------------------------------------------------
# The run.


def run(sections: Sequence[str] = SECTIONS, *, quick: bool = False, platform: str | None = None,
        devices: Sequence[str] = ('one', 'all'), torch_modes: Sequence[str] = TORCH_MODES,
        networks: Sequence[Network | str] | None = None, detector_names: Sequence[str] = DETECTORS,
        rounds: int | None = None, steps: int | None = None, peak_tflops: float | None = None,
        time_budget: float | None = None, torch_memory_format: str = 'auto', seed: int = 0,
        on_row: Callable[[list], None] | None = None) -> list:
  """Runs the benchmark and returns its rows (`Row`s, then `DetectorRow`s), in the order of the tables.

  Args:
    sections: of `SECTIONS`.
    quick: the `QUICK` sizes and network, a smoke test.
    platform: 'cpu', 'gpu' or 'tpu': the default networks and sizes, and where PyTorch runs. Default: JAX's
      default backend (this does not switch JAX's platform; `main` does, before JAX starts).
    devices: of `DEVICES`: one device, and / or every local device.
    torch_modes: of `TORCH_MODES` ('eager', 'compile'); empty: no PyTorch rows.
    networks: `Network`s or 'name:batch:dtype' strings; default: the platform's.
    detector_names: detectors of the detectors section, of `DETECTORS`.
    rounds: timing rounds of every row. steps: calls per round.
    peak_tflops: the device's peak for MFU where `ood_jax.trainer.throughput`'s table does not list it.
    time_budget: seconds after which rows that have not started are skipped (None: no limit).
    torch_memory_format: 'auto' (channels-last on CUDA), 'channels_last' or 'contiguous'.
    seed: of the synthetic data and weights.
    on_row: called with the rows so far (in run order) after each row.

  Raises:
    ValueError: for an unknown section, device choice, PyTorch mode, network, detector or memory format.
  """
  for name, given, valid in (('sections', sections, SECTIONS), ('devices', devices, DEVICES),
                             ('torch modes', torch_modes, TORCH_MODES), ('detectors', detector_names, DETECTORS)):
    unknown = sorted(set(given) - set(valid))
    if unknown:
      raise ValueError(f'unknown {name} {unknown}; valid: {", ".join(valid)}.')
  if torch_memory_format not in ('auto', 'channels_last', 'contiguous'):
    raise ValueError(f"torch_memory_format must be 'auto', 'channels_last' or 'contiguous', got "
                     f'{torch_memory_format!r}.')
  if peak_tflops is not None:
    throughput.check_peak_tflops(peak_tflops)
  platform = platform or jax.default_backend()
  if quick:
    sizes, default_networks = QUICK, QUICK_NETWORKS
  elif platform == 'cpu':
    sizes, default_networks = CPU, CPU_NETWORKS
  else:
    sizes, default_networks = ACCELERATOR, ACCELERATOR_NETWORKS
  if rounds is not None:
    sizes = dataclasses.replace(sizes, rounds=rounds, detector_rounds=rounds)
  if steps is not None:
    sizes = dataclasses.replace(sizes, steps=steps)
  chosen = tuple(parse_network(n) if isinstance(n, str) else n for n in (networks or default_networks))
  budget = _Budget(time_budget)
  done = []

  def emit(row):
    done.append(row)
    if on_row is not None:
      on_row(list(done))

  if 'detectors' in sections:
    detector_rows(list(dict.fromkeys(detector_names)), sizes=sizes, budget=budget, seed=seed, emit=emit)
  torch_modes = list(dict.fromkeys(torch_modes))
  if {'train', 'inference'} & set(sections):
    benches = [_NetworkBench(network, index, sizes=sizes, platform=platform, peak_tflops=peak_tflops,
                             torch_modes=torch_modes, torch_memory_format=torch_memory_format, seed=seed + index)
               for index, network in enumerate(dict.fromkeys(chosen))]
    for job in _network_jobs(benches, sections, list(dict.fromkeys(devices)), torch_modes, budget):
      emit(job())
    for bench in benches:
      bench.release()
  return ordered(done)


def ordered(rows: Sequence) -> list:
  """Rows in the order of the tables: training, inference, detectors; by network, framework and devices within."""
  rank = lambda row: (SECTIONS.index(row.section), row.order) if isinstance(row, Row) else (len(SECTIONS), ())
  return sorted(rows, key=rank)


# ----------------------------------------------------------------------------------------------
# The report.


def _versions() -> str:
  names = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'libtpu', 'flax', 'optax', 'numpy', 'scipy',
           'scikit-learn', 'torch', 'triton', 'faiss-cpu', 'faiss-gpu')
  found = []
  for name in names:
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      continue
  torch = sys.modules.get('torch')
  if torch is not None and getattr(torch.version, 'cuda', None):
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found.append(f'torch CUDA {torch.version.cuda}, cuDNN {cudnn}')
  return f'Python {platform_lib.python_version()}, ' + ', '.join(found)


def header(command: str, seconds: float | None = None, finished: bool = True) -> str:
  """The lines above the tables: status, command, devices, host and versions."""
  local = jax.local_devices()
  kinds = ', '.join(dict.fromkeys(d.device_kind for d in local))
  cpu = platform_lib.processor() or platform_lib.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  if not finished:
    status = 'in progress or stopped before the end: the rows so far'
  else:
    status = 'complete' if seconds is None else f'complete in {seconds:.0f} s'
  date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  return '\n'.join([
      '# Accelerator benchmark',
      '',
      f'- Run: {date}, {status}.',
      f'- Command: `{command}`',
      f'- Devices: {len(local)} × {kinds} (platform {local[0].platform}); host CPU: {cpu}, '
      f'{os.cpu_count()} threads.',
      f'- Versions: {_versions()}.',
      f'- XLA_FLAGS: `{os.environ.get("XLA_FLAGS", "")}`; XLA_PYTHON_CLIENT_MEM_FRACTION: '
      f'`{os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")}`; ood_jax {ood_jax.__version__}.',
  ])


def _number(value: float | None, digits: str) -> str:
  return '—' if value is None else format(value, digits)


def _gflop(flops: float | None) -> str:
  if flops is None:
    return '—'
  return f'{flops / 1e9:,.1f}' if flops >= 1e9 else f'{flops / 1e9:.2g}'


def tables(rows: Sequence) -> str:
  """The markdown tables of `rows` (train, inference, detectors: those that have rows)."""
  out = []
  for section, title, unit in (('train', 'Training step', 'ms/step'), ('inference', 'Inference', 'ms/batch')):
    lines = [row for row in rows if isinstance(row, Row) and row.section == section]
    if not lines:
      continue
    out += [f'## {title}', '', f'| network | devices | framework | img/s | {unit} | GFLOP/device | MFU | compile s | '
            'check |', '|---|---:|---|---:|---:|---:|---:|---:|---|']
    for row in lines:
      cells = [row.network, str(row.devices) if row.devices else '—', row.framework,
               _number(row.images_per_sec, ',.0f'), _number(None if row.seconds is None else 1e3 * row.seconds, '.2f'),
               _gflop(row.flops),
               '—' if row.mfu is None else f'{100 * row.mfu:.1f} %', _number(row.compile_seconds, '.1f'), row.check]
      out.append('| ' + ' | '.join(cell.replace('|', '\\|') for cell in cells) + ' |')
    out.append('')
  lines = [row for row in rows if isinstance(row, DetectorRow)]
  if lines:
    out += ['## Detectors', '', '| detector | fit s | score s | test rows/s | NumPy float64 s | check |',
            '|---|---:|---:|---:|---:|---|']
    for row in lines:
      rate = None if not row.score else row.rows / row.score
      cells = [row.detector, _number(row.fit, '.2f'), _number(row.score, '.4f'), _number(rate, ',.0f'),
               _number(row.baseline, '.2f'), row.check]
      out.append('| ' + ' | '.join(cell.replace('|', '\\|') for cell in cells) + ' |')
    out.append('')
  return '\n'.join(out)


# How to read the tables; printed under the header, so that a written report explains itself.
LEGEND = (
    'Written by `experiments/benchmark_accelerator.py` (`bash experiments/run_accelerator_benchmark.sh`); what it '
    'measures and how: its docstring and [Performance](performance.md). img/s and ms: the best of the rounds, '
    "each from the initial state. GFLOP/device: XLA's count of the lowered program (the global batch) / the devices; "
    "PyTorch rows use the count of the same network on one device. MFU: GFLOP/device × calls/s / the device's "
    "dense peak at the dtype (`ood_jax.trainer.throughput`; TF32 for float32 on NVIDIA). compile s: XLA's "
    "compilation; for PyTorch the first call (torch.compile's compilation; eager: cuDNN's autotuning). check: "
    'the all-device program against the one-device one, PyTorch against ood_jax from the same weights, the '
    'detectors against NumPy float64 (score range); a skipped row says why.')


def report(rows: Sequence, command: str, seconds: float | None = None, finished: bool = True) -> str:
  """The markdown report: header, legend and tables."""
  return header(command, seconds, finished) + '\n\n' + LEGEND + '\n\n' + tables(ordered(rows))


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.platform:
    jax.config.update('jax_platforms', FLAGS.platform)
  # Half of the GPU for JAX (instead of 75 %), the rest for PyTorch's allocator. Read when the backend starts.
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
  command = 'python -m experiments.benchmark_accelerator ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  start = time.perf_counter()

  def write(rows, finished=False):
    if FLAGS.output:
      pathlib.Path(FLAGS.output).write_text(report(rows, command.strip(), time.perf_counter() - start, finished) + '\n',
                                            encoding='utf-8')

  def on_row(rows):
    row = rows[-1]
    name = row.detector if isinstance(row, DetectorRow) else f'{row.section} {row.network} {row.framework} ' \
                                                              f'{row.devices} dev'
    print(f'[{time.perf_counter() - start:6.0f} s] {name}: {row.check}', flush=True)
    write(rows)

  try:
    rows = run(FLAGS.sections, quick=FLAGS.quick, platform=FLAGS.platform, devices=FLAGS.devices,
               torch_modes=FLAGS.torch, networks=FLAGS.networks or None, detector_names=FLAGS.detectors,
               rounds=FLAGS.rounds, steps=FLAGS.steps, peak_tflops=FLAGS.peak_tflops, time_budget=FLAGS.time_budget,
               torch_memory_format=FLAGS.torch_memory_format, on_row=on_row)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  text = report(rows, command.strip(), time.perf_counter() - start, finished=True)
  print(text)
  write(rows, finished=True)
  if any(row.passed is False for row in rows):
    raise SystemExit('a row failed or a check did not hold (✗ / failed above)')


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_enum('platform', None, ['cpu', 'gpu', 'tpu'], "JAX platform (default: JAX's default backend).")
  flags.DEFINE_list('sections', list(SECTIONS), f'Sections to run, of {",".join(SECTIONS)}.')
  flags.DEFINE_list('devices', list(DEVICES), 'one: one device; all: data-parallel over every local device.')
  flags.DEFINE_list('torch', list(TORCH_MODES), 'PyTorch rows: eager, compile (torch.compile); empty for none.')
  flags.DEFINE_list('networks', [], "name:batch:dtype of each network (default: the platform's, see the docstring).")
  flags.DEFINE_list('detectors', list(DETECTORS), f'Detectors of the detectors section, of {",".join(DETECTORS)}.')
  flags.DEFINE_bool('quick', False, 'Tiny sizes and one call per row: a smoke test, not a measurement.')
  flags.DEFINE_integer('rounds', None, 'Timing rounds of every row (default 5; 3 on CPU).', lower_bound=1)
  flags.DEFINE_integer('steps', None, 'Calls per timing round (default 10; 3 on CPU).', lower_bound=1)
  flags.DEFINE_float('peak_tflops', None, "The device's dense peak TFLOP/s, for MFU on a chip the table lacks.")
  flags.DEFINE_float('time_budget', None, 'Seconds after which rows not yet started are skipped.')
  flags.DEFINE_enum('torch_memory_format', 'auto', ['auto', 'channels_last', 'contiguous'],
                    'PyTorch memory format (auto: channels-last on CUDA, NCHW on the CPU).')
  flags.DEFINE_string('output', None, 'Write the report (markdown) here, rewritten after every row.')
  app.run(main)
