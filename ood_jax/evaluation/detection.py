"""Post-hoc detectors on a model's outputs: fitted on the training set, tuned on validation OOD only, scored.

`evaluate_detectors` is the one path from extracted outputs (logits, features, labels as host arrays) to
each detector's OOD metrics: the trainer's evaluator and `ood_jax.evaluation.evaluate` both call it. Each
detector is fitted once on the training outputs (streamed in batches), its hyperparameters chosen on the
in-distribution validation outputs and the validation OOD sets alone (`tuning.select`), and scored in one
pass over the test set and every OOD set together. Progress is logged detector by detector.

Every score goes through `tuning.score_rows` (fixed row blocks), so each detector's jitted kernel compiles
once per process for the validation sets, its grid points and the test sets; detectors with the same fit
(ReAct, DICE and VRA; ASH, SCALE and GradNorm; ViM and Residual; fDBD and NCI) share one fitted state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ood_jax import detectors
from ood_jax import metrics
from ood_jax.evaluation import tuning

__all__ = ['evaluate_detectors', 'streamed']

_LOG = logging.getLogger(__name__)

# Rows per training batch handed to a detector's streamed fit.
_FIT_BATCH = 4096


def streamed(outputs) -> bool:
  """Whether `outputs` is a streamed set rather than a dict of arrays.

  A streamed set (`ood_jax.trainer.feature_cache.ChunkStore`, or anything with the same four members)
  has `keys` (its output names), `num_rows`, `dim(key)` (the trailing size of a row) and `blocks(keys,
  rows)` returning a fresh iterator over dicts of at most `rows` consecutive rows, in order.
  """
  return not isinstance(outputs, Mapping) and callable(getattr(outputs, 'blocks', None))


def _blocks(outputs, keys):
  if streamed(outputs):
    return outputs.blocks(keys, tuning.BLOCK)
  return [{key: outputs[key] for key in keys}]


def evaluate_detectors(spec, *, train: dict, test: dict, ood: dict[str, dict], num_classes: int,
                       head=None, validation: dict | None = None, validation_ood: dict[str, dict] | None = None,
                       pinned: dict[str, dict] | None = None) -> dict[str, Any]:
  """OOD metrics of post-hoc detectors fitted on training outputs, one entry per detector.

  Args:
    spec: 'all', or detector names (`ood_jax.detectors`); 'all' keeps those the inputs allow.
    train: training-set outputs of `inference.run` ('features', 'labels', and 'logits' for a
      classifier), in training order; or a streamed set (`streamed`), which every fit reads block by
      block, so that memory holds one block, not the set.
    test: in-distribution test outputs ('features', and 'logits' for a classifier), or a streamed set.
    ood: OOD test set name → its outputs (or a streamed set). With any streamed set, every set is
      scored block by block and only the scores are kept.
    num_classes: K.
    head: the final dense layer's (kernel, bias), or None when the head is not affine.
    validation: in-distribution validation outputs; with `validation_ood`, detectors with a grid are
      tuned (`ood_jax.evaluation.tuning.select`) on these two alone and scored on the test sets with the choice.
    validation_ood: validation OOD set name → its outputs (never a test set).
    pinned: detector name → {hyperparameter: value} fixed (`detectors.resolve(hparams=)`): used, not tuned.

  Returns:
    {'ood': {set: {detector: metrics}}, 'ood_mean': {detector: metrics}}, 'tuning': {detector:
    {'hparams', 'validation_auroc', 'candidates'}} for tuned detectors and, for detectors that failed
    on this model, 'errors': {detector: message} (logged too).
  """
  present = tuple(train.keys) if streamed(train) else tuple(train)
  outputs = tuple(key for key in ('logits', 'features') if key in present)  # a function model may give logits only
  if not outputs:
    raise ValueError("the training outputs hold neither 'logits' nor 'features'.")
  available = set(outputs) | ({'head'} if head is not None and 'features' in present else set())
  chosen = detectors.resolve(spec, available=available, hparams=pinned)
  keys = (*outputs, 'labels')
  if streamed(train):  # read again for every pass of every fit: one chunk in memory at a time
    batches = lambda: train.blocks(keys, _FIT_BATCH)
    num_train, feature_dim = train.num_rows, train.dim('features') if 'features' in present else None
  else:
    batches = [{key: train[key][start:start + _FIT_BATCH] for key in keys}
               for start in range(0, len(train['labels']), _FIT_BATCH)]
    num_train, feature_dim = len(train['labels']), train['features'].shape[-1] if 'features' in present else None
  tune = bool(validation_ood) and validation is not None and len(validation[outputs[0]]) > 0
  sets = [test] + list(ood.values())
  if any(streamed(s) for s in sets):
    # Each set scored block by block as it is read; only the scores (one float per row) are kept.
    score_sets = lambda det, state, hp: [
        np.concatenate([tuning.score_rows(det, state, block, **hp) for block in _blocks(s, keys[:-1])]) for s in sets]
  else:
    # One pass per detector over the test set and every OOD set together (in row blocks), then split.
    inputs = {key: np.concatenate([s[key] for s in sets]) for key in keys[:-1]}
    bounds = np.cumsum([len(s[outputs[0]]) for s in sets])[:-1]
    score_sets = lambda det, state, hp: np.split(tuning.score_rows(det, state, inputs, **hp), bounds)
  per_set, errors, tuned = {name: {} for name in ood}, {}, {}
  fitted: dict[tuple, Any] = {}

  def fit(det, **hp):
    """The detector's state, fitted once per (fit function, fit hyperparameters) and shared (states are immutable)."""
    key = (det.fit_fn, tuple(sorted((k, repr(v)) for k, v in {**det.defaults, **hp}.items() if k in det.fit_params)))
    if key not in fitted:
      fitted[key] = det.fit(batches, head=head, num_classes=num_classes, **hp)
    return fitted[key]

  start = time.perf_counter()
  for index, det in enumerate(chosen, 1):
    began = time.perf_counter()
    try:
      hparams = {}
      if tune and det.grid:
        hparams, tuned[det.name] = tuning.select(
            det, lambda _det=det, **hp: fit(_det, **hp), validation_in={k: validation[k] for k in keys[:-1]},
            validation_ood=validation_ood, feature_dim=feature_dim, num_classes=num_classes, num_train=num_train)
      state = fit(det, **{k: v for k, v in hparams.items() if k in det.fit_params})
      values = score_sets(det, state, hparams)
    except (ValueError, TypeError, np.linalg.LinAlgError) as e:
      _LOG.warning('detector %s failed on this model: %s', det.name, e)
      errors[det.name] = f'{type(e).__name__}: {e}'
      tuned.pop(det.name, None)
      continue
    for name, out_scores in zip(ood, values[1:]):
      per_set[name][det.name] = metrics.ood_metrics(values[0], out_scores)
    chosen_text = f" ({', '.join(f'{k}={v}' for k, v in hparams.items())})" if hparams else ''
    _LOG.info('detectors: [%d/%d] %s%s in %.1f s (%.0f s in all)', index, len(chosen), det.name, chosen_text,
              time.perf_counter() - began, time.perf_counter() - start)
  block: dict[str, Any] = {'ood': per_set}
  if ood and any(per_set.values()):
    block['ood_mean'] = metrics.mean_over_sets(per_set)
  if tuned:
    block['tuning'] = tuned
  if errors:
    block['errors'] = errors
  return block
