r"""Outlier exposure: ICE, OE and Energy (Wu et al. 2022, "Towards In-distribution Compatibility
in Out-of-distribution Detection"), with the softmax model they fine-tune.

  python -m experiments.train --config=configs/ice.py --workdir=runs/ice_c10_wrn
  python -m experiments.train --config=configs/ice.py:oe --workdir=runs/oe_c10_wrn
  python -m experiments.train --config=configs/ice.py:cifar10,densenet40_12,energy --workdir=runs/energy_c10_dn
  python -m experiments.train --config=configs/ice.py:softmax --workdir=runs/softmax_c10_wrn
  python -m experiments.train --config=configs/ice.py:finetune --workdir=runs/ice_ft_c10_wrn \
      --config.init_from=runs/softmax_c10_wrn
  python -m experiments.train --config=configs/ice.py:cifar100,oe,finetune --workdir=runs/oe_ft_c100_wrn \
      --config.init_from=runs/softmax_c100_wrn
  python -m experiments.compare runs/softmax_c10_wrn runs/oe_c10_wrn runs/energy_c10_wrn runs/ice_c10_wrn

Argument (after ':', comma-separated, any order; defaults first):
  dataset   cifar10 | cifar100
  model     wrn40_2 (WRN-40-2, dropout 0.3, the Outlier Exposure backbone) | densenet40_12 (DenseNet-40-12,
            paper Table 1) | wrn34_10 (WRN-34-10, paper Table 1's CIFAR-10 WideResNet; ~46 M parameters)
  method    ice | oe | energy | softmax (no outliers: the baseline, and the checkpoint `finetune` starts from)
  schedule  scratch | finetune (needs --config.init_from=<workdir of the softmax run, same dataset and model>)
  smoke     4 steps of batch 16 (+ 16 outliers), one OOD set: for CPU tests, same model and data.

Recipe (Section 5 "Training"): batches of 128 in-distribution images + 256 outliers
(one forward pass), SGD Nesterov momentum 0.9, weight decay 5e-4, pad-4 crop + flip on both streams.
  scratch   100 epochs, lr 0.1, "stair-wise" decay; the paper gives no epochs, we divide by 10 at 50 and 75.
  finetune  10 epochs, cosine from lr 0.01 (ICE) or 0.001 (OE, Energy, as Hendrycks et al. and Liu et al.).
            ICE's Mahalanobis head does not exist in the softmax checkpoint: it starts from the class means
            and the shared covariance of the pretrained features (init_head='class_stats'; on digits,
            99.7 % accuracy and 99.0 mean AUROC after 10 epochs vs 97.8 % and 96.9 from a random head).
Loss weights: ICE λ = 1, OE λ = 0.5, Energy λ = 0.1 with the margins of Liu et al.'s published runs
(m_in, m_out) = (−23, −5) on CIFAR-10 and (−27, −5) on CIFAR-100.
ICE clips the global gradient norm at 1 (not in the paper, which publishes no code): its squared
Mahalanobis distances give gradients in the thousands, and on the digits benchmark ICE without clipping
diverges within 2 steps, from scratch at lr 0.05 and fine-tuning at lr 0.01, with either head start.

Outliers: the paper's 80 Million Tiny Images is withdrawn. Default: 300 000 random images of TFDS
`imagenet_resized/32x32` (prepare it with `tfds build imagenet_resized/32x32`; it needs the
downsampled-ImageNet files). The 300K Random Images file of Hendrycks et al. (CIFAR classes removed)
works as --config.outliers.source=/data/300K_random_images.npy. Unlike those, ImageNet shares classes
with CIFAR: expect somewhat weaker near-OOD (CIFAR-10 ↔ CIFAR-100) numbers than the paper.

OOD sets: the paper's SVHN, Textures (DTD), Places365 and the other CIFAR (TFDS), plus noise;
iSUN and LSUN (ODIN releases) are image folders:
--config.eval.ood_sets="('svhn_cropped', 'dtd', 'places365_small', 'cifar100', 'folder:/data/iSUN',
'folder:/data/LSUN')".

Expected (Table 2, CIFAR-10, WRN from scratch, mean FPR95 over iSUN/Places365/Textures/LSUN/SVHN / accuracy):
ICE 3.33 % / 96.38 %, OE 4.03 % / 94.88 %, Energy 4.12 % / 94.13 % (the paper's WRN there is WRN-34-10).

Hardware and runtime (estimates, not measurements): WRN-40-2 scratch about 1–1.5 h on one A100/H100
(391 steps × 100 epochs of 384 images), fine-tune 10 min; DenseNet-40-12 about 2×; WRN-34-10 about 6×.
`:smoke` takes about a minute on a 2-core CPU under tfds.testing.mock_data (tests/experiments/test_configs.py).
"""

from configs import common

DATASETS = ('cifar10', 'cifar100')
MODELS = ('wrn40_2', 'densenet40_12', 'wrn34_10')
METHODS = ('ice', 'oe', 'energy', 'softmax')
SCHEDULES = ('scratch', 'finetune')

_OOD_SETS = {
    'cifar10': ('svhn_cropped', 'dtd', 'places365_small', 'cifar100', 'gaussian_noise', 'uniform_noise'),
    'cifar100': ('svhn_cropped', 'dtd', 'places365_small', 'cifar10', 'gaussian_noise', 'uniform_noise'),
}
_ENERGY_MARGINS = {'cifar10': (-23.0, -5.0), 'cifar100': (-27.0, -5.0)}
_FINETUNE_LR = {'ice': 0.01, 'oe': 0.001, 'energy': 0.001}


def get_config(arg=None):
  args = common.parse_arg(arg, dataset=DATASETS, backbone=MODELS, method=METHODS, schedule=SCHEDULES)
  c = common.base_config()
  c.dataset = args['dataset'] or DATASETS[0]
  c.backbone = args['backbone'] or MODELS[0]
  c.method = args['method'] or METHODS[0]
  schedule = args['schedule'] or SCHEDULES[0]
  if c.method == 'softmax' and schedule == 'finetune':
    raise ValueError("Config argument 'finetune' fine-tunes with outliers: pick ice, oe or energy "
                     "(softmax is the scratch run that finetune starts from).")
  if c.backbone.startswith('wrn'):
    c.backbone_kwargs.dropout_rate = 0.3  # Outlier Exposure's WRN
  c.batch_size = 128
  c.augment = 'crop_flip'
  c.optimizer.update(dict(name='sgd', momentum=0.9, nesterov=True, weight_decay=5e-4))
  if schedule == 'scratch':
    c.num_epochs = 100
    c.optimizer.update(dict(learning_rate=0.1, schedule='step', decay_epochs=(50, 75), decay_factor=0.1))
  else:
    c.num_epochs = 10
    c.optimizer.update(dict(learning_rate=_FINETUNE_LR[c.method], schedule='cosine'))
    c.required_fields = ('init_from',)  # a fine-tune needs its pretrained run on the command line
    c.init_head = 'class_stats' if c.method == 'ice' else 'auto'
  if c.method == 'ice':
    c.optimizer.grad_clip_norm = 1.0
  if c.method == 'energy':
    c.method_kwargs.margin_in, c.method_kwargs.margin_out = _ENERGY_MARGINS[c.dataset]
  c.outliers.update(dict(source='imagenet_resized/32x32', batch_size=256, split='train', max_examples=300_000))
  c.checkpoint_every_steps = 2000
  c.eval.ood_sets = _OOD_SETS[c.dataset]
  if args['smoke']:
    common.shrink_for_smoke(c)
    c.outliers.batch_size = 16
    c.outliers.max_examples = 64
  return c
