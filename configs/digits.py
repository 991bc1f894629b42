"""The offline embedded default: real handwritten digits shipped inside scikit-learn.

  python -m experiments.train --config=configs/digits.py --workdir=runs/digits
  python -m experiments.train --config=configs/digits.py --workdir=runs/digits_isomax --config.method=isomax

Any method of `ood_jax.methods` works through --config.method=... (softmax, isomax, dm, one_vs_all,
distance_one_vs_all). In-distribution: digits 0–5 (724 train, of which 10 % are held out for
calibration, / 359 test, 32×32 grey); OOD: test
digits 6–9 (near), patches of scikit-learn's two sample photos and noise (far). No network, no
download. Runtime: about a minute on 2 CPU cores (`:smoke`: a few seconds). No paper number: this
is the offline sanity benchmark; expect ~98 % accuracy and near-OOD AUROC well below far-OOD.
"""

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.dataset = 'digits'
  c.backbone = 'digits_cnn'
  c.batch_size = 64
  c.num_epochs = 30
  c.augment = 'crop'               # pad-4 crop, no flip: a mirrored digit is another symbol
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = 'cosine'
  # Used by the outlier-exposure methods (oe, energy, ice): train digits 6–9, disjoint from the test sets.
  c.outliers.source = 'digits/outliers'
  c.outliers.batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 100
  c.eval.batch_size = 256
  c.eval.ood_sets = ('digits/near', 'digits/photos', 'digits/gaussian_noise', 'digits/uniform_noise')
  c.eval.detectors = 'all'  # every post-hoc detector the model allows, one row each (a few seconds here)
  # The digits protocol (ood_jax.trainer.data.protocols): the sets above as near / far, detector hyperparameters
  # tuned on held-out train digits 6–9, and the leaderboard table in results.md.
  c.eval.benchmark = 'digits'
  if arg == 'smoke':
    c.eval.detectors = ''
    c.eval.benchmark = ''  # tests set the sets they need
    c.num_epochs = 2
    c.log_every_steps = 10
    c.checkpoint_every_steps = 10
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; valid: 'smoke' or none.")
  return c
