"""Config checks (all before any I/O) and the `Experiment` record."""

import pytest

from configs import digits as digits_config
from configs import ice as ice_config
from ood_jax.trainer import checkpoint
from ood_jax.trainer import experiment
from ood_jax.trainer.data import sources


def _smoke(method, **overrides):
  config = digits_config.get_config('smoke')
  config.method = method
  if method in ('oe', 'energy', 'ice'):
    config.outliers.source = 'digits/outliers'
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture
def no_data(monkeypatch):
  """Any attempt to read a dataset fails the test: the checks must come first."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'a dataset was read: {args}')
  monkeypatch.setattr(sources, 'load_split', refuse)
  monkeypatch.setattr(sources, 'read_tfds', refuse)


def test_class_stats_policy_needs_a_mahalanobis_head_and_init_from(tmp_path):
  config = _smoke('oe', init_from=str(tmp_path), init_head='class_stats')
  with pytest.raises(ValueError, match="class_stats.*'oe'"):
    experiment.check_config(config)
  with pytest.raises(ValueError, match='init_from=None'):
    experiment.check_config(_smoke('ice', init_head='class_stats'))
  with pytest.raises(ValueError, match='fine-tunes a pretrained model'):
    experiment.check_config(_smoke('ice', required_fields=('init_from',)))



def test_fine_tune_recipe_asks_for_init_from(no_data):
  config = ice_config.get_config('cifar10,ice,finetune,smoke')
  with pytest.raises(ValueError, match='--config.init_from=<workdir'):
    experiment.check_config(config)
  config.init_from = '/some/run'
  experiment.check_config(config)  # no I/O: init_from is read when training starts
  config.required_fields = ('no_such_field',)
  with pytest.raises(ValueError, match="'no_such_field', which is not a config field"):
    experiment.check_config(config)


def test_smot_base_model_head_is_checked_before_any_data(tmp_path, no_data):
  base = str(tmp_path / 'isomax_run')
  checkpoint.save_config(_smoke('isomax'), base)  # only its config.json: the check must not need more
  with pytest.raises(ValueError, match="dense head.*'isomax' \\(distance head\\)"):
    experiment.make_experiment(_smoke('smot', base_model=base))
  checkpoint.save_config(_smoke('softmax'), base)
  exp = experiment.make_experiment(_smoke('smot', base_model=base))
  assert exp.base.method.name == 'softmax' and exp.base.model.head == 'dense'


@pytest.mark.parametrize('field,value,message', [
    ('eval.ood_sets', ('digits/nearish',), 'valid digits sets: digits/near'),
    ('eval.ood_sets', ('imagenet_o',), 'valid: cifar10'),
    ('eval.corruptions', ('smudge',), 'smudge'),
    ('eval.batch_size', 12, 'divisible by the number of devices'),
    ('normalization', 'per_image', 'normalization .per_image.; valid values: dataset, symmetric'),
    ('init_head', 'freeze', 'init_head policy .freeze.; valid values: auto, class_stats, keep, reinit'),
])
def test_bad_settings_fail_with_the_valid_values(no_data, field, value, message):
  config = _smoke('softmax')
  *path, last = field.split('.')
  (config[path[0]] if path else config)[last] = value
  with pytest.raises(ValueError, match=message):
    experiment.check_config(config)


def test_experiment_record_resolves_the_config(no_data):
  exp = experiment.make_experiment(_smoke('isomax', normalization='symmetric'))
  assert (exp.info.name, exp.method.name, exp.model.head, exp.info.num_classes) == ('digits', 'isomax', 'distance', 6)
  assert exp.mean == (0.5,) and exp.std == (0.5,) and exp.base is None
  exp = experiment.make_experiment(_smoke('softmax'))
  assert exp.mean == exp.info.mean and exp.std == exp.info.std


def test_settings_are_the_config_read_once(no_data):
  # The loop and the evaluator read `exp.settings`; its values are the config's, defaults from configs/common.py.
  config = _smoke('oe', method_kwargs={'weight': 0.25})
  config.eval.detectors = 'react,knn'
  config.eval.detector_kwargs = 'react.percentile=95, knn.k=7'
  exp = experiment.make_experiment(config)
  s = exp.settings
  assert (s.validation_fraction, s.batch_size, s.num_steps) == (config.validation_fraction, config.batch_size,
                                                               config.num_steps)
  assert dict(s.method_hparams) == {**exp.method.hparams, 'weight': 0.25}
  assert s.outliers.source == 'digits/outliers' and s.outliers.augment == config.augment
  assert s.eval.sets.test_sets == experiment.evaluation_sets(config.eval, 'digits').test_sets
  react, knn = s.eval.detectors
  assert (react.name, react.defaults['percentile'], 'percentile' in react.grid) == ('react', 95, False)
  assert (knn.name, knn.defaults['k'], 'k' in knn.grid) == ('knn', 7, False)
  with pytest.raises(AttributeError):
    s.batch_size = 3  # frozen


@pytest.mark.parametrize('text, match', [
    ('react.nope=1', 'no hyperparameter'),
    ('nope.k=1', "unknown detector 'nope'"),
    ('react=95', "not 'detector.hyperparameter=value'"),
])
def test_detector_kwargs_errors_name_what_is_wrong(no_data, text, match):
  config = _smoke('softmax')
  config.eval.detector_kwargs = text
  with pytest.raises(ValueError, match=match):
    experiment.check_config(config)


def test_detector_kwargs_parse_literals():
  assert experiment.detector_kwargs('') == {}
  assert experiment.detector_kwargs("react.percentile=95, vim.dim=None,fdbd.normalizer='norm',x.y=word") == {
      'react': {'percentile': 95}, 'vim': {'dim': None}, 'fdbd': {'normalizer': 'norm'}, 'x': {'y': 'word'}}


def test_trainer_reads_no_config_default_twice():
  # Every default lives in configs/common.py: the trainer's modules read the checked record (or a config field
  # directly), never `config.get(name, default)` with a default of their own.
  import pathlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(experiment.__file__).parent
  offending = [f'{path.name}:{number}: {line.strip()}' for path in sorted(root.rglob('*.py'))
               for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1)
               if re.search(r'\b(config|cfg|eval_config)(\.\w+)*\.get\(', line)]
  assert not offending, '\n'.join(offending)


def test_severities_are_checked_without_corruptions(no_data):
  config = _smoke('softmax')
  config.eval.corruptions, config.eval.severities = (), (1, 6)
  with pytest.raises(ValueError, match='severity must be one of 1..5, got 6'):
    experiment.check_config(config)
