r"""Every outlier-exposure, contrastive and smooth-training method side by side on digits, offline.

  python -m experiments.digits_methods --workdir=runs/digits_methods --output=docs/digits_methods.md

Trains, on the digits benchmark (`configs/digits.py`, real data, about 8 minutes on 2 CPU cores), the
softmax baseline, OE, Energy, ICE from scratch and ICE fine-tuned from the softmax run (paper 001),
SMOT with the softmax run as its base model (paper 004), SupCon and ReweightOOD (paper 003), and
writes one table (`ood_jax.report.comparison_markdown`): accuracy, ECE and AUROC / FPR@95 of each
method's default score on the near (digits 6–9) and far (photos, noise) OOD sets. OE, Energy and ICE
see the train digits 6–9 as outliers, so their near-OOD numbers measure seen classes; the far sets
are unseen by every method. Runs already in <workdir>/<name> are reused.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging

from configs import digits as digits_config
from ood_jax import report
from ood_jax import train


# name → (method, config overrides); '{softmax}' stands for the softmax run's workdir. Runs are trained
# in this order, so the softmax run exists before the runs that start from it.
RUNS = {
    'softmax': ('softmax', {}),
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
  softmax = os.path.join(workdir, 'softmax')
  config.update_from_flattened_dict(
      {key: value.format(softmax=softmax) if isinstance(value, str) else value for key, value in overrides.items()})
  if smoke:
    config.num_steps = 8  # also caps the fine-tune's 10 epochs
  return config


def run(workdir: str, output: str | None, *, smoke: bool = False) -> str:
  """Trains (or reuses) every run of `RUNS` and returns the comparison table (also written to `output`)."""
  for name, (method, overrides) in RUNS.items():
    run_dir = os.path.join(workdir, name)
    if not os.path.exists(os.path.join(run_dir, 'results.json')):
      train.train_and_evaluate(_config(method, overrides, workdir, smoke), run_dir)
  runs = report.load_results([os.path.join(workdir, name) for name in RUNS])
  table = report.comparison_markdown({os.path.basename(path): r for path, r in runs.items()})
  if output:
    os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
    with open(output, 'w', encoding='utf-8') as f:
      f.write(table)
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  print(run(flags.FLAGS.workdir, flags.FLAGS.output, smoke=flags.FLAGS.smoke))


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_string('workdir', 'runs/digits_methods', 'Folder for the runs.')
  flags.DEFINE_string('output', 'docs/digits_methods.md', 'Markdown file for the table.')
  flags.DEFINE_bool('smoke', False, 'Tiny runs (8 steps each), for tests.')
  app.run(main)
