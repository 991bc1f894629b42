r"""Every training method of the five papers × every post-hoc detector on digits, offline.

  python -m experiments.digits_methods --workdir=runs/digits_methods --output=docs/digits_methods.md \
      --leaderboard=docs/digits_leaderboard.md

Trains, on the digits benchmark (`configs/digits.py`, real data), the softmax baseline, IsoMax and
DM (paper 000), one-vs-all and distance one-vs-all (paper 002), OE, Energy, ICE from scratch and
ICE fine-tuned from the softmax run (paper 001), SMOT with the softmax run as its base model (paper
004), SupCon and ReweightOOD (paper 003). Each run is evaluated on the 'digits' protocol
(`ood_jax.trainer.data.protocols`: near = test digits 6–9, far = photos and noise) with every detector its
model allows, hyperparameters tuned on the validation OOD set (held-out train digits 6–9). Writes
two tables: `--output`, each method by its default score (`ood_jax.evaluation.report.comparison_markdown`:
accuracy, ECE, AUROC / FPR@95 per set), and `--leaderboard`, the methods × detectors matrix of
near / far AUROC (`ood_jax.evaluation.leaderboard.compare_markdown`). OE, Energy and ICE see the rest of the
train digits 6–9 as outliers, so their near-OOD numbers measure seen classes; the far sets are
unseen by every method. Runs already in <workdir>/<name> are reused.
"""

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
import jax

from configs import digits as digits_config
from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report
from ood_jax.trainer import train


# name → (method, config overrides); '{softmax}' stands for the softmax run's workdir. Runs are trained
# in this order, so the softmax run exists before the runs that start from it.
RUNS = {
    'softmax': ('softmax', {}),
    'isomax': ('isomax', {}),
    'dm': ('dm', {}),
    'one_vs_all': ('one_vs_all', {}),
    'distance_one_vs_all': ('distance_one_vs_all', {}),
    'oe': ('oe', {}),
    'energy': ('energy', {}),
    # ICE's squared distances need clipping: unclipped it diverges within 2 steps (configs/ice.py).
    'ice': ('ice', {'optimizer.grad_clip_norm': 1.0}),
    'ice_finetuned': ('ice', {'init_from': '{softmax}', 'init_head': 'class_stats', 'num_epochs': 10,
                              'optimizer.learning_rate': 0.01, 'optimizer.grad_clip_norm': 1.0}),
    'smot': ('smot', {'base_model': '{softmax}'}),
    'supcon': ('supcon', {'augment': 'two_views'}),
    'reweightood': ('reweightood', {'augment': 'two_views'}),
}


def _config(method, overrides, workdir, smoke):
  config = digits_config.get_config('smoke' if smoke else None)
  config.method = method
  config.eval.ood_sets = ()            # the protocol's sets
  config.eval.benchmark = 'digits'
  config.eval.detectors = 'knn' if smoke else 'all'  # smoke: one tuned detector that every model allows
  softmax = os.path.join(workdir, 'softmax')
  config.update_from_flattened_dict(
      {key: value.format(softmax=softmax) if isinstance(value, str) else value for key, value in overrides.items()})
  if smoke:
    config.num_steps = 8  # also caps the fine-tune's 10 epochs
  return config


def _write(path: str | None, text: str) -> None:
  if path:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)


def run(workdir: str, output: str | None, *, leaderboard_output: str | None = None, smoke: bool = False,
        names=None) -> tuple[str, str]:
  """Trains (or reuses) the runs of `RUNS` (or those named) and returns (comparison, leaderboard) tables."""
  names = list(RUNS) if names is None else list(names)
  for name in names:
    method, overrides = RUNS[name]
    run_dir = os.path.join(workdir, name)
    if not os.path.exists(os.path.join(run_dir, 'results.json')):
      train.train_and_evaluate(_config(method, overrides, workdir, smoke), run_dir)
  runs = {name: r for name, r in zip(names, report.load_results([os.path.join(workdir, n) for n in names]).values())}
  table = report.comparison_markdown(runs)
  matrix = leaderboard.compare_markdown(runs)
  _write(output, table)
  _write(leaderboard_output, matrix)
  return table, matrix


def provenance(minutes: float, smoke: bool) -> str:
  """The lines that say how the committed tables were made, prepended to both files by `main`."""
  data = 'tiny smoke runs (8 steps each), not results' if smoke else "real data: scikit-learn's 8×8 digits"
  return (f'Written by `python -m experiments.digits_methods --workdir=runs/digits_methods '
          f'--output=docs/digits_methods.md --leaderboard=docs/digits_leaderboard.md` ({data}; {len(RUNS)} runs '
          f'trained and evaluated in {minutes:.1f} minutes on {os.cpu_count()} CPU cores, jax {jax.__version__}).\n\n')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  start = time.time()
  # The files are written here, not by `run`: their first line needs the runtime, known only now.
  table, matrix = run(flags.FLAGS.workdir, None, smoke=flags.FLAGS.smoke)
  minutes = (time.time() - start) / 60
  header = provenance(minutes, flags.FLAGS.smoke)
  for path, text in ((flags.FLAGS.output, table), (flags.FLAGS.leaderboard, matrix)):
    _write(path, header + text)
  print(table)
  print(matrix)
  logging.info('digits_methods: %.1f minutes', minutes)


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_string('workdir', 'runs/digits_methods', 'Folder for the runs.')
  flags.DEFINE_string('output', 'docs/digits_methods.md', 'Markdown file for the comparison table.')
  flags.DEFINE_string('leaderboard', 'docs/digits_leaderboard.md', 'Markdown file for the methods × detectors table.')
  flags.DEFINE_bool('smoke', False, 'Tiny runs (8 steps each), for tests.')
  app.run(main)
