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

A package listed in `MODULES` imports optional packages at module level; its entrance (the first
lines of `ood_jax/trainer/__init__.py`, of `ood_jax/plots.py`) calls `require` with that list before
any of them is imported, so a missing one raises `ModuleNotFoundError` naming the extra to install,
instead of a bare "No module named 'ml_collections'" from deep inside the trainer. Packages imported
on first use (TensorFlow's readers, scikit-learn) go through `import_optional`, which says the same.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

# Import name -> the extras that install it, the one to recommend first.
PROVIDED_BY = {
    'ml_collections': ('train',),
    'absl': ('train',),
    'orbax.checkpoint': ('train',),
    'clu': ('train',),
    'tensorflow': ('train',),
    'tensorflow_datasets': ('train',),
    'PIL': ('train', 'digits'),
    'matplotlib': ('plots',),
    'sklearn': ('digits',),
}

# How the messages name a package whose import name is not its distribution's.
_DISPLAY = {'absl': 'absl-py', 'PIL': 'Pillow (PIL)', 'sklearn': 'scikit-learn', 'orbax.checkpoint': 'orbax-checkpoint'}

# ood_jax package -> the optional packages its modules import at module level (tests/test_install.py
# checks this against the source: every such import of a module is listed under it or a package above).
MODULES = {
    # The trainer wing: configs, checkpoints, metric writers (clu, and through it TensorFlow), logging,
    # image folders. Its entrance checks them all, so every module below it is covered.
    'ood_jax.trainer': ('ml_collections', 'orbax.checkpoint', 'clu', 'absl', 'PIL', 'tensorflow'),
    'ood_jax.plots': ('matplotlib',),
}


def installed(name: str) -> bool:
  """Whether the module `name` ('PIL', 'orbax.checkpoint') can be imported (only a parent package is imported)."""
  if sys.modules.get(name) is not None:
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
