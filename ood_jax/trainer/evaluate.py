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
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ood_jax.trainer import checkpoint
from ood_jax.evaluation import detection
from ood_jax.evaluation import embeddings as embedding_eval
from ood_jax.evaluation import evaluator
from ood_jax.trainer import experiment as experiment_lib
from ood_jax.trainer import feature_cache
from ood_jax.trainer import inference
from ood_jax.evaluation import leaderboard
from ood_jax import metrics
from ood_jax.evaluation import report
from ood_jax import scores as scores_lib
from ood_jax.trainer import sharding
from ood_jax.trainer import step
from ood_jax.trainer import streamed
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import protocols
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources
from ood_jax import detectors
from ood_jax.detectors import adapter
from ood_jax.detectors import rotation

def score_all(logits: np.ndarray, names) -> dict[str, np.ndarray]:
  """Every named logit score (`ood_jax.scores`), as float64 host arrays."""
  return {name: np.asarray(getattr(scores_lib, name)(logits), np.float64) for name in names}


def method_scores(out, method) -> dict[str, np.ndarray]:
  """The method's scores of one set's outputs: its model scores (inference outputs `[N, 1]`), then its logit scores."""
  model = {name: np.asarray(out[name][:, 0], np.float64) for name in method.model_scores}
  return {**model, **score_all(out['logits'], method.scores)}


@functools.lru_cache(maxsize=16)
def _apply_with_model_scores(model, names: tuple[str, ...]) -> inference.ApplyFn:
  """`(variables, images) -> (logits, features, score_1 [B, 1], ...)`: the method's model scores (`Method.model_scores`,
  detectors that run the model, at their defaults) computed in the same inference pass; one function per model."""
  chosen = tuple(detectors.get(name) for name in names)

  def apply(variables, images):
    logits, features = model.apply(variables, images, train=False)
    inputs = {'inputs': images, 'apply_fn': rotation.model_apply_fn(model, variables)}
    return (logits, features, *(det.score((), inputs)[:, None] for det in chosen))

  return apply


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
  model_scores = tuple(method.model_scores) if method.probabilities else ()
  plan = settings.eval.sets
  catalog.check_prepared(plan.test_sets + plan.validation, benchmark_dir=bench_dir)
  cache = _feature_cache(exp, variables, workdir, names + model_scores)

  def run(data, extra=model_scores):
    labels = data.labels if data.labels.min() >= 0 else None
    apply = _apply_with_model_scores(exp.model, extra) if extra else inference.model_apply(exp.model)
    return inference.run(apply, variables, data.images, labels, mesh=mesh,
                         batch_size=settings.eval.batch_size, mean=exp.mean, std=exp.std, names=names + extra)

  def outputs(key, load):
    """The model's outputs on one set (with its labels, −1 for OOD), from the cache when it has them."""
    started = time.perf_counter()
    out = cache.load(key) if cache else None
    # Running the model is a collective: on several processes either all of them use the cache
    # (process 0 writes it; another host may not see the file yet) or all run the model.
    if cache and not _on_every_process(out is not None):
      out = None
    source = 'from the feature cache'
    if out is None:
      data = load()
      out = {**run(data), 'labels': np.asarray(data.labels, np.int32)}
      if cache:
        cache.save(key, out)
      source = 'through the model'
    logging.info('eval: %s, %d examples %s in %.1f s', key, len(out['labels']), source, time.perf_counter() - started)
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
  # A detector that computes one of the method's own scores (msp for max_softmax, ...) would be a second,
  # identical row: the method's row names it instead (`leaderboard.twin_detectors`).
  twins = leaderboard.twin_detectors(method.scores, spec) if method.probabilities is not None else {}
  if twins:
    logging.info("eval: %s reported as the method's own score(s) %s.", ', '.join(twins), ', '.join(twins.values()))
    spec = tuple(det for det in spec if det.name not in twins)
  train_out = (outputs(f'{info.name}:{info.train_split}-validation@{fraction}', lambda: split()[0])
               if spec or method.probabilities is None else None)
  validation_out = (outputs(f'{info.name}:validation@{fraction}', lambda: split()[1])
                    if fraction > 0 and (spec or method.probabilities) else None)
  results: dict[str, Any] = {'dataset': info.name, 'backbone': config.backbone, 'method': method.name,
                             'default_score': (model_scores + method.scores)[0]}

  if method.probabilities is None:
    block = embedding_eval.evaluate_embeddings(train_out, test_out, ood_out, num_classes=info.num_classes,
                                               k=min(settings.eval.knn_k, len(train_out['labels'])))
    results.update(block)
    if block['ood']:
      results['ood_mean'] = metrics.mean_over_sets(block['ood'])
  else:
    calibrate = None
    if validation_out is not None:
      summary, calibrate = evaluator.calibration_block(validation_out['logits'], validation_out['labels'],
                                                       calibrator=method.calibration)
      results['calibration'] = {**summary, 'validation_examples': len(validation_out['labels'])}
    results['in_distribution'] = {
        'num_examples': len(test_out['labels']),
        **_classification_block(exp, calibrate, test_out['logits'], test_out['labels'], with_reliability=True)}
    in_scores = method_scores(test_out, method)
    default = results['default_score']
    ood, default_scores = {}, {}
    for name, out in ood_out.items():
      out_scores = method_scores(out, method)
      ood[name] = {score: metrics.ood_metrics(in_scores[score], out_scores[score]) for score in in_scores}
      default_scores[name] = out_scores[default]
    results['ood'] = ood
    if ood:
      results['ood_mean'] = metrics.mean_over_sets(ood)
      # What results.md's score figure draws (results.json keeps no per-example scores).
      results['score_histogram'] = metrics.score_histogram(in_scores[default], default_scores)
    if settings.eval.corruptions:
      results['corrupted'] = _corrupted(exp, run, calibrate)

  if spec:
    head = adapter.head_weights(variables, 'head') if method.head == 'dense' else None
    without_embeddings = lambda out: {k: v for k, v in out.items() if k != 'embeddings'}
    validation_ood = {name: without_embeddings(ood_set(name)) for name in plan.validation}
    if validation_ood and validation_out is None:
      logging.warning('eval: validation OOD sets are given but validation_fraction is 0, so detectors keep '
                      'their default hyperparameters.')
    results['detectors'] = detection.evaluate_detectors(
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
      per_pair[f'{corruption}_{severity}'] = _classification_block(exp, calibrate, run(data, ())['logits'], data.labels)
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


def evaluate_protocol(model, variables=None, *, protocol: str, dataset: str, validation_fraction: float = 0.1,
                      preprocess=None, data_dir: str | None = None, benchmark_dir: str | None = None,
                      download: bool = False, batch_size: int = 256, workdir: str | None = None,
                      chunk_size: int = 4096, **kwargs) -> evaluator.Report:
  """A benchmark protocol (`data.protocols`: 'openood_v1_5', 'digits', ...) on a model of your own, in one call.

  Loads the in-distribution training split (less a stratified validation part), test split and the protocol's
  near / far and validation OOD sets through the data layer (every set checked before anything runs), then
  calls `ood_jax.evaluation.evaluate`, the same path as any other evaluation.

  Args:
    model, variables: as `ood_jax.evaluation.evaluate` takes them.
    protocol: a name of `data.protocols.names()`.
    dataset: the in-distribution dataset (`data.registry`), e.g. 'cifar10' or 'digits'.
    validation_fraction: held out of the training split for calibration and tuning (> 0 to tune).
    preprocess: uint8 images [B, H, W, C] → the model's inputs; default: scaled to [0, 1] and normalised
      with the dataset's mean and std, as ood_jax's trainer feeds its models.
    data_dir, benchmark_dir, download: where the data is (`config.data_dir`, `config.benchmark_dir`,
      `config.download`).
    batch_size: rows per forward pass.
    workdir: for a large protocol (ImageNet: `protocols.Protocol.large`), where the streamed sets' outputs
      are cached in chunks (<workdir>/features); required there, a folder every process sees.
    chunk_size: for a large protocol, rows per cached chunk (a multiple of `batch_size`).
    **kwargs: further arguments of `ood_jax.evaluation.evaluate` (detectors, detector_kwargs, head, ...); for a
      large protocol also `image_size` and `resize` (`streamed.evaluate_large_protocol`).

  A large protocol takes the streamed, process-sharded path (`ood_jax.trainer.streamed`): nothing is loaded
  into memory, each process reads its shard of every set, and `validation_fraction` and `download` do not
  apply (the protocol names its validation split; TFDS ImageNet needs a manual download).

  Returns:
    The `Report`; its leaderboard is grouped near / far as the protocol says.
  """
  plan = protocols.get(protocol, dataset)
  if plan.large:
    if workdir is None:
      raise ValueError(f'protocol {protocol!r} on {dataset!r} streams its sets through a feature cache: pass '
                       'workdir= (a folder every process sees; its features/ keeps the outputs for reruns).')
    return streamed.evaluate_large_protocol(model, variables, plan, workdir=workdir, chunk_size=chunk_size,
                                            batch_size=batch_size, preprocess=preprocess, data_dir=data_dir,
                                            benchmark_dir=benchmark_dir, **kwargs)
  info = registry.get_info(dataset)
  catalog.check_validation_fraction(validation_fraction)
  catalog.check_available(info, splits=(info.train_split, info.test_split),
                          ood_names=plan.test_sets + plan.validation, data_dir=data_dir,
                          benchmark_dir=benchmark_dir, download=download)
  if preprocess is None:
    mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
    preprocess = lambda images: (np.asarray(images, np.float32) / 255.0 - mean) / std

  def batches(data, labelled=True):
    # Streamed: only one batch of preprocessed (float32) images exists at a time.
    for start in range(0, len(data.images), batch_size):
      images = preprocess(data.images[start:start + batch_size])
      yield (images, data.labels[start:start + batch_size]) if labelled else images

  train, validation = catalog.load_train_and_validation(info, validation_fraction=validation_fraction,
                                                        data_dir=data_dir, download=download)
  test = sources.load_split(info.name, info.test_split, data_dir=data_dir, download=download)
  load = lambda name: catalog.load_ood_set(name, info, data_dir=data_dir, benchmark_dir=benchmark_dir,
                                           download=download)
  return evaluator.evaluate(
      model, variables, train=batches(train), test=batches(test),
      validation=batches(validation) if len(validation) else None,
      ood={name: batches(load(name), labelled=False) for name in plan.test_sets},
      validation_ood={name: batches(load(name), labelled=False) for name in plan.validation} if len(validation)
      else None, groups=plan.groups, batch_size=batch_size, **kwargs)
