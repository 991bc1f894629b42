"""The README is the front door: its quick start runs, its commands are CI's, its sample output has the shape
the digits run prints, and its links resolve.
"""

import pathlib
import re

import flax.linen as nn
import jax
import numpy as np
import optax

from ood_jax import metrics
from ood_jax.evaluation import evaluator
from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / 'README.md'


def _text():
  return README.read_text(encoding='utf-8')


def _blocks(language):
  return re.findall(rf'^```{language}\n(.*?)^```', _text(), flags=re.S | re.M)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(3, name='head')(x)


def _your_model_and_data():
  """What the quick start assumes the reader has: a trained Linen classifier and arrays."""
  rng = np.random.default_rng(0)
  centres = np.array([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]])

  def blobs(n):
    y = rng.integers(0, 3, n)
    return (centres[y] + rng.normal(size=(n, 2))).astype(np.float32), y

  (x_train, y_train), (x_val, y_val), (x_test, y_test) = blobs(300), blobs(90), blobs(150)
  model = _Net()
  variables = model.init(jax.random.key(0), x_train[:1])
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(variables)
  loss_fn = lambda v: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x_train), y_train).mean()

  @jax.jit
  def step(variables, opt_state):
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(variables), opt_state)
    return optax.apply_updates(variables, updates), opt_state

  for _ in range(100):
    variables, opt_state = step(variables, opt_state)
  return {'model': model, 'variables': variables, 'x_train': x_train, 'y_train': y_train, 'x_val': x_val,
          'y_val': y_val, 'x_test': x_test, 'y_test': y_test,
          'x_near': (np.array([1.0, 1.0]) + rng.normal(size=(100, 2))).astype(np.float32),
          'x_far': rng.uniform(-30, 30, size=(100, 2)).astype(np.float32),
          'x_val_ood': (np.array([-6.0, 0.0]) + rng.normal(size=(100, 2))).astype(np.float32)}


def test_readme_quick_start_runs_on_a_model_of_your_own(tmp_path, monkeypatch, capsys):
  blocks = _blocks('python')
  assert len(blocks) == 1 and 'ood_jax.evaluation.evaluate(' in blocks[0]
  assert len(blocks[0].splitlines()) <= 16  # about 15 lines
  monkeypatch.chdir(tmp_path)
  namespace = _your_model_and_data()
  exec(compile(blocks[0], str(README), 'exec'), namespace)  # pylint: disable=exec-used
  results = namespace['report'].results
  assert {'near', 'far'} == set(results['benchmark']['groups']) and results['detectors']['ood_mean']
  assert 'Leaderboard' in capsys.readouterr().out
  assert (tmp_path / 'runs' / 'mine' / 'results.json').exists() and (tmp_path / 'runs' / 'mine' / 'results.md').exists()


def test_readme_shows_ci_install_and_test_commands_and_the_digits_commands_first():
  ci = (REPO / '.ci' / 'run').read_text(encoding='utf-8')
  install = re.search(r"^pip install --quiet (-e '\.\[all,test\]')$", ci, flags=re.M).group(1)
  assert f'pip install {install}' in _text()
  test_command = re.search(r'^(python -m pytest.*)$', ci, flags=re.M).group(1)
  quick_start = _text().split('## Quick start: the command line, offline', 1)[1]
  commands = [line for line in re.search(r'```bash\n(.*?)```', quick_start, flags=re.S).group(1).splitlines()]
  assert commands[0] == 'python -m experiments.train --config=configs/digits.py --workdir=runs/digits'
  assert commands[1].startswith(test_command)


def _digits_like_results():
  """A results dict shaped as the digits run writes it (set names, groups, calibration note, detectors)."""
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(6), size=120)
  labels = rng.integers(0, 6, 120)
  in_dist = {'num_examples': 120, **metrics.classification_metrics(probs, labels)}
  logits = 5.0 * np.eye(6)[labels[:30]]  # every validation example right: the temperature is not identified
  summary, calibrate = evaluator.calibration_block(logits, labels[:30])
  in_dist['calibrated'] = metrics.classification_metrics(calibrate(np.log(probs)), labels)
  near, far = ('digits/near',), ('digits/photos', 'digits/gaussian_noise', 'digits/uniform_noise')
  ins = rng.normal(1.0, 1.0, 120)
  outs = {name: rng.normal(shift, 1.0, 60) for name, shift in zip(near + far, (0.5, -1.0, 2.0, 0.0))}
  ood = {name: {score: metrics.ood_metrics(ins + k, o) for k, score in enumerate(('max_softmax', 'energy'))}
         for name, o in outs.items()}
  det = {name: {d: metrics.ood_metrics(ins, o + k / 5) for k, d in enumerate(('vim', 'knn', 'rmds', 'react'))}
         for name, o in outs.items()}
  results = {'method': 'softmax', 'backbone': 'digits_cnn', 'dataset': 'digits', 'default_score': 'max_softmax',
             'in_distribution': in_dist, 'calibration': {**summary, 'validation_examples': 30},
             'ood': ood, 'ood_mean': metrics.mean_over_sets(ood),
             'detectors': {'ood': det, 'ood_mean': metrics.mean_over_sets(det), 'tuning': {}}}
  results['benchmark'] = leaderboard.benchmark_block(results, protocol='digits', groups={'near': near, 'far': far},
                                                     validation=('digits/validation',))
  return results


def _shape(line):
  """A printed line with its numbers and detector names abstracted: what must not change is the layout."""
  line = re.sub(r'\d+\.\d+', '#', line)
  return re.sub(r'\b[a-z_]+ (# / #)', r'D \1', line)


def test_readme_sample_output_has_the_shape_the_digits_run_prints():
  quick_start = _text().split('## Quick start: the command line, offline', 1)[1]
  sample = re.search(r'```text\n(.*?)```', quick_start, flags=re.S).group(1).splitlines()
  printed = report.summary(_digits_like_results(), results_dir='runs/digits').splitlines()
  assert [_shape(line) for line in sample] == [_shape(line) for line in printed]
  after = quick_start.split('```text', 1)[1].split('```', 1)[1][:700]
  for provenance in ('seed 0', 'CPU', 'jax/jaxlib', 'flax', 'fpr95_ood_positive', 'conventions.md'):
    assert provenance in after, provenance  # the run's machine and versions, and the convention, beside it


def test_readme_is_a_front_door_with_links_that_resolve():
  text = _text()
  assert 150 <= len(text.splitlines()) <= 200
  for section in ('## Install', '## Quick start: the command line, offline', '## Quick start: your own Flax model',
                  "## Train the papers' methods", '## What is inside', '## How to cite'):
    assert section in text, section
  for target in re.findall(r'\]\((?!https?://|#)([^)\s]+)\)', text):
    assert (REPO / target.split('#')[0]).exists(), target
  assert "pip install -e '.[all]' 'jax[cuda12]'" in text
  assert not re.search(r'paper 00\d|issue \d', text)
