"""The evaluator: in-distribution accuracy and calibration, OOD detection, accuracy under shift.

Each data set goes through the model once (`inference.run`); per-example logits come back to the
host, where the method's probabilities and scores and `ood_jax.metrics` turn them into
`results.json` (everything) and `results.md` (the tables people read; `ood_jax.report`).
Contrastive models, which have no classifier, are evaluated from their features
(`embedding_eval`).

Conventions: scores are "higher = more in-distribution"; OOD metrics treat in-distribution as the
positive class; FPR@95 / TNR@95 at TPR 95 %. Probabilities are the method's (softmax, σ, 2σ).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from ood_jax import checkpoint
from ood_jax import embedding_eval
from ood_jax import experiment as experiment_lib
from ood_jax import inference
from ood_jax import metrics
from ood_jax import report
from ood_jax import scores as scores_lib
from ood_jax import sharding
from ood_jax import step
from ood_jax.data import catalog
from ood_jax.data import sources


def score_all(logits: np.ndarray, names) -> dict[str, np.ndarray]:
  """Every named logit score (`ood_jax.scores`), as float64 host arrays."""
  return {name: np.asarray(getattr(scores_lib, name)(logits), np.float64) for name in names}


def evaluate_model(exp: experiment_lib.Experiment, variables, mesh) -> dict[str, Any]:
  """All results of a trained model; see the module docstring."""
  config, info, method = exp.config, exp.info, exp.method
  data_dir = config.get('data_dir')

  # A contrastive model's projection head returns unit embeddings where a classifier has logits.
  names = ('logits', 'features') if method.probabilities else ('embeddings', 'features')

  def run(data):
    labels = data.labels if data.labels.min() >= 0 else None
    return inference.run(inference.model_apply(exp.model), variables, data.images, labels, mesh=mesh,
                         batch_size=config.eval.batch_size, mean=exp.mean, std=exp.std, names=names)

  def ood_set(name):
    return catalog.load_ood_set(name, info, data_dir=data_dir)

  test = sources.load_split(info.name, info.test_split, data_dir=data_dir)
  header = {'dataset': info.name, 'backbone': config.backbone, 'method': method.name,
            'default_score': method.scores[0]}
  if method.probabilities is None:
    train = sources.load_split(info.name, info.train_split, data_dir=data_dir)
    block = embedding_eval.evaluate_embeddings(
        run(train), run(test),
        {name: run(ood_set(name)) for name in config.eval.ood_sets}, num_classes=info.num_classes,
        k=min(config.eval.get('knn_k', 50), len(train)))
    results = {**header, **block}
    if block['ood']:
      results['ood_mean'] = metrics.mean_over_sets(block['ood'])
    return results

  logits = run(test)['logits']
  results: dict[str, Any] = {
      **header,
      'in_distribution': {'num_examples': len(test),
                          **metrics.classification_metrics(np.asarray(method.probabilities(logits)), test.labels)},
  }
  in_scores = score_all(logits, method.scores)
  ood = {}
  for name in config.eval.ood_sets:
    out_scores = score_all(run(ood_set(name))['logits'], method.scores)
    ood[name] = {score: metrics.ood_metrics(in_scores[score], out_scores[score]) for score in method.scores}
  results['ood'] = ood
  if ood:
    results['ood_mean'] = metrics.mean_over_sets(ood)
  if config.eval.corruptions:
    results['corrupted'] = _corrupted(exp, run)
  return results


def _corrupted(exp, run) -> dict[str, Any]:
  """Accuracy, ECE and NLL per (corruption, severity), their spread per severity and their mean."""
  eval_config = exp.config.eval
  names = ('accuracy', 'ece', 'nll')
  per_pair = {}
  for corruption in eval_config.corruptions:
    for severity in eval_config.severities:
      data = catalog.load_corrupted_set(exp.info, corruption, severity, data_dir=exp.config.get('data_dir'))
      probs = np.asarray(exp.method.probabilities(run(data)['logits']))
      block = metrics.classification_metrics(probs, data.labels)
      per_pair[f'{corruption}_{severity}'] = {name: block[name] for name in names}
  per_severity = {
      str(severity): {name: metrics.summary([per_pair[f'{c}_{severity}'][name] for c in eval_config.corruptions])
                      for name in names}
      for severity in eval_config.severities
  }
  return {
      'per_pair': per_pair,
      'per_severity': per_severity,
      'mean': {name: float(np.mean([pair[name] for pair in per_pair.values()])) for name in names},
  }


def evaluate(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of a training run, with its saved config unless one is given."""
  exp = experiment_lib.make_experiment(checkpoint.load_config(workdir) if config is None else config)
  mesh = sharding.make_mesh()
  restored = checkpoint.restore(workdir, sharding=sharding.replicated(mesh))
  variables = step.model_variables(restored['params'], restored.get('batch_stats'))
  results = evaluate_model(exp, variables, mesh)
  report.write_results(results, workdir)
  return results

