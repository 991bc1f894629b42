"""Post-hoc OOD detectors for any Flax model: a registry of pure fit / score pairs.

Every detector is a frozen `Detector` record with one calling convention, data and hyperparameters apart:

  det = detectors.get('vim')                       # or get('react', percentile=95.0): a pinned value
  state = det.fit(train_batches, head=(kernel, bias), num_classes=K, **hparams)   # streamed
  s = det.score(state, {'logits': z, 'features': h}, **hparams)                   # [N], jit-able

* `train_batches`: a list of batch dicts, or a callable returning a fresh iterator of them (some fits
  make two passes), each with 'features' `[B, D]`, 'logits' `[B, K]` (computed from the features and
  the head when absent), 'labels' `[B]` and, for layer detectors, 'feature_maps' (a dict of maps).
* `head`: the final layer's (kernel `[D, K]`, bias `[K]`), e.g. `adapter.head_weights(variables, 'fc')`.
* `score`'s inputs are a mapping with the keys of `registry.INPUTS`: 'logits', 'features',
  'feature_maps', 'member_logits' (`[M, N, K]`, one set per ensemble member), and for detectors that
  need the model 'inputs' with 'apply_fn' (inputs → logits or the adapter's dict) or
  'stochastic_apply_fn' ((inputs, rng) → logits) and 'rng'; a missing key is None.
* `**hparams` are keyword-only with the published defaults (`det.defaults`); `fit` and `score` accept
  the same dict and each uses its own (`det.fit_params` are the ones `fit` consumes), so a tuner can
  pass one dictionary to both. `det.grid` lists values to tune over on validation data;
  `det.pin(**hparams)` fixes values (they leave the grid).
* Every score is "higher = more in-distribution" (the peers, OpenOOD and pytorch-ood, report the
  negation for several of them).
* Each score checks its arguments on the host, then runs one `jax.jit` kernel: hyperparameters that set
  shapes (KNN's k, GEN's M, ASH's variant) are static, the others traced, so a tuning grid over a traced
  value compiles once per input shape (`ood_jax.evaluation.tuning.score_rows` scores host arrays in
  fixed row blocks, so every set size shares that shape).

`needs` says what a detector reads: 'logits', 'features', 'head' (given to fit), 'feature_maps',
'model' (it runs the network: ODIN, MC-dropout, input-preprocessed Mahalanobis, RotPred) and 'members'
(logits of several networks or dropout samples).

`get(name, **hparams)`, `names()`, `resolve(('react', 'vim'))` / `resolve('all', available=('logits',
'features', 'head'), hparams={'react': {'percentile': 95.0}})`. Each family module holds its detectors'
math and registers them where they are defined: `logit`, `shaping`, `gaussian`, `multilayer`,
`neighbours`, `subspace`, `prototypes`, `gradient`, `ensemble`, `rotation` (imported in that order, which is
the registry's); `adapter` extracts logits / features / maps from any Linen or NNX module.
"""

from ood_jax.detectors import registry
from ood_jax.detectors import logit
from ood_jax.detectors import shaping
from ood_jax.detectors import gaussian
from ood_jax.detectors import multilayer
from ood_jax.detectors import neighbours
from ood_jax.detectors import subspace
from ood_jax.detectors import prototypes
from ood_jax.detectors import gradient
from ood_jax.detectors import ensemble
from ood_jax.detectors import rotation
from ood_jax.detectors import adapter
from ood_jax.detectors.registry import Detector
from ood_jax.detectors.registry import INPUTS
from ood_jax.detectors.registry import NEEDS
from ood_jax.detectors.registry import get
from ood_jax.detectors.registry import names
from ood_jax.detectors.registry import register
from ood_jax.detectors.registry import resolve

__all__ = [
    'Detector',
    'INPUTS',
    'NEEDS',
    'adapter',
    'ensemble',
    'gaussian',
    'get',
    'gradient',
    'logit',
    'multilayer',
    'names',
    'neighbours',
    'prototypes',
    'register',
    'registry',
    'resolve',
    'rotation',
    'shaping',
    'subspace',
]
