"""Checkpoints: one restore function for a workdir, its checkpoints folder or one step folder; configs."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ood_jax.trainer import checkpoint
from ood_jax.trainer import defaults
from ood_jax.trainer import sharding


def _save(workdir, steps):
  manager = checkpoint.manager(str(workdir), max_to_keep=5)
  for step in steps:
    state = {'step': jnp.asarray(step, jnp.int32), 'params': {'w': jnp.full((3,), float(step))},
             'batch_stats': {}, 'bad_step': jnp.asarray(-1, jnp.int32)}
    checkpoint.save(manager, step, state)
  manager.wait_until_finished()


def test_restore_reads_a_workdir_its_checkpoints_folder_or_a_step_folder(tmp_path):
  _save(tmp_path / 'run', [2, 4])
  for path, step in [(tmp_path / 'run', 4), (tmp_path / 'run' / 'checkpoints', 4),
                     (tmp_path / 'run' / 'checkpoints' / '2', 2)]:
    assert checkpoint.latest_step(str(path)) == step
    restored = checkpoint.restore(str(path))
    np.testing.assert_array_equal(restored['params']['w'], np.full((3,), float(step)))
    assert restored['params']['w'].sharding.device_set == {jax.local_devices()[0]}
  assert checkpoint.latest_step(str(tmp_path / 'run' / 'checkpoints' / '3')) is None


def test_restore_places_arrays_on_the_given_devices(tmp_path):
  _save(tmp_path / 'run', [1])
  mesh = sharding.make_mesh()
  restored = checkpoint.restore(str(tmp_path / 'run'), sharding=sharding.replicated(mesh))
  assert restored['params']['w'].sharding.is_equivalent_to(sharding.replicated(mesh), 1)
  target = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
            'params': {'w': jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(mesh))},
            'batch_stats': {}, 'bad_step': jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}
  exact = checkpoint.restore(str(tmp_path / 'run'), target=target)
  assert int(exact['step']) == 1 and exact['params']['w'].dtype == jnp.float32


def test_missing_checkpoint_names_the_command_that_writes_one(tmp_path):
  for path in (tmp_path / 'nothing', tmp_path):
    assert checkpoint.latest_step(str(path)) is None
    with pytest.raises(FileNotFoundError, match='experiments.train --config=... --workdir='):
      checkpoint.restore(str(path))


def test_config_round_trip_and_old_field_names(tmp_path):
  config = ml_collections.ConfigDict({'method': 'isomax', 'backbone': 'resnet18', 'eval': {'ood_sets': ('svhn',)}})
  checkpoint.save_config(config, str(tmp_path / 'run'))
  loaded = checkpoint.load_config(str(tmp_path / 'run'))
  assert loaded.method == 'isomax' and loaded.backbone == 'resnet18' and list(loaded.eval.ood_sets) == ['svhn']
  # Runs saved by ood_jax 0.1 called the backbone 'model'.
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'config.json').write_text(json.dumps({'model': 'wrn40_2', 'model_kwargs': {'dropout_rate': 0.3}}))
  old = checkpoint.load_config(str(tmp_path / 'old'))
  assert old.backbone == 'wrn40_2' and old.backbone_kwargs.dropout_rate == 0.3 and 'model' not in old
  with pytest.raises(FileNotFoundError, match='workdir of a training run'):
    checkpoint.load_config(str(tmp_path / 'nothing'))


def test_config_differences_count_what_changes_a_run_and_nothing_else():
  saved = ml_collections.ConfigDict({'method': 'softmax', 'seed': 0, 'optimizer': {'learning_rate': 0.1},
                                     'method_kwargs': {}, 'eval': {'batch_size': 64}, 'log_every_steps': 10,
                                     'num_devices': 8, 'old_field': 1})
  new = ml_collections.ConfigDict(saved.to_dict())
  new.eval.batch_size, new.log_every_steps, new.num_devices = 128, 1, 1  # ignored
  assert checkpoint.config_differences(saved, new) == []
  assert checkpoint.config_fingerprint(saved) == checkpoint.config_fingerprint(new)
  del new['old_field']  # only one side has it: another version's field, not compared
  new.new_field = 'x'
  assert checkpoint.config_differences(saved, new) == []
  # ... but the fingerprint changes: after such an upgrade no older step is fallen back to.
  assert checkpoint.config_fingerprint(saved) != checkpoint.config_fingerprint(new)
  new.optimizer.learning_rate = 0.01
  new.method_kwargs = ml_collections.ConfigDict({'label_smoothing': 0.1})  # a whole value: added knobs count
  assert checkpoint.config_differences(saved, new) == [
      "method_kwargs: {} → {'label_smoothing': 0.1}", 'optimizer.learning_rate: 0.1 → 0.01']
  assert checkpoint.config_fingerprint(saved) != checkpoint.config_fingerprint(new)


def test_save_config_replaces_the_file_whole(tmp_path):
  checkpoint.save_config(ml_collections.ConfigDict({'method': 'softmax'}), str(tmp_path))
  checkpoint.save_config(ml_collections.ConfigDict({'method': 'isomax'}), str(tmp_path))
  assert checkpoint.load_config(str(tmp_path)).method == 'isomax'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']  # no temporary file left


def test_restore_errors_show_their_cause_before_the_wrapper_text():
  # Orbax wraps a torn file's TensorStore error in a long message of its own; the cause says what is wrong.
  try:
    try:
      raise ValueError('OUT_OF_RANGE: byte range [0, 4096) is not valid for a file of 100 bytes')
    except ValueError as cause:
      raise RuntimeError('Failed to restore item "state" from ' + 'x' * 1000) from cause
  except RuntimeError as wrapped:
    text = checkpoint._short(wrapped)  # pylint: disable=protected-access
  assert text.startswith('ValueError: OUT_OF_RANGE: byte range [0, 4096) is not valid')
  assert '(raised as RuntimeError: Failed to restore item "state"' in text and len(text) < 800
  assert checkpoint._short(KeyError('params')) == "KeyError: 'params'"  # pylint: disable=protected-access


def test_a_config_saved_before_a_field_existed_reads_its_default(tmp_path):
  saved = defaults.base_config().to_dict()
  del saved['eval']['detector_kwargs'], saved['deterministic']  # as a 0.1 run wrote it
  saved['method'], saved['eval']['knn_k'] = 'isomax', 7
  (tmp_path / checkpoint.CONFIG).write_text(json.dumps(saved))
  config = checkpoint.load_config(str(tmp_path))
  assert config.eval.detector_kwargs == defaults.base_config().eval.detector_kwargs
  assert config.deterministic == defaults.base_config().deterministic
  assert (config.method, config.eval.knn_k) == ('isomax', 7)  # what the run saved wins
