"""A run checks every data set it reads before it trains or writes anything (`experiment.check_data`)."""

import os

import pytest
import tensorflow_datasets as tfds

from configs import digits as digits_config
from ood_jax.trainer import checkpoint
from ood_jax.trainer import experiment
from ood_jax.trainer import train
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources


def test_a_missing_ood_set_stops_the_run_before_any_step_and_the_workdir_stays_as_it_was(tmp_path, monkeypatch):
  config = digits_config.get_config('smoke')
  config.eval.ood_sets = ('digits/near', f'folder:{tmp_path}/nope', f'imglist:{tmp_path}/none.txt')
  def refuse(*args, **kwargs):
    raise AssertionError('training started')
  monkeypatch.setattr(train, 'train', refuse)
  workdir = tmp_path / 'run'
  with pytest.raises(sources.DatasetNotFoundError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert message.startswith('2 input(s) of this run are missing; nothing was trained or written')
  assert f'folder:{tmp_path}/nope' in message and 'none.txt' in message and 'digits/near' not in message
  assert not workdir.exists()


def test_every_missing_tfds_set_is_listed_with_the_command_that_prepares_it(tmp_path):
  config = digits_config.get_config('smoke')
  config.dataset, config.data_dir = 'cifar10', str(tmp_path)  # an empty TFDS folder
  config.eval.ood_sets = ('svhn_cropped', 'gaussian_noise')
  config.eval.corruptions, config.eval.severities = ('fog',), (5,)
  config.method, config.outliers.source = 'oe', 'digits/outliers'
  exp = experiment.make_experiment(config)
  with pytest.raises(sources.DatasetNotFoundError) as info:
    experiment.check_data(exp)
  message = str(info.value)
  for name in ('cifar10', 'svhn_cropped', 'cifar10_corrupted/fog_5'):
    assert f'TFDS dataset {name!r} is not prepared' in message, name
  assert "tfds.builder('cifar10'" in message and 'gaussian_noise' not in message
  assert message.startswith('3 input(s)')  # train and test of cifar10 are one builder: listed once
  config.download = True  # TFDS prepares them when read
  experiment.check_data(experiment.make_experiment(config))


def test_present_sets_pass_under_mock_data(tmp_path):
  info = registry.get_info('cifar10')
  with tfds.testing.mock_data(num_examples=4):
    catalog.check_available(info, splits=('train', 'test'), ood_names=('svhn_cropped', 'digits/far'),
                            corrupted=[('fog', 1)], data_dir=str(tmp_path))
  with pytest.raises(sources.DatasetNotFoundError, match=r"Outlier file '.*none.npy' does not exist"):
    catalog.check_available(info, outliers=(os.fspath(tmp_path / 'none.npy'), 'train'))


def test_a_base_run_without_checkpoints_is_reported(tmp_path):
  base = tmp_path / 'base'
  base_config = digits_config.get_config('smoke')
  base.mkdir()
  checkpoint.save_config(base_config, str(base))
  config = digits_config.get_config('smoke')
  config.method, config.base_model = 'smot', str(base)
  with pytest.raises(sources.DatasetNotFoundError, match='holds no checkpoint'):
    experiment.check_data(experiment.make_experiment(config))
