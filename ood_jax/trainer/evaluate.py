"""The evaluator: accuracy and calibration (raw and post-hoc calibrated), OOD detection, shift.

Each data set goes through the model once (`inference.run`); per-example logits and features come
back to the host, where

* the method's probabilities give accuracy, calibration and selective-prediction metrics
  (`metrics.classification_metrics`) on the test set and on every (corruption, severity) set,
  each also after the method's post-hoc calibrator (temperature scaling, or per-class Platt scaling
  for one-vs-all models) fitted on the validation split of the training data;
* the method's own scores and any requested post-hoc detectors (`config.eval.detectors`, fitted on
  the training features) give OOD metrics (`metrics.ood_metrics`) against every OOD set;

and the results go to `results.json` (everything) and `results.md` (`ood_jax.evaluation.report`). Contrastive
models, which have no classifier, are evaluated from their features (`embedding_eval`) and get the
feature detectors.

Conventions: scores are "higher = more in-distribution"; OOD metrics treat in-distribution as the
positive class; FPR@95 / TNR@95 at TPR 95 %. Probabilities are the method's (softmax, σ, 2σ).
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ood_jax import calibration
from ood_jax.trainer import checkpoint
from ood_jax import detectors
from ood_jax.evaluation import embeddings as embedding_eval
from ood_jax.trainer import experiment as experiment_lib
from ood_jax.trainer import feature_cache
from ood_jax.trainer import inference
from ood_jax.evaluation import leaderboard
from ood_jax import metrics
from ood_jax.evaluation import report
from ood_jax import scores as scores_lib
from ood_jax.trainer import sharding
from ood_jax.trainer import step
from ood_jax.evaluation import tuning
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import sources
from ood_jax.detectors import adapter

# Rows per training batch handed to a detector's streamed fit.
_FIT_BATCH = 4096


def score_all(logits: np.ndarray, names) -> dict[str, np.ndarray]:
  """Every named logit score (`ood_jax.scores`), as float64 host arrays."""
  return {name: np.asarray(getattr(scores_lib, name)(logits), np.float64) for name in names}


def evaluate_detectors(spec, *, train: dict, test: dict, ood: dict[str, dict], num_classes: int,
                       head=None, validation: dict | None = None, validation_ood: dict[str, dict] | None = None,
                       pinned: dict[str, dict] | None = None) -> dict[str, Any]:
  """OOD metrics of post-hoc detectors fitted on training outputs, one entry per detector.

  Args:
    spec: 'all', or detector names (`ood_jax.detectors`); 'all' keeps those the inputs allow.
    train: training-set outputs of `inference.run` ('features', 'labels', and 'logits' for a
      classifier), in training order.
    test: in-distribution test outputs ('features', and 'logits' for a classifier).
    ood: OOD test set name → its outputs.
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
  has_logits = 'logits' in train
  available = {'features'} | ({'logits'} if has_logits else set()) | ({'head'} if head is not None else set())
  chosen = detectors.resolve(spec, available=available, hparams=pinned)
  keys = ('logits', 'features', 'labels') if has_logits else ('features', 'labels')
  batches = [{key: train[key][start:start + _FIT_BATCH] for key in keys}
             for start in range(0, len(train['labels']), _FIT_BATCH)]
  tune = bool(validation_ood) and validation is not None and len(validation['features']) > 0
  # One call per detector over the test set and every OOD set together, then split.
  sets = [test] + list(ood.values())
  inputs = {key: np.concatenate([s[key] for s in sets]) for key in keys[:-1]}
  bounds = np.cumsum([len(s['features']) for s in sets])[:-1]
  per_set, errors, tuned = {name: {} for name in ood}, {}, {}
  for det in chosen:
    fit = lambda _det=det, **hp: _det.fit(batches, head=head, num_classes=num_classes, **hp)
    try:
      hparams = {}
      if tune and det.grid:
        hparams, tuned[det.name] = tuning.select(
            det, fit, validation_in={k: validation[k] for k in keys[:-1]}, validation_ood=validation_ood,
            feature_dim=train['features'].shape[-1], num_classes=num_classes)
      state = fit(**{k: v for k, v in hparams.items() if k in det.fit_params})
      values = np.split(np.asarray(det.score(state, inputs, **hparams), np.float64), bounds)
    except (ValueError, TypeError, np.linalg.LinAlgError) as e:
      logging.warning('detector %s failed on this model: %s', det.name, e)
      errors[det.name] = f'{type(e).__name__}: {e}'
      tuned.pop(det.name, None)
      continue
    for name, out_scores in zip(ood, values[1:]):
      per_set[name][det.name] = metrics.ood_metrics(values[0], out_scores)
  block: dict[str, Any] = {'ood': per_set}
  if ood and any(per_set.values()):
    block['ood_mean'] = metrics.mean_over_sets(per_set)
  if tuned:
    block['tuning'] = tuned
  if errors:
    block['errors'] = errors
  return block


def _softmax64(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _calibrator(method, validation_logits: np.ndarray, validation_labels: np.ndarray):
  """(summary, logits → calibrated probabilities) of the method's calibrator, fitted on validation.

  The calibrated probabilities are computed in float64 on the host: a temperature well below 1 pushes
  float32 probabilities to exactly 1.0, and the ties that makes would change rank metrics (AURC)
  that temperature scaling cannot change.
  """
  if method.calibration == 'platt':
    state = calibration.fit_platt(validation_logits, validation_labels)
    slope, intercept = np.asarray(state.slope, np.float64), np.asarray(state.intercept, np.float64)
    sigmoid = lambda x: np.exp(-np.logaddexp(0.0, -x))
    return {'calibrator': 'platt'}, lambda logits: sigmoid(np.asarray(logits, np.float64) * slope + intercept)
  summary = {'calibrator': 'temperature'}
  if np.all(np.argmax(validation_logits, axis=-1) == validation_labels):
    # With no validation error the NLL keeps falling as T → 0: the data carry no information about
    # T, and the bound the fit would stop at over-sharpens every later mistake (on digits-C it
    # multiplied the NLL by 70). Keep the model's own probabilities and say so.
    temperature = 1.0
    summary['warning'] = ('every validation example is classified correctly, so the temperature cannot be '
                          'fitted (the NLL falls as T → 0); T = 1 is kept. Raise --config.validation_fraction '
                          'or calibrate on harder held-out data.')
    logging.warning('calibration: %s', summary['warning'])
  else:
    temperature = float(calibration.fit_temperature(validation_logits, validation_labels).temperature)
  summary['temperature'] = temperature
  return summary, lambda logits: _softmax64(np.asarray(logits, np.float64) / temperature)


def _shift_metrics(probs, labels) -> dict[str, float]:
  block = metrics.classification_metrics(probs, labels)
  return {name: block[name] for name in metrics.CLASSIFICATION_METRICS}


def _classification_block(exp, calibrate, logits, labels, *, with_reliability=False) -> dict[str, Any]:
  """Metrics of the method's probabilities and, with a calibrator, under 'calibrated' those after it."""
  measure = metrics.classification_metrics if with_reliability else _shift_metrics
  block = measure(np.asarray(exp.method.probabilities(logits)), labels)
  if calibrate is not None:
    block['calibrated'] = measure(calibrate(logits), labels)
  return block


def _on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process (on one process: `flag`); a collective on several."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def _feature_cache(exp, variables, workdir, names) -> feature_cache.FeatureCache | None:
  settings = exp.settings
  if workdir is None or not settings.eval.feature_cache:
    return None
  key = feature_cache.fingerprint(
      variables, backbone=exp.config.backbone, backbone_kwargs=dict(settings.backbone_kwargs),
      method=exp.method.name, dtype=settings.dtype, mean=exp.mean, std=exp.std, names=names,
      image_shape=exp.info.image_shape, data_dir=settings.data_dir, benchmark_dir=settings.benchmark_dir)
  return feature_cache.FeatureCache(workdir, key)


def evaluate_model(exp: experiment_lib.Experiment, variables, mesh, *, workdir: str | None = None) -> dict[str, Any]:
  """All results of a trained model; see the module docstring.

  With `workdir`, each set's outputs are cached under <workdir>/features (`ood_jax.trainer.feature_cache`)
  and reused while the weights are the same, so re-evaluating with other detectors or another
  protocol runs the model only on sets it has not seen.
  """
  config, info, method, settings = exp.config, exp.info, exp.method, exp.settings
  data_dir, download, bench_dir = settings.data_dir, settings.download, settings.benchmark_dir
  # A contrastive model's projection head returns unit embeddings where a classifier has logits.
  names = ('logits', 'features') if method.probabilities else ('embeddings', 'features')
  plan = settings.eval.sets
  catalog.check_prepared(plan.test_sets + plan.validation, benchmark_dir=bench_dir)
  cache = _feature_cache(exp, variables, workdir, names)

  def run(data):
    labels = data.labels if data.labels.min() >= 0 else None
    return inference.run(inference.model_apply(exp.model), variables, data.images, labels, mesh=mesh,
                         batch_size=settings.eval.batch_size, mean=exp.mean, std=exp.std, names=names)

  def outputs(key, load):
    """The model's outputs on one set (with its labels, −1 for OOD), from the cache when it has them."""
    out = cache.load(key) if cache else None
    # Running the model is a collective: on several processes either all of them use the cache
    # (process 0 writes it; another host may not see the file yet) or all run the model.
    if cache and not _on_every_process(out is not None):
      out = None
    if out is None:
      data = load()
      out = {**run(data), 'labels': np.asarray(data.labels, np.int32)}
      if cache:
        cache.save(key, out)
    return out

  fraction = settings.validation_fraction
  split = functools.cache(lambda: catalog.load_train_and_validation(info, validation_fraction=fraction,
                                                                    data_dir=data_dir, download=download))
  ood_set = lambda name: outputs(name, lambda: catalog.load_ood_set(name, info, data_dir=data_dir,
                                                                     benchmark_dir=bench_dir, download=download))
  spec = settings.eval.detectors
  test_out = outputs(f'{info.name}:{info.test_split}',
                     lambda: sources.load_split(info.name, info.test_split, data_dir=data_dir, download=download))
  ood_out = {name: ood_set(name) for name in plan.test_sets}
  spec = spec if ood_out else ()  # detectors are scored against OOD sets only
  train_out = (outputs(f'{info.name}:{info.train_split}-validation@{fraction}', lambda: split()[0])
               if spec or method.probabilities is None else None)
  validation_out = (outputs(f'{info.name}:validation@{fraction}', lambda: split()[1])
                    if fraction > 0 and (spec or method.probabilities) else None)
  results: dict[str, Any] = {'dataset': info.name, 'backbone': config.backbone, 'method': method.name,
                             'default_score': method.scores[0]}

  if method.probabilities is None:
    block = embedding_eval.evaluate_embeddings(train_out, test_out, ood_out, num_classes=info.num_classes,
                                               k=min(settings.eval.knn_k, len(train_out['labels'])))
    results.update(block)
    if block['ood']:
      results['ood_mean'] = metrics.mean_over_sets(block['ood'])
  else:
    calibrate = None
    if validation_out is not None:
      summary, calibrate = _calibrator(method, validation_out['logits'], validation_out['labels'])
      results['calibration'] = {**summary, 'validation_examples': len(validation_out['labels'])}
    results['in_distribution'] = {
        'num_examples': len(test_out['labels']),
        **_classification_block(exp, calibrate, test_out['logits'], test_out['labels'], with_reliability=True)}
    in_scores = score_all(test_out['logits'], method.scores)
    ood, default_scores = {}, {}
    for name, out in ood_out.items():
      out_scores = score_all(out['logits'], method.scores)
      ood[name] = {score: metrics.ood_metrics(in_scores[score], out_scores[score]) for score in method.scores}
      default_scores[name] = out_scores[method.scores[0]]
    results['ood'] = ood
    if ood:
      results['ood_mean'] = metrics.mean_over_sets(ood)
      # What results.md's score figure draws (results.json keeps no per-example scores).
      results['score_histogram'] = metrics.score_histogram(in_scores[method.scores[0]], default_scores)
    if settings.eval.corruptions:
      results['corrupted'] = _corrupted(exp, run, calibrate)

  if spec:
    head = adapter.head_weights(variables, 'head') if method.head == 'dense' else None
    without_embeddings = lambda out: {k: v for k, v in out.items() if k != 'embeddings'}
    validation_ood = {name: without_embeddings(ood_set(name)) for name in plan.validation}
    if validation_ood and validation_out is None:
      logging.warning('eval: validation OOD sets are given but validation_fraction is 0, so detectors keep '
                      'their default hyperparameters.')
    results['detectors'] = evaluate_detectors(
        spec, train=without_embeddings(train_out), test=without_embeddings(test_out),
        ood={name: without_embeddings(out) for name, out in ood_out.items()}, num_classes=info.num_classes,
        head=None if head is None else tuple(np.asarray(w) for w in head),
        validation=None if validation_out is None else without_embeddings(validation_out),
        validation_ood=validation_ood)
  if plan.protocol:
    results['benchmark'] = leaderboard.benchmark_block(results, protocol=plan.protocol, groups=plan.groups,
                                                       validation=plan.validation)
  return results


def _spread(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
  return {name: metrics.summary([row[name] for row in rows]) for name in metrics.CLASSIFICATION_METRICS}


def _corrupted(exp, run, calibrate) -> dict[str, Any]:
  """Classification metrics per (corruption, severity), their spread per severity and their mean.

  With a calibrator, each level also holds 'calibrated': the same after calibration (fitted once, on
  clean validation data, as a deployed model would be).
  """
  eval_config, settings = exp.settings.eval, exp.settings
  per_pair = {}
  for corruption in eval_config.corruptions:
    for severity in eval_config.severities:
      data = catalog.load_corrupted_set(exp.info, corruption, severity, data_dir=settings.data_dir,
                                        download=settings.download)
      per_pair[f'{corruption}_{severity}'] = _classification_block(exp, calibrate, run(data)['logits'], data.labels)
  out: dict[str, Any] = _levels(eval_config, per_pair)
  if calibrate is not None:
    calibrated = _levels(eval_config, {pair: block['calibrated'] for pair, block in per_pair.items()})
    for severity, spread in calibrated['per_severity'].items():
      out['per_severity'][severity]['calibrated'] = spread
    out['mean']['calibrated'] = calibrated['mean']
  return {'per_pair': per_pair, **out}


def _levels(eval_config, per_pair: dict[str, dict[str, float]]) -> dict[str, Any]:
  """The spread of every metric over corruptions per severity, and its mean over all pairs."""
  per_severity = {str(s): _spread([per_pair[f'{c}_{s}'] for c in eval_config.corruptions])
                  for s in eval_config.severities}
  mean = {name: float(np.mean([block[name] for block in per_pair.values()])) for name in metrics.CLASSIFICATION_METRICS}
  return {'per_severity': per_severity, 'mean': mean}


def evaluate(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of a training run, with its saved config unless one is given."""
  exp = experiment_lib.make_experiment(checkpoint.load_config(workdir) if config is None else config)
  experiment_lib.check_data(exp, training=False)
  mesh = sharding.make_mesh()
  restored = checkpoint.restore(workdir, sharding=sharding.replicated(mesh))
  variables = step.model_variables(restored['params'], restored.get('batch_stats'))
  results = evaluate_model(exp, variables, mesh, workdir=workdir)
  report.write_results(results, workdir)
  return results
