"""The experiment scripts: importable together (flags are defined only when a script runs) and runnable."""

import importlib
import os
import pathlib
import subprocess
import sys

from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (REPO / 'experiments').glob('*.py') if p.stem != '__init__')


def test_every_script_imports_into_one_process_without_defining_flags():
  for name in SCRIPTS:
    importlib.import_module(f'experiments.{name}')
  # Two scripts defining --workdir on import could not share a process (the tests import several).
  defined = [module for module in flags.FLAGS.flags_by_module_dict() if module.startswith('experiments')]
  assert not defined


def test_scripts_define_their_flags_when_run():
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  for name, flag in (('train', '--workdir'), ('compare', '--output'), ('digits_methods', '--[no]smoke')):
    out = subprocess.run([sys.executable, '-m', f'experiments.{name}', '--helpfull'], cwd=REPO, env=env,
                         capture_output=True, text=True).stdout  # absl exits 1 after help
    assert flag in out, name
  missing = subprocess.run([sys.executable, '-m', 'experiments.train'], cwd=REPO, env=env, capture_output=True,
                           text=True)
  assert missing.returncode != 0 and 'must have a value other than None' in missing.stderr


def test_evaluate_loads_a_model_of_your_own_by_module_and_class():
  # `experiments.evaluate --model=<module>:<class> --model_kwargs=<JSON>`: the class imported and built with the
  # arguments; every malformed value is a usage error (exit 2, one line) that names the flag.
  from absl import app  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from experiments import evaluate  # pylint: disable=g-import-not-at-top

  model = evaluate.load_model('flax.linen:Dense', '{"features": 3, "use_bias": false}')
  assert isinstance(model, nn.Dense) and (model.features, model.use_bias) == (3, False)
  assert isinstance(evaluate.load_model('ood_jax.models.small:MLP', None), nn.Module)
  for spec, kwargs, message in (('flax.linen.Dense', None, '<module path>:<class name>'),
                                ('flax.linen:Dense', '{"features": 3', 'must be a JSON object'),
                                ('flax.linen:Dense', '[3]', 'must be a JSON object'),
                                ('flax.linen:NoSuchLayer', None, 'cannot be imported'),
                                ('no_such_package.models:Net', None, 'cannot be imported')):
    with pytest.raises(app.UsageError, match=message):
      evaluate.load_model(spec, kwargs)
