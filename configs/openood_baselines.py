r"""Training baselines of OpenOOD v1.5's leaderboard on CIFAR-10 (Zhang et al. 2023, "OpenOOD v1.5"):
LogitNorm, T2FNorm, Mixup, RegMixup, ConfBranch, G-ODIN and RotPred, each trained from scratch, and MixOE,
fine-tuned from the cross-entropy baseline (softmax), all scored on the OpenOOD v1.5 protocol (near: CIFAR-100,
TinyImageNet; far: MNIST, SVHN, Textures, Places365).

  python -m experiments.train --config=configs/openood_baselines.py:logitnorm --workdir=runs/openood_c10/logitnorm
  python -m experiments.train --config=configs/openood_baselines.py:t2fnorm --workdir=runs/openood_c10/t2fnorm
  python -m experiments.train --config=configs/openood_baselines.py:mixup --workdir=runs/openood_c10/mixup
  python -m experiments.train --config=configs/openood_baselines.py:regmixup --workdir=runs/openood_c10/regmixup
  python -m experiments.train --config=configs/openood_baselines.py:confbranch --workdir=runs/openood_c10/confbranch
  python -m experiments.train --config=configs/openood_baselines.py:godin --workdir=runs/openood_c10/godin
  python -m experiments.train --config=configs/openood_baselines.py:softmax --workdir=runs/openood_c10/softmax
  python -m experiments.train --config=configs/openood_baselines.py:rotpred --workdir=runs/openood_c10/rotpred
  python -m experiments.train --config=configs/openood_baselines.py:mixoe --workdir=runs/openood_c10/mixoe \
      --config.init_from=runs/openood_c10/softmax
  python -m experiments.train --config=configs/openood_baselines.py:vos --workdir=runs/openood_c10/vos
  python -m experiments.train --config=configs/openood_baselines.py:npos --workdir=runs/openood_c10/npos
  python -m experiments.train --config=configs/openood_baselines.py:cider --workdir=runs/openood_c10/cider

Argument (after ':', comma-separated): a method, logitnorm (default) | t2fnorm | mixup | regmixup |
confbranch | godin | softmax | rotpred | mixoe | vos | npos | cider; and smoke (4 steps of batch 16 and one
OOD set, CIFAR-100, instead of the protocol; CPU tests). The protocol reads TinyImageNet and Places365 from
OpenOOD's release (prepare it as `ood_jax.trainer.data.protocols` says) and CIFAR, MNIST, SVHN and Textures from TFDS
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
  softmax     the cross-entropy baseline (OpenOOD's `base` trainer), MSP; the run MixOE fine-tunes
  rotpred     rotation loss weight λ = 1; each batch in its 4 quarter turns (4 × 128 images a step)
  mixoe       fine-tunes the softmax run (--config.init_from): 10 epochs, lr 0.001, cosine; 128 outliers a step,
              cutmix, λ ~ Beta(α = 0.1, β = 1), weight 1 (OpenOOD's train_mixoe.yml and script)
  vos         β = 0.1; queue of 1000 features per class, 10 000 draws per class, the least likely kept
              (select 1), covariance ridge 1e-4, from the first step with full queues (OpenOOD's start_epoch 0)
  npos        two views; lr 0.5, weight decay 1e-4, 10 warm-up epochs; queue 1000, k = 300, 200 boundary
              points, 2 picked, 600 candidates (σ = 0.1), 200 kept each; τ = 0.1, m = 0.95, w_comp = 1,
              w_disp = 0.5, β = 0.1 from epoch 40 (start_step 40·351)
  cider       two views; lr 0.5, weight decay 1e-4, 10 warm-up epochs; τ = 0.1, m = 0.95, w = 2
              (ood_jax.methods.synthesis and .prototypes list their simplifications)
Known differences from OpenOOD: 10 % of the training images are held out (validation_fraction) for the
calibrator and detector tuning (--config.validation_fraction=0 trains on the whole split); G-ODIN's weight
decay also applies to its dividend weights (OpenOOD exempts them) and its score is taken without the input
perturbation (ε = 0.0025) of OpenOOD's postprocessor; T2FNorm's ID accuracy is measured with the raw-feature
logits its scores use (OpenOOD classifies with the normalised features). MixOE's outliers are OpenOOD's
TinyImageNet-597 list (train_tin), which the outlier loader does not read: 300 000 images of TFDS
`imagenet_resized/32x32` stand in (as configs/ice.py; `tfds build imagenet_resized/32x32`, or
--config.outliers.source=<images.npy>), and the in-distribution and mixed halves share one forward pass
(OpenOOD runs two, so its BatchNorm statistics are per half). NPOS and CIDER train at batch 128 (OpenOOD's
dataset default) and OpenOOD's cosine floor of lr·10⁻³ is left out; they have no classifier, so their ID
accuracy is a linear probe's (OpenOOD's leaderboard gives none). VOS is scored by the energy of its logits
(OpenOOD's EBO); its learned class weights give the paper's weighted energy through the detector
'weighted_energy'.

Expected numbers: OpenOOD v1.5 leaderboard, CIFAR-10, ResNet-18, 100 epochs, mean ± std over three
training runs, near-OOD AUROC / far-OOD AUROC / ID accuracy (%), from the leaderboard's data
(github.com/Jingkang50/OpenOOD, branch `leaderboard`, model_info/cifar10/*.json), scored by the method's
own postprocessor:
  logitnorm   (MSP)         92.33 ± 0.08 / 96.74 ± 0.06 / 94.30 ± 0.25
  t2fnorm     (T2FNorm)     92.79 ± 0.13 / 96.98 ± 0.23 / 94.69 ± 0.07
  regmixup    (MSP)         87.47 ± 0.49 / 90.25 ± 1.90 / 95.75 ± 0.15
  confbranch  (ConfBranch)  89.84 ± 0.24 / 92.85 ± 0.29 / 94.88 ± 0.05
  godin       (G-ODIN)      89.12 ± 0.57 / 95.51 ± 0.31 / 94.70 ± 0.25
  rotpred     (RotPred)     92.68 ± 0.27 / 96.62 ± 0.18 / 95.35 ± 0.52
  mixoe       (MSP)         88.73 ± 0.82 / 91.93 ± 0.69 / 94.55 ± 0.32
  softmax     (MSP)         88.03 ± 0.25 / 90.73 ± 0.43 / 95.06 ± 0.30
  vos         (EBO)         87.70 ± 0.48 / 90.83 ± 0.92 / 94.31 ± 0.64
  npos        (KNN)         89.78 ± 0.33 / 94.07 ± 0.49 / no ID accuracy on the leaderboard
  cider       (KNN)         90.71 ± 0.16 / 94.71 ± 0.36 / no ID accuracy on the leaderboard
  mixup       no CIFAR-10 entry on the leaderboard (the cross-entropy + MSP baseline is 88.03 ± 0.25 /
              90.73 ± 0.43 / 95.06 ± 0.30).
results.md's leaderboard table shows the same near / far means for the method's default score.

Hardware and runtime: not measured. Expect about an hour per method on one A100/H100 (100 epochs of a
CIFAR ResNet-18; RegMixup runs two forward passes per step, so about twice that); the trainer logs
steps/s and an ETA. RotPred runs every image in four turns (about 4× the baseline's time, and its score four
passes per evaluated image); VOS draws 10 000 × 512 normals per class and step, NPOS searches 1 200
candidates per class against its queue every step, and NPOS and CIDER run two views (about twice the
baseline's time); MixOE's fine-tune is 10 epochs of two halves (about a fifth of a baseline run).
`:smoke` trains and evaluates in about a minute on a 2-core CPU under tfds.testing.mock_data
(tests/experiments/test_configs.py).
"""

from configs import common

METHODS = ('logitnorm', 't2fnorm', 'mixup', 'regmixup', 'confbranch', 'godin', 'softmax', 'rotpred', 'mixoe', 'vos',
           'npos', 'cider')

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
    'softmax': {},
    'rotpred': {'weight': 1.0},
    'mixoe': {'alpha': 0.1, 'beta': 1.0, 'mix_op': 'cutmix', 'weight': 1.0},
    # train_vos.yml: start_epoch 0.
    'vos': {'weight': 0.1, 'start_step': 0, 'queue_size': 1000, 'num_samples': 10000, 'select': 1, 'ridge': 1e-4},
    # train_npos.yml: start_epoch_KNN 40 = 40 epochs of 45 000 // 128 = 351 steps.
    'npos': {'temperature': 0.1, 'momentum': 0.95, 'compactness_weight': 1.0, 'dispersion_weight': 0.5,
             'weight': 0.1, 'start_step': 40 * 351, 'queue_size': 1000, 'neighbours': 300, 'boundary': 200,
             'pick': 2, 'num_candidates': 600, 'noise': 0.1, 'keep': 200},
    'cider': {'temperature': 0.1, 'weight': 2.0, 'momentum': 0.95},  # train_cider.yml
}

# Smoke runs: small queues and few draws, so the CPU runs the synthesis in seconds (and may switch its loss on).
_SMOKE_KWARGS = {
    'vos': {'queue_size': 1, 'num_samples': 64},
    'npos': {'start_step': 0, 'queue_size': 2, 'neighbours': 1, 'boundary': 2, 'pick': 1, 'num_candidates': 8,
             'keep': 4},
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
  if c.method == 'mixoe':  # a fine-tune of the softmax run with outliers (OpenOOD's cifar10_train_mixoe.sh)
    c.num_epochs = 10
    c.optimizer.learning_rate = 0.001
    c.required_fields = ('init_from',)
    c.outliers.update(dict(source='imagenet_resized/32x32', batch_size=128, split='train', max_examples=300_000))
  if c.method in ('npos', 'cider'):  # two views, OpenOOD's train_npos.yml / train_cider.yml optimiser
    c.augment = 'two_views'
    c.optimizer.update(dict(learning_rate=0.5, weight_decay=1e-4, warmup_epochs=10.0))
  if args['smoke']:
    common.shrink_for_smoke(c)
    c.method_kwargs.update(_SMOKE_KWARGS.get(c.method, {}))
    c.eval.benchmark = ''  # TinyImageNet and Places365 come from OpenOOD's release, which mock data lacks
    c.eval.ood_sets = ('cifar100',)
    c.outliers.update(dict(batch_size=16, max_examples=64))
  return c
