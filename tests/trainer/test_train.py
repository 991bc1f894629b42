"""End-to-end tests of the trainer and evaluator on the offline digits benchmark (real data, CPU).

Covers: early failure on unknown names, a full train → evaluate → results round trip, exact
resume after SIGKILL (bitwise identical parameters), 8 devices vs 1 device, the non-finite guard,
and the learning-rate schedules and optimiser against hand-computed values.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits as digits_config
from ood_jax.trainer import evaluate
from ood_jax.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(**overrides):
  config = digits_config.get_config('smoke')
  config.num_steps = 12
  config.log_every_steps = 4
  config.checkpoint_every_steps = 6
  config.eval.ood_sets = ('digits/near', 'digits/gaussian_noise')
  config.update_from_flattened_dict(overrides)  # dotted keys: 'optimizer.learning_rate'
  return config


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  return manager.latest_step(), restored


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize('field,value,valid', [
    ('dataset', 'imagenet21k', 'cifar10'),
    ('backbone', 'resnet1000', 'resnet18'),
    ('method', 'no_such_method', 'isomax'),
    ('optimizer.name', 'lion', 'sgd'),
    ('dtype', 'float8', 'bfloat16'),
])
def test_unknown_names_fail_before_any_work(tmp_path, field, value, valid):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=f'(?s){value}.*valid.*{valid}'):
    train.train_and_evaluate(_config(**{field: value}), str(workdir))
  assert not workdir.exists()  # nothing was written, read or compiled


def test_invalid_peak_tflops_fails_before_any_work(tmp_path):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match='peak_tflops must be a positive number'):
    train.train_and_evaluate(_config(peak_tflops=-1.0), str(workdir))
  assert not workdir.exists()


def test_unknown_method_kwargs_fail(tmp_path):
  config = _config()
  config.method_kwargs = ml_collections.ConfigDict({'entropic_scale': 3.0})  # an IsoMax knob on softmax
  with pytest.raises(ValueError, match='entropic_scale.*label_smoothing'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_train_evaluate_round_trip(tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(_config(method='isomax', peak_tflops=1.0), workdir)
  ind = results['in_distribution']
  assert results['method'] == 'isomax' and results['default_score'] == 'entropic_score'
  assert ind['num_examples'] == 359
  assert 0.0 <= ind['accuracy'] <= 1.0 and 0.0 <= ind['ece'] <= 1.0 and ind['nll'] > 0
  assert sum(ind['reliability']['counts']) == 359
  assert set(results['ood']) == {'digits/near', 'digits/gaussian_noise'}
  for per_score in results['ood'].values():
    assert set(per_score) == {'entropic_score', 'max_softmax', 'max_logit'}
    for m in per_score.values():
      assert 0.0 <= m['auroc'] <= 1.0 and m['tnr95_id_positive'] == pytest.approx(1.0 - m['fpr95_id_positive'])
  # Files a person and a script read.
  on_disk = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert on_disk['in_distribution']['accuracy'] == ind['accuracy']
  md = (tmp_path / 'run' / 'results.md').read_text()
  assert '| digits/near | entropic_score |' in md and f"{100 * ind['accuracy']:.2f} %" in md
  logged = _metrics(workdir)
  assert [r['step'] for r in logged] == [4, 8, 12]
  # Throughput: in-distribution images/s, and the MFU of one step's XLA FLOPs against the given peak.
  batch_size = _config().batch_size
  for r in logged:
    assert r['images_per_sec'] == pytest.approx(r['steps_per_sec'] * batch_size, rel=1e-12)
    assert 0 < r['mfu'] < 1
  flops_over_peak = [r['mfu'] / r['steps_per_sec'] for r in logged]  # the same step every time
  np.testing.assert_allclose(flops_over_peak, flops_over_peak[0], rtol=1e-9)
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['method'] == 'isomax'
  # experiments.evaluate's path: the saved config + the latest checkpoint give the same numbers.
  again = evaluate.evaluate(workdir)
  assert again['in_distribution'] == ind
  assert again['ood'] == results['ood']


def test_rerun_of_finished_run_only_evaluates(tmp_path):
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(_config(num_steps=4, checkpoint_every_steps=4), workdir)
  lines = len(_metrics(workdir))
  assert 'images_per_sec' in _metrics(workdir)[0] and 'mfu' not in _metrics(workdir)[0]  # no CPU peak known
  second = train.train_and_evaluate(_config(num_steps=4, checkpoint_every_steps=4), workdir)
  assert len(_metrics(workdir)) == lines  # no step was taken again
  assert second['in_distribution'] == first['in_distribution']


def _train_command(workdir, num_steps, *flags):
  return [sys.executable, '-m', 'experiments.train', '--config=configs/digits.py:smoke', f'--workdir={workdir}',
          f'--config.num_steps={num_steps}', '--config.checkpoint_every_steps=5', '--config.log_every_steps=5',
          '--config.eval.batch_size=64', *flags]


def test_sigkill_resume_is_bitwise_identical(tmp_path):
  _check_sigkill_resume(tmp_path, 80)


# One method per way a method adds state or randomness to a step: a loss (LogitNorm), a head with state of its
# own and random hints (ConfBranch's λ, kept in batch_stats), inputs mixed on the device from the step's
# key (RegMixup), that key's box cut from the outlier stream and pasted into the images (MixOE), and a memory of
# past batches written by the method's update_state and sampled from with the step key (VOS's feature queue, small
# enough to fill and draw virtual outliers before the kill). The MLP keeps each of the subprocess runs to seconds.
_RESUME_FLAGS = {'vos': ("--config.method_kwargs={'queue_size': 4, 'num_samples': 64}",)}


# CI runs VOS (the newest mechanism, which also draws from the step key); the other four run in the release check
# (`pytest -m slow`, README), about a minute each on 2 cores.
@pytest.mark.parametrize('method', [pytest.param(m, marks=pytest.mark.slow) for m in (
    'logitnorm', 'confbranch', 'regmixup', 'mixoe')] + ['vos'])
def test_sigkill_resume_of_openood_baselines_is_bitwise_identical(tmp_path, method):
  _check_sigkill_resume(tmp_path, 200, f'--config.method={method}', '--config.backbone=mlp',
                        *_RESUME_FLAGS.get(method, ()))


def _check_sigkill_resume(tmp_path, num_steps, *flags):
  """SIGKILL a digits run after its first checkpoint, resume it, and compare with an uninterrupted run bit for bit."""
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  interrupted = tmp_path / 'interrupted'
  proc = subprocess.Popen(_train_command(interrupted, num_steps, *flags), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = interrupted / 'checkpoints'
  deadline = time.time() + 240
  # Orbax renames a finished checkpoint into place, so a directory named by its step is complete.
  while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert proc.poll() is None, 'training exited before its first checkpoint'
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert killed_at < num_steps, 'the run finished before it could be killed'

  subprocess.run(_train_command(interrupted, num_steps, *flags), cwd=REPO, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  uninterrupted = tmp_path / 'uninterrupted'
  subprocess.run(_train_command(uninterrupted, num_steps, *flags), cwd=REPO, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  step_a, state_a = _final_params(interrupted)
  step_b, state_b = _final_params(uninterrupted)
  assert step_a == step_b == num_steps
  leaves_a, tree_a = jax.tree.flatten(state_a)
  leaves_b, tree_b = jax.tree.flatten(state_b)
  assert tree_a == tree_b
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
  # The resumed run logged the steps after the kill only once more: same final numbers.
  assert _metrics(interrupted)[-1]['loss'] == _metrics(uninterrupted)[-1]['loss']


def test_eight_devices_follow_the_one_device_trajectory(tmp_path):
  # The MLP, as in test_multiprocess.py: XLA:CPU's convolutions round differently for a batch of 64
  # and 8 slices of 8 (1e-6 at step 0), and the CNN's max-pooling grows that to 3e-3 by step 8, which
  # no tolerance could tell from a bug; on the MLP a wrong split or gradient mean is off by far more.
  assert jax.device_count() == 8
  common = dict(num_steps=8, log_every_steps=1, checkpoint_every_steps=8, backbone='mlp', **{'eval.ood_sets': ()})
  train.train_and_evaluate(_config(num_devices=1, **common), str(tmp_path / 'one'))
  train.train_and_evaluate(_config(num_devices=8, **common), str(tmp_path / 'eight'))
  one = [r['loss'] for r in _metrics(tmp_path / 'one')]
  eight = [r['loss'] for r in _metrics(tmp_path / 'eight')]
  assert len(one) == len(eight) == 8
  assert one[0] != one[-1]  # the trajectory moves
  np.testing.assert_allclose(eight, one, rtol=2e-4, atol=2e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(num_steps=20, log_every_steps=1, checkpoint_every_steps=1)
  config.optimizer.learning_rate = 1e30  # parameters explode within a few steps
  config.optimizer.schedule = 'constant'
  with pytest.raises(train.NonFiniteLossError, match=r'at step (\d+)') as error:
    train.train_and_evaluate(config, workdir)
  bad = int(__import__('re').search(r'at step (\d+)', str(error.value)).group(1))
  step, state = _final_params(workdir)
  assert step <= bad  # nothing at or after the bad step was saved
  assert f'(step {step})' in str(error.value)
  for leaf in jax.tree.leaves(state['params']):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_checkpoint_of_eight_devices_is_evaluated_in_a_one_device_process(tmp_path):
  """Trained on 8 devices, evaluated (experiments.evaluate) where only 1 exists: restore re-shards.

  Orbax restores without a target onto the saving run's devices; this failed with 'Topology
  mismatch' before restores placed every array on the current devices.
  """
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(_config(num_steps=4, **{'eval.ood_sets': ('digits/near',)}), str(workdir))
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--workdir={workdir}'], cwd=REPO, env=env,
                 check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  again = json.loads((workdir / 'results.json').read_text())
  assert again['in_distribution']['accuracy'] == results['in_distribution']['accuracy']
  np.testing.assert_allclose(again['ood']['digits/near']['max_softmax']['auroc'],
                             results['ood']['digits/near']['max_softmax']['auroc'], rtol=1e-6)


