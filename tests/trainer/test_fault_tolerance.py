"""Faults of a training run, each ending in bitwise the parameters of an uninterrupted run (digits, CPU).

Covers (docs/fault_tolerance.md): SIGTERM (finish the step, save it, exit with status 75, resume);
a torn latest checkpoint (truncated data, missing item: reported, fallen back past, moved aside);
a damaged latest checkpoint whose predecessor belongs to another config (refused); a config that
changed under a workdir (refused naming the fields; ignored fields pass; allow_config_change);
a full disk during a save (clear error, previous checkpoint intact); time-based checkpoints.

Every scenario continues a copy of one reference run, so a test trains only the steps it needs.
"""

import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import serialization as orbax_serialization
import pytest

from configs import digits as digits_config
from experiments import train as train_cli
from ood_jax.trainer import checkpoint
from ood_jax.trainer import experiment
from ood_jax.trainer import train

NUM_STEPS = 8


def _config(**overrides):
  """8 steps of the digits smoke run, a checkpoint every 2 (all kept), on one device.

  The backbone is the MLP: compiling the step is most of a scenario's time, 4 s for the CNN against
  1.5 s (on 2 cores), and the checkpoint machinery under test does not depend on the model. The CNN's
  batch statistics are resumed bitwise in tests/trainer/test_train.py and tests/trainer/test_multiprocess.py.
  """
  config = digits_config.get_config('smoke')
  config.backbone = 'mlp'
  config.num_steps = NUM_STEPS
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 10
  config.num_devices = 1
  config.eval.ood_sets = ()
  config.update_from_flattened_dict(overrides)  # dotted keys: 'optimizer.learning_rate'
  return config


def _train(config, workdir):
  """`train_and_evaluate` without the evaluation: the same checks, config.json and loop."""
  exp, mesh, unchanged = train.prepare(config, str(workdir))
  return train.train(exp, str(workdir), mesh, config_unchanged=unchanged)


def _steps(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir() if p.name.isdigit())


def _saved(workdir, step):
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  return manager.restore(step, args=ocp.args.StandardRestore())


def _assert_bitwise(state, reference):
  """Every leaf of params, batch statistics, optimiser state and counters identical, bit for bit."""
  as_dict = lambda s: s if isinstance(s, dict) else {'step': s.step, 'params': s.params,
                                                      'batch_stats': s.batch_stats, 'opt_state': s.opt_state,
                                                      'bad_step': s.bad_step}
  leaves, tree = jax.tree.flatten(jax.tree.map(np.asarray, as_dict(state)))
  ref_leaves, ref_tree = jax.tree.flatten(jax.tree.map(np.asarray, as_dict(reference)))
  assert tree == ref_tree
  assert len(leaves) > 4
  for leaf, ref in zip(leaves, ref_leaves):
    assert leaf.dtype == ref.dtype and np.array_equal(leaf, ref), 'not bitwise equal to the uninterrupted run'


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run: its workdir (checkpoints 2, 4, 6, 8) and final state."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  handler = signal.getsignal(signal.SIGTERM)
  state = _train(_config(), workdir)
  assert signal.getsignal(signal.SIGTERM) is handler  # the handler lived only while training
  assert _steps(workdir) == [2, 4, 6, 8]
  return types.SimpleNamespace(workdir=workdir, state=state, metrics=_metrics(workdir))


def _copy(reference, tmp_path, keep_steps):
  """The reference workdir as a run killed after checkpoint max(keep_steps): later steps and logs removed."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference.workdir, workdir)
  for step in set(_steps(workdir)) - set(keep_steps):
    shutil.rmtree(workdir / 'checkpoints' / str(step))
  return workdir


def test_sigterm_saves_the_finished_step_and_resumes_bitwise(reference, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  batches = train._batches

  def batches_with_sigterm(*args):
    batch_at, steps_per_epoch = batches(*args)

    def batch_at_with_sigterm(step):
      if step == 2:  # the notice arrives while step 2 (the third) is being prepared
        os.kill(os.getpid(), signal.SIGTERM)
      return batch_at(step)

    return batch_at_with_sigterm, steps_per_epoch

  monkeypatch.setattr(train, '_batches', batches_with_sigterm)
  previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a handler of our own, to see it restored
  try:
    with pytest.raises(train.PreemptedError, match='checkpoint of step 3') as error:
      _train(_config(), workdir)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert error.value.step == 3 and train.PREEMPTED_EXIT_CODE == 75
  assert _steps(workdir) == [2, 3]  # the periodic save and the step the notice interrupted
  assert [r['step'] for r in _metrics(workdir)] == [2, 3]  # the partial interval was logged, not lost
  _assert_bitwise(_saved(workdir, 2), _saved(reference.workdir, 2))

  monkeypatch.setattr(train, '_batches', batches)
  _assert_bitwise(_train(_config(), workdir), reference.state)
  _assert_bitwise(_saved(workdir, NUM_STEPS), _saved(reference.workdir, NUM_STEPS))
  assert _metrics(workdir)[-1]['loss'] == reference.metrics[-1]['loss']


def test_cli_exits_with_the_preempted_status(monkeypatch):
  def preempted(config, workdir):
    raise train.PreemptedError(5, os.path.join(workdir, 'checkpoints'))

  monkeypatch.setattr(train, 'train_and_evaluate', preempted)
  monkeypatch.setattr(train_cli, 'flags', types.SimpleNamespace(FLAGS=types.SimpleNamespace(
      config=_config(), workdir='/nonexistent/run')))
  with pytest.raises(SystemExit) as exit_info:
    train_cli.main(['train'])
  assert exit_info.value.code == train.PREEMPTED_EXIT_CODE == 75


def _truncate_data(step_dir):
  files = [p for p in (step_dir / 'default' / 'd').iterdir()]
  assert files
  for path in files:
    os.truncate(path, path.stat().st_size // 2)


def _remove_item(step_dir):
  shutil.rmtree(step_dir / 'default')


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # orbax's failed reads
def test_torn_latest_checkpoints_are_skipped_for_the_newest_good_one_and_resume_bitwise(reference, tmp_path, caplog):
  workdir = _copy(reference, tmp_path, keep_steps=(2, 4, 6))  # killed before saving step 8
  _truncate_data(workdir / 'checkpoints' / '6')  # a torn write
  _remove_item(workdir / 'checkpoints' / '4')  # a lost folder
  with caplog.at_level(logging.WARNING):
    state = _train(_config(), workdir)
  _assert_bitwise(state, reference.state)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  for step, error in ((6, 'OUT_OF_RANGE'), (4, 'KeyError')):
    assert any(f'Checkpoint step {step} in {workdir / "checkpoints"} failed to restore' in w and error in w
               for w in warnings), warnings
  assert any('Resuming from step 2' in w for w in warnings), warnings
  # The damaged steps were moved aside, not deleted; the run saved its own 4, 6 and 8 in their place.
  assert sorted(p.name for p in (workdir / 'checkpoints.corrupt').iterdir()) == ['4', '6']
  assert _steps(workdir) == [2, 4, 6, 8]
  _assert_bitwise(_saved(workdir, 6), _saved(reference.workdir, 6))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # orbax's failed reads
def test_no_fallback_to_a_checkpoint_of_another_config(reference, tmp_path):
  workdir = _copy(reference, tmp_path, keep_steps=(2, 4, 6))
  _truncate_data(workdir / 'checkpoints' / '6')
  changed = _config(**{'optimizer.learning_rate': 0.01, 'allow_config_change': True})
  with pytest.raises(checkpoint.CheckpointRestoreError, match=r'(?s)step 6:.*step 4 was written under a different '
                     r'config.*Nothing was moved or deleted.*fresh --workdir'):
    _train(changed, workdir)
  assert _steps(workdir) == [2, 4, 6] and not (workdir / 'checkpoints.corrupt').exists()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # orbax's failed reads
def test_changed_config_is_refused_naming_the_fields(reference, tmp_path):
  workdir = _copy(reference, tmp_path, keep_steps=(2, 4))
  before = (workdir / 'config.json').read_text()
  with pytest.raises(checkpoint.ConfigChangedError, match=r"(?s)method: 'softmax' → 'isomax'.*optimizer.learning_rate: "
                     r'0.05 → 0.2.*fresh --workdir.*--config.allow_config_change=True'):
    train.train_and_evaluate(_config(method='isomax', **{'optimizer.learning_rate': 0.2}), str(workdir))
  assert (workdir / 'config.json').read_text() == before  # refused before anything was written
  # How a run is logged, checkpointed, evaluated or spread over devices may change.
  same = _config(log_every_steps=1, checkpoint_every_minutes=5.0, keep_checkpoints=3, num_devices=2,
                 **{'eval.ood_sets': ('digits/near',), 'eval.batch_size': 32})
  assert checkpoint.check_config_unchanged(same, str(workdir)) == []
  assert checkpoint.config_fingerprint(same) == checkpoint.config_fingerprint(_config())
  assert checkpoint.config_fingerprint(_config(seed=1)) != checkpoint.config_fingerprint(_config())
  # Allowed, but the checkpoints of a dense head do not fit IsoMax's distance head: a clear error.
  with pytest.raises(checkpoint.CheckpointRestoreError, match=r'(?s)step 4:.*step 2 was written under a different '
                     r'config.*init_from'):
    _train(_config(method='isomax', allow_config_change=True), workdir)
  assert _steps(workdir) == [2, 4]


def test_disk_full_during_save_fails_clearly_and_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  write = orbax_serialization.async_serialize_from_host
  disk = {'full': False}

  async def write_until_full(*args, **kwargs):
    if disk['full']:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await write(*args, **kwargs)

  save = checkpoint.Writer.save

  def save_filling_the_disk_at_step_4(self, step, state):
    # Step 2's write is asynchronous: let it finish on a disk with room before this one fills it
    # (else, on a slow machine, step 2's own write meets the full disk; seen once in CI).
    self.wait()
    disk['full'] = step >= 4
    return save(self, step, state)

  monkeypatch.setattr(orbax_serialization, 'async_serialize_from_host', write_until_full)
  monkeypatch.setattr(checkpoint.Writer, 'save', save_filling_the_disk_at_step_4)
  with pytest.raises(checkpoint.CheckpointWriteError) as error:
    _train(_config(), workdir)
  message = str(error.value)
  assert error.value.errno == errno.ENOSPC
  assert f'step 4 to {workdir / "checkpoints"} failed' in message and 'No space left on device' in message
  assert 'steps 2) are intact' in message and 'resumes from step 2' in message
  assert _steps(workdir) == [2]
  _assert_bitwise(_saved(workdir, 2), _saved(reference.workdir, 2))

  monkeypatch.undo()
  _assert_bitwise(_train(_config(), workdir), reference.state)
  # The half-written step was cleaned up when the run restarted.
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]


def test_checkpoint_every_minutes_saves_by_wall_clock(reference, tmp_path):
  workdir = _copy(reference, tmp_path, keep_steps=(2, 4, 6))
  # 1e-9 minutes: due after every step, whatever checkpoint_every_steps says.
  state = _train(_config(checkpoint_every_minutes=1e-9, checkpoint_every_steps=1000), workdir)
  assert _steps(workdir) == [2, 4, 6, 7, 8]
  _assert_bitwise(state, reference.state)


@pytest.mark.parametrize('field,value,message', [
    ('checkpoint_every_minutes', -1.0, 'checkpoint_every_minutes must be a number >= 0'),
    ('checkpoint_every_minutes', float('nan'), 'checkpoint_every_minutes must be a number >= 0'),
])
def test_fault_tolerance_fields_are_checked_before_any_work(field, value, message):
  with pytest.raises(ValueError, match=message):
    experiment.check_config(_config(**{field: value}))
