"""The entry points answer a mistake like a tool: a line or two, the closest valid name, exit status 2, no traceback.

Each case runs the script as a person would (`python -m experiments.train ...` from the repository root); none
gets as far as training: every one fails in the flag parsing or in the checks before the first step.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import digits as digits_config
from experiments import cli
from ood_jax.trainer import checkpoint
from ood_jax.trainer import experiment

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = '--config=configs/digits.py:smoke'
HINT = 'Pass --helpfull for every flag and config field.'  # the second line under a mistake in the flags


def _run(module, *args, **env):
  environ = {key: value for key, value in os.environ.items() if key != cli.TRACEBACK_ENV}
  # A run that got past the checks would train: the timeout bounds the damage of a regression.
  return subprocess.run([sys.executable, '-m', f'experiments.{module}', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**environ, 'PYTHONPATH': str(REPO), **env})


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  """A workdir holding checkpoints of the digits smoke config (config.json and a step's metadata: nothing
  restorable), and one holding only config.json."""
  root = tmp_path_factory.mktemp('workdirs')
  for name in ('with_checkpoints', 'no_checkpoint'):
    checkpoint.save_config(digits_config.get_config('smoke'), str(root / name))
  step = root / 'with_checkpoints' / checkpoint.CHECKPOINTS / '4'
  step.mkdir(parents=True)
  (step / '_CHECKPOINT_METADATA').write_text('{}')
  return root


# (script, arguments, the first line of stderr, the second or None). '{w}' is the workdirs fixture's folder.
MISTAKES = {
    'unknown_field': ('train', [SMOKE, '--workdir={w}/new', '--config.metod=isomax'],
                      "error: unknown config field 'metod'; did you mean 'method'?", None),
    'unknown_nested_field': ('train', [SMOKE, '--workdir={w}/new', '--config.eval.detectr=knn'],
                             "error: unknown config field 'eval.detectr'; did you mean 'eval.detectors'?", None),
    'new_key_of_a_free_form_group': (
        'train', [SMOKE, '--workdir={w}/new', '--config.method_kwargs.margin_in=-20'],
        "error: unknown config field 'method_kwargs.margin_in': a key this config lacks goes into "
        "config.method_kwargs as one dict, --config.method_kwargs=\"{'margin_in': <value>}\" (this config: {}).",
        None),
    'bad_value_type': ('train', [SMOKE, '--workdir={w}/new', '--config.num_steps=abc'],
                       "error: bad value for config.num_steps (type int; this config: 0): invalid literal for int() "
                       "with base 10: 'abc'", HINT),
    'unknown_method': ('train', [SMOKE, '--workdir={w}/new', '--config.method=isomx'],
                       "error: Unknown method 'isomx'; did you mean 'isomax'? valid values: isomax, ", None),
    'unknown_corruption': ('train', [SMOKE, '--workdir={w}/new', '--config.eval.corruptions=fogg'],
                           "error: Unknown corruption 'fogg'; did you mean 'fog'? valid values: fog, ", None),
    'unknown_ood_set': ('train', [SMOKE, '--workdir={w}/new', '--config.eval.ood_sets=digits/photo'],
                        "error: Unknown OOD set 'digits/photo'; valid digits sets: digits/near, digits/photos, "
                        'digits/gaussian_noise, digits/uniform_noise, digits/validation. Did you mean '
                        "'digits/photos'?", None),
    'bad_config_argument': ('train', ['--config=configs/isomax.py:cifar1000', '--workdir={w}/new'],
                            "error: --config=configs/isomax.py:cifar1000: Unknown config argument 'cifar1000'; did "
                            "you mean 'cifar100'? valid (dataset: ", HINT),
    'missing_config_file': ('train', ['--config=configs/digit.py', '--workdir={w}/new'],
                            "error: config file 'configs/digit.py' does not exist; did you mean 'configs/digits.py'?",
                            None),
    'unknown_flag': ('train', [SMOKE, '--workdr={w}/new'], "error: Unknown command line flag 'workdr'. Did you mean: "
                     'workdir ?', HINT),
    'missing_data': ('train', [SMOKE, '--workdir={w}/new', '--config.init_from={w}/nonexistent'],
                     'error: 1 input(s) of this run are missing; nothing was trained or written:',
                     "- init_from '{w}/nonexistent' does not exist (a workdir or a checkpoint folder of a run)."),
    'changed_config': ('train', [SMOKE, '--workdir={w}/with_checkpoints', '--config.num_steps=1'],
                       'error: The config differs from the one the checkpoints in {w}/with_checkpoints were trained '
                       'with ({w}/with_checkpoints/config.json): num_steps: 0 → 1. ', None),
    'evaluate_unknown_field': ('evaluate', ['--workdir={w}/no_checkpoint', SMOKE, '--config.eval.detector=knn'],
                               "error: unknown config field 'eval.detector'; did you mean 'eval.detectors'?", None),
    'evaluate_not_a_workdir': ('evaluate', ['--workdir={w}/nonexistent'],
                               'error: {w}/nonexistent/config.json not found: is {w}/nonexistent the workdir of a '
                               'training run?', None),
    'evaluate_no_checkpoint': ('evaluate', ['--workdir={w}/no_checkpoint'],
                               "error: No checkpoint at '{w}/no_checkpoint'", None),
    'compare_no_results': ('compare', ['{w}/no_checkpoint'],
                           'error: {w}/no_checkpoint/results.json not found: train the run first', None),
    'bad_seeds': ('digits_methods', ['--workdir={w}/new', '--seeds=0,x'],
                  "error: --seeds takes comma-separated integers, e.g. 0,1,2; got '0,x'.", HINT),
}


@pytest.mark.parametrize('name', MISTAKES)
def test_a_mistake_prints_what_is_wrong_and_exits_2(workdirs, name):
  module, args, first, second = MISTAKES[name]
  done = _run(module, *(arg.replace('{w}', str(workdirs)) for arg in args))
  lines = done.stderr.splitlines()
  assert done.returncode == cli.USAGE_EXIT_CODE, done.stderr
  assert 'Traceback' not in done.stderr and len(lines) <= 2, done.stderr
  assert lines[0].startswith(first.replace('{w}', str(workdirs))), done.stderr
  if second is not None:
    assert lines[1] == second.replace('{w}', str(workdirs))
  assert not (workdirs / 'new').exists()  # nothing was written


def test_help_lists_every_config_field_and_exits_0():
  done = _run('train', '--helpfull')
  assert done.returncode == 0, done.stderr
  assert "config.eval.detectors = ''" in done.stdout and 'config.optimizer.learning_rate = 0.1' in done.stdout
  assert '--workdir: Directory for checkpoints' in done.stdout


@pytest.mark.parametrize('switch', [['--verbosity=1'], [], ['-v', '1']])
def test_the_verbose_switch_adds_the_traceback(switch):
  env = {} if switch else {cli.TRACEBACK_ENV: '1'}
  done = _run('train', SMOKE, '--workdir=/nonexistent/new', '--config.method=isomx', *switch, **env)
  assert done.returncode == cli.USAGE_EXIT_CODE
  assert 'Traceback (most recent call last)' in done.stderr and 'in check_config' in done.stderr
  assert done.stderr.splitlines()[-1].startswith("error: Unknown method 'isomx'; did you mean 'isomax'?")


def _bad_config():
  config = digits_config.get_config('smoke')
  config.method = 'isomx'
  return config


def test_only_errors_of_the_checks_count_as_mistakes(monkeypatch, capsys):
  # A ValueError out of the config checks is the user's; the same error anywhere else is a bug, with its traceback.
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli._run_main(lambda argv: experiment.check_config(_bad_config()), ['train'], ())  # pylint: disable=protected-access
  assert exit_info.value.code == cli.USAGE_EXIT_CODE
  assert capsys.readouterr().err.startswith("error: Unknown method 'isomx'; did you mean 'isomax'?")

  def buggy(argv):
    del argv
    raise ValueError('a bug in the training loop')

  with pytest.raises(ValueError, match='a bug in the training loop'):
    cli._run_main(buggy, ['train'], ())  # pylint: disable=protected-access


def test_config_help_lists_the_base_config_with_its_defaults():
  text = cli.config_help('Path to a config file.')
  assert text.startswith('Path to a config file.\nOverride any field with --config.<field>=<value>;')
  fields = dict(line.split(' = ', 1) for line in text.splitlines()[2:])
  assert fields['config.method'] == "'softmax'" and fields['config.method_kwargs'] == '{}'
  assert fields['config.eval.severities'] == '(1, 2, 3, 4, 5)' and fields['config.data_dir'] == 'None'
