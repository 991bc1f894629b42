"""Runs repeated over seeds: every number of their results as mean ± standard deviation, and where they ran.

The digits tables (`experiments.digits_methods`, `experiments.digits_calibration`) train each run once per
seed: a single run's numbers change with the seed (and with the CPU, whose float rounding differs), and only
their spread over seeds says by how much. `spread` folds the per-seed results into one results dict
whose numbers are `Spread`s; the report functions (`ood_jax.evaluation.report.comparison_markdown`, ...) then
print each of them as 'mean ± std' without knowing, and `provenance` names the seeds, the command, the machine
and the library versions.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import importlib.metadata
import math
import os
import platform
import statistics
from typing import Any

from absl import app
import jax

DEFAULT_SEEDS = (0, 1, 2)
SMOKE_SEEDS = (0, 1)  # two: the fewest with a standard deviation
FLAG_HELP = 'Seeds to train every run with, comma-separated (default 0,1,2; with --smoke 0,1).'
LIBRARIES = ('jax', 'flax', 'optax', 'numpy')


@dataclasses.dataclass(frozen=True)
class Spread:
  """One number over n seeds: its mean and sample standard deviation (n − 1 in the denominator; NaN for n = 1).

  Formats as 'mean ± std', the format spec applied to both (f'{s:.1f}' gives '97.6 ± 1.2'; with one seed, the
  value alone). It scales by a constant, as the tables print percentages (`100 * s`); any other arithmetic is a
  TypeError, so a table that computed with its numbers could not print a spread that is not one.
  """

  mean: float
  std: float
  n: int

  def __mul__(self, factor):
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
      return NotImplemented
    return Spread(self.mean * factor, self.std * abs(factor), self.n)

  __rmul__ = __mul__

  def __format__(self, spec: str) -> str:
    if self.n < 2:
      return format(self.mean, spec)
    return f'{format(self.mean, spec)} ± {format(self.std, spec)}'

  def __str__(self) -> str:
    return format(self, '')


def parse_seeds(values: Sequence[str | int]) -> tuple[int, ...]:
  """The seeds of a --seeds flag ('0,1,2' as absl's list flag gives it), checked: integers, no repeats."""
  try:
    seeds = tuple(int(value) for value in values)
  except ValueError:
    given = ','.join(map(str, values))
    raise ValueError(f'--seeds takes comma-separated integers, e.g. 0,1,2; got {given!r}.') from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'--seeds needs at least one seed and no repeats, got {list(seeds)}.')
  return seeds


def from_flag(values: Sequence[str] | None, *, smoke: bool) -> tuple[int, ...]:
  """The seeds of --seeds (`FLAG_HELP`'s defaults when not given); a bad value is an `app.UsageError` (exit 2)."""
  try:
    return parse_seeds(values or (SMOKE_SEEDS if smoke else DEFAULT_SEEDS))
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def run_dir(root: str, name: str, seed: int) -> str:
  """Where the run `name` of `seed` lives: <root>/<name>/seed<seed>."""
  return os.path.join(root, name, f'seed{seed}')


def spread(results: Sequence[Any], seeds: Sequence[int]) -> Any:
  """The per-seed results of one run (dicts of the same structure, `results[i]` of `seeds[i]`) as one.

  Every number becomes a `Spread` over the seeds. Lists are matched element by element, lists of named entries
  (the leaderboard's rows) by name and kind. Any other value (a name, a flag) is kept when all seeds agree;
  otherwise it reads 'seed 0: a; seed 2: b' for the seeds that have it, e.g. a calibration warning only some
  seeds raised. A number that some seeds lack is a ValueError: its spread would silently be over fewer seeds.
  """
  if len(results) != len(seeds) or not results:
    raise ValueError(f'spread needs one result per seed, got {len(results)} results for seeds {list(seeds)}.')
  return _spread(list(results), list(seeds), 'results')


def _spread(values: list, seeds: list, path: str) -> Any:
  if all(isinstance(v, dict) for v in values):
    keys = list(dict.fromkeys(key for v in values for key in v))
    out = {}
    for key in keys:
      present = [(v[key], seed) for v, seed in zip(values, seeds) if key in v]
      if len(present) == len(values):
        out[key] = _spread([v for v, _ in present], seeds, f'{path}[{key!r}]')
      elif any(_is_number(v) or isinstance(v, (dict, list)) for v, _ in present):
        missing = [seed for v, seed in zip(values, seeds) if key not in v]
        raise ValueError(f'{path}[{key!r}] is missing in the results of seed(s) {missing}.')
      else:
        out[key] = _text([v for v, _ in present], [seed for _, seed in present], every_seed=False)
    return out
  if all(isinstance(v, (list, tuple)) for v in values):
    if all(v and all(isinstance(item, dict) and 'name' in item for item in v) for v in values):
      values = [{(item['name'], item.get('kind')): item for item in v} for v in values]
      merged = _spread(values, seeds, path)
      return list(merged.values())
    if len({len(v) for v in values}) != 1:
      raise ValueError(f'{path} has {sorted({len(v) for v in values})} entries in different seeds.')
    return [_spread(list(items), seeds, f'{path}[{i}]') for i, items in enumerate(zip(*values))]
  if all(_is_number(v) for v in values):
    floats = [float(v) for v in values]
    std = statistics.stdev(floats) if len(floats) > 1 else math.nan
    return Spread(statistics.fmean(floats), std, len(floats))
  return _text(values, seeds)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(values: list, seeds: list, *, every_seed: bool = True) -> Any:
  if every_seed and all(v == values[0] for v in values):
    return values[0]
  return '; '.join(f'seed {seed}: {value}' for value, seed in zip(values, seeds))


def means(tree: Any) -> Any:
  """`tree` with every `Spread` replaced by its mean: what a figure plots."""
  if isinstance(tree, Spread):
    return tree.mean
  if isinstance(tree, dict):
    return {key: means(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return [means(value) for value in tree]
  return tree


def machine() -> str:
  """The CPU cores this process may use (what `nproc` prints), the CPU model, JAX's backend and the versions."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
  except OSError:
    pass  # not Linux: platform's name
  versions = ', '.join(f'{name} {importlib.metadata.version(name)}' for name in LIBRARIES)
  return f'{cores} CPU cores ({model}), JAX backend {jax.default_backend()}; {versions}'


def provenance(command: str, seeds: Sequence[int], minutes: float, what: str, *, reused: int = 0) -> str:
  """The paragraph that heads a table made over seeds: the command, n and the seeds, the runtime, the machine.

  `reused`: how many runs this invocation found already trained (by an earlier, interrupted or parallel
  invocation of the same command) and only evaluated; the runtime then covers this invocation, not the sweep.
  """
  timing = f'trained and evaluated in {minutes:.1f} minutes on {machine()}'
  if reused:
    timing = (f'{minutes:.1f} minutes on {machine()} for the invocation that wrote this file, which found {reused} '
              f'runs already trained by earlier invocations of the same command (and evaluated those without results)')
  return (f'Written by `{command}` ({what}; every number is the mean ± sample standard deviation over '
          f'n = {len(seeds)} seed(s), {", ".join(map(str, seeds))}, {timing}).\n\n')
