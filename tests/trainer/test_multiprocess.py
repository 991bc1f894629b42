"""Two JAX processes on localhost (`jax.distributed`, gloo CPU collectives) train and evaluate like one.

The test starts two worker processes with 2 fake CPU devices each (a 4-device global mesh),
coordinated through 127.0.0.1 on a free port, and runs `train.train_and_evaluate` (the CLI's path
with --config.distributed=True) on the digits smoke config for 120 steps, with the smoke
evaluation: test set, the 4 digits OOD sets, temperature scaling fitted on the validation split.
The run is interrupted twice:

1. SIGKILL of process 1 after the first checkpoint (process 0 is then killed too, as a scheduler
   restarting the job would);
2. a restart of both resumes from it; a SIGTERM to process 1 alone is propagated by JAX's
   preemption service, both processes save the same sync step and exit with status 75;
3. a restart of both finishes the run and evaluates it, every process feeding the same global
   batches (`inference.run`).

Its state after the first launch and at the end equals a 1-process run over 4 devices with the
same global batch to 2e-4 on every leaf, not bitwise: XLA:CPU's in-process all-reduce and gloo's
cross-process one add the per-device gradients in different orders, a float rounding (1e-8 after
one step) that training grows to ~5e-5 by step 200, as between 1, 2, 4 and 8 devices in one
process. The backbone is the MLP: the CNN's max-pooling turns such rounding into 1e-2 differences
within 16 steps (different devices of one process too), which no tolerance could tell from a bug;
on the MLP a wrong batch order gives 0.5. Bitwise resumption itself is tested in one process
(test_train.py, test_fault_tolerance.py); the processes run the same code.

Each checkpoint is written once: one step folder, its metadata once, the array bytes split between
the processes (orbax writes the slices of replicated arrays from different replicas) and adding up
to those of the 1-process checkpoint; process 0 alone appends to metrics.jsonl.

The evaluation is compared with a 1-process one (this process, 4 devices) of the same final
parameters, the step-120 checkpoint: the feature-cache fingerprint (a hash of the variables) is the
same, the labels of every set are equal, the per-example logits and features agree to 2e-6 of
their largest magnitude (observed 5e-7: a few float32 ulps; the 2-process program, with its
cross-process all-gather, is compiled apart from the 1-process one, and a single-device run differs
from the 4-device one as much), and every number of results.json to 1e-5 (observed 7e-7; the
accuracy and every AUROC are equal). Results are written once: an audit hook in each worker records
the files it writes outside checkpoints/; process 0 writes results.json and results.md once,
process 1 nothing. The workers print their peak RSS (`-s` shows it; docs/fault_tolerance.md has
the numbers).

Run as a script (`python tests/trainer/test_multiprocess.py <workdir>`) this file is the worker.
"""

import json
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import time

from absl import logging
import jax
import numpy as np

from configs import digits as digits_config
from ood_jax.trainer import checkpoint
from ood_jax.trainer import evaluate
from ood_jax.trainer import experiment
from ood_jax.trainer import sharding
from ood_jax.trainer import step as step_lib
from ood_jax.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 120
LOG_EVERY = 15
CHECKPOINT_EVERY = 30
# Largest difference allowed on any leaf (parameters, momentum): the observed one is 5e-5, as
# between 1, 2, 4 and 8 devices of one process (4e-5); batches in a wrong order give 0.5.
TOLERANCE = 2e-4
# The 2-process evaluation against a 1-process one of the same parameters (module docstring):
# largest difference on a per-example output (logits, features), relative to the largest magnitude
# of that array in its set (observed 5e-7: float32 rounding, a few ulps) ...
OUTPUT_TOLERANCE = 2e-6
# ... and on any number of results.json (observed 7e-7 on Intel). A rank metric moves should the rounding
# swap two near-tied scores: AUROC by 1 / (n_in · n_out) ≈ 6e-6, AUPR by more when the swap is near the top of
# the ranking (on an AMD EPYC: AUROC 6.1e-6 and energy AUPR-In 1.6e-5 from one swap, on the landed code too).
# The bound admits one such swap.
METRIC_TOLERANCE = 5e-5
PROCESSES = 2
DEVICES_PER_PROCESS = 2


def _config():
  config = digits_config.get_config('smoke')
  config.backbone = 'mlp'  # see the module docstring
  config.num_steps = NUM_STEPS
  config.batch_size = 16  # global: 4 rows per device
  config.log_every_steps = LOG_EVERY
  config.checkpoint_every_steps = CHECKPOINT_EVERY
  config.keep_checkpoints = 100
  return config  # the smoke evaluation: test set, 4 OOD sets, calibration on the validation split


def _record_writes(workdir: str) -> list[str]:
  """The paths under `workdir` this process will write, create, rename to or delete, as a growing list.

  Recorded by an audit hook (Python-level file operations: results, config, metrics, feature
  cache), relative to `workdir`; checkpoints/ is left out, orbax writes it from every process.
  """
  root = os.path.abspath(workdir)
  writes = []
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

  def hook(event, args):
    if event == 'open':
      path, mode, flags = args
      writing = any(c in mode for c in 'wax+') if isinstance(mode, str) else bool((flags or 0) & write_flags)
    elif event in ('os.rename', 'os.mkdir', 'os.remove', 'os.rmdir', 'shutil.rmtree'):
      path, writing = args[1] if event == 'os.rename' else args[0], True
    else:
      return
    if writing and isinstance(path, (str, bytes, os.PathLike)):
      relative = os.path.relpath(os.path.abspath(os.fsdecode(path)), root)
      if not relative.startswith('..') and relative.split(os.sep)[0] != checkpoint.CHECKPOINTS:
        writes.append(relative)

  sys.addaudithook(hook)
  return writes


def _worker(workdir: str) -> int:
  """One process of the multi-process run (the CLI's `train_and_evaluate`); returns its exit status."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  logging.info('imports done %.1f s after the launch', time.time() - float(os.environ['LAUNCHED_AT']))
  writes = _record_writes(workdir)
  config = _config()
  config.distributed = True
  status = 0
  try:
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    logging.info('trained and evaluated in %.1f s', time.perf_counter() - start)
  except train.PreemptedError as e:
    print(e, flush=True)
    status = train.PREEMPTED_EXIT_CODE
  # Peak resident memory of this process (Linux reports KiB), for docs/fault_tolerance.md.
  print(json.dumps({'process': jax.process_index(), 'devices': jax.local_device_count(), 'writes': writes,
                    'max_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
  return status


def _report(proc) -> dict:
  """The JSON line a worker prints before it exits."""
  lines = [line for line in proc.log.read_text().splitlines() if line.startswith('{"process"')]
  assert len(lines) == 1, proc.log
  return json.loads(lines[0])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, logs, cache):
  port = _free_port()
  procs = []
  for index in range(PROCESSES):
    env = {**os.environ, 'PYTHONPATH': str(REPO),
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}',
           'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': str(PROCESSES),
           'JAX_PROCESS_ID': str(index), 'LAUNCHED_AT': str(time.time()),
           # The three launches compile the same programs: the persistent cache compiles them once.
           'JAX_COMPILATION_CACHE_DIR': str(cache), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
    path = logs / f'process{index}.{time.time_ns()}.log'
    with open(path, 'w') as log:
      procs.append(subprocess.Popen([sys.executable, __file__, str(workdir)], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT))
    procs[-1].log = path
  return procs


def _steps(workdir):
  checkpoints = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


def _wait_for_checkpoint_after(workdir, step, procs, timeout=120):
  # Orbax renames a finished checkpoint into place (after every process wrote its part).
  deadline = time.time() + timeout
  while not any(s > step for s in _steps(workdir)):
    assert all(p.poll() is None for p in procs), 'a process exited before the checkpoint it should have written'
    assert time.time() < deadline
    time.sleep(0.02)


def _logged_lines(workdir):
  metrics = pathlib.Path(workdir) / 'metrics.jsonl'
  return metrics.read_text().count('\n') if metrics.exists() else 0


def _wait_for_new_log_line(workdir, lines_before, procs, timeout=120):
  # A line of this launch: its processes are in the loop, past jax.distributed.initialize (which
  # installs the SIGTERM handler of JAX's preemption service; before it SIGTERM would kill).
  deadline = time.time() + timeout
  while _logged_lines(workdir) <= lines_before:
    assert all(p.poll() is None for p in procs), 'a process exited before logging a step'
    assert time.time() < deadline
    time.sleep(0.02)


def _wait(procs, timeout=120):
  return [p.wait(timeout=timeout) for p in procs]


def _saved(workdir, step):
  # Onto this process's first device: the two-process checkpoint's devices do not exist here.
  return checkpoint.restore(os.path.join(workdir, 'checkpoints', str(step)))


def _max_difference(state, reference) -> float:
  """The largest absolute difference over every leaf (parameters, optimiser state, counters)."""
  leaves, tree = jax.tree.flatten(state)
  ref_leaves, ref_tree = jax.tree.flatten(reference)
  assert tree == ref_tree and len(leaves) > 5
  return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(leaves, ref_leaves))


def _numbers(tree, path=''):
  """path → leaf of a results dict (as JSON has it)."""
  if isinstance(tree, dict):
    return {key: value for name, child in tree.items() for key, value in _numbers(child, f'{path}/{name}').items()}
  if isinstance(tree, list):
    return {key: value for i, child in enumerate(tree) for key, value in _numbers(child, f'{path}[{i}]').items()}
  return {path: tree}


def _one_process_evaluation(workdir, evaldir):
  """The 1-process evaluation (4 of this process's devices) of the parameters `workdir` ended with."""
  config = _config()
  exp = experiment.make_experiment(config)
  mesh = sharding.make_mesh(jax.devices()[:PROCESSES * DEVICES_PER_PROCESS])
  restored = checkpoint.restore(os.path.join(workdir, checkpoint.CHECKPOINTS, str(NUM_STEPS)),
                                sharding=sharding.replicated(mesh))
  variables = step_lib.model_variables(restored['params'], restored.get('batch_stats'))
  # Through JSON, as results.json went: tuples become lists, keys strings.
  return json.loads(json.dumps(evaluate.evaluate_model(exp, variables, mesh, workdir=str(evaldir))))


def _outputs(workdir):
  """set file → its cached outputs (logits, features, labels) under <workdir>/features/<fingerprint>."""
  files = sorted(pathlib.Path(workdir).glob('features/*/*.npz'))
  return {f'{f.parent.name}/{f.name}': dict(np.load(f)) for f in files}


def _array_bytes(step_dir):
  return sum(p.stat().st_size for p in pathlib.Path(step_dir).rglob('*') if p.is_file() and p.parent.name == 'd')


def test_two_processes_match_one_and_survive_sigkill_and_sigterm(tmp_path):
  # The reference: this (pytest) process alone on 4 of its 8 fake devices: the same global mesh.
  one = tmp_path / 'one_process'
  config = _config()
  config.num_devices = PROCESSES * DEVICES_PER_PROCESS
  exp, mesh, unchanged = train.prepare(config, str(one))
  train.train(exp, str(one), mesh, config_unchanged=unchanged)

  workdir, logs, cache = tmp_path / 'two_processes', tmp_path / 'logs', tmp_path / 'xla_cache'
  logs.mkdir()
  # 1. SIGKILL of one process after the first checkpoint; the other goes with it (a scheduler
  #    restarts the whole job).
  procs = _launch(workdir, logs, cache)
  _wait_for_checkpoint_after(workdir, 0, procs)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  procs[0].send_signal(signal.SIGKILL)
  procs[0].wait()
  killed_at = _steps(workdir)[-1]
  assert killed_at < NUM_STEPS, 'the run finished before it could be killed'

  # 2. Restart both: they resume from that checkpoint. Once they train, a preemption notice to
  #    process 1 only: both reach the same sync step (JAX's service takes up to a second to agree,
  #    15-50 steps here), save it and exit with status 75.
  lines_before = _logged_lines(workdir)
  procs = _launch(workdir, logs, cache)
  _wait_for_new_log_line(workdir, lines_before, procs)
  procs[1].send_signal(signal.SIGTERM)
  assert _wait(procs) == [train.PREEMPTED_EXIT_CODE] * PROCESSES
  preempted_at = _steps(workdir)[-1]
  assert killed_at < preempted_at < NUM_STEPS
  for proc in procs:
    assert f'saved a checkpoint of step {preempted_at}' in proc.log.read_text()

  # 3. Restart both: the run finishes and is evaluated (`train_and_evaluate`, as the CLI).
  preempted_procs, procs = procs, _launch(workdir, logs, cache)
  assert _wait(procs) == [0] * PROCESSES
  assert _steps(workdir)[-1] == NUM_STEPS
  for step in (killed_at, NUM_STEPS):
    difference = _max_difference(_saved(workdir, step), _saved(one, step))
    print(f'step {step}: largest difference from the one-process run {difference:.3g}')
    assert difference <= TOLERANCE, step

  # Written once: one folder per step, metadata once, the array bytes of one copy (± compression).
  step_dir = workdir / 'checkpoints' / str(NUM_STEPS)
  assert len(list(step_dir.rglob('_METADATA'))) == 1 and len(list(step_dir.rglob('_CHECKPOINT_METADATA'))) == 1
  assert 0.85 < _array_bytes(step_dir) / _array_bytes(one / 'checkpoints' / str(NUM_STEPS)) < 1.15
  # Process 0 alone logs: each launch's logged steps appear once (a resumed launch re-logs the
  # steps after its checkpoint, as one process would).
  logged = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert logged[:2] == [LOG_EVERY, 2 * LOG_EVERY] and logged.count(NUM_STEPS) == 1 and preempted_at in logged

  # The evaluation: results written once, by process 0; process 1 computed the same but wrote nothing
  # outside the checkpoints, in any launch.
  reports = [_report(proc) for proc in procs]
  for report in reports:
    print(f'process {report["process"]}: peak RSS {report["max_rss_mib"]:.0f} MiB')
  assert [r['process'] for r in reports] == [0, 1] and reports[1]['writes'] == []
  assert _report(preempted_procs[1])['writes'] == []
  final_writes = reports[0]['writes']
  assert final_writes.count('results.json') == 1 and final_writes.count('results.md') == 1
  assert (workdir / 'results.md').exists()
  results = json.loads((workdir / 'results.json').read_text())
  assert set(results['ood']) == set(_config().eval.ood_sets) and results['in_distribution']['num_examples'] > 0

  # ... and equal to a 1-process evaluation of the same parameters: the same feature-cache
  # fingerprint (a hash of the variables' bytes), the same per-example outputs and labels up to
  # float32 rounding, the same numbers in results.json up to METRIC_TOLERANCE.
  one_results = _one_process_evaluation(workdir, tmp_path / 'one_process_evaluation')
  outputs, one_outputs = _outputs(workdir), _outputs(tmp_path / 'one_process_evaluation')
  assert outputs.keys() == one_outputs.keys() and len(outputs) == 2 + len(_config().eval.ood_sets)
  output_difference = 0.0
  for name, out in outputs.items():
    assert out.keys() == one_outputs[name].keys() and np.array_equal(out['labels'], one_outputs[name]['labels'])
    output_difference = max([output_difference] + [
        float(np.max(np.abs(out[key] - one_outputs[name][key])) / np.max(np.abs(one_outputs[name][key])))
        for key in out if key != 'labels'])
  numbers, one_numbers = _numbers(results), _numbers(one_results)
  assert numbers.keys() == one_numbers.keys()
  metric_difference, worst = 0.0, None
  for key, value in numbers.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      if abs(value - one_numbers[key]) > metric_difference:
        metric_difference, worst = abs(value - one_numbers[key]), key
    else:
      assert value == one_numbers[key], key
  auroc_difference = max(abs(block['auroc'] - one_results['ood'][name][score]['auroc'])
                         for name, ood in results['ood'].items() for score, block in ood.items())
  mean_auroc = {score: round(block['auroc'], 4) for score, block in results['ood_mean'].items()}
  print(f'2 processes vs 1, same parameters: outputs differ by {output_difference:.3g} (relative), results.json '
        f'numbers by {metric_difference:.3g} (largest: {worst}), AUROC by {auroc_difference:.3g}; accuracy '
        f'{results["in_distribution"]["accuracy"]:.4f}, mean AUROC {mean_auroc}')
  assert output_difference <= OUTPUT_TOLERANCE and metric_difference <= METRIC_TOLERANCE
  assert results['in_distribution']['accuracy'] == one_results['in_distribution']['accuracy']


if __name__ == '__main__':
  sys.exit(_worker(sys.argv[1]))
