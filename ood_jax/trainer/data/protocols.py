"""Benchmark protocols as data: which OOD sets a leaderboard row is measured on, and tuned on.

A `Protocol` names, for one in-distribution dataset, its near-OOD and far-OOD test sets and the
validation OOD sets on which detector hyperparameters are chosen (never a test set). Every name is
an OOD-set name of `ood_jax.trainer.data.catalog`, so a protocol runs on whatever the catalog can load:

* TFDS sets by their catalog names ('cifar100', 'mnist', 'svhn_cropped', 'dtd', ...);
* 'openood:<list>': an image list of OpenOOD v1.5's release, `<benchmark_dir>/openood/
  benchmark_imglist/<list>.txt` with images under `<benchmark_dir>/openood/images_classic/`
  (TinyImageNet and OpenOOD's Places365 subset exist only there);
* 'odin:<folder>': a folder of the resized sets released with ODIN (`<benchmark_dir>/odin/<folder>`:
  Imagenet_resize, LSUN_resize, LSUN (crops), iSUN);
* 'digits/<set>': the offline digits benchmark, so the protocol code runs on real data anywhere.

`catalog.check_protocol_sets` reports, before any model runs, every set that is not prepared, with
the command that prepares it.

| protocol | dataset | near-OOD | far-OOD | validation OOD |
|---|---|---|---|---|
| openood_v1_5 | cifar10, cifar100 | other CIFAR, TinyImageNet | MNIST, SVHN, Textures, Places365 | TIN val |
| openood_v1_5_lists | cifar10, cifar100 | as above, every set from OpenOOD's image lists | | TIN val |
| isomax | cifar10, cifar100, svhn | TinyImageNet (resized) | LSUN (resized), SVHN / CIFAR-10 | TIN val |
| ice | cifar10 / cifar100 | the other CIFAR | Textures, SVHN, Places365, LSUN, iSUN | TIN val |
| smot | cifar10 / cifar100 | – | Textures, SVHN, iSUN, Places365, LSUN | TIN val |
| ova | cifar10 / cifar100 | the other CIFAR | SVHN | TIN val |
| reweightood | cifar10 / cifar100 | – | MNIST, iSUN, LSUN-r, LSUN-c, SVHN, Textures, Places365 | TIN val |
| digits | digits | digits 6–9 | photos, Gaussian and uniform noise | held-out train digits 6–9 |
| openood_v1_5 | imagenet200 | SSB-hard, NINCO | iNaturalist, Textures, OpenImage-O | OpenImage-O val |
| openood_v1_5 | imagenet | SSB-hard, NINCO | iNaturalist, Textures, OpenImage-O | OpenImage-O val |

`openood_v1_5` reads CIFAR, MNIST, SVHN and Textures from TFDS (MNIST's and SVHN's test splits,
all 5,640 DTD images) and TinyImageNet and Places365 from OpenOOD's lists; `openood_v1_5_lists`
reads every set from OpenOOD's lists, i.e. exactly OpenOOD's images (its lists drop images that
overlap the in-distribution classes, which the TFDS splits do not). The papers' own protocols have
no validation OOD set (they used defaults or tuned elsewhere); ood_jax tunes them on OpenOOD's
TinyImageNet validation list, and their near/far grouping follows OpenOOD's taxonomy (another
CIFAR or TinyImageNet is near, everything else far).

The ImageNet protocols are *large* (`Protocol.large`): their in-distribution data is named by the protocol
(`InDistribution`), streamed from disk and sharded over processes (`ood_jax.trainer.data.stream`), never
held in memory. ImageNet-200 (OpenOOD v1.5's 200-class subset of ImageNet-1K) reads its train / val / test
split from OpenOOD's lists (train_imagenet200, val_imagenet200, test_imagenet200); ImageNet-1K reads TFDS
`imagenet2012` (train; ood_jax's split of the 50,000 validation images: the first 5,000 for validation,
the other 45,000 for test). Both share OpenOOD's ImageNet OOD lists: near SSB-hard and NINCO, far
iNaturalist, Textures and OpenImage-O, tuned on the OpenImage-O validation list; images at 224 × 224,
the shorter side resized to 256 and centre-cropped (OpenOOD's `pre_size` and `image_size`).
"""

from __future__ import annotations

import dataclasses

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'PROTOCOLS', 'InDistribution', 'Protocol', 'get', 'names']


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics, as OpenOOD normalises
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InDistribution:
  """The in-distribution data of a large protocol, which no registry dataset describes.

  Attributes:
    num_classes: K.
    train: the detectors' fitting set, a stream source name (`ood_jax.trainer.data.stream.open_source`):
      'openood:<dataset>/<list>' (a labelled OpenOOD list) or 'tfds:<name>/<split>[<a>:<b>]'.
    validation: the in-distribution validation set (calibration and tuning), a source name.
    test: the in-distribution test set, a source name.
    image_size: (height, width) the model sees.
    resize: the shorter side is resized to this before the centre crop to `image_size`; None resizes
      straight to `image_size`.
    mean: per-channel normalisation means on [0, 1].
    std: per-channel standard deviations on [0, 1].
  """

  num_classes: int
  train: str
  validation: str
  test: str
  image_size: tuple[int, int] = (224, 224)
  resize: int | None = 256
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  @property
  def sets(self) -> tuple[str, ...]:
    return (self.train, self.validation, self.test)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One benchmark protocol for one in-distribution dataset.

  Attributes:
    name: protocol name ('openood_v1_5', 'digits', ...).
    dataset: registry name of the in-distribution dataset.
    near: near-OOD test sets (catalog names).
    far: far-OOD test sets.
    validation: OOD sets for hyperparameter selection, disjoint from the test sets.
    source: where the protocol comes from.
    in_distribution: for a large protocol, its streamed in-distribution data; None for one whose
      dataset is a registry dataset, loaded into memory.
  """

  name: str
  dataset: str
  near: tuple[str, ...]
  far: tuple[str, ...]
  validation: tuple[str, ...]
  source: str
  in_distribution: InDistribution | None = None

  @property
  def large(self) -> bool:
    """Whether the protocol is evaluated streamed from disk and sharded over processes."""
    return self.in_distribution is not None

  @property
  def test_sets(self) -> tuple[str, ...]:
    return self.near + self.far

  @property
  def groups(self) -> dict[str, tuple[str, ...]]:
    """{'near': ..., 'far': ...} without empty groups."""
    return {group: sets for group, sets in (('near', self.near), ('far', self.far)) if sets}


_OPENOOD = 'Zhang et al. 2023, OpenOOD v1.5 (arXiv:2306.09301), configs/datasets/<dataset>/<dataset>_ood.yml'
_OTHER_CIFAR = {'cifar10': 'cifar100', 'cifar100': 'cifar10'}


def _openood(dataset: str, *, lists: bool) -> Protocol:
  listed = lambda name: f'openood:{dataset}/test_{name}'
  if lists:
    near = (listed(_OTHER_CIFAR[dataset]), listed('tin'))
    far = (listed('mnist'), listed('svhn'), listed('texture'), listed('places365'))
  else:
    near = (_OTHER_CIFAR[dataset], listed('tin'))
    far = ('mnist', 'svhn_cropped', 'dtd', listed('places365'))
  return Protocol('openood_v1_5_lists' if lists else 'openood_v1_5', dataset, near, far,
                  (f'openood:{dataset}/val_tin',), _OPENOOD)


def _paper(name: str, dataset: str, near: tuple[str, ...], far: tuple[str, ...], source: str) -> Protocol:
  # The papers name no validation OOD set; OpenOOD's TinyImageNet validation list keeps tuning off test.
  validation = (f'openood:{dataset if dataset in _OTHER_CIFAR else "cifar10"}/val_tin',)
  return Protocol(name, dataset, near, far, validation, source)


def _openood_imagenet(dataset: str) -> Protocol:
  # OpenOOD v1.5's ImageNet OOD lists live under benchmark_imglist/imagenet/ for both ID datasets; only the
  # OpenImage-O validation list is per dataset (configs/datasets/imagenet200/imagenet200_ood.yml).
  listed = lambda name: f'openood:imagenet/test_{name}'
  if dataset == 'imagenet200':
    split = lambda name: f'openood:imagenet200/{name}_imagenet200'
    data = InDistribution(200, split('train'), split('val'), split('test'))
  else:
    data = InDistribution(1000, 'tfds:imagenet2012/train', 'tfds:imagenet2012/validation[:5000]',
                          'tfds:imagenet2012/validation[5000:]')
  return Protocol('openood_v1_5', dataset, (listed('ssb_hard'), listed('ninco')),
                  (listed('inaturalist'), listed('textures'), listed('openimage_o')),
                  (f'openood:{dataset}/val_openimage_o',), _OPENOOD.replace('<dataset>', dataset), data)


_ICE_FAR = ('dtd', 'svhn_cropped', 'places365_small', 'odin:LSUN', 'odin:iSUN')
_REWEIGHTOOD_FAR = ('mnist', 'odin:iSUN', 'odin:LSUN_resize', 'odin:LSUN', 'svhn_cropped', 'dtd', 'places365_small')

PROTOCOLS: dict[tuple[str, str], Protocol] = {}
for _protocol in (
    _openood('cifar10', lists=False), _openood('cifar100', lists=False),
    _openood('cifar10', lists=True), _openood('cifar100', lists=True),
    _paper('isomax', 'cifar10', ('odin:Imagenet_resize',), ('odin:LSUN_resize', 'svhn_cropped'),
           'Macêdo et al., Entropic OOD Detection, section IV: resized TinyImageNet and LSUN; SVHN, Table II'),
    _paper('isomax', 'cifar100', ('odin:Imagenet_resize',), ('odin:LSUN_resize', 'svhn_cropped'),
           'Macêdo et al., Entropic OOD Detection, section IV'),
    _paper('isomax', 'svhn_cropped', ('odin:Imagenet_resize',), ('odin:LSUN_resize', 'cifar10'),
           'Macêdo et al., Entropic OOD Detection, section IV'),
    _paper('ice', 'cifar10', ('cifar100',), _ICE_FAR, 'Wu et al., ICE, section Experiments / Dataset'),
    _paper('ice', 'cifar100', ('cifar10',), _ICE_FAR, 'Wu et al., ICE, section Experiments / Dataset'),
    _paper('ova', 'cifar10', ('cifar100',), ('svhn_cropped',), 'Padhy et al., One-vs-All, Tables S2/S3'),
    _paper('ova', 'cifar100', ('cifar10',), ('svhn_cropped',), 'Padhy et al., One-vs-All, Tables S2/S3'),
    _paper('reweightood', 'cifar10', (), _REWEIGHTOOD_FAR, 'ReweightOOD, section 4 / Datasets'),
    _paper('reweightood', 'cifar100', (), _REWEIGHTOOD_FAR, 'ReweightOOD, section 4 / Datasets'),
    _paper('smot', 'cifar10', (), ('dtd', 'svhn_cropped', 'odin:iSUN', 'places365_small', 'odin:LSUN'),
           'SMOT, section 5 / Datasets'),
    _paper('smot', 'cifar100', (), ('dtd', 'svhn_cropped', 'odin:iSUN', 'places365_small', 'odin:LSUN'),
           'SMOT, section 5 / Datasets'),
    Protocol('digits', 'digits', ('digits/near',), ('digits/photos', 'digits/gaussian_noise', 'digits/uniform_noise'),
             ('digits/validation',), 'ood_jax.trainer.data.digits: real scikit-learn digits and photos, offline'),
    _openood_imagenet('imagenet200'), _openood_imagenet('imagenet'),
):
  PROTOCOLS[(_protocol.name, _protocol.dataset)] = _protocol


def names() -> tuple[str, ...]:
  """Every protocol name, in registry order."""
  return tuple(dict.fromkeys(name for name, _ in PROTOCOLS))


def get(name: str, dataset: str) -> Protocol:
  """The protocol `name` for in-distribution `dataset`; ValueError listing what exists otherwise."""
  if (name, dataset) in PROTOCOLS:
    return PROTOCOLS[(name, dataset)]
  if name not in names():
    raise ValueError(f'Unknown benchmark protocol {name!r}; valid protocols: {", ".join(names())}.')
  datasets = [d for n, d in PROTOCOLS if n == name]
  raise ValueError(f'Benchmark protocol {name!r} has no split for dataset {dataset!r}; it defines: '
                   f'{", ".join(datasets)}.')
