r"""IsoMax vs SoftMax (Macêdo et al. 2021, "Entropic Out-of-Distribution Detection").

  python -m experiments.train --config=configs/isomax.py --workdir=runs/isomax_c10_densenet
  python -m experiments.train --config=configs/isomax.py:cifar10,resnet34 --workdir=runs/isomax_c10_resnet
  python -m experiments.train --config=configs/isomax.py:cifar100,resnet34 --workdir=runs/softmax_c100_resnet \
      --config.method=softmax

Argument (after ':', comma-separated, any order): a dataset, cifar10 (default) | cifar100 |
svhn_cropped; a backbone, densenet_bc100 (default; DenseNet-BC-100, k = 12) | resnet34; and smoke
(4 steps of batch 16 and a minimal evaluation, for CPU tests; same model and data). The loss is
--config.method=isomax (default; scored by the entropic score ES) or softmax (scored by the maximum
probability MPS); results.json holds every score of the method either way.

Recipe (paper Section IV): SGD with Nesterov momentum 0.9, lr 0.1, batch 64, 300 epochs, lr ÷10 at
epochs 150, 200 and 250, weight decay 1e-4 on every parameter (prototypes included), no dropout;
pad-4 random crop + horizontal flip (SVHN: crop only, a mirrored digit is another symbol).

OOD sets: SVHN ↔ CIFAR-10 as in the paper, plus the other CIFAR, Textures (DTD) and Gaussian /
uniform noise. The paper's resized TinyImageNet and LSUN (the ODIN releases) are image folders:
add them with --config.eval.ood_sets="('svhn_cropped', 'folder:/data/LSUN_resize', 'folder:/data/Imagenet_resize')".
Every TFDS set must be prepared beforehand (`tfds build cifar10 cifar100 svhn_cropped dtd`).

Expected AUROC (%), Table II, SoftMax+MPS → IsoMax+ES:
  DenseNet-BC-100: CIFAR-10 → SVHN 86.6 → 96.6; CIFAR-100 → SVHN 80.1 → 88.6; SVHN → CIFAR-10 96.5 → 98.5.
  ResNet-34:       CIFAR-10 → SVHN 91.7 → 97.1; CIFAR-100 → SVHN 71.3 → 85.3; SVHN → CIFAR-10 89.8 → 98.0.
Classification accuracy should match between the two losses (Fig. 3).

Hardware and runtime: one A100/H100 GPU; about 1.5–3 h for CIFAR (782 steps per epoch × 300
epochs) and 1.5× that for SVHN (73,257 training images). These are estimates, not measurements; the
trainer logs steps/s and an ETA after the first 100 steps. `:smoke` on a 2-core CPU under
tfds.testing.mock_data: about 1 min with ResNet-34 and 3 min with DenseNet-BC-100, mostly XLA
compilation; on real data, evaluating the full test sets adds 5–10 min.
"""

from configs import common

DATASETS = ('cifar10', 'cifar100', 'svhn_cropped')
MODELS = ('densenet_bc100', 'resnet34')

# The paper's pairs first (CIFAR → SVHN, SVHN → CIFAR-10), then far-OOD sets every dataset shares.
_OOD_SETS = {
    'cifar10': ('svhn_cropped', 'cifar100'),
    'cifar100': ('svhn_cropped', 'cifar10'),
    'svhn_cropped': ('cifar10', 'cifar100'),
}
_FAR_OOD = ('dtd', 'gaussian_noise', 'uniform_noise')


def get_config(arg=None):
  args = common.parse_arg(arg, dataset=DATASETS, backbone=MODELS)
  c = common.base_config()
  c.dataset = args['dataset'] or DATASETS[0]
  c.backbone = args['backbone'] or MODELS[0]
  c.method = 'isomax'
  c.batch_size = 64
  c.num_epochs = 300
  c.augment = 'crop' if c.dataset == 'svhn_cropped' else 'crop_flip'
  c.optimizer.update(dict(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                          schedule='step', decay_epochs=(150, 200, 250), decay_factor=0.1))
  c.checkpoint_every_steps = 5000
  c.eval.ood_sets = _OOD_SETS[c.dataset] + _FAR_OOD
  if args['smoke']:
    common.shrink_for_smoke(c)
  return c
