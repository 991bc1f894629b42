"""Post-hoc OOD detectors for any Flax model: a registry of pure fit / score pairs.

Every detector is a frozen `Detector` record with one calling convention:

  det = detectors.get('vim')
  state = det.fit(train_batches, head=(kernel, bias), num_classes=K, **hparams)   # streamed
  s = det.score(state, logits=z, features=h, **hparams)                           # [N], jit-able

* `train_batches`: a list of batch dicts, or a callable returning a fresh iterator of them (some fits
  make two passes), each with 'features' `[B, D]`, 'logits' `[B, K]` (computed from the features and
  the head when absent), 'labels' `[B]` and, for layer detectors, 'feature_maps' (a dict of maps).
* `head`: the final layer's (kernel `[D, K]`, bias `[K]`), e.g. `adapter.head_weights(variables, 'fc')`.
* `score` takes keyword inputs: `logits`, `features`, `feature_maps`, `member_logits` (`[M, N, K]`, one
  set per ensemble member), and for detectors that need the model, `inputs` with `apply_fn`
  (inputs → logits or the adapter's dict) or `stochastic_apply_fn` ((inputs, rng) → logits) and `rng`.
* `**hparams` are keyword-only with the published defaults (`det.defaults`); `fit` and `score` accept
  the same dict and each uses its own (`det.fit_params` are the ones `fit` consumes), so a tuner can
  pass one dictionary to both. `det.grid` lists values to tune over on validation data.
* Every score is "higher = more in-distribution" (the peers, OpenOOD and pytorch-ood, report the
  negation for several of them).

`needs` says what a detector reads: 'logits', 'features', 'head' (given to fit), 'feature_maps',
'model' (it runs the network: ODIN, MC-dropout, input-preprocessed Mahalanobis) and 'members'
(logits of several networks or dropout samples).

`get(name)`, `names()`, `resolve(('react', 'vim'))` / `resolve('all', available=('logits',
'features', 'head'))`. The family modules hold the math: `logit`, `shaping`, `distance`, `gradient`,
`ensemble`; `adapter` extracts logits / features / maps from any Linen or NNX module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax

from ood_jax.detectors import adapter
from ood_jax.detectors import distance
from ood_jax.detectors import ensemble
from ood_jax.detectors import gradient
from ood_jax.detectors import logit
from ood_jax.detectors import shaping

__all__ = [
    'Detector',
    'NEEDS',
    'adapter',
    'distance',
    'ensemble',
    'get',
    'gradient',
    'logit',
    'names',
    'resolve',
    'shaping',
]

NEEDS = ('logits', 'features', 'head', 'feature_maps', 'model', 'members')
_INPUTS = ('logits', 'features', 'feature_maps', 'member_logits', 'inputs', 'apply_fn',
           'stochastic_apply_fn', 'rng')


@dataclasses.dataclass(frozen=True)
class Detector:
  """A registered detector.

  Attributes:
    name: registry name.
    needs: subset of `NEEDS`.
    fit_fn: `(batches, *, head, num_classes, **fit_hparams) -> state`, or None for a trivial fit.
    score_fn: `(state, inputs: dict, **score_hparams) -> [N]`.
    defaults: every hyperparameter and its published default.
    fit_params: the hyperparameters `fit` consumes (the others are scoring-time).
    grid: hyperparameter → values to tune over.
    paper: the method's paper, "Authors Year".
    year: publication year.
  """

  name: str
  needs: frozenset
  fit_fn: Callable | None
  score_fn: Callable
  defaults: Mapping[str, Any]
  fit_params: tuple
  grid: Mapping[str, tuple]
  paper: str
  year: int

  def _hparams(self, hparams):
    unknown = sorted(set(hparams) - set(self.defaults))
    if unknown:
      raise ValueError(f'detector {self.name!r} has no hyperparameter(s) {unknown}; its hyperparameters '
                       f'are {sorted(self.defaults) or "none"}.')
    return {**self.defaults, **hparams}

  @property
  def needs_fit(self) -> bool:
    return self.fit_fn is not None

  def fit(self, batches=None, *, head=None, num_classes=None, **hparams):
    """Fits the detector's state (a pytree; `()` for logit-only detectors)."""
    hp = self._hparams(hparams)
    if self.fit_fn is None:
      return ()
    if 'head' in self.needs and head is None:
      raise ValueError(f'detector {self.name!r} needs the final layer: pass head=(kernel [D, K], bias [K]).')
    return self.fit_fn(batches, head=head, num_classes=num_classes,
                       **{k: hp[k] for k in self.fit_params})

  def score(self, state=(), **kwargs):
    """Scores `[N]`, higher = more in-distribution; inputs and hyperparameters by keyword."""
    inputs = {k: kwargs.pop(k, None) for k in _INPUTS}
    hp = self._hparams(kwargs)
    required = {'logits': 'logits', 'features': 'features', 'feature_maps': 'feature_maps',
                'members': 'member_logits'}
    for need, key in required.items():
      # A detector that runs the model computes its maps from `inputs`; its fit reads them from batches.
      if need == 'feature_maps' and 'model' in self.needs:
        continue
      if need in self.needs and inputs[key] is None:
        given = sorted(k for k, v in inputs.items() if v is not None) or 'nothing'
        raise ValueError(f'detector {self.name!r} needs {key} (it needs {sorted(self.needs)}); got {given}.')
    if 'model' in self.needs and inputs['inputs'] is None:
      raise ValueError(f'detector {self.name!r} runs the model: pass inputs= and apply_fn= '
                       f'(or stochastic_apply_fn=).')
    return self.score_fn(state, inputs, **{k: v for k, v in hp.items() if k not in self.fit_params})

  def grid_for(self, *, feature_dim: int | None = None, num_classes: int | None = None) -> dict:
    """`grid` without values that do not apply at this size (dimensions ≥ D, top-M > K)."""
    out = {}
    for key, values in self.grid.items():
      keep = []
      for v in values:
        if key == 'dim' and v is not None and feature_dim is not None and v > feature_dim:
          continue
        if key == 'top_m' and num_classes is not None and v > num_classes and keep:
          continue
        keep.append(v)
      out[key] = tuple(keep)
    return out


_REGISTRY: dict[str, Detector] = {}


def _register(name, needs, score_fn, *, fit_fn=None, defaults=None, fit_params=(), grid=None, paper, year):
  needs = frozenset(needs)
  assert needs <= set(NEEDS), needs
  _REGISTRY[name] = Detector(name, needs, fit_fn, score_fn, MappingProxyType(dict(defaults or {})),
                             tuple(fit_params), MappingProxyType(dict(grid or {})), paper, year)


def get(name: str) -> Detector:
  """The detector registered as `name`; ValueError listing the valid names otherwise."""
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f'unknown detector {name!r}; valid detectors: {", ".join(_REGISTRY)}.')
  return _REGISTRY[name]


def names() -> tuple:
  """All registered names, in registry order (by family)."""
  return tuple(_REGISTRY)


def resolve(spec: str | Iterable[str], *, available: Iterable[str] | None = None) -> tuple:
  """Detectors for a config value: 'all', one name, or a sequence of names (duplicates dropped).

  Args:
    spec: 'all', a name or names.
    available: with 'all', keep only detectors whose needs are a subset (e.g. ('logits', 'features',
      'head') for an evaluator that has no model at hand); named detectors must satisfy it too.

  Returns:
    A tuple of `Detector`s.
  """
  avail = None if available is None else set(available)
  if avail is not None and not avail <= set(NEEDS):
    raise ValueError(f'available must be a subset of {NEEDS}, got {sorted(avail)}.')
  if isinstance(spec, str):
    if spec == 'all':
      return tuple(d for d in _REGISTRY.values() if avail is None or d.needs <= avail)
    spec = (spec,)
  out = []
  for name in spec:
    det = get(name)
    if avail is not None and not det.needs <= avail:
      raise ValueError(f'detector {name!r} needs {sorted(det.needs - avail)}, which are not available.')
    if det not in out:
      out.append(det)
  return tuple(out)


# ------------------------------------------------------------------------------------------------
# Registry entries. Fits receive (batches, head=, num_classes=, **fit_hparams); scores (state, x, **hp).
# ------------------------------------------------------------------------------------------------


def _head_fit(fn):
  return lambda batches, *, head, num_classes, **hp: fn(batches, head=head, **hp)


_PERCENTILES = (65, 70, 75, 80, 85, 90, 95)

# Logit / probability.
_register('msp', {'logits'}, lambda s, x: logit.msp(x['logits']), paper='Hendrycks & Gimpel 2017', year=2017)
_register('max_logit', {'logits'}, lambda s, x: logit.max_logit(x['logits']),
          paper='Hendrycks et al. 2022', year=2022)
_register('energy', {'logits'}, lambda s, x, **hp: logit.energy(x['logits'], **hp),
          defaults={'temperature': 1.0}, paper='Liu et al. 2020', year=2020)
_register('entropy', {'logits'}, lambda s, x: logit.entropy(x['logits']),
          paper='Softmax entropy (pytorch-ood `Entropy`)', year=2021)
_register('temperature_msp', {'logits'}, lambda s, x: logit.temperature_msp(s, x['logits']),
          fit_fn=lambda b, *, head, num_classes, **hp: logit.fit_temperature(b, head=head,
                                                                             num_classes=num_classes, **hp),
          defaults={'grid_size': 64, 'bounds': (0.05, 20.0)}, fit_params=('grid_size', 'bounds'),
          paper='Guo et al. 2017', year=2017)
_register('gen', {'logits'}, lambda s, x, **hp: logit.gen(x['logits'], **hp),
          defaults={'gamma': 0.1, 'top_m': 100},
          grid={'gamma': (0.01, 0.1, 0.5, 1.0, 2.0), 'top_m': (10, 50, 100, 200, 500, 1000)},
          paper='Liu, Lochman & Zach 2023', year=2023)
_register('kl_matching', {'logits'}, lambda s, x: logit.kl_matching(s, x['logits']),
          fit_fn=lambda b, *, head, num_classes, **hp: logit.fit_kl_matching(b, head=head,
                                                                             num_classes=num_classes, **hp),
          defaults={'use_labels': False}, fit_params=('use_labels',), paper='Hendrycks et al. 2022', year=2022)

# Activation shaping.
_ACT_FIT = dict(fit_fn=_head_fit(shaping.fit_activations), fit_params=('max_rows', 'seed'))
_ACT_DEFAULTS = {'max_rows': 10_000, 'seed': 0}
_register('react', {'features', 'head'}, lambda s, x, **hp: shaping.react(s, x['features'], **hp),
          defaults={**_ACT_DEFAULTS, 'percentile': 90.0, 'temperature': 1.0},
          grid={'percentile': (85, 90, 95, 99)}, paper='Sun, Guo & Li 2021', year=2021, **_ACT_FIT)
for _variant in 'pbs':
  _register(f'ash_{_variant}', {'features', 'head'},
            lambda s, x, _v=_variant, **hp: shaping.ash(s, x['features'], variant=_v, **hp),
            fit_fn=lambda b, *, head, num_classes, **hp: shaping.fit_head(b, head=head, num_classes=num_classes),
            defaults={'percentile': 90.0}, grid={'percentile': _PERCENTILES},
            paper='Djurisic et al. 2023', year=2023)
_register('scale', {'features', 'head'}, lambda s, x, **hp: shaping.scale(s, x['features'], **hp),
          fit_fn=lambda b, *, head, num_classes, **hp: shaping.fit_head(b, head=head, num_classes=num_classes),
          defaults={'percentile': 85.0}, grid={'percentile': _PERCENTILES}, paper='Xu et al. 2024', year=2024)
_register('dice', {'features', 'head'}, lambda s, x, **hp: shaping.dice(s, x['features'], **hp),
          defaults={**_ACT_DEFAULTS, 'sparsity': 0.9}, grid={'sparsity': (0.3, 0.5, 0.7, 0.9)},
          paper='Sun & Li 2022', year=2022, **_ACT_FIT)
_register('vra', {'features', 'head'}, lambda s, x, **hp: shaping.vra(s, x['features'], **hp),
          defaults={**_ACT_DEFAULTS, 'low': 60.0, 'high': 90.0, 'gamma': 0.0, 'per_unit': True,
                    'below': 'zero'},
          grid={'low': (50, 60, 65, 70), 'high': (80, 85, 90, 95, 99), 'gamma': (0.0, 0.3, 0.6)},
          paper='Xu et al. 2023', year=2023, **_ACT_FIT)
_register('rankfeat', {'feature_maps', 'head'}, lambda s, x, **hp: shaping.rankfeat(s, x['feature_maps'], **hp),
          fit_fn=lambda b, *, head, num_classes, **hp: shaping.fit_head(b, head=head, num_classes=num_classes),
          defaults={'temperature': 1.0, 'map_name': None}, paper='Song, Sebe & Wang 2022', year=2022)

# Feature / distance.
_register('mahalanobis', {'features'}, lambda s, x: distance.mahalanobis(s, x['features']),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_mahalanobis(b, num_classes=num_classes, **hp),
          defaults={'ridge': 1e-6}, fit_params=('ridge',), paper='Lee et al. 2018', year=2018)
_register('rmds', {'features'}, lambda s, x: distance.rmds(s, x['features']),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_rmds(b, num_classes=num_classes, **hp),
          defaults={'ridge': 1e-6}, fit_params=('ridge',), paper='Ren et al. 2021', year=2021)
_register('mahalanobis_multilayer', {'feature_maps'},
          lambda s, x: distance.multilayer_mahalanobis(s, x['feature_maps']),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_multilayer(b, num_classes=num_classes, **hp),
          defaults={'ridge': 1e-6}, fit_params=('ridge',), paper='Lee et al. 2018', year=2018)
_register('mahalanobis_ensemble', {'feature_maps', 'model'},
          lambda s, x, **hp: distance.mahalanobis_ensemble(s, x['apply_fn'], x['inputs'], **hp),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_multilayer(b, num_classes=num_classes, **hp),
          defaults={'ridge': 1e-6, 'noise': 0.0014}, fit_params=('ridge',),
          grid={'noise': (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)}, paper='Lee et al. 2018', year=2018)
_register('knn', {'features'}, lambda s, x, **hp: distance.knn(s, x['features'], **hp),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_knn(b, **hp),
          defaults={'fraction': 1.0, 'seed': 0, 'k': 50}, fit_params=('fraction', 'seed'),
          grid={'k': (50, 100, 200, 500, 1000)}, paper='Sun et al. 2022', year=2022)
_register('vim', {'features', 'head'}, lambda s, x, **hp: distance.vim(s, x['features'], **hp),
          fit_fn=_head_fit(distance.fit_subspace), defaults={'dim': None},
          grid={'dim': (None, 64, 128, 256, 512, 1000)}, paper='Wang et al. 2022', year=2022)
_register('residual', {'features', 'head'}, lambda s, x, **hp: distance.residual(s, x['features'], **hp),
          fit_fn=_head_fit(distance.fit_subspace), defaults={'dim': None},
          grid={'dim': (None, 64, 128, 256, 512, 1000)}, paper='Wang et al. 2022', year=2022)
_register('she', {'features', 'head'}, lambda s, x: distance.she(s, x['features'], logits=x['logits']),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_she(b, head=head, num_classes=num_classes),
          paper='Zhang et al. 2023', year=2023)
_register('nnguide', {'features', 'head'},
          lambda s, x, **hp: distance.nnguide(s, x['features'], logits=x['logits'], **hp),
          fit_fn=_head_fit(distance.fit_nnguide), defaults={'fraction': 0.01, 'seed': 0, 'k': 100},
          fit_params=('fraction', 'seed'), grid={'k': (10, 50, 100)}, paper='Park et al. 2023', year=2023)
_register('fdbd', {'features', 'head'}, lambda s, x, **hp: distance.fdbd(s, x['features'], **hp),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_fdbd(b, head=head, num_classes=num_classes),
          defaults={'normalizer': 'distance'}, grid={'normalizer': ('distance', 'norm')},
          paper='Liu & Qin 2024', year=2024)
_register('nci', {'features', 'head'}, lambda s, x, **hp: distance.nci(s, x['features'], **hp),
          fit_fn=lambda b, *, head, num_classes, **hp: distance.fit_fdbd(b, head=head, num_classes=num_classes),
          defaults={'alpha': 1e-4}, grid={'alpha': (1e-4, 1e-3, 1e-2, 1e-1)}, paper='Liu & Qin 2025', year=2025)
_register('neco', {'features', 'head'}, lambda s, x, **hp: distance.neco(s, x['features'], **hp),
          fit_fn=_head_fit(distance.fit_neco),
          defaults={'dim': None, 'standardize': False, 'use_max_logit': False},
          grid={'dim': (None, 16, 32, 64, 128, 256), 'standardize': (False, True)},
          paper='Ammar et al. 2024', year=2024)

# Gradient.
_register('gradnorm', {'features', 'head'}, lambda s, x, **hp: gradient.gradnorm(s, x['features'], **hp),
          fit_fn=lambda b, *, head, num_classes, **hp: shaping.fit_head(b, head=head, num_classes=num_classes),
          defaults={'temperature': 1.0, 'include_bias': False}, paper='Huang, Geng & Li 2021', year=2021)
_register('odin', {'model'}, lambda s, x, **hp: gradient.odin(x['apply_fn'], x['inputs'], **hp),
          defaults={'temperature': 1000.0, 'epsilon': 0.0014},
          grid={'temperature': (1.0, 10.0, 100.0, 1000.0), 'epsilon': (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005)},
          paper='Liang, Li & Srikant 2018', year=2018)


# Ensembles and MC-dropout.
def _dropout_members(x, num_samples):
  rng = x['rng'] if x['rng'] is not None else jax.random.PRNGKey(0)
  return ensemble.mc_dropout_logits(x['stochastic_apply_fn'], x['inputs'], rng, num_samples=num_samples)


for _suffix, _fn in (('', ensemble.mean_msp), ('_entropy', ensemble.predictive_entropy),
                     ('_mi', ensemble.mutual_information)):
  _register(f'ensemble{_suffix}', {'members'}, lambda s, x, _f=_fn: _f(x['member_logits']),
            paper='Lakshminarayanan, Pritzel & Blundell 2017', year=2017)
  _register(f'mc_dropout{_suffix}', {'model'},
            lambda s, x, _f=_fn, **hp: _f(_dropout_members(x, **hp)),
            defaults={'num_samples': 10}, paper='Gal & Ghahramani 2016', year=2016)
_register('mc_dropout_features', {'features', 'head'},
          lambda s, x, **hp: ensemble.mean_msp(ensemble.feature_dropout_logits(
              s, x['features'], x['rng'] if x['rng'] is not None else jax.random.PRNGKey(0), **hp)),
          fit_fn=lambda b, *, head, num_classes, **hp: shaping.fit_head(b, head=head, num_classes=num_classes),
          defaults={'rate': 0.5, 'num_samples': 5}, paper='Gal & Ghahramani 2016 (OpenOOD feature dropout)',
          year=2016)
