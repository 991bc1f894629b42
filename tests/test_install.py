"""Install layers: the bare core works without TensorFlow, extras are named when missing, Colab keeps its TF.

setup.py: core `install_requires` = jax, flax, optax, chex, numpy; extras train, colab (train without
tensorflow-cpu), plots, digits, all, docs, test. `ood_jax._extras` maps each trainer-side module to the
optional packages it needs. The slow test, marked `venv` and `slow` (a few minutes; the release check runs it),
pip-installs into a fresh venv from PyPI (pip's cache is reused):
`test_release_builds_passes_twine_and_installs_core_and_extras` builds the distributions as a release would,
checks them with twine, installs the wheel alone (the core: the Flax example of docs/own_model.md runs without
any extra), the sdist, and the extras, all in one venv.
"""

import ast
import importlib
import importlib.metadata
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import venv

import nbformat
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

from configs import common
from ood_jax import _extras
from ood_jax.trainer import checkpoint
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'colab' / 'cifar10c_calibration.ipynb'
TENSORFLOW_DISTRIBUTIONS = {'tensorflow', 'tensorflow-cpu', 'tensorflow-gpu', 'tensorflow-intel', 'tensorflow-macos',
                            'tf-nightly', 'tf-nightly-cpu', 'intel-tensorflow'}
# The import name of each optional package -> the distribution setup.py lists for it.
DISTRIBUTION = {'absl': 'absl-py', 'ml_collections': 'ml-collections', 'orbax.checkpoint': 'orbax-checkpoint',
                'clu': 'clu', 'tensorflow': 'tensorflow-cpu', 'tensorflow_datasets': 'tensorflow-datasets',
                'PIL': 'pillow', 'matplotlib': 'matplotlib', 'sklearn': 'scikit-learn'}
OPTIONAL_MODULES = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections', 'matplotlib', 'sklearn', 'PIL',
                    'tensorboard')


def _setup():
  """INSTALL_REQUIRES, EXTRAS_REQUIRE and URL of setup.py, read without running setuptools."""
  namespace = {'__name__': 'setup_under_test', '__file__': str(REPO / 'setup.py')}
  source = (REPO / 'setup.py').read_text(encoding='utf-8').replace('setuptools.setup(', 'dict(')
  exec(compile(source, 'setup.py', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['INSTALL_REQUIRES'], namespace['EXTRAS_REQUIRE'], namespace['URL']


def _names(requirements) -> set[str]:
  return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_core_is_jax_flax_optax_chex_numpy_and_extras_layer_the_rest():
  core, extras, _ = _setup()
  assert _names(core) == {'jax', 'flax', 'optax', 'chex', 'numpy'}
  assert {'train', 'colab', 'plots', 'digits', 'all', 'test'} <= set(extras)
  assert _names(extras['train']) >= {'tensorflow-datasets', 'tensorflow-cpu', 'orbax-checkpoint', 'clu',
                                     'tensorboard', 'ml-collections', 'absl-py', 'pillow'}
  assert _names(extras['plots']) == {'matplotlib'} and _names(extras['digits']) == {'scikit-learn', 'pillow'}
  # colab is train less TensorFlow itself (and its TensorBoard), with the same version ranges otherwise.
  assert set(extras['colab']) <= set(extras['train'])
  assert _names(extras['train']) - _names(extras['colab']) == {'tensorflow-cpu', 'tensorboard'}
  assert set(extras['all']) == set(extras['train'] + extras['plots'] + extras['digits'])
  # Every extra the error messages name installs the package they name.
  for module, provided_by in _extras.PROVIDED_BY.items():
    for extra in provided_by:
      assert canonicalize_name(DISTRIBUTION[module]) in _names(extras[extra]), (module, extra)


def _closure(requirements) -> set[str]:
  """Every distribution that installing `requirements` pulls, from the metadata installed here."""
  seen, todo = set(), [Requirement(r) for r in requirements]
  while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if name in seen or (req.marker and not req.marker.evaluate({'extra': ''})):
      continue
    seen.add(name)
    try:
      todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or ()]
    except importlib.metadata.PackageNotFoundError:
      pass  # not installed here: its own requirements are not known, the name is still counted
  return seen


def test_colab_extra_pulls_no_tensorflow():
  # What Colab installs (ood_jax[colab,plots]), followed through every dependency's metadata: no
  # TensorFlow distribution, so pip never installs one beside Colab's own `tensorflow`.
  _, extras, _ = _setup()
  pulled = _closure(extras['colab'] + extras['plots'])
  assert {'tensorflow-datasets', 'orbax-checkpoint', 'clu', 'matplotlib'} <= pulled
  assert not pulled & TENSORFLOW_DISTRIBUTIONS, pulled & TENSORFLOW_DISTRIBUTIONS
  assert 'tensorflow-cpu' in _closure(extras['train'])  # the check does see TensorFlow where it is


def _module_level_optional_imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(encoding='utf-8'))
  names = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
  optional = set()
  for name in names:
    for package in _extras.PROVIDED_BY:
      if name == package or name.startswith(package + '.'):
        optional.add(package)
  return optional


def test_extras_table_lists_every_module_level_optional_import():
  # A module importing an optional package at module level must be covered by ood_jax._extras.MODULES
  # (itself or a package above it), or its import error would not name the extra.
  package = REPO / 'ood_jax'
  uncovered = []
  for path in sorted(package.rglob('*.py')):
    parts = path.relative_to(REPO).with_suffix('').parts
    module = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    prefixes = ['.'.join(module.split('.')[:i]) for i in range(1, module.count('.') + 2)]
    covered = {name for prefix in prefixes for name in _extras.MODULES.get(prefix, ())}
    uncovered += [f'{module} imports {name}' for name in _module_level_optional_imports(path) - covered]
  assert not uncovered, 'add to ood_jax._extras.MODULES (or import on first use):\n' + '\n'.join(uncovered)
  for names in _extras.MODULES.values():
    assert set(names) <= set(_extras.PROVIDED_BY)


def test_missing_extra_names_the_pip_command():
  message = _extras.missing_message('ood_jax.trainer.train', ['ml_collections', 'clu'])
  assert "pip install 'ood_jax[train]'" in message and 'ml_collections, clu' in message
  assert "'colab'" in message and 'tensorflow-cpu' in message  # the Colab path
  message = _extras.missing_message('ood_jax.trainer.data', ['PIL'])
  assert "pip install 'ood_jax[train]' (or 'ood_jax[digits]')" in message
  assert _extras.missing_message('ood_jax.plots', ['matplotlib']).startswith(
      "ood_jax.plots needs matplotlib, which comes with the 'plots' extra of ood_jax: pip install 'ood_jax[plots]'")
  assert not any('Extras' in type(finder).__name__ for finder in sys.meta_path)  # no global import hook


_ENTRANCE_SCRIPT = r"""
import importlib, json, sys
sys.modules[sys.argv[1]] = None  # as if the package were not installed
try:
  importlib.import_module(sys.argv[2])
  print(json.dumps(None))
except ModuleNotFoundError as err:
  print(json.dumps([err.name, str(err)]))
"""


@pytest.mark.parametrize('missing, module, extra', [('clu', 'ood_jax.trainer.train', 'train'),
                                                    ('ml_collections', 'ood_jax.trainer.data', 'train'),
                                                    ('matplotlib', 'ood_jax.plots', 'plots')])
def test_wing_entrance_names_the_missing_extra(missing, module, extra):
  # The trainer wing and the figures check their packages at their entrance, before any module of theirs
  # imports one: the error names the extra, not a module deep inside. The core imports without them.
  result = subprocess.run([sys.executable, '-c', _ENTRANCE_SCRIPT, missing, module], capture_output=True, text=True,
                          cwd=REPO, check=True)
  name, message = json.loads(result.stdout.strip().splitlines()[-1])
  assert name == missing and f"pip install 'ood_jax[{extra}]'" in message, message
  core = subprocess.run([sys.executable, '-c', _ENTRANCE_SCRIPT, missing, 'ood_jax'], capture_output=True, text=True,
                        cwd=REPO, check=True)
  assert json.loads(core.stdout.strip().splitlines()[-1]) is None


def test_data_loaders_take_download():
  # config.download reaches every TFDS read: each loader of the catalog and of sources takes it.
  for fn in (catalog.load_ood_set, catalog.load_corrupted_set, catalog.load_outlier_set,
             catalog.load_train_and_validation, sources.load_split, sources.read_tfds, sources.load_outliers):
    assert inspect.signature(fn).parameters['download'].default is False, fn.__name__
  assert common.base_config().download is False  # opt-in; offline and CI runs never download
  assert 'download' in checkpoint.RESUME_IGNORED_FIELDS  # resuming with downloads on or off is the same run


def test_download_prepares_a_missing_tfds_dataset(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = 'ood_jax_download_probe'
  if name not in tfds.list_builders():
    # TFDS's own test builder (20 images generated locally, nothing fetched), registered under a name.
    type('OodJaxDownloadProbe', (tfds.testing.DummyMnist,), {'__module__': __name__})
  sources.clear_cache()
  with pytest.raises(sources.DatasetNotFoundError, match='download=True'):
    sources.read_tfds(name, 'train', data_dir=tmp_path, label_key='label')
  data = sources.read_tfds(name, 'train', data_dir=tmp_path, label_key='label', download=True)
  assert data.images.shape == (20, 28, 28, 1) and sorted(data.labels.tolist()) == sorted(list(range(10)) * 2)
  assert (tmp_path / name).is_dir()  # prepared under data_dir: the next read needs no download
  sources.clear_cache()
  assert len(sources.read_tfds(name, 'test', data_dir=tmp_path)) == 20


# Runs in the fresh venv: the Flax example of docs/own_model.md and a few calls, then what is (not) imported.
_CORE_SCRIPT = r"""
import importlib, importlib.util, json, re, sys
import numpy as np
readme = open(sys.argv[1], encoding='utf-8').read()
namespace = {}
exec(re.findall(r'```python\n(.*?)```', readme, flags=re.S)[0], namespace)
from ood_jax import layers, losses, metrics, scores
import jax.numpy as jnp
logits = jnp.array([[4.0, 0.0, -1.0], [0.1, 0.0, 0.2]])
values = {'auroc': float(namespace['auroc']), 'loss': float(namespace['loss']),
          'isomax': np.asarray(losses.isomax(logits, jnp.array([0, 2]))).tolist(),
          'msp': np.asarray(scores.max_softmax(logits)).tolist(),
          'ece': float(metrics.expected_calibration_error(jnp.full((4, 2), 0.5), jnp.array([0, 1, 0, 1]))),
          'distance': np.asarray(layers.negative_distances(jnp.ones((1, 2)), jnp.ones((3, 2)))).tolist()}
imported = sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2].split(',') + ['orbax']))
installed = sorted(m for m in sys.argv[2].split(',') if importlib.util.find_spec(m) is not None)
errors = {}
for module in sys.argv[3].split(','):
  try:
    importlib.import_module(module)
    errors[module] = None
  except ModuleNotFoundError as err:
    errors[module] = str(err)
print(json.dumps({'values': values, 'imported': imported, 'installed': installed, 'errors': errors}))
"""

_TRAINER_MODULES = {**{f'ood_jax.trainer.{name}': 'train' for name in (
    'train', 'evaluate', 'experiment', 'checkpoint', 'optim', 'finetune', 'data', 'data.sources', 'inference')},
                    'ood_jax.trainer': 'train', 'ood_jax.plots': 'plots'}


def _install_cell_functions():
  """Source of the notebook's install cell, less its last statements (the ones that act)."""
  cell = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
              if c.cell_type == 'code' and 'def install_commands' in c.source)
  tree = ast.parse(cell)
  keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign)
  tree.body = [node for node in tree.body if isinstance(node, keep)]
  return ast.unparse(tree)


def _run(command, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, f'{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
  return result.stdout


_WHEEL_SCRIPT = r"""
import importlib.util, json, sys
import ood_jax
from ood_jax import evaluation, layers_nnx  # noqa: F401  (the core's modules import without any extra)
print(json.dumps({'version': ood_jax.__version__, 'file': ood_jax.__file__,
                  'tensorflow': importlib.util.find_spec('tensorflow') is not None,
                  'imported': sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'orbax', 'clu'))}))
"""


@pytest.mark.slow
@pytest.mark.venv
def test_release_builds_passes_twine_and_installs_core_and_extras(tmp_path):
  # The release as a user gets it: `python -m build` on a clean copy of what setup.py packages, `twine check` as
  # PyPI's upload would, then one fresh venv from PyPI (pip's cache reused): the wheel alone is the core (the Flax
  # example of docs/own_model.md runs, nothing optional is installed or imported, the trainer wing names its
  # extra), the sdist builds and installs in its place, the notebook's install cell resolves without TensorFlow
  # in a Colab-like runtime, and the extras install (plots) or resolve (all). One venv for all of it: each fresh
  # core install costs about a minute of CI.
  source = tmp_path / 'src'
  shutil.copytree(REPO / 'ood_jax', source / 'ood_jax', ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('setup.py', 'README.md', 'CHANGELOG.md'):
    shutil.copy(REPO / name, source / name)
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env['PIP_DISABLE_PIP_VERSION_CHECK'] = '1'
  dist = tmp_path / 'dist'
  _run([sys.executable, '-m', 'build', '--sdist', '--wheel', '--outdir', str(dist), str(source)], env=env,
       cwd=tmp_path)
  version = _setup_version()
  wheel, = dist.glob(f'ood_jax-{version}-py3-none-any.whl')
  sdist, = dist.glob(f'ood_jax-{version}.tar.gz')
  assert 'PASSED' in _run([sys.executable, '-m', 'twine', 'check', '--strict', str(wheel), str(sdist)], env=env)

  env_dir = tmp_path / 'venv'
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / 'bin' / 'python')
  _run([python, '-m', 'pip', 'install', '--quiet', str(wheel)], env=env, cwd=tmp_path)
  report = json.loads(_run([python, '-c', _WHEEL_SCRIPT], env=env, cwd=tmp_path).strip().splitlines()[-1])
  assert report['version'] == version and str(env_dir) in report['file']
  assert not report['tensorflow'] and not report['imported'], report

  # The core alone: the docs' Flax example and a few calls; no optional package installed or imported.
  optional = ','.join(OPTIONAL_MODULES)
  out = _run([python, '-c', _CORE_SCRIPT, str(REPO / 'docs' / 'own_model.md'), optional, ','.join(_TRAINER_MODULES)],
             env=env, cwd=tmp_path)
  report = json.loads(out.strip().splitlines()[-1])
  assert report['installed'] == [], report['installed']  # none of TF, TFDS, clu, ml_collections, ... is there
  assert report['imported'] == [], report['imported']  # nor orbax (a flax dependency) imported
  assert report['values']['auroc'] > 0.95 and report['values']['loss'] < 0.5  # the docs' example, as in CI
  assert report['values']['distance'] == [[0.0, 0.0, 0.0]] and report['values']['ece'] == pytest.approx(0.0)
  for module, extra in _TRAINER_MODULES.items():
    message = report['errors'][module]
    assert message and f"pip install 'ood_jax[{extra}]'" in message, (module, message)

  # The sdist builds and installs in place of the wheel (its dependencies are already there).
  _run([python, '-m', 'pip', 'install', '--quiet', '--force-reinstall', '--no-deps', str(sdist)], env=env,
       cwd=tmp_path)
  assert json.loads(_run([python, '-c', _WHEEL_SCRIPT], env=env, cwd=tmp_path).strip().splitlines()[-1])[
      'version'] == version

  # The notebook's install cell in a runtime that has `tensorflow` (as Colab does; a stand-in distribution here)
  # with OOD_JAX_REPO a local checkout: no clone, the 'colab' extra, and pip's resolution of that command (a dry
  # run against PyPI) installs no TensorFlow beside it.
  site = pathlib.Path(_run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                           env=env).strip())
  (site / 'tensorflow').mkdir()
  (site / 'tensorflow' / '__init__.py').write_text("__version__ = '2.19.0'\n")
  (site / 'tensorflow-2.19.0.dist-info').mkdir()
  (site / 'tensorflow-2.19.0.dist-info' / 'METADATA').write_text(
      'Metadata-Version: 2.1\nName: tensorflow\nVersion: 2.19.0\n')
  plan = _install_cell_functions() + textwrap.dedent(f"""
      import json
      checkout, commands = install_commands({str(source)!r}, '/nonexistent/clone',
                                            tensorflow_installed=have_tensorflow())
      print(json.dumps([checkout, commands]))""")
  checkout, commands = json.loads(_run([python, '-c', plan], env=env, cwd=tmp_path).strip().splitlines()[-1])
  assert checkout == str(source) and len(commands) == 1 and commands[0][0] == python
  assert commands[0][-1] == f'{source}[colab,plots]'
  _run(commands[0] + ['--dry-run', '--report', str(tmp_path / 'colab.json')], env=env, cwd=tmp_path)
  would_install = {canonicalize_name(item['metadata']['name'])
                   for item in json.loads((tmp_path / 'colab.json').read_text())['install']}
  assert {'ood-jax', 'tensorflow-datasets', 'clu', 'matplotlib'} <= would_install
  assert not would_install & TENSORFLOW_DISTRIBUTIONS, would_install & TENSORFLOW_DISTRIBUTIONS

  # Extras: plots installs matplotlib and ood_jax.plots imports; pip resolves 'all' (a dry run: no TensorFlow
  # download) with the packages the trainer needs.
  _run([python, '-m', 'pip', 'install', '--quiet', f'{wheel}[plots]'], env=env, cwd=tmp_path)
  _run([python, '-c', 'import ood_jax.plots'], env=env, cwd=tmp_path)
  _run([python, '-m', 'pip', 'install', '--quiet', '--dry-run', '--ignore-installed', '--report',
        str(tmp_path / 'all.json'), f'{wheel}[all]'], env=env, cwd=tmp_path)
  plan = json.loads((tmp_path / 'all.json').read_text())['install']
  would_install = {canonicalize_name(item['metadata']['name']) for item in plan}
  assert {'tensorflow-cpu', 'tensorflow-datasets', 'clu', 'scikit-learn'} <= would_install  # orbax: with flax


def _setup_version():
  """ood_jax/__init__.py's __version__, as setup.py reads it."""
  namespace = {'__name__': 'setup_under_test', '__file__': str(REPO / 'setup.py')}
  source = (REPO / 'setup.py').read_text(encoding='utf-8').replace('setuptools.setup(', 'dict(')
  exec(compile(source, 'setup.py', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['VERSION']

