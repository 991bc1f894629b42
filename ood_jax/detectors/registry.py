"""The detector registry: one frozen `Detector` record per method, registered where its math is defined.

A family module defines `fit_x(batches, *, ...) -> state` and `x(state, features, *, hparams)`, then
registers them right below the score function (big_vision's `Registry.register` on the function):

  registry.register('knn', needs={'features'}, fit=fit_knn, score=knn, defaults={'fraction': 1.0, 'seed': 0,
                    'k': 50}, fit_params=('fraction', 'seed'), grid={'k': (50, 100)}, paper='Sun et al. 2022',
                    year=2022)

The registry binds by parameter name, so no adapter sits between it and the math: a score function's
parameters named after a data key (`INPUTS`) receive that input, `state` receives the fitted state, and
its keyword parameters named in `defaults` receive the scoring-time hyperparameters; a fit receives
`head=` / `num_classes=` when it has those parameters, and its `fit_params`.

`get(name, **hparams)` pins hyperparameters (a config's choice: `get('react', percentile=95.0)`), as
does `Detector.pin`; `resolve` turns a config value into records.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ['Detector', 'INPUTS', 'NEEDS', 'get', 'names', 'register', 'resolve']

NEEDS = ('logits', 'features', 'head', 'feature_maps', 'model', 'members')
# The data a score reads; everything else passed to `score` is a hyperparameter.
INPUTS = ('logits', 'features', 'feature_maps', 'member_logits', 'inputs', 'apply_fn', 'stochastic_apply_fn',
          'rng')
# needs → the input it requires at scoring time ('head' and 'model' are handled apart).
_REQUIRED = {'logits': 'logits', 'features': 'features', 'feature_maps': 'feature_maps', 'members': 'member_logits'}


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable) -> tuple[str, ...]:
  return tuple(inspect.signature(fn).parameters)


@dataclasses.dataclass(frozen=True)
class Detector:
  """A registered detector.

  Attributes:
    name: registry name.
    needs: subset of `NEEDS`.
    fit_fn: `(batches, *, [head], [num_classes], **fit_hparams) -> state`, or None for a trivial fit.
    score_fn: the family's score function, bound by parameter name (see the module docstring).
    defaults: every hyperparameter and its default (the published one unless pinned).
    fit_params: the hyperparameters `fit` consumes (the others are scoring-time).
    grid: hyperparameter → values to tune over (pinned names are not tuned).
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

  def _hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
    data = sorted(set(hparams) & set(INPUTS))
    if data:
      raise ValueError(f'detector {self.name!r}: {data} are inputs, not hyperparameters; pass them in the inputs '
                       f'mapping, det.score(state, {{{data[0]!r}: ...}}).')
    unknown = sorted(set(hparams) - set(self.defaults))
    if unknown:
      raise ValueError(f'detector {self.name!r} has no hyperparameter(s) {unknown}; its hyperparameters '
                       f'are {sorted(self.defaults) or "none"}.')
    return {**self.defaults, **hparams}

  def pin(self, **hparams) -> Detector:
    """This detector with `hparams` as its defaults and out of its grid (a config's fixed choice)."""
    hp = self._hparams(hparams)
    return dataclasses.replace(self, defaults=MappingProxyType(hp),
                               grid=MappingProxyType({k: v for k, v in self.grid.items() if k not in hparams}))

  def fit(self, batches=None, *, head=None, num_classes=None, **hparams):
    """Fits the detector's state (a pytree; `()` for logit-only detectors); uses the fit hyperparameters."""
    hp = self._hparams(hparams)
    if self.fit_fn is None:
      return ()
    if 'head' in self.needs and head is None:
      raise ValueError(f'detector {self.name!r} needs the final layer: pass head=(kernel [D, K], bias [K]).')
    params = _parameters(self.fit_fn)
    context = {'head': head, 'num_classes': num_classes}
    return self.fit_fn(batches, **{k: v for k, v in context.items() if k in params},
                       **{k: hp[k] for k in self.fit_params})

  def score(self, state, inputs: Mapping[str, Any], /, **hparams):
    """Scores `[N]`, higher = more in-distribution.

    Args:
      state: from `fit` (`()` for detectors without a fit).
      inputs: the data, by `INPUTS` key ('logits', 'features', ...); a missing key is None.
      **hparams: hyperparameters (fit-time ones are accepted and ignored, so a tuner can pass one dict).
    """
    hp = self._hparams(hparams)  # first: the old keyword spelling of the data gets the message that explains
    if not isinstance(inputs, Mapping):
      raise TypeError(f'detector {self.name!r}: inputs must be a mapping such as {{"logits": z, "features": h}}, '
                      f'got {type(inputs).__name__}.')
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
      raise ValueError(f'detector {self.name!r}: unknown input(s) {unknown}; valid inputs are {list(INPUTS)}.')
    data = {key: inputs.get(key) for key in INPUTS}
    for need, key in _REQUIRED.items():
      # A detector that runs the model computes its maps from `inputs`; its fit reads them from batches.
      if need == 'feature_maps' and 'model' in self.needs:
        continue
      if need in self.needs and data[key] is None:
        given = sorted(k for k, v in data.items() if v is not None) or 'nothing'
        raise ValueError(f'detector {self.name!r} needs {key} (it needs {sorted(self.needs)}); got {given}.')
    if 'model' in self.needs and data['inputs'] is None:
      raise ValueError(f"detector {self.name!r} runs the model: pass {{'inputs': x, 'apply_fn': f}} "
                       f"(or 'stochastic_apply_fn').")
    params = _parameters(self.score_fn)
    args = {key: value for key, value in data.items() if key in params}
    if 'state' in params:
      args['state'] = state
    return self.score_fn(**args, **{k: v for k, v in hp.items() if k not in self.fit_params})

  def grid_for(self, *, feature_dim: int | None = None, num_classes: int | None = None,
               num_train: int | None = None) -> dict:
    """`grid` without the values that do not apply at this size.

    * 'dim' ≥ D (ViM, Residual, NECO): the principal subspace is then everything, so the residual is zero
      (ViM equals energy) and NECO's ratio is 1. None (the default rule) is kept.
    * 'top_m' > K beyond the first (GEN clips M to K, so larger values repeat it).
    * 'k' (KNN, NNGuide) beyond the bank: more than `num_train` × the bank's `fraction` training rows,
      a neighbour that does not exist (the detectors raise for it).

    A hyperparameter whose values are all dropped gets an empty tuple (tuning then tries its default alone).
    """
    bank = None if num_train is None else num_train * float(self.defaults.get('fraction', 1.0))
    out = {}
    for key, values in self.grid.items():
      keep = []
      for v in values:
        if key == 'dim' and v is not None and feature_dim is not None and v >= feature_dim:
          continue
        if key == 'top_m' and num_classes is not None and v > num_classes and keep:
          continue
        if key == 'k' and bank is not None and v > bank:
          continue
        keep.append(v)
      out[key] = tuple(keep)
    return out


_REGISTRY: dict[str, Detector] = {}


def register(name: str, *, needs: Iterable[str], score: Callable, fit: Callable | None = None,
             defaults: Mapping[str, Any] | None = None, fit_params: Iterable[str] = (),
             grid: Mapping[str, tuple] | None = None, paper: str, year: int) -> Detector:
  """Registers a detector; checks at import time that its functions take what the registry passes."""
  needs, defaults, fit_params, grid = frozenset(needs), dict(defaults or {}), tuple(fit_params), dict(grid or {})
  problems = []
  if name in _REGISTRY:
    problems.append('the name is registered already')
  if not needs <= set(NEEDS):
    problems.append(f'needs {sorted(needs - set(NEEDS))} are not in {NEEDS}')
  if not set(fit_params) | set(grid) <= set(defaults):
    problems.append('fit_params and grid must be hyperparameters with defaults')
  score_params = inspect.signature(score).parameters
  for key in sorted(set(defaults) - set(fit_params)):
    if key not in score_params or key in INPUTS:
      problems.append(f'the score function takes no hyperparameter {key!r}')
  for key, param in score_params.items():
    if key not in INPUTS and key != 'state' and key not in defaults and param.default is inspect.Parameter.empty:
      problems.append(f'the score function requires {key!r}, which the registry never passes')
  fit_accepts = set(inspect.signature(fit).parameters) if fit is not None else set()
  if set(fit_params) - fit_accepts:
    problems.append(f'the fit takes no {sorted(set(fit_params) - fit_accepts)}')
  if problems:
    raise TypeError(f'register({name!r}): ' + '; '.join(problems) + '.')
  detector = Detector(name, needs, fit, score, MappingProxyType(defaults), fit_params, MappingProxyType(grid),
                      paper, year)
  _REGISTRY[name] = detector
  return detector


def _registered(name) -> Detector:
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f'unknown detector {name!r}; valid detectors: {", ".join(_REGISTRY)}.')
  return _REGISTRY[name]


def get(name: str, **hparams) -> Detector:
  """The detector registered as `name`, with `hparams` pinned (`Detector.pin`); ValueError listing the valid
  names otherwise."""
  return _registered(name).pin(**hparams) if hparams else _registered(name)


def names() -> tuple:
  """All registered names, in registry order (by family, in the order `ood_jax.detectors` imports them)."""
  return tuple(_REGISTRY)


def resolve(spec: str | Iterable[str | Detector], *, available: Iterable[str] | None = None,
            hparams: Mapping[str, Mapping[str, Any]] | None = None) -> tuple:
  """Detectors for a config value: 'all', one name, or a sequence of names or `Detector`s (duplicates dropped).

  Args:
    spec: 'all', a name, or names / records.
    available: with 'all', keep only detectors whose needs are a subset (e.g. ('logits', 'features',
      'head') for an evaluator that has no model at hand); named detectors must satisfy it too.
    hparams: detector name → {hyperparameter: value} to pin (`Detector.pin`), e.g. a config's
      `{'react': {'percentile': 95.0}}`. Every name must be registered; a named `spec` must select it.

  Returns:
    A tuple of `Detector`s.
  """
  avail = None if available is None else set(available)
  if avail is not None and not avail <= set(NEEDS):
    raise ValueError(f'available must be a subset of {NEEDS}, got {sorted(avail)}.')
  hparams = dict(hparams or {})
  for name in hparams:
    _registered(name)
  if isinstance(spec, str) and spec == 'all':
    chosen = [d for d in _REGISTRY.values() if avail is None or d.needs <= avail]
  else:
    chosen = []
    for item in (spec,) if isinstance(spec, str) else spec:
      det = item if isinstance(item, Detector) else get(item)
      if avail is not None and not det.needs <= avail:
        raise ValueError(f'detector {det.name!r} needs {sorted(det.needs - avail)}, which are not available.')
      if det.name not in {d.name for d in chosen}:
        chosen.append(det)
    missing = sorted(set(hparams) - {d.name for d in chosen})
    if missing:
      raise ValueError(f'hparams set {missing}, which {spec!r} does not select.')
  return tuple(d.pin(**hparams[d.name]) if d.name in hparams else d for d in chosen)
