"""experiments.benchmark_accelerator at --quick sizes on the tests' 8 CPU devices: one device and all of them.

What is checked against something independent: the timed training step's first loss and the timed eval logits
against the model applied eagerly with a NumPy float64 cross-entropy, the 8-device programs against the one-device
ones, the FLOPs per device against the one-device count / 8, and the detectors against the NumPy float64
baselines (inside the run). Timings are not asserted, only that they are real numbers.
"""

import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from experiments import benchmark_accelerator as bench
from ood_jax import models

REPO = pathlib.Path(__file__).resolve().parents[2]


def _installed(name):
  try:
    __import__(name)
  except ImportError:
    return False
  return True


@pytest.fixture(scope='module')
def quick_rows():
  return bench.run(quick=True, peak_tflops=1.0)


def _row(rows, section, framework, devices):
  found = [r for r in rows if isinstance(r, bench.Row) and r.section == section and r.framework == framework
           and r.devices == devices]
  assert len(found) == 1, (section, framework, devices, rows)
  return found[0]


def _eager_reference(network, seed=0):
  """The quick network's step-1 loss (float64 cross-entropy) and eval logits, from the same weights and images."""
  model = models.make_classifier(network.name, 'dense', bench.QUICK.classes, dtype=bench.DTYPES[network.dtype])
  shape = bench.IMAGE_SHAPES[network.name]
  variables = bench.random_variables(model, shape, seed)
  rng = np.random.default_rng(seed)  # the run draws its images and labels so
  images = rng.standard_normal((max(network.batch, bench.QUICK.inference_batch), *shape), np.float32)
  labels = rng.integers(0, bench.QUICK.classes, network.batch)
  # Jitted whole (eagerly, each operation would compile on its own), but not the benchmark's programs.
  train_logits = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0][0])(
      variables, images[:network.batch])
  z = np.asarray(train_logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  loss = -np.mean(log_softmax[np.arange(network.batch), labels])
  eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(variables,
                                                                       images[:bench.QUICK.inference_batch])
  eval_logits = np.asarray(eval_logits, np.float64)
  return loss, eval_logits


def test_quick_run_trains_and_infers_on_one_and_on_all_devices(quick_rows):
  network = bench.QUICK_NETWORKS[0]
  loss, logits = _eager_reference(network)
  for section in ('train', 'inference'):
    one, every = _row(quick_rows, section, 'ood_jax', 1), _row(quick_rows, section, 'ood_jax', 8)
    for row in (one, every):
      assert row.passed is True and row.check.startswith('✓'), row
      assert row.seconds > 0 and math.isfinite(row.images_per_sec) and row.compile_seconds > 0, row
      assert row.items == (network.batch if section == 'train' else bench.QUICK.inference_batch)
      # MFU = FLOPs per device × calls/s / peak, the peak given in TFLOP/s.
      assert row.mfu == pytest.approx(row.flops / row.seconds / 1e12, rel=1e-9)
    # XLA counts the whole (global-batch) program; each of the 8 devices does an eighth.
    assert every.flops == pytest.approx(one.flops / 8, rel=1e-6) and one.flops > 0
    if section == 'train':
      np.testing.assert_allclose([one.result, every.result], loss, rtol=1e-5)
    else:
      np.testing.assert_allclose(one.result, logits, rtol=1e-4, atol=1e-5 * np.abs(logits).max())
      np.testing.assert_allclose(every.result, logits, rtol=1e-4, atol=1e-5 * np.abs(logits).max())
    torch_rows = [r for r in quick_rows if isinstance(r, bench.Row) and r.section == section
                  and r.framework.startswith('PyTorch')]
    assert [r.framework for r in torch_rows] == ['PyTorch eager', 'PyTorch torch.compile', 'PyTorch']
    assert all(r.seconds is None and r.passed is None for r in torch_rows)
    assert 'no PyTorch twin of digits_cnn' in torch_rows[0].check and 'DDP' in torch_rows[2].check


def test_quick_run_fits_and_scores_the_detectors_like_numpy(quick_rows):
  rows = [r for r in quick_rows if isinstance(r, bench.DetectorRow)]
  assert [r.detector for r in rows] == list(bench.DETECTORS)
  for row in rows:
    assert row.passed is True and row.delta <= bench.DETECTOR_TOLERANCE, row
    assert row.fit > 0 and row.score > 0 and row.baseline > 0 and row.rows == bench.QUICK.test_rows, row


def test_report_has_the_device_versions_command_and_three_tables(quick_rows):
  text = bench.report(quick_rows, 'python -m experiments.benchmark_accelerator --quick', 12.0)
  assert text.startswith('# Accelerator benchmark\n')
  assert 'complete in 12 s' in text and '`python -m experiments.benchmark_accelerator --quick`' in text
  assert '8 × cpu (platform cpu)' in text and f'jax {jax.__version__}' in text
  sections = text.split('\n## ')[1:]
  assert [s.splitlines()[0] for s in sections] == ['Training step', 'Inference', 'Detectors']
  train_table = [line for line in sections[0].splitlines() if line.startswith('|')]
  assert len(train_table) == 2 + 5 and all(line.count(' | ') == 8 for line in train_table if '---' not in line)
  assert '| digits_cnn b8 float32 | 8 | ood_jax |' in sections[0] and ' %' in sections[0]  # MFU with the given peak
  assert 'in progress' in bench.report(quick_rows[:1], 'x', 1.0, finished=False)


def test_rows_skip_with_a_reason_when_out_of_time_or_when_the_batch_does_not_split():
  rows = bench.run(('train', 'inference', 'detectors'), quick=True, time_budget=0.0, torch_modes=())
  assert rows and all(r.passed is None and 'time budget of 0 s spent' in r.check for r in rows), rows
  rows = bench.run(('train',), quick=True, devices=('all',), networks=['digits_cnn:6:float32'], torch_modes=())
  assert len(rows) == 1 and rows[0].check == 'skipped: 6 images do not split over 8 devices', rows


@pytest.mark.parametrize('kwargs, message', [
    ({'sections': ('train', 'sorting')}, r"unknown sections \['sorting'\]"),
    ({'devices': ('one', 'two')}, r"unknown devices \['two'\]; valid: one, all"),
    ({'torch_modes': ('jit',)}, r"unknown torch modes \['jit'\]"),
    ({'detector_names': ('odin',)}, r"unknown detectors \['odin'\]"),
    ({'networks': ['resnet18:512']}, 'networks are name:batch:dtype'),
    ({'networks': ['vgg16:512:float32']}, "unknown network 'vgg16'"),
    ({'networks': ['resnet18:0:float32']}, 'must be a positive integer'),
    ({'networks': ['resnet18:512:float16']}, "unknown dtype 'float16'"),
    ({'torch_memory_format': 'nhwc'}, 'torch_memory_format must be'),
    ({'peak_tflops': -1.0}, 'peak_tflops must be a positive number'),
])
def test_bad_arguments_are_errors_before_any_work(kwargs, message):
  with pytest.raises(ValueError, match=message):
    bench.run(quick=True, **kwargs)


def test_pytorch_is_skipped_where_it_has_no_device():
  no_cuda = types.SimpleNamespace(__version__='9.9', cuda=types.SimpleNamespace(is_available=lambda: False))
  assert bench._torch_reason(no_cuda, 'gpu') == 'torch 9.9 has no CUDA device'
  assert 'not TPU' in bench._torch_reason(no_cuda, 'tpu')
  assert bench._torch_reason(no_cuda, 'cpu') is None
  assert bench._torch_reason('torch is not importable (x)', 'gpu') == 'torch is not importable (x)'


def test_a_failing_row_is_reported_and_the_run_goes_on():
  def fail():
    raise RuntimeError('out of memory\nwhile allocating')

  row = bench._guarded(bench.Row('train', 'x', 1, 'ood_jax', seconds=1.0), fail)
  assert row.passed is False and row.seconds is None and row.check == 'failed: RuntimeError: out of memory', row


def test_trainer_modules_load_without_the_trainer_extra(monkeypatch):
  real = bench.importlib.import_module

  def without_trainer(name, *args):
    if name.startswith('ood_jax.trainer'):
      raise ModuleNotFoundError("ood_jax.trainer needs the 'train' extra")
    return real(name, *args)

  monkeypatch.setattr(bench.importlib, 'import_module', without_trainer)
  module = bench._trainer_module('throughput')
  assert module.__name__ == '_ood_jax_trainer_throughput' and module is not bench.throughput
  device = types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3')
  assert module.peak_flops(device, 'bfloat16') == bench.throughput.peak_flops(device, 'bfloat16') == 989.4e12


def test_torch_compile_rows_run_last_so_that_a_time_budget_cuts_them_first():
  class FakeBench:
    local = [0, 1]

    def __init__(self, name):
      self.name = name
      self.jax_row = lambda section, choice, budget: f'{self.name} {section} ood_jax {choice}'
      self.torch_row = lambda section, mode, budget: f'{self.name} {section} torch {mode}'
      self.ddp_row = lambda section: f'{self.name} {section} ddp'

  jobs = bench._network_jobs([FakeBench('a'), FakeBench('b')], ('train', 'inference'), ('one', 'all'),
                             ('eager', 'compile'), None)
  order = [job() for job in jobs]
  first = [f'{n} {s} {what}' for n in 'ab' for s in ('train', 'inference')
           for what in ('ood_jax one', 'ood_jax all', 'torch eager')]
  assert order == first + [f'{n} {s} {what}' for n in 'ab' for s in ('train', 'inference')
                           for what in ('torch compile', 'ddp')]


def test_default_networks_are_the_cifar_ones_at_the_batches_people_train_with():
  labels = [network.label for network in bench.ACCELERATOR_NETWORKS]
  assert labels == ['resnet18 b512 bfloat16', 'resnet18 b512 float32', 'wrn28_10 b128 bfloat16',
                    'wrn28_10 b128 float32']


@pytest.mark.skipif(not _installed('torch'), reason='the PyTorch rows need torch')
def test_quick_pytorch_rows_agree_with_ood_jax():
  rows = bench.run(('train', 'inference'), quick=True, devices=('one',), torch_modes=('eager',),
                   networks=['resnet20:8:float32'])
  eager = [r for r in rows if r.framework == 'PyTorch eager']
  assert len(eager) == 2
  for row in eager:
    assert row.passed is True and row.check.startswith('✓ params') and row.seconds > 0, row


@pytest.mark.skipif(not _installed('sklearn'), reason='the detector baselines use scikit-learn')
def test_one_shot_script_writes_the_report(tmp_path):
  output = tmp_path / 'benchmark_accelerator.md'
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu', 'PLATFORM': 'cpu', 'OUTPUT': str(output),
         'PYTHON': sys.executable}
  result = subprocess.run(['bash', 'experiments/run_accelerator_benchmark.sh', '--quick', '--sections=detectors',
                           '--detectors=react'], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  text = output.read_text()
  assert text.startswith('# Accelerator benchmark') and 'complete in' in text, text
  assert '--platform=cpu' in text and '--time_budget=' in text and '| react |' in text and '✓' in text, text
