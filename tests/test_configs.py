"""Tests of the experiment configs in configs/: every argument they document loads and names only
things the trainer and evaluator know, every command in their docstrings parses as the CLI parses
it, and one paper config's smoke variant trains and evaluates end to end on mock CIFAR data.
"""

import importlib
import itertools
import json
import pathlib
import re
import shlex

from absl import flags
from ml_collections import config_flags
import pytest
import tensorflow_datasets as tfds

from configs import common
from ood_jax import corruptions
from ood_jax import train
from ood_jax.data import digits
from ood_jax.data import ood_sets
from ood_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(path for path in (REPO / 'configs').glob('*.py') if path.stem not in ('__init__', 'common'))
NUM_DEVICES = 8  # tests/conftest.py


def _module(name):
  return importlib.import_module(f'configs.{name}')


def _documented_args(module):
  """None, 'smoke', and every combination of the dataset and model tokens a config declares, ± smoke."""
  groups = [getattr(module, name) for name in ('DATASETS', 'MODELS') if hasattr(module, name)]
  combos = [','.join(combo) for combo in itertools.product(*groups)] if groups else []
  return [None, 'smoke', *combos, *(f'{combo},smoke' for combo in combos)]


CASES = [(path.stem, arg) for path in CONFIG_FILES for arg in _documented_args(_module(path.stem))]


def _check_eval_names(config):
  # check_config resolves what training needs; these are read only after training, so a typo here
  # would surface hours into a run.
  for name in config.eval.ood_sets:
    if name.startswith('digits/'):
      assert name.split('/', 1)[1] in digits.OOD_SETS, name
    else:
      assert name in ood_sets.OOD_SETS or name.startswith('folder:'), name
  for corruption, severity in itertools.product(config.eval.corruptions, config.eval.severities):
    corruptions.check_corruption(corruption, severity)
  assert config.eval.batch_size % NUM_DEVICES == 0
  assert config.normalization in ('dataset', 'symmetric')


def test_config_files_are_found():
  assert {path.stem for path in CONFIG_FILES} >= {'digits', 'isomax', 'ova'}
  assert all(callable(getattr(_module(path.stem), 'get_config', None)) for path in CONFIG_FILES)


@pytest.mark.parametrize('name,arg', CASES)
def test_config_loads_and_passes_checks(name, arg):
  module = _module(name)
  config = module.get_config(arg)
  train.check_config(config)
  _check_eval_names(config)
  assert set(config) == set(common.base_config())  # no field the trainer would silently ignore
  if arg and 'smoke' in arg:
    # Smoke keeps the recipe's data, model and method and shrinks only the amount of work.
    full = module.get_config(arg.replace('smoke', '').strip(',') or None)
    assert (config.dataset, config.model, config.method) == (full.dataset, full.model, full.method)
    assert (0 < config.num_steps <= 5) or config.num_epochs < full.num_epochs
    assert config.batch_size <= full.batch_size and config.eval.batch_size <= full.eval.batch_size
    assert len(config.eval.ood_sets) <= 4 and len(config.eval.corruptions) <= 2


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda path: path.stem)
def test_unknown_argument_raises_with_valid_ones(path):
  with pytest.raises(ValueError, match='smoke'):
    _module(path.stem).get_config('no_such_token')


@pytest.mark.parametrize('arg', ['cifar10,cifar100', 'resnet34,densenet_bc100,smoke'])
def test_two_tokens_of_one_group_raise(arg):
  with pytest.raises(ValueError, match='two'):
    _module('isomax').get_config(arg)


def test_parse_arg_ignores_order_and_spaces():
  chosen = common.parse_arg(' smoke, b2 ,,x1', first=('x1', 'x2'), second=('b1', 'b2'))
  assert chosen == {'first': 'x1', 'second': 'b2', 'smoke': True}
  assert common.parse_arg(None, first=('x1',)) == {'first': None, 'smoke': False}


def test_paper_recipes():
  isomax = _module('isomax')
  c = isomax.get_config('svhn_cropped,resnet34')
  assert (c.method, c.batch_size, c.num_epochs, c.augment) == ('isomax', 64, 300, 'crop')
  assert tuple(c.optimizer.decay_epochs) == (150, 200, 250) and c.optimizer.weight_decay == 1e-4
  assert c.eval.ood_sets[0] == 'cifar10'
  ova = _module('ova')
  c10, c100 = ova.get_config('cifar10'), ova.get_config('cifar100')
  assert (c10.model, c10.optimizer.name, c10.batch_size, c10.normalization) == ('resnet20', 'adam', 512, 'symmetric')
  assert tuple(c10.eval.corruptions) == corruptions.BENCHMARK_CORRUPTIONS
  assert (c100.model, c100.optimizer.name, c100.num_epochs, c100.optimizer.nesterov) == ('wrn28_10', 'sgd', 200, True)
  assert len(c100.eval.corruptions) == 17 and not {'motion_blur', 'snow'} & set(c100.eval.corruptions)


def _docstring_commands(path):
  """Every `python -m experiments.train ...` command of a config's docstring, continuation lines joined."""
  text = re.sub(r'\\\n\s*', ' ', _module(path.stem).__doc__)
  return [line.strip() for line in text.splitlines() if line.strip().startswith('python -m experiments.train')]


# ml_collections loads config files through importlib's deprecated load_module().
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda path: path.stem)
def test_docstring_commands_parse_as_the_cli_parses_them(path, monkeypatch):
  commands = _docstring_commands(path)
  assert commands, f'{path.name} documents no `python -m experiments.train` command'
  monkeypatch.chdir(REPO)
  for command in commands:
    argv = [arg for arg in shlex.split(command)[3:] if arg.startswith('--config')]
    assert argv[0].startswith(f'--config=configs/{path.name}'), command
    # The same flag definition as experiments/train.py, on a private flag registry.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                   sys_argv=['train', *argv])
    flag_values(['train', *argv])
    train.check_config(flag_values.config)
    _check_eval_names(flag_values.config)


def test_ova_smoke_trains_and_evaluates_on_mock_cifar(tmp_path):
  """The cheapest paper config (ResNet-20), with the paper's distance OvA loss, on mock TFDS data."""
  num_examples = 24
  config = _module('ova').get_config('cifar10,smoke')
  config.method = 'distance_one_vs_all'
  sources.clear_cache()
  try:
    with tfds.testing.mock_data(num_examples=num_examples):
      train.train_and_evaluate(config, str(tmp_path))
  finally:
    sources.clear_cache()  # mock arrays must not leak into later tests

  results = json.loads((tmp_path / 'results.json').read_text(encoding='utf-8'))
  in_dist = results['in_distribution']
  assert (results['dataset'], results['model'], results['method']) == ('cifar10', 'resnet20', 'distance_one_vs_all')
  assert in_dist['num_examples'] == num_examples
  assert 0.0 <= in_dist['accuracy'] <= 1.0 and 0.0 <= in_dist['ece'] <= 1.0 and in_dist['nll'] > 0.0
  assert list(results['ood']) == list(config.eval.ood_sets) == ['cifar100']
  ood = results['ood']['cifar100'][results['default_score']]
  assert results['default_score'] == 'max_distance_sigmoid'
  assert all(0.0 <= ood[m] <= 1.0 for m in ('auroc', 'aupr_in', 'aupr_out', 'fpr95', 'tnr95', 'dtacc'))
  assert abs(ood['fpr95'] + ood['tnr95'] - 1.0) < 1e-12
  corrupted = results['corrupted']
  assert set(corrupted['per_pair']) == {f'{c}_{s}' for c in config.eval.corruptions for s in (1, 5)}
  assert set(corrupted['per_severity']) == {'1', '5'}
  assert 0.0 <= corrupted['mean']['accuracy'] <= 1.0
  assert (tmp_path / 'results.md').read_text(encoding='utf-8').startswith('# distance_one_vs_all')
  assert (tmp_path / 'checkpoints' / str(config.num_steps)).is_dir()
