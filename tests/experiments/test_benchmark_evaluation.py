"""experiments.benchmark_evaluation --smoke: both scales run, the repeated call compiles nothing, the NumPy float64
baseline agrees. Timings are not asserted (tiny sizes, shared machine); only that they are numbers."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
_CALL = re.compile(r'^  evaluate_detectors: (\d+) XLA compilations \(([\d.]+) s compiling\), ([\d.]+) s '
                   r'\((\d+) detectors, (\d+) tuned, (\d+) failed\)$')
_AGAIN = re.compile(r'^  again, same process: (\d+) XLA compilations \(([\d.]+) s compiling\), ([\d.]+) s$')
_ROW = re.compile(r'^  \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)× \| ([\d.e+-]+) \|$')


def test_smoke_run_prints_both_scales_and_the_baseline():
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  run = subprocess.run([sys.executable, '-m', 'experiments.benchmark_evaluation', '--smoke'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.splitlines()
  headers = [line for line in lines if re.match(r'^(digits|cifar) \(synthetic', line)]
  assert [h.split()[0] for h in headers] == ['digits', 'cifar'], run.stdout
  calls = [_CALL.match(line) for line in lines if _CALL.match(line)]
  assert len(calls) == 2, run.stdout
  for call in calls:
    compiles, _, _, done, tuned, failed = (int(g) if g.isdigit() else g for g in call.groups())
    assert 0 < compiles <= 60 and done >= 20 and tuned >= 10 and failed <= 1, call.group(0)
  again = [_AGAIN.match(line) for line in lines if _AGAIN.match(line)]
  assert [int(m.group(1)) for m in again] == [0, 0], run.stdout  # kernels are reused by a second run
  rows = {m.group(1): m.groups()[1:] for m in map(_ROW.match, lines) if m}
  assert sorted(rows) == sorted(('msp', 'energy', 'mahalanobis', 'knn', 'vim', 'react')), run.stdout
  for name, (ours, numpy, ratio, delta) in rows.items():
    assert float(ours) >= 0 and float(numpy) >= 0 and float(ratio) >= 0, name
    assert float(delta) < 1e-4, (name, delta)  # the same scores as the float64 baseline
