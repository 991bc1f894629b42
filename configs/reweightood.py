r"""Contrastive training: ReweightOOD and its SupCon baseline (Regmi et al. 2024, "ReweightOOD: Loss Reweighting
for Distance-Based OOD Detection").

  python -m experiments.train --config=configs/reweightood.py --workdir=runs/reweightood_c10
  python -m experiments.train --config=configs/reweightood.py:supcon --workdir=runs/supcon_c10
  python -m experiments.train --config=configs/reweightood.py:cifar100 --workdir=runs/reweightood_c100
  python -m experiments.compare runs/supcon_c10 runs/reweightood_c10

Argument (after ':', comma-separated, any order; defaults first): a dataset, cifar10 | cifar100; a
method, reweightood (paper eq. 2) | supcon; and smoke (4 steps of batch 16, one OOD set; CPU tests).

Recipe (Section 4 "Training pipelines"): ResNet-18 → projection head (Dense–ReLU–Dense to 128-d, unit
norm), two SimCLR views per image (random resized crop, flip, colour jitter, greyscale), batch 512,
500 epochs, SGD momentum 0.9, lr 0.5 with cosine decay, weight decay 1e-4, τ = 0.1. The paper gives
no warm-up; with lr 0.5 at batch 512 we warm up linearly over 10 epochs as SupCon's code does.
(m_b, c_b, m_w, c_w) = (5, −4, 2, 1) on CIFAR-10 and (5, −2, 2, 1) on CIFAR-100; the loss uses the
paper's per-anchor form with stop-gradient weights (`--config.method_kwargs.variant=openood` for
OpenOOD's pairwise ELU form).

Evaluation: on the backbone's 512-d features, KNN on normalised features (k = 100 on CIFAR-10, 300 on
CIFAR-100; score −distance to the k-th neighbour) and Mahalanobis (class means + shared covariance),
both fitted on the training set; accuracy and ECE by a linear probe on the frozen features, as the
paper; MES radius and centroid dispersion (eqs. 4–5). OOD sets: the paper's SVHN, Textures (DTD),
Places365 and the other CIFAR (TFDS), plus noise; MNIST, iSUN and LSUN as image folders
(--config.eval.ood_sets="(..., 'folder:/data/iSUN')").

Expected: CIFAR-100, ReweightOOD, mean over its OOD sets FPR95 38.36 %, AUROC 90.91 % (Table 3);
OpenOOD v1.5 CIFAR-10 ReweightOOD+MDS near / far AUROC 91.86 / 98.05.

Hardware and runtime (estimates, not measurements): 98 steps × 500 epochs of 1 024 ResNet-18 views,
about 4–6 h on one A100/H100 (--config.dtype=bfloat16 roughly halves it). `:smoke`: about a minute on
a 2-core CPU under tfds.testing.mock_data (tests/experiments/test_configs.py).
"""

from configs import common

DATASETS = ('cifar10', 'cifar100')
METHODS = ('reweightood', 'supcon')

_OOD_SETS = {
    'cifar10': ('cifar100', 'svhn_cropped', 'dtd', 'places365_small', 'gaussian_noise', 'uniform_noise'),
    'cifar100': ('cifar10', 'svhn_cropped', 'dtd', 'places365_small', 'gaussian_noise', 'uniform_noise'),
}
_KNN_K = {'cifar10': 100, 'cifar100': 300}
_BETWEEN = {'cifar10': (5.0, -4.0), 'cifar100': (5.0, -2.0)}  # (m_b, c_b)


def get_config(arg=None):
  args = common.parse_arg(arg, dataset=DATASETS, method=METHODS)
  c = common.base_config()
  c.dataset = args['dataset'] or DATASETS[0]
  c.method = args['method'] or METHODS[0]
  c.backbone = 'resnet18'
  c.batch_size = 512
  c.num_epochs = 500
  c.augment = 'two_views'
  c.optimizer.update(dict(name='sgd', learning_rate=0.5, momentum=0.9, nesterov=False, weight_decay=1e-4,
                          schedule='cosine', warmup_epochs=10.0))
  c.method_kwargs.temperature = 0.1
  if c.method == 'reweightood':
    c.method_kwargs.between = _BETWEEN[c.dataset]
    c.method_kwargs.within = (2.0, 1.0)
  c.checkpoint_every_steps = 2000
  c.eval.knn_k = _KNN_K[c.dataset]
  c.eval.ood_sets = _OOD_SETS[c.dataset]
  if args['smoke']:
    common.shrink_for_smoke(c)
    c.eval.knn_k = 5
  return c
