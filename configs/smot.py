r"""SMOT, smooth training ("Out-of-Distribution Detection with Smooth Training", an anonymous ICLR 2024
submission): two stages.

  python -m experiments.train --config=configs/smot.py:base --workdir=runs/smot_base_c10
  python -m experiments.train --config=configs/smot.py --workdir=runs/smot_c10 --config.base_model=runs/smot_base_c10
  python -m experiments.train --config=configs/smot.py:cifar100,base --workdir=runs/smot_base_c100
  python -m experiments.train --config=configs/smot.py:cifar100 --workdir=runs/smot_c100 \
      --config.base_model=runs/smot_base_c100
  python -m experiments.compare runs/smot_base_c10 runs/smot_c10

Argument (after ':', comma-separated, any order; defaults first): a dataset, cifar10 | cifar100; a
stage, smot (needs --config.base_model=<workdir of the base stage>) | base (the cross-entropy model
whose class activation maps SMOT masks with; also the paper's MSP baseline); and smoke (4 steps of
batch 16, one OOD set; CPU tests).

Recipe (Section 5 "Training details"), ResNet-18, SGD momentum 0.9, weight decay 5e-4, batch 128,
pad-4 crop + flip:
  base  200 epochs of cross-entropy, lr 0.1, ÷10 after epochs 80 and 140.
  smot  300 epochs of eq. 8 from scratch, lr 0.1 with cosine decay; t = 255·Beta(α = 50, β = 20) per
        image masks CAM ≥ t, soft label ε(t) = 1 − exp((t − 255)/T) with T = 10 (CIFAR-10) or 150
        (CIFAR-100), λ = 0.1. The CAM is the frozen base model's, computed inside the jitted step.
Score: MSP (energy and max-logit reported too). OOD sets: the paper's Textures (DTD), SVHN and
Places365 (TFDS), plus noise; iSUN and LSUN are image folders
(--config.eval.ood_sets="('dtd', 'svhn_cropped', 'places365_small', 'folder:/data/iSUN', 'folder:/data/LSUN')").

Expected (Table 2, CIFAR-10, mean over Textures/SVHN/iSUN/Places/LSUN): SMOT FPR95 15.42 %, AUROC
97.15 %; the MSP baseline (the base stage) 51.13 % / 91.27 %.

Hardware and runtime (estimates, not measurements): base about 1 h, smot about 2.5 h (two forward
passes per step plus the base model's) on one A100/H100. `:smoke`: about a minute on a 2-core CPU
under tfds.testing.mock_data (tests/experiments/test_configs.py).
"""

from configs import common

DATASETS = ('cifar10', 'cifar100')
STAGES = ('smot', 'base')

_OOD_SETS = ('dtd', 'svhn_cropped', 'places365_small', 'gaussian_noise', 'uniform_noise')
_TEMPERATURE = {'cifar10': 10.0, 'cifar100': 150.0}


def get_config(arg=None):
  args = common.parse_arg(arg, dataset=DATASETS, stage=STAGES)
  c = common.base_config()
  c.dataset = args['dataset'] or DATASETS[0]
  c.backbone = 'resnet18'
  c.batch_size = 128
  c.augment = 'crop_flip'
  c.optimizer.update(dict(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4))
  if (args['stage'] or STAGES[0]) == 'base':
    c.method = 'softmax'
    c.num_epochs = 200
    c.optimizer.update(dict(schedule='step', decay_epochs=(80, 140), decay_factor=0.1))
  else:
    c.method = 'smot'
    c.num_epochs = 300
    c.optimizer.schedule = 'cosine'
    c.method_kwargs.update(dict(alpha=50.0, beta=20.0, weight=0.1, temperature=_TEMPERATURE[c.dataset]))
  c.checkpoint_every_steps = 2000
  c.eval.ood_sets = _OOD_SETS
  if args['smoke']:
    common.shrink_for_smoke(c)
  return c
