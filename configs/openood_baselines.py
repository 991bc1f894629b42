r"""Training baselines of OpenOOD v1.5's leaderboard on CIFAR-10 (Zhang et al. 2023, "OpenOOD v1.5"):
LogitNorm, T2FNorm, Mixup, RegMixup, ConfBranch and G-ODIN, each trained from scratch and scored on the
OpenOOD v1.5 protocol (near: CIFAR-100, TinyImageNet; far: MNIST, SVHN, Textures, Places365).

  python -m experiments.train --config=configs/openood_baselines.py:logitnorm --workdir=runs/openood_c10/logitnorm
  python -m experiments.train --config=configs/openood_baselines.py:t2fnorm --workdir=runs/openood_c10/t2fnorm
  python -m experiments.train --config=configs/openood_baselines.py:mixup --workdir=runs/openood_c10/mixup
  python -m experiments.train --config=configs/openood_baselines.py:regmixup --workdir=runs/openood_c10/regmixup
  python -m experiments.train --config=configs/openood_baselines.py:confbranch --workdir=runs/openood_c10/confbranch
  python -m experiments.train --config=configs/openood_baselines.py:godin --workdir=runs/openood_c10/godin

Argument (after ':', comma-separated): a method, logitnorm (default) | t2fnorm | mixup | regmixup |
confbranch | godin; and smoke (4 steps of batch 16 and one OOD set, CIFAR-100, instead of the protocol;
CPU tests). The protocol reads TinyImageNet and Places365 from OpenOOD's release (prepare it as
`ood_jax.trainer.data.protocols` says) and CIFAR, MNIST, SVHN and Textures from TFDS
(`tfds build cifar10 cifar100 mnist svhn_cropped dtd`).

Recipe (OpenOOD v1.5's `configs/pipelines/train/*.yml` and `scripts/`): ResNet-18 with the CIFAR stem,
100 epochs, batch 128, SGD lr 0.1 with Nesterov momentum 0.9, weight decay 5e-4, cosine decay (OpenOOD's
floor of 1e-6·lr is left out), pad-4 crop + flip, inputs standardised with the CIFAR-10 statistics.
Method hyperparameters (ood_jax.methods, overridable with --config.method_kwargs.<name>=...):
  logitnorm   τ = 0.04                       (losses.logit_norm)
  t2fnorm     τ = 0.1                        (layers.FeatureNormDense)
  mixup       α = 0.2                        (OpenOOD's; Zhang et al. 2018 used α = 1 on CIFAR-10)
  regmixup    α = 20, η = 1                  (the authors' CIFAR-10 command and OpenOOD's script)
  confbranch  budget β = 0.3, initial λ = 0.1, hints on half the examples (OpenOOD's)
  godin       cosine dividend h, divisor g = σ(BN(Linear(f)))
Known differences from OpenOOD: 10 % of the training images are held out (validation_fraction) for the
calibrator and detector tuning (--config.validation_fraction=0 trains on the whole split); G-ODIN's weight
decay also applies to its dividend weights (OpenOOD exempts them) and its score is taken without the input
perturbation (ε = 0.0025) of OpenOOD's postprocessor; T2FNorm's ID accuracy is measured with the raw-feature
logits its scores use (OpenOOD classifies with the normalised features).

Expected numbers: OpenOOD v1.5 leaderboard, CIFAR-10, ResNet-18, 100 epochs, mean ± std over three
training runs, near-OOD AUROC / far-OOD AUROC / ID accuracy (%), from the leaderboard's data
(github.com/Jingkang50/OpenOOD, branch `leaderboard`, model_info/cifar10/*.json), scored by the method's
own postprocessor:
  logitnorm   (MSP)         92.33 ± 0.08 / 96.74 ± 0.06 / 94.30 ± 0.25
  t2fnorm     (T2FNorm)     92.79 ± 0.13 / 96.98 ± 0.23 / 94.69 ± 0.07
  regmixup    (MSP)         87.47 ± 0.49 / 90.25 ± 1.90 / 95.75 ± 0.15
  confbranch  (ConfBranch)  89.84 ± 0.24 / 92.85 ± 0.29 / 94.88 ± 0.05
  godin       (G-ODIN)      89.12 ± 0.57 / 95.51 ± 0.31 / 94.70 ± 0.25
  mixup       no CIFAR-10 entry on the leaderboard (the cross-entropy + MSP baseline is 88.03 ± 0.25 /
              90.73 ± 0.43 / 95.06 ± 0.30).
results.md's leaderboard table shows the same near / far means for the method's default score.

Hardware and runtime: not measured. Expect about an hour per method on one A100/H100 (100 epochs of a
CIFAR ResNet-18; RegMixup runs two forward passes per step, so about twice that); the trainer logs
steps/s and an ETA. `:smoke` trains and evaluates in about a minute on a 2-core CPU under
tfds.testing.mock_data (tests/experiments/test_configs.py).
"""

from configs import common

METHODS = ('logitnorm', 't2fnorm', 'mixup', 'regmixup', 'confbranch', 'godin')

# OpenOOD's values, all set here so that each shows in config.json and can be overridden on the command line
# (a locked config takes --config.method_kwargs.<name> only for names it has). Mixup's α differs from the
# method's default (Zhang et al.'s 1.0).
_METHOD_KWARGS = {
    'logitnorm': {'temperature': 0.04},
    't2fnorm': {'temperature': 0.1},
    'mixup': {'alpha': 0.2},
    'regmixup': {'alpha': 20.0, 'weight': 1.0},
    'confbranch': {'budget': 0.3, 'weight': 0.1, 'hint_probability': 0.5},
    'godin': {},
}


def get_config(arg=None):
  args = common.parse_arg(arg, method=METHODS)
  c = common.base_config()
  c.dataset = 'cifar10'
  c.backbone = 'resnet18'
  c.method = args['method'] or METHODS[0]
  c.method_kwargs.update(_METHOD_KWARGS[c.method])
  c.batch_size = 128
  c.num_epochs = 100
  c.augment = 'crop_flip'
  c.optimizer.update(dict(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          schedule='cosine'))
  c.checkpoint_every_steps = 2000
  c.eval.benchmark = 'openood_v1_5'
  if args['smoke']:
    common.shrink_for_smoke(c)
    c.eval.benchmark = ''  # TinyImageNet and Places365 come from OpenOOD's release, which mock data lacks
    c.eval.ood_sets = ('cifar100',)
  return c
