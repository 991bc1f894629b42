"""Detector hyperparameters chosen on validation data only (OpenOOD v1.5's automatic parameter search).

For a detector with a grid (`Detector.grid_for`), every combination of its values is scored on the
in-distribution validation split and the validation OOD sets; the combination with the best AUROC
(the mean over the validation OOD sets) wins, ties going to the earlier candidate, and the published
defaults come first. `select` is given no test data at all, so the choice cannot depend on a test
set. Fits are shared between candidates that differ only in scoring-time values (ReAct's percentile,
KNN's k), so a grid of 30 costs one fit and 30 scorings of the (small) validation sets.

`score_rows` is how the evaluation path scores host arrays: in blocks of `BLOCK` rows, the last one
padded, so each detector's kernel sees one shape and compiles once per process for the validation sets,
every grid point that differs only in a traced hyperparameter, and the test sets alike.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ood_jax import metrics

__all__ = ['BLOCK', 'candidates', 'score_rows', 'select']

# Rows per scoring call. Scores are per row (no detector mixes rows), so padding a block and dropping the
# padded scores changes nothing (mc_dropout_features draws its dropout masks per block, by row position);
# one size for every set is one compilation per detector and static setting.
BLOCK = 1024


def score_rows(det, state, inputs: dict[str, np.ndarray], **hparams) -> np.ndarray:
  """`det.score` of host arrays with rows on axis 0 ('logits', 'features'), in blocks of `BLOCK` rows; float64.

  The last block is padded by repeating its final row (a valid input for every detector, unlike zeros,
  which some scores divide by) and the padded scores are dropped. Every block is dispatched before the
  first is read back, so the device works while the host slices the next one.
  """
  size = len(next(iter(inputs.values())))
  if not size:
    return np.asarray(det.score(state, inputs, **hparams), np.float64)
  pending = []
  for start in range(0, size, BLOCK):
    rows = min(BLOCK, size - start)
    block = {key: _pad_rows(np.asarray(value[start:start + rows]), BLOCK) for key, value in inputs.items()}
    pending.append((rows, det.score(state, block, **hparams)))
  return np.concatenate([np.asarray(out, np.float64)[:rows] for rows, out in pending])


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  return x if len(x) == rows else np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def candidates(det, *, feature_dim: int | None = None, num_classes: int | None = None,
               num_train: int | None = None) -> list[dict[str, Any]]:
  """Every combination of the detector's grid (`Detector.grid_for`), the published defaults first, no repeats."""
  grid = det.grid_for(feature_dim=feature_dim, num_classes=num_classes, num_train=num_train)
  keys = list(grid)
  out = [{key: det.defaults[key] for key in keys}]
  for values in itertools.product(*(grid[key] for key in keys)):
    candidate = dict(zip(keys, values))
    if candidate not in out:
      out.append(candidate)
  return out


def select(det, fit, *, validation_in: dict, validation_ood: dict[str, dict], feature_dim: int | None = None,
           num_classes: int | None = None, num_train: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """The best grid point of `det` on validation data.

  Args:
    det: a `Detector` with a grid.
    fit: `fit(**fit_hparams) -> state`, the detector fitted on the training outputs.
    validation_in: in-distribution validation outputs ('logits', 'features').
    validation_ood: validation OOD set name → its outputs. Never a test set.
    feature_dim: D, to drop grid values that do not apply.
    num_classes: K, likewise.
    num_train: training rows (the neighbour detectors' bank), likewise.

  Returns:
    (hparams, record): the chosen grid values, and {'hparams', 'validation_auroc', 'candidates'} for
    the results file.
  """
  if not validation_ood:
    raise ValueError('select needs at least one validation OOD set.')
  keys = [key for key in ('logits', 'features') if key in validation_in]
  sets = [validation_in, *validation_ood.values()]
  inputs = {key: np.concatenate([s[key] for s in sets]) for key in keys}
  bounds = np.cumsum([len(s[keys[0]]) for s in sets])[:-1]
  states: dict[tuple, Any] = {}
  best, best_auroc, failure = None, -np.inf, None
  tried = candidates(det, feature_dim=feature_dim, num_classes=num_classes, num_train=num_train)
  for candidate in tried:
    fit_key = tuple(sorted((k, repr(v)) for k, v in candidate.items() if k in det.fit_params))
    if fit_key not in states:
      states[fit_key] = fit(**{k: v for k, v in candidate.items() if k in det.fit_params})
    try:
      values = np.split(score_rows(det, states[fit_key], inputs, **candidate), bounds)
      auroc = float(np.mean([metrics.auroc(values[0], out) for out in values[1:]]))
    except ValueError as e:  # e.g. NaN scores at an extreme grid value: that candidate is out, not the detector
      failure = failure or f'{candidate}: {e}'
      continue
    if auroc > best_auroc:  # strict: ties keep the earlier candidate (the defaults first)
      best, best_auroc = candidate, auroc
  if best is None:
    raise ValueError(f'detector {det.name!r}: no grid candidate could be scored on the validation sets; the first '
                     f'failure was {failure}')
  return best, {'hparams': best, 'validation_auroc': best_auroc, 'candidates': len(tried)}
