r"""Every training method of the five papers × every post-hoc detector on digits, offline.

  python -m experiments.digits_methods --workdir=runs/digits_methods --output=docs/digits_methods.md \
      --leaderboard=docs/digits_leaderboard.md --seeds=0,1,2

Trains, on the digits benchmark (`configs/digits.py`, real data), the softmax baseline, IsoMax
(Macêdo et al. 2021), DM, one-vs-all and distance one-vs-all (Padhy et al. 2020), OE, Energy, ICE from scratch
and ICE fine-tuned from the softmax run (Wu et al. 2022), SMOT with the softmax run as its base model (the
anonymous "Out-of-Distribution Detection with Smooth Training"), SupCon and ReweightOOD (Regmi et al. 2024), and
the training baselines of OpenOOD v1.5's leaderboard (LogitNorm, T2FNorm, Mixup, RegMixup, ConfBranch,
G-ODIN, RotPred, MixOE fine-tuned from the softmax run, VOS, NPOS and CIDER). Each run is evaluated on the
'digits' protocol (`ood_jax.trainer.data.protocols`: near = test digits
6–9, far = photos and noise) with every detector its model allows, hyperparameters tuned on the validation OOD
set (held-out train digits 6–9). Writes two tables: `--output`, each method by its default score
(`ood_jax.evaluation.report.comparison_markdown`: accuracy, ECE, AUROC / FPR@95 per set), and `--leaderboard`,
the methods × detectors matrix of near / far AUROC (`ood_jax.evaluation.leaderboard.compare_markdown`). OE,
Energy and ICE see the rest of the train digits 6–9 as outliers, so their near-OOD numbers measure seen
classes; the far sets are unseen by every method.

Every run is trained once per seed of --seeds (default 0, 1, 2; `config.seed`, the weights' initialisation and
the batch order: the data split is fixed), in <workdir>/<name>/seed<k>, and the runs of one seed start from
that seed's softmax run. Both tables give every number as the mean ± sample standard deviation over the seeds
(`experiments.seeds`), headed by the command, the seeds, the machine and the library versions: a single run's
numbers, the far-OOD ones most, change with the seed and the CPU, and the std says by how much. Runs already
there are reused.
"""

import os
import shlex
import sys
import time

from experiments import cli  # before the imports that load TensorFlow: it sets TensorFlow's logging

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging

from configs import digits as digits_config
from experiments import seeds as seeds_lib
from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report
from ood_jax.trainer import train


# name → (method, config overrides); '{softmax}' stands for the workdir of the softmax run of the same seed.
# Runs are trained in this order, so the softmax run exists before the runs that start from it.
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
    # Training baselines of OpenOOD v1.5 (configs/openood_baselines.py), at the methods' CIFAR-10 defaults.
    'logitnorm': ('logitnorm', {}),
    't2fnorm': ('t2fnorm', {}),
    'mixup': ('mixup', {}),
    'regmixup': ('regmixup', {}),
    'confbranch': ('confbranch', {}),
    'godin': ('godin', {}),
    'rotpred': ('rotpred', {}),
    # MixOE fine-tunes the softmax run with outliers as OpenOOD does (10 epochs; a tenth of the from-scratch rate
    # here, where OpenOOD's hundredth barely moves the ~110 steps), one outlier per image.
    'mixoe': ('mixoe', {'init_from': '{softmax}', 'num_epochs': 10, 'optimizer.learning_rate': 0.005,
                        'outliers.batch_size': 64}),
    # VOS, NPOS, CIDER: OpenOOD's recipes with queues scaled to the digits' ~300 training images per class.
    'vos': ('vos', {'method_kwargs': {'queue_size': 100, 'num_samples': 2000}}),
    'npos': ('npos', {'augment': 'two_views', 'method_kwargs': {
        'queue_size': 100, 'neighbours': 20, 'boundary': 20, 'pick': 2, 'num_candidates': 100, 'keep': 20}}),
    'cider': ('cider', {'augment': 'two_views'}),
}


def _config(method, overrides, workdir, smoke, seed=0):
  config = digits_config.get_config('smoke' if smoke else None)
  config.method = method
  config.seed = seed
  config.eval.ood_sets = ()            # the protocol's sets
  config.eval.benchmark = 'digits'
  config.eval.detectors = 'knn' if smoke else 'all'  # smoke: one tuned detector that every model allows
  softmax = seeds_lib.run_dir(workdir, 'softmax', seed)  # the softmax run of the same seed
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
        names=None, seeds=seeds_lib.DEFAULT_SEEDS) -> tuple[str, str]:
  """Trains (or reuses) the runs of `RUNS` (or those named) once per seed and returns the (comparison,
  leaderboard) tables of their mean ± std over the seeds."""
  names = list(RUNS) if names is None else list(names)
  for seed in seeds:  # seed by seed: an interrupted sweep leaves whole seeds, and softmax precedes its dependents
    for name in names:
      method, overrides = RUNS[name]
      run_dir = seeds_lib.run_dir(workdir, name, seed)
      if not os.path.exists(os.path.join(run_dir, 'results.json')):
        train.train_and_evaluate(_config(method, overrides, workdir, smoke, seed), run_dir)
  runs = {}
  for name in names:
    per_seed = report.load_results([seeds_lib.run_dir(workdir, name, seed) for seed in seeds])
    runs[name] = seeds_lib.spread(list(per_seed.values()), seeds)
  table = report.comparison_markdown(runs)
  matrix = leaderboard.compare_markdown(runs)
  _write(output, table)
  _write(leaderboard_output, matrix)
  return table, matrix


def provenance(command: str, seeds, minutes: float, smoke: bool, runs: int = len(RUNS), reused: int = 0) -> str:
  """The paragraph that says how the committed tables were made, prepended to both files by `main`."""
  data = 'tiny smoke runs (8 steps each), not results' if smoke else "real data: scikit-learn's 8×8 digits"
  return seeds_lib.provenance(command, seeds, minutes, f'{data}; {runs} runs × {len(seeds)} seeds', reused=reused)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  seeds = seeds_lib.from_flag(flags.FLAGS.seeds, smoke=flags.FLAGS.smoke)
  start = time.time()
  # Runs an earlier (interrupted or parallel) invocation trained: this one only evaluates them, and says so.
  reused = sum(os.path.isdir(os.path.join(seeds_lib.run_dir(flags.FLAGS.workdir, name, seed), 'checkpoints'))
               for seed in seeds for name in RUNS)
  # The files are written here, not by `run`: their first line needs the runtime, known only now.
  table, matrix = run(flags.FLAGS.workdir, None, smoke=flags.FLAGS.smoke, seeds=seeds)
  minutes = (time.time() - start) / 60
  command = shlex.join(['python', '-m', 'experiments.digits_methods', *sys.argv[1:]])
  header = provenance(command, seeds, minutes, flags.FLAGS.smoke, reused=reused)
  for path, text in ((flags.FLAGS.output, table), (flags.FLAGS.leaderboard, matrix)):
    _write(path, header + text)
  print(header + table)
  print(matrix)
  logging.info('digits_methods: %.1f minutes', minutes)


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_string('workdir', 'runs/digits_methods', 'Folder for the runs.')
  flags.DEFINE_string('output', 'docs/digits_methods.md', 'Markdown file for the comparison table.')
  flags.DEFINE_string('leaderboard', 'docs/digits_leaderboard.md', 'Markdown file for the methods × detectors table.')
  flags.DEFINE_bool('smoke', False, 'Tiny runs (8 steps each), for tests.')
  flags.DEFINE_list('seeds', None, seeds_lib.FLAG_HELP)
  cli.run(main)
