"""Optional dependencies: which extra of ood_jax each part needs, and a clear error when it is missing.

The library core (layers, losses, scores, metrics, calibration, corruptions, models, methods,
detectors) needs only jax, flax, optax, chex and numpy. The rest comes with the extras of setup.py:

  train   the trainer, the evaluator and TFDS data: TensorFlow (CPU build), TFDS, orbax, clu,
          ml_collections, absl, Pillow
  colab   `train` without TensorFlow, for runtimes that already ship `tensorflow` (Colab): installing
          tensorflow-cpu beside it would put two TensorFlow distributions into one environment
  plots   the figures of `ood_jax.plots` (matplotlib)
  digits  the offline digits benchmark (scikit-learn, Pillow)
  all     train + plots + digits

A module listed in `MODULES` imports optional packages at module level. `import ood_jax` puts a
finder at the front of `sys.meta_path` (`install`) that, before Python loads such a module, checks
that its packages are installed and otherwise raises `ModuleNotFoundError` naming the extra to
install, instead of a bare "No module named 'ml_collections'" from deep inside the trainer. The
finder never finds a module itself, so it changes nothing once the extras are installed. Packages
imported on first use (TensorFlow, scikit-learn) go through `import_optional`, which says the same.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence

# Import name -> the extras that install it, the one to recommend first.
PROVIDED_BY = {
    'ml_collections': ('train',),
    'orbax.checkpoint': ('train',),
    'clu': ('train',),
    'tensorflow': ('train',),
    'tensorflow_datasets': ('train',),
    'PIL': ('train', 'digits'),
    'matplotlib': ('plots',),
    'sklearn': ('digits',),
}

# How the messages name a package whose import name is not its distribution's.
_DISPLAY = {'PIL': 'Pillow (PIL)', 'sklearn': 'scikit-learn', 'orbax.checkpoint': 'orbax-checkpoint'}

# ood_jax module -> the optional packages it needs to import (tests/test_install.py checks this
# against the source: every optional package a module imports at module level is listed). A module
# that imports one of these modules needs no entry: the check runs when that import happens.
MODULES = {
    'ood_jax.data': ('PIL',),
    'ood_jax.optim': ('ml_collections',),
    'ood_jax.checkpoint': ('ml_collections', 'orbax.checkpoint'),
    'ood_jax.experiment': ('ml_collections',),
    'ood_jax.evaluate': ('ml_collections',),
    # clu (and through it TensorFlow) is imported when training starts; checked here, at import.
    'ood_jax.train': ('ml_collections', 'orbax.checkpoint', 'clu', 'tensorflow'),
    'ood_jax.plots': ('matplotlib',),
}


def installed(name: str) -> bool:
  """Whether the module `name` ('PIL', 'orbax.checkpoint') can be imported (only a parent package is imported)."""
  if name in sys.modules:
    return True
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):  # a missing parent package ('orbax' of 'orbax.checkpoint')
    return False


def _extras_of(name: str) -> tuple[str, ...]:
  return PROVIDED_BY.get(name) or PROVIDED_BY.get(name.split('.')[0]) or ('all',)


def missing_message(needed_by: str, missing: Sequence[str]) -> str:
  """The error text: what needs which missing packages, and the pip command that installs them."""
  extras = list(dict.fromkeys(_extras_of(name)[0] for name in missing))
  others = [extra for name in missing for extra in _extras_of(name)[1:] if extra not in extras]
  names = ', '.join(_DISPLAY.get(name, name) for name in missing)
  comes = 'comes' if len(missing) == 1 else 'come'
  which = ' and '.join(f"'{extra}'" for extra in extras)
  text = (f"{needed_by} needs {names}, which {comes} with the {which} extra{'s' if len(extras) > 1 else ''} "
          f"of ood_jax: pip install 'ood_jax[{','.join(extras)}]'")
  if others:
    text += ' (or ' + ', '.join(f"'ood_jax[{extra}]'" for extra in dict.fromkeys(others)) + ')'
  if 'train' in extras:
    text += ("; in Colab, or wherever `tensorflow` is already installed, use the 'colab' extra instead of "
             "'train' (the same without tensorflow-cpu)")
  return text + '.'


def require(names: Sequence[str], *, needed_by: str) -> None:
  """Raises ModuleNotFoundError naming the extra to install unless every module of `names` is installed."""
  missing = [name for name in names if not installed(name)]
  if missing:
    raise ModuleNotFoundError(missing_message(needed_by, missing), name=missing[0])


def import_optional(name: str, *, needed_by: str):
  """`importlib.import_module(name)`, or ModuleNotFoundError naming the extra that installs it."""
  require((name,), needed_by=needed_by)
  return importlib.import_module(name)


class _ExtrasFinder(importlib.abc.MetaPathFinder):
  """Checks the optional packages of a `MODULES` entry before Python loads it; finds nothing itself."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname in MODULES:
      require(MODULES[fullname], needed_by=fullname)
    return None


def install() -> None:
  """Puts the finder first in `sys.meta_path` (once; `import ood_jax` calls this)."""
  if not any(isinstance(finder, _ExtrasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ExtrasFinder())
