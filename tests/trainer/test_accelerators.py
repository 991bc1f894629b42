"""What a GPU/TPU run needs, checked on this CPU: traces of chosen steps, the process settings `prepare` applies
before JAX starts, the persistent compilation cache across processes, and installs that resolve JAX's CUDA and TPU
builds within ood_jax's JAX range (pip dry runs against PyPI: marked `venv` and `slow`, run by the release check).

The platform-specific programs (no CPU rewrites in a GPU/TPU program) are tested in tests/test_batch_norm.py, MFU
per device in tests/trainer/test_throughput.py, the deterministic-ops flags in tests/trainer/test_xla_options.py.
"""

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import venv

import jax
import ml_collections
import nbformat
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
import pytest

from configs import digits as digits_config
from ood_jax.trainer import experiment
from ood_jax.trainer import profiling
from ood_jax.trainer import train
from ood_jax.trainer import xla_options

REPO = pathlib.Path(__file__).resolve().parents[2]


def _smoke_config(**overrides):
  """4 steps of the digits smoke run with the MLP (the fastest step to compile), on one device, no evaluation."""
  config = digits_config.get_config('smoke')
  config.backbone = 'mlp'
  config.num_steps = 4
  config.num_devices = 1
  config.eval.ood_sets = ()
  config.update_from_flattened_dict(overrides)
  return config


def test_profile_steps_are_traced_and_prepare_sets_the_process_first(tmp_path, monkeypatch):
  applied = []
  # Recorded, not applied: the compilation cache and XLA_FLAGS of this test process stay as they are.
  monkeypatch.setattr(xla_options, 'set_deterministic', lambda enabled: applied.append(('deterministic', enabled)))
  monkeypatch.setattr(xla_options, 'use_compilation_cache', lambda folder: applied.append(('cache', folder)))
  config = _smoke_config(profile_steps='2-3', compilation_cache_dir=str(tmp_path / 'cache'))
  workdir = tmp_path / 'run'
  exp, mesh, unchanged = train.prepare(config, str(workdir))
  assert applied == [('deterministic', True), ('cache', str(tmp_path / 'cache'))]
  assert exp.settings.profile_steps == (2, 3) and exp.settings.process.deterministic
  state = train.train(exp, str(workdir), mesh, config_unchanged=unchanged)
  assert int(state.step) == 4
  # One trace for the run of steps 2-3, where TensorBoard's profile plugin looks (plugins/profile/<run>/).
  traces = sorted((workdir / 'profile').glob('steps_2-3/plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, list((workdir / 'profile').rglob('*'))
  assert [p.name for p in (workdir / 'profile').iterdir()] == ['steps_2-3']
  content = traces[0].read_bytes()
  assert b'train' in content and b'step_num' in content  # the StepTraceAnnotation of each traced step


def test_profiler_traces_each_run_of_steps_once_even_when_resumed_inside_one(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(jax.profiler, 'start_trace', lambda logdir: calls.append(('start', os.path.basename(logdir))))
  monkeypatch.setattr(jax.profiler, 'stop_trace', lambda: calls.append(('stop',)))
  with profiling.StepProfiler((2, 3, 4, 7, 9, 10), str(tmp_path)) as profiler:
    for n in range(3, 10):  # resumed at step 3; stops inside the run 9-10 (preempted after step 9)
      with profiler.step(n):
        calls.append(n)
      profiler.step_done(n, None)
  assert calls == [('start', 'steps_2-4'), 3, 4, ('stop',), 5, 6, ('start', 'steps_7-7'), 7, ('stop',), 8,
                   ('start', 'steps_9-10'), 9, ('stop',)]


@pytest.mark.parametrize('text, steps', [('', ()), ('5', (5,)), ('3, 1', (1, 3)), ('2-4,4,7', (2, 3, 4, 7))])
def test_profile_steps_parse(text, steps):
  assert experiment.profile_steps(text) == steps


@pytest.mark.parametrize('text, match', [('0', 'count from 1'), ('4-2', 'a <= b'), ('x', 'neither a step'),
                                         (3, 'must be a string')])
def test_profile_steps_errors(text, match):
  with pytest.raises(ValueError, match=match):
    experiment.profile_steps(text)


def test_process_settings_are_checked_without_the_backend():
  config = _smoke_config()
  assert experiment.process_settings(config) == experiment.ProcessSettings(deterministic=True,
                                                                           compilation_cache_dir=None)
  fields = config.to_dict()
  fields['deterministic'] = 'yes'
  with pytest.raises(ValueError, match='deterministic must be True or False'):
    experiment.process_settings(ml_collections.ConfigDict(fields))


# Runs in a fresh process: the cache hook `prepare` calls, one small jitted program, the cache hits JAX records.
_CACHE_SCRIPT = r"""
import json, sys
import jax
import jax.numpy as jnp
from ood_jax.trainer import xla_options
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kwargs: hits.append(event) if event == '/jax/compilation_cache/cache_hits' else None)
xla_options.use_compilation_cache(sys.argv[1])
value = jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.arange(3.0))
print(json.dumps({'hits': len(hits), 'value': value.tolist()}))
"""


def test_compilation_cache_is_reused_by_a_second_process(tmp_path):
  cache = tmp_path / 'cache'
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'XLA_FLAGS': ''}

  def run():
    result = subprocess.run([sys.executable, '-c', _CACHE_SCRIPT, str(cache)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])

  first = run()
  entries = sorted(p.name for p in cache.iterdir())
  assert first['hits'] == 0 and entries  # written, though each program compiles in milliseconds
  second = run()
  assert second['hits'] >= 1 and second['value'] == first['value']
  assert sorted(p.name for p in cache.iterdir()) == entries  # loaded, nothing compiled anew


# ---- installs (pip dry runs against PyPI) ----


def _pip(*args, python=None):
  """pip of this environment, for the interpreter `python` (a venv without pip of its own) if given."""
  command = [sys.executable, '-m', 'pip'] + (['--python', python] if python else []) + list(args)
  result = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, 'PIP_DISABLE_PIP_VERSION_CHECK': '1'})
  assert result.returncode == 0, f'{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'


def _resolved(report_path) -> dict[str, str]:
  report = json.loads(pathlib.Path(report_path).read_text())
  return {canonicalize_name(item['metadata']['name']): item['metadata']['version'] for item in report['install']}


def _source_copy(tmp_path) -> pathlib.Path:
  """The package's sources in tmp_path: pip's metadata builds never write into the checkout."""
  source = tmp_path / 'ood_jax_src'
  shutil.copytree(REPO / 'ood_jax', source / 'ood_jax', ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('setup.py', 'README.md'):
    shutil.copy(REPO / name, source / name)
  return source


def _jax_range():
  namespace = {'__name__': 'setup_under_test', '__file__': str(REPO / 'setup.py')}
  source = (REPO / 'setup.py').read_text(encoding='utf-8').replace('setuptools.setup(', 'dict(')
  exec(compile(source, 'setup.py', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['JAX_VERSIONS'], namespace['EXTRAS_REQUIRE']


def _in_range(version: str) -> bool:
  return Version('0.6') <= Version(version) < Version('0.13')


def test_accelerator_extras_share_the_core_jax_range():
  jax_versions, extras = _jax_range()
  assert jax_versions == '>=0.6,<0.13'
  assert extras['cuda12'] == [f'jax[cuda12]{jax_versions}'] and extras['tpu'] == [f'jax[tpu]{jax_versions}']
  assert extras['cuda13'] == [f'jax[cuda13]{jax_versions},>=0.7']  # jax's cuda13 extra starts at 0.7.0
  assert not any(Requirement(r).name == 'jax' for r in extras['all'])  # 'all' stays accelerator-neutral


# The plugin distributions each accelerator extra must bring at jax's own version.
_PLUGINS = {'cuda12': ('jax-cuda12-plugin', 'jax-cuda12-pjrt'), 'cuda13': ('jax-cuda13-plugin', 'jax-cuda13-pjrt'),
            'tpu': ()}


@pytest.mark.slow
@pytest.mark.venv
def test_all_with_an_accelerator_resolves_jax_and_its_plugin_within_the_range(tmp_path):
  # The documented install line, `pip install -e '.[all,cuda12]'`, in a fresh environment: one resolution.
  source = _source_copy(tmp_path)
  _pip('install', '--quiet', '--dry-run', '--ignore-installed', '--report', str(tmp_path / 'all.json'),
       f'{source}[all,cuda12]')
  resolved = _resolved(tmp_path / 'all.json')
  assert _in_range(resolved['jax']), resolved['jax']
  assert resolved['jaxlib'] == resolved['jax-cuda12-plugin'] == resolved['jax-cuda12-pjrt'] == resolved['jax']
  assert 'tensorflow-cpu' in resolved


def _runtime(tmp_path, requirements) -> str:
  """A venv standing in for a Colab runtime: the distributions `requirements` resolve to, as metadata only.

  Colab preinstalls JAX's accelerator build (jax, jaxlib and a CUDA plugin, or libtpu) and TensorFlow; pip reads
  what is installed from each distribution's METADATA, so the files are all a dry run needs. No pip inside: the
  test's pip acts on it (`pip --python`).
  """
  _pip('install', '--quiet', '--dry-run', '--ignore-installed', '--report', str(tmp_path / 'runtime.json'),
       *requirements)
  env_dir = tmp_path / 'runtime'
  venv.create(env_dir, with_pip=False)
  python = str(env_dir / 'bin' / 'python')
  site = pathlib.Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                     capture_output=True, text=True, check=True).stdout.strip())
  report = json.loads((tmp_path / 'runtime.json').read_text())
  metadata = [item['metadata'] for item in report['install']]
  metadata.append({'name': 'tensorflow', 'version': '2.19.0'})
  for meta in metadata:
    info = site / f'{meta["name"].replace("-", "_")}-{meta["version"]}.dist-info'
    info.mkdir()
    lines = ['Metadata-Version: 2.1', f'Name: {meta["name"]}', f'Version: {meta["version"]}']
    lines += [f'Requires-Dist: {r}' for r in meta.get('requires_dist', ())]
    lines += [f'Provides-Extra: {e}' for e in meta.get('provides_extra', ())]
    (info / 'METADATA').write_text('\n'.join(lines) + '\n')
  (site / 'tensorflow').mkdir()
  (site / 'tensorflow' / '__init__.py').write_text("__version__ = '2.19.0'\n")
  return python


def _install_cell_functions() -> str:
  """The notebook install cell's imports, assignments and functions (not the statements that act)."""
  cell = next(c.source for c in nbformat.read(REPO / 'colab' / 'cifar10c_calibration.ipynb', as_version=4).cells
              if c.cell_type == 'code' and 'def install_commands' in c.source)
  tree = ast.parse(cell)
  keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign)
  tree.body = [node for node in tree.body if isinstance(node, keep)]
  return ast.unparse(tree)


@pytest.mark.slow
@pytest.mark.venv
@pytest.mark.parametrize('runtime, extra, kept', [
    (('jax[cuda12]==0.5.2', 'flax==0.10.6'), 'cuda12', False),  # an older Colab GPU runtime: upgraded together
    (('jax[cuda13]==0.8.0', 'flax==0.12.0'), 'cuda13', True),  # a runtime within ood_jax's range: kept
    (('jax[tpu]==0.5.2', 'flax==0.10.6'), 'tpu', False),  # a Colab TPU runtime: jax, jaxlib and libtpu together
])
def test_colab_install_keeps_or_upgrades_the_runtime_accelerator_jax(tmp_path, runtime, extra, kept):
  python = _runtime(tmp_path, runtime)
  source = _source_copy(tmp_path)
  plan = _install_cell_functions() + textwrap.dedent(f"""
      import json
      print(json.dumps(install_commands({str(source)!r}, '/nonexistent/clone', tensorflow_installed=have_tensorflow(),
                                        accelerator=accelerator_extra())))""")
  result = subprocess.run([python, '-c', plan], capture_output=True, text=True, check=True, cwd=tmp_path)
  checkout, commands = json.loads(result.stdout.strip().splitlines()[-1])
  assert checkout == str(source) and len(commands) == 1 and commands[0][:4] == [python, '-m', 'pip', 'install']
  assert commands[0][-1] == f'{source}[colab,plots,{extra}]'
  _pip(*commands[0][3:], '--dry-run', '--report', str(tmp_path / 'install.json'), python=python)
  resolved = _resolved(tmp_path / 'install.json')
  assert 'tensorflow' not in resolved and 'tensorflow-cpu' not in resolved  # the runtime's TensorFlow stays
  accelerator = ('jax', 'jaxlib') + _PLUGINS[extra]
  if kept:
    assert not set(accelerator) & set(resolved), resolved
    return
  assert _in_range(resolved['jax']), resolved['jax']
  versions = {name: resolved.get(name) for name in accelerator}
  assert set(versions.values()) == {resolved['jax']}, versions
  if extra == 'tpu':  # the libtpu that this jax release names
    _pip('install', '--quiet', '--dry-run', '--ignore-installed', '--no-deps', '--report',
         str(tmp_path / 'jax.json'), f'jax[tpu]=={resolved["jax"]}')
    wanted = json.loads((tmp_path / 'jax.json').read_text())['install'][0]['metadata']['requires_dist']
    libtpu = next(Requirement(r) for r in wanted if Requirement(r).name == 'libtpu')
    assert Version(resolved['libtpu']) in libtpu.specifier, (str(libtpu), resolved['libtpu'])
