"""Tests of the experiment configs in configs/: every argument they document loads and names only
things the trainer and evaluator know, every command in their docstrings parses as the CLI parses
it, and one paper config's smoke variant trains and evaluates end to end on mock CIFAR data.
"""

import importlib
import itertools
import json
import math
import pathlib
import re
import shlex

from absl import flags
import jax
from ml_collections import config_flags
import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import common
from ood_jax.trainer import checkpoint
from ood_jax import corruptions
from ood_jax.trainer import experiment
from ood_jax.trainer import finetune
from ood_jax import metrics
from ood_jax import methods
from ood_jax.trainer import train
from ood_jax.trainer.data import digits
from ood_jax.trainer.data import ood_sets
from ood_jax.trainer.data import sources

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted(path for path in (REPO / 'configs').glob('*.py') if path.stem not in ('__init__', 'common'))
NUM_DEVICES = 8  # tests/conftest.py


def _module(name):
  return importlib.import_module(f'configs.{name}')


# The token groups a config may declare (module constants), as parse_arg groups them.
TOKEN_GROUPS = ('DATASETS', 'MODELS', 'METHODS', 'SCHEDULES', 'STAGES')


def _documented_args(module):
  """None, 'smoke', and every valid combination of the token groups a config declares, ± smoke."""
  groups = [getattr(module, name) for name in TOKEN_GROUPS if hasattr(module, name)]
  combos = [','.join(combo) for combo in itertools.product(*groups)] if groups else []
  # softmax is the run finetune starts from, not a fine-tuned method (test_ice_softmax_finetune_raises).
  combos = [combo for combo in combos if not {'softmax', 'finetune'} <= set(combo.split(','))]
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


def _fill_required_paths(config, tmp_path):
  """Sets the workdirs a config leaves to the command line, after checking that check_config asks for them.

  Fine-tuning (`required_fields` names `init_from`) and SMOT's second stage (`base_model`) cannot
  run without a pretrained run; the trainer must say so before any work. The base model's head is
  checked from its saved config, so the stand-in base workdir holds the config of a softmax run.
  """
  needs_init = 'init_from' in config.required_fields and not config.init_from
  needs_base = config.method == 'smot' and not config.base_model
  if needs_init or needs_base:
    with pytest.raises(ValueError, match='init_from' if needs_init else 'base_model'):
      experiment.check_config(config)
  if needs_init:
    config.init_from = '/runs/pretrained'
  if needs_base:
    base = config.copy_and_resolve_references()
    base.method = 'softmax'
    checkpoint.save_config(base, str(tmp_path / 'base'))
    config.base_model = str(tmp_path / 'base')
  return config


def test_config_files_are_found():
  assert {path.stem for path in CONFIG_FILES} >= {'digits', 'isomax', 'ova', 'ice', 'reweightood', 'smot'}
  assert all(callable(getattr(_module(path.stem), 'get_config', None)) for path in CONFIG_FILES)


@pytest.mark.parametrize('name,arg', CASES)
def test_config_loads_and_passes_checks(name, arg, tmp_path):
  module = _module(name)
  config = _fill_required_paths(module.get_config(arg), tmp_path)
  experiment.check_config(config)
  _check_eval_names(config)
  assert set(config) == set(common.base_config())  # no field the trainer would silently ignore
  if arg and 'smoke' in arg:
    # Smoke keeps the recipe's data, model and method and shrinks only the amount of work.
    full = module.get_config(arg.replace('smoke', '').strip(',') or None)
    assert (config.dataset, config.backbone, config.method) == (full.dataset, full.backbone, full.method)
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
  assert (c10.backbone, c10.optimizer.name, c10.batch_size, c10.normalization) == ('resnet20', 'adam', 512, 'symmetric')
  assert tuple(c10.eval.corruptions) == corruptions.BENCHMARK_CORRUPTIONS
  assert (c100.backbone, c100.optimizer.name, c100.num_epochs, c100.optimizer.nesterov) == (
      'wrn28_10', 'sgd', 200, True)
  assert len(c100.eval.corruptions) == 17 and not {'motion_blur', 'snow'} & set(c100.eval.corruptions)


def _train_commands(text):
  """Every `python -m experiments.train ...` command of a text, continuation lines joined."""
  text = re.sub(r'\\\n\s*', ' ', text)
  return [line.strip() for line in text.splitlines() if line.strip().startswith('python -m experiments.train')]


def _parse_as_the_cli(command):
  """The config `experiments/train.py` would build from a command line (its flag definition)."""
  argv = [arg for arg in shlex.split(command)[3:] if arg.startswith('--config')]
  flag_values = flags.FlagValues()  # a private registry: the same definition as experiments/train.py
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                 sys_argv=['train', *argv])
  flag_values(['train', *argv])
  return argv[0], flag_values.config


def _pretend_base_models_are_softmax_runs(monkeypatch):
  # Documented SMOT commands name base-model workdirs that a reader trains first; check_config reads
  # the base run's saved config (its head must be dense), so stand in a softmax run's.
  monkeypatch.setattr(checkpoint, 'load_config', lambda workdir: ml_collections.ConfigDict({'method': 'softmax'}))


# ml_collections loads config files through importlib's deprecated load_module().
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda path: path.stem)
def test_docstring_commands_parse_as_the_cli_parses_them(path, monkeypatch):
  commands = _train_commands(_module(path.stem).__doc__)
  assert commands, f'{path.name} documents no `python -m experiments.train` command'
  monkeypatch.chdir(REPO)
  _pretend_base_models_are_softmax_runs(monkeypatch)
  for command in commands:
    config_arg, config = _parse_as_the_cli(command)
    assert config_arg.startswith(f'--config=configs/{path.name}'), command
    experiment.check_config(config)
    _check_eval_names(config)


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_readme_train_commands_parse_as_the_cli_parses_them(monkeypatch):
  commands = _train_commands((REPO / 'README.md').read_text(encoding='utf-8'))
  assert len(commands) >= 10
  monkeypatch.chdir(REPO)
  _pretend_base_models_are_softmax_runs(monkeypatch)
  for command in commands:
    _, config = _parse_as_the_cli(command)
    experiment.check_config(config)
    _check_eval_names(config)


def _train_on_mock_data(config, workdir, num_examples=24):
  """train_and_evaluate on tfds.testing.mock_data: random images of every TFDS set the config names."""
  sources.clear_cache()
  try:
    with tfds.testing.mock_data(num_examples=num_examples):
      return train.train_and_evaluate(config, str(workdir))
  finally:
    sources.clear_cache()  # mock arrays must not leak into later tests


def _check_ood_block(results, config, default_score, scores):
  assert results['default_score'] == default_score
  assert list(results['ood']) == list(config.eval.ood_sets) and len(config.eval.ood_sets) == 1
  for per_score in results['ood'].values():
    assert set(per_score) == set(scores)
    for m in per_score.values():
      assert all(0.0 <= m[k] <= 1.0 for k in metrics.OOD_METRICS)


def test_ova_smoke_trains_and_evaluates_on_mock_cifar(tmp_path):
  """The cheapest paper config (ResNet-20), with the paper's distance OvA loss, on mock TFDS data."""
  num_examples = 24
  config = _module('ova').get_config('cifar10,smoke')
  config.method = 'distance_one_vs_all'
  _train_on_mock_data(config, tmp_path, num_examples)

  results = json.loads((tmp_path / 'results.json').read_text(encoding='utf-8'))
  in_dist = results['in_distribution']
  assert (results['dataset'], results['backbone'], results['method']) == ('cifar10', 'resnet20', 'distance_one_vs_all')
  assert in_dist['num_examples'] == num_examples
  assert 0.0 <= in_dist['accuracy'] <= 1.0 and 0.0 <= in_dist['ece'] <= 1.0 and in_dist['nll'] > 0.0
  assert list(results['ood']) == list(config.eval.ood_sets) == ['cifar100']
  ood = results['ood']['cifar100'][results['default_score']]
  assert results['default_score'] == 'max_distance_sigmoid'
  assert set(ood) == set(metrics.OOD_METRICS) and all(0.0 <= v <= 1.0 for v in ood.values())
  assert abs(ood['fpr95_id_positive'] + ood['tnr95_id_positive'] - 1.0) < 1e-12
  corrupted = results['corrupted']
  assert set(corrupted['per_pair']) == {f'{c}_{s}' for c in config.eval.corruptions for s in (1, 5)}
  assert set(corrupted['per_severity']) == {'1', '5'}
  assert 0.0 <= corrupted['mean']['accuracy'] <= 1.0
  assert (tmp_path / 'results.md').read_text(encoding='utf-8').startswith('# distance_one_vs_all')
  assert (tmp_path / 'checkpoints' / str(config.num_steps)).is_dir()


def test_ice_softmax_finetune_raises():
  with pytest.raises(ValueError, match='fine-tunes with outliers'):
    _module('ice').get_config('softmax,finetune')


def test_paper_001_003_004_recipes():
  ice = _module('ice')
  c = ice.get_config(None)
  assert (c.dataset, c.backbone, c.method, c.num_epochs) == ('cifar10', 'wrn40_2', 'ice', 100)
  assert (c.batch_size, c.outliers.batch_size, c.outliers.source) == (128, 256, 'imagenet_resized/32x32')
  assert (c.optimizer.learning_rate, c.optimizer.schedule, tuple(c.optimizer.decay_epochs)) == (0.1, 'step', (50, 75))
  assert (c.optimizer.weight_decay, c.backbone_kwargs.dropout_rate, c.optimizer.grad_clip_norm) == (5e-4, 0.3, 1.0)
  ft = ice.get_config('finetune')
  assert (ft.num_epochs, ft.optimizer.schedule, ft.optimizer.learning_rate, ft.init_head) == (
      10, 'cosine', 0.01, 'class_stats')
  oe = ice.get_config('cifar100,oe,finetune')
  assert (oe.optimizer.learning_rate, oe.init_head, oe.optimizer.grad_clip_norm) == (0.001, 'auto', 0.0)
  assert 'cifar10' in oe.eval.ood_sets
  for dataset, margins in (('cifar10', (-23.0, -5.0)), ('cifar100', (-27.0, -5.0))):
    e = ice.get_config(f'{dataset},energy')
    assert (e.method_kwargs.margin_in, e.method_kwargs.margin_out) == margins
  assert 'dropout_rate' not in ice.get_config('densenet40_12').backbone_kwargs

  rw = _module('reweightood')
  c10, c100, supcon = rw.get_config(None), rw.get_config('cifar100'), rw.get_config('supcon')
  assert (c10.backbone, c10.method, c10.batch_size, c10.num_epochs, c10.augment) == (
      'resnet18', 'reweightood', 512, 500, 'two_views')
  assert (c10.optimizer.learning_rate, c10.optimizer.schedule, c10.optimizer.warmup_epochs) == (0.5, 'cosine', 10.0)
  assert c10.optimizer.weight_decay == 1e-4 and c10.method_kwargs.temperature == 0.1
  assert (tuple(c10.method_kwargs.between), tuple(c100.method_kwargs.between)) == ((5.0, -4.0), (5.0, -2.0))
  assert (c10.eval.knn_k, c100.eval.knn_k) == (100, 300)
  assert supcon.method == 'supcon' and set(supcon.method_kwargs) == {'temperature'}

  smot = _module('smot')
  base, s10, s100 = smot.get_config('base'), smot.get_config(None), smot.get_config('cifar100')
  assert (base.method, base.num_epochs, tuple(base.optimizer.decay_epochs), base.optimizer.schedule) == (
      'softmax', 200, (80, 140), 'step')
  assert (s10.method, s10.num_epochs, s10.optimizer.schedule, s10.batch_size) == ('smot', 300, 'cosine', 128)
  assert (s10.method_kwargs.temperature, s100.method_kwargs.temperature) == (10.0, 150.0)
  assert (s10.method_kwargs.alpha, s10.method_kwargs.beta, s10.method_kwargs.weight) == (50.0, 20.0, 0.1)
  assert base.backbone == s10.backbone == 'resnet18' and base.optimizer.weight_decay == 5e-4


def _check_outlier_exposure_run(results, config, workdir, method, score):
  assert results['method'] == method
  _check_ood_block(results, config, score, methods.get_method(method).scores)
  logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {'ce', 'outlier_loss' if method == 'oe' else 'energy_loss'} <= set(logged[-1])


def test_energy_config_trains_from_scratch_on_mock_cifar(tmp_path):
  config = _module('ice').get_config('energy,smoke')
  _check_outlier_exposure_run(_train_on_mock_data(config, tmp_path), config, tmp_path, 'energy', 'energy')


# The release check runs the two-stage configs (pytest -m slow): 2–3 minutes each on 2 cores; CI trains OE → ICE
# fine-tuning and SMOT from its base run on digits (tests/test_methods.py).
@pytest.mark.slow
def test_oe_config_trains_from_scratch_and_the_ice_config_fine_tunes_from_its_run(tmp_path):
  """ICE's fine-tune protocol (Wu et al. 2022) on mock CIFAR-10: a WRN-40-2 with a softmax head, then ICE from its
  checkpoint.

  The pretrained run is the OE config's (softmax head and cross-entropy, plus the outlier loss) so that
  one WRN-40-2 training serves both configs; the suite's time is spent on such smoke runs.
  """
  ice = _module('ice')
  base = ice.get_config('oe,smoke')
  results = _train_on_mock_data(base, tmp_path / 'oe', num_examples=100)  # 100: every class has examples
  _check_outlier_exposure_run(results, base, tmp_path / 'oe', 'oe', 'max_softmax')

  config = ice.get_config('finetune,smoke')
  config.init_from = str(tmp_path / 'oe')
  results = _train_on_mock_data(config, tmp_path / 'ice', num_examples=100)
  assert (results['method'], results['backbone']) == ('ice', 'wrn40_2')
  _check_ood_block(results, config, 'max_logit', ('max_logit', 'max_likelihood', 'max_softmax'))
  source = finetune.load_pretrained(str(tmp_path / 'oe'))['params']
  tuned = finetune.load_pretrained(str(tmp_path / 'ice'))['params']
  assert set(tuned['head']) == {'means', 'cholesky_raw'} and tuned['head']['means'].shape == (10, 128)
  assert jax.tree.structure(tuned['backbone']) == jax.tree.structure(source['backbone'])


@pytest.mark.parametrize('method', ['reweightood', pytest.param('supcon', marks=pytest.mark.slow)])
def test_contrastive_configs_train_and_evaluate_by_features_on_mock_cifar(tmp_path, method):
  config = _module('reweightood').get_config(f'{method},smoke')
  results = _train_on_mock_data(config, tmp_path, num_examples=100)  # 100: every class has embeddings
  assert (results['method'], results['backbone']) == (method, 'resnet18')
  _check_ood_block(results, config, 'knn', ('knn', 'mahalanobis'))
  ind = results['in_distribution']
  assert ind['num_examples'] == 100 and len(ind['mes_radius']) == 10 and 0.0 <= ind['accuracy'] <= 1.0


@pytest.mark.slow
def test_smot_config_trains_its_second_stage_from_its_first(tmp_path):
  smot = _module('smot')
  _train_on_mock_data(smot.get_config('base,smoke'), tmp_path / 'base')
  config = smot.get_config('smoke')
  config.base_model = str(tmp_path / 'base')
  results = _train_on_mock_data(config, tmp_path / 'smot')
  assert results['method'] == 'smot'
  _check_ood_block(results, config, 'max_softmax', methods.get_method('smot').scores)
  logged = [json.loads(line) for line in (tmp_path / 'smot' / 'metrics.jsonl').read_text().splitlines()]
  assert 0.99 < logged[0]['smoothing'] < 1.0  # ε(t), t = 255·Beta(50, 20) ≈ 182, T = 10


# One method per mechanism runs in CI: a head with its own state (ConfBranch), a score that runs the model (RotPred),
# a memory written by update_state and sampled in the step (VOS), an embedding model evaluated by a probe (CIDER).
# The full list runs in the release check (`pytest -m slow`).
_CI_BASELINES = ('confbranch', 'rotpred', 'vos', 'cider')


def test_openood_baseline_configs_train_and_evaluate_on_mock_cifar(tmp_path):
  """One config of configs/openood_baselines.py per mechanism, smoke, on mock CIFAR-10 (the MLP backbone)."""
  _check_openood_baselines(tmp_path, _CI_BASELINES)


@pytest.mark.slow
def test_every_openood_baseline_config_trains_and_evaluates_on_mock_cifar(tmp_path):
  _check_openood_baselines(tmp_path, _module('openood_baselines').METHODS)


def _check_openood_baselines(tmp_path, names):
  """The configs `names` of configs/openood_baselines.py, smoke, on mock CIFAR-10 (one test: compiling is the cost).

  The MLP stands in for the config's ResNet-18, which the ResNet-18 configs' smoke tests above train on this
  data: the runs differ only in the method (inputs, head, loss, how the outputs are evaluated), and a
  ResNet-18 compile each (45 s on 2 cores) would be most of this suite's time.
  """
  module = _module('openood_baselines')
  assert set(_CI_BASELINES) <= set(module.METHODS)
  logged_metric = {'mixup': 'mix', 'regmixup': 'mix', 'confbranch': 'lambda', 'rotpred': 'rotation_accuracy',
                   'mixoe': 'mix', 'vos': 'synthesis', 'npos': 'synthesis', 'cider': 'dispersion'}
  for method in names:
    config = module.get_config(f'{method},smoke')
    assert config.backbone == 'resnet18' and config.dataset == 'cifar10'
    config.backbone = 'mlp'
    if 'init_from' in config.required_fields:  # MixOE fine-tunes the cross-entropy run, trained earlier in the loop
      config.init_from = str(tmp_path / 'softmax')
    # An embedding model (NPOS, CIDER) is evaluated by a linear probe and class statistics, so every class needs
    # examples in the test split and the training part. Mock labels come from np.random.default_rng(0), the same in
    # every split: 24 examples have no class 8; 100 have every class in test, train and the 10 % validation part.
    embedding = methods.get_method(method).probabilities is None
    results = _train_on_mock_data(config, tmp_path / method, num_examples=100 if embedding else 24)
    # RotPred's own score runs the model (its four turns) in the evaluator's inference pass, before the logit scores.
    scores = methods.get_method(method).model_scores + methods.get_method(method).scores
    assert results['method'] == method and 0.0 <= results['in_distribution']['accuracy'] <= 1.0
    _check_ood_block(results, config, scores[0], scores)
    logged = [json.loads(line) for line in (tmp_path / method / 'metrics.jsonl').read_text().splitlines()]
    assert all(math.isfinite(row['loss']) for row in logged)
    assert logged_metric.get(method, 'accuracy') in logged[-1]
