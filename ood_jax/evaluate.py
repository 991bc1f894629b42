"""The evaluator: in-distribution accuracy and calibration, OOD detection, accuracy under shift.

Predictions run over padded, masked, sharded batches (every example exactly once); per-example
logits come back to the host, where the method's probabilities and scores and `ood_jax.metrics`
turn them into `results.json` (everything) and `results.md` (the tables people read).

Conventions: scores are "higher = more in-distribution"; OOD metrics treat in-distribution as the
positive class; FPR@95 / TNR@95 at TPR 95 %. Probabilities are the method's (softmax, σ, 2σ); NLL
is −log of the true class's probability after normalising the row to sum to one.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ood_jax import corruptions
from ood_jax import metrics
from ood_jax import scores as scores_lib
from ood_jax.data import digits
from ood_jax.data import ood_sets
from ood_jax.data import pipeline
from ood_jax.data import sources

OOD_METRICS = {
    'auroc': metrics.auroc,
    'aupr_in': metrics.aupr_in,
    'aupr_out': metrics.aupr_out,
    'fpr95': metrics.fpr_at_tpr,
    'tnr95': metrics.tnr_at_tpr,
    'dtacc': metrics.detection_accuracy,
}


@functools.lru_cache(maxsize=16)
def _apply_fn(model, mesh):
  # One compilation per (model, mesh), shared by every evaluated set: CIFAR-10-C alone has 75.
  return jax.jit(lambda v, x: model.apply(v, x, train=False)[0],
                 in_shardings=(pipeline.replicated(mesh), pipeline.batch_sharding(mesh)),
                 out_shardings=pipeline.replicated(mesh))


def predict(model, variables, images, labels, *, mesh, batch_size, mean, std) -> np.ndarray:
  """Logits `[N, K]` (float32, host) of every image, in order, in inference mode."""
  apply = _apply_fn(model, mesh)
  chunks = []
  for batch in pipeline.eval_batches(images, labels, global_batch_size=batch_size, mesh=mesh, mean=mean, std=std):
    logits = np.asarray(apply(variables, batch['image']), np.float32)
    chunks.append(logits[np.asarray(batch['mask'])])
  return np.concatenate(chunks)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, *, num_bins: int = 15) -> dict[str, Any]:
  """Accuracy, NLL, ECE and reliability-diagram data of predictive probabilities."""
  probs64 = np.asarray(probs, np.float64)
  true = probs64[np.arange(len(labels)), labels] / np.maximum(probs64.sum(axis=-1), 1e-300)
  diagram = metrics.reliability_diagram(probs, labels, num_bins=num_bins)
  return {
      'accuracy': float(np.mean(np.argmax(probs, axis=-1) == labels)),
      'nll': float(-np.mean(np.log(np.maximum(true, 1e-300)))),
      'ece': float(diagram['ece']),
      'reliability': {k: np.asarray(v).tolist() for k, v in diagram.items() if k != 'ece'},
  }


def score_all(logits: np.ndarray, names) -> dict[str, np.ndarray]:
  """Every named logit score (`ood_jax.scores`), as float64 host arrays."""
  return {name: np.asarray(getattr(scores_lib, name)(logits), np.float64) for name in names}


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
  return {name: fn(in_scores, out_scores) for name, fn in OOD_METRICS.items()}


def _summary(values) -> dict[str, float]:
  values = np.asarray(values, np.float64)
  q1, median, q3 = np.percentile(values, [25, 50, 75])
  return {'mean': float(values.mean()), 'median': float(median), 'q1': float(q1), 'q3': float(q3),
          'min': float(values.min()), 'max': float(values.max())}


def check_eval_config(config, info) -> None:
  """Fails before training on evaluation settings that would otherwise fail after it."""
  eval_cfg = config.eval
  if eval_cfg.batch_size % jax.device_count():
    raise ValueError(f'eval.batch_size ({eval_cfg.batch_size}) must be divisible by the number of devices '
                     f'({jax.device_count()}).')
  for name in eval_cfg.ood_sets:
    if name.startswith('digits/'):
      valid = digits.OOD_SETS
      if name.split('/', 1)[1] not in valid:
        raise ValueError(f'Unknown OOD set {name!r}; valid digits sets: {", ".join("digits/" + v for v in valid)}.')
    elif not name.startswith('folder:') and name not in ood_sets.OOD_SETS:
      raise ValueError(f'Unknown OOD set {name!r}; valid: {", ".join(ood_sets.OOD_SETS)}, folder:<path>, '
                       f'digits/<{"|".join(digits.OOD_SETS)}>.')
  for corruption in eval_cfg.corruptions:
    for severity in eval_cfg.severities:
      corruptions.check_corruption(corruption, severity)


def load_ood_set(config, info, name: str) -> sources.ArrayData:
  """An OOD test set by name; 'digits/<set>' are the digits benchmark's own sets."""
  if name.startswith('digits/'):
    return digits.load_ood(name.split('/', 1)[1])
  return ood_sets.load_ood(name, data_dir=config.get('data_dir'), image_size=info.image_shape[:2],
                           channels=info.image_shape[-1])


def load_corrupted_set(config, info, corruption: str, severity: int) -> sources.ArrayData:
  if info.name == 'digits':
    return digits.load_corrupted(corruption, severity)
  return ood_sets.load_corrupted(info.name, corruption, severity, data_dir=config.get('data_dir'))


def evaluate_model(config: ml_collections.ConfigDict, model, method, info, variables, mesh) -> dict[str, Any]:
  """All results of a trained model; see the module docstring."""
  from ood_jax import train  # pylint: disable=g-import-not-at-top  (train imports this module)

  mean, std = train.normalization(config, info)
  eval_cfg = config.eval
  run = lambda data: predict(model, variables, data.images, data.labels if data.labels.min() >= 0 else None,
                             mesh=mesh, batch_size=eval_cfg.batch_size, mean=mean, std=std)
  test = sources.load_split(info.name, info.test_split, data_dir=config.get('data_dir'))
  if method.probabilities is None:
    return _evaluate_embedding_model(config, model, method, info, variables, mesh, test, mean, std)
  logits = run(test)
  results: dict[str, Any] = {
      'dataset': info.name, 'model': config.model, 'method': method.name,
      'default_score': method.scores[0],
      'in_distribution': {'num_examples': len(test),
                          **classification_metrics(np.asarray(method.probabilities(logits)), test.labels)},
  }
  in_scores = score_all(logits, method.scores)

  ood: dict[str, Any] = {}
  for name in eval_cfg.ood_sets:
    out_scores = score_all(run(load_ood_set(config, info, name)), method.scores)
    ood[name] = {score: ood_metrics(in_scores[score], out_scores[score]) for score in method.scores}
  results['ood'] = ood
  if ood:
    results['ood_mean'] = _ood_mean(ood, method.scores)

  pairs = [(c, s) for c in eval_cfg.corruptions for s in eval_cfg.severities]
  if pairs:
    per_pair = {}
    for corruption, severity in pairs:
      data = load_corrupted_set(config, info, corruption, severity)
      probs = np.asarray(method.probabilities(run(data)))
      cm = classification_metrics(probs, data.labels)
      per_pair[f'{corruption}_{severity}'] = {'accuracy': cm['accuracy'], 'ece': cm['ece'], 'nll': cm['nll']}
    per_severity = {}
    for severity in eval_cfg.severities:
      rows = [per_pair[f'{c}_{severity}'] for c in eval_cfg.corruptions]
      per_severity[str(severity)] = {m: _summary([r[m] for r in rows]) for m in ('accuracy', 'ece', 'nll')}
    results['corrupted'] = {
        'per_pair': per_pair,
        'per_severity': per_severity,
        'mean': {m: float(np.mean([r[m] for r in per_pair.values()])) for m in ('accuracy', 'ece', 'nll')},
    }
  return results


def _ood_mean(ood: dict[str, Any], score_names) -> dict[str, Any]:
  return {score: {m: float(np.mean([ood[s][score][m] for s in ood])) for m in OOD_METRICS} for score in score_names}


def _evaluate_embedding_model(config, model, method, info, variables, mesh, test, mean, std) -> dict[str, Any]:
  """Contrastive models (paper 003): linear-probe accuracy/calibration, KNN and Mahalanobis scores."""
  from ood_jax import embedding_eval  # pylint: disable=g-import-not-at-top

  eval_cfg = config.eval
  apply_fn = lambda v, x: model.apply(v, x, train=False)
  extract = lambda data: embedding_eval.extract(
      apply_fn, variables, data.images, data.labels if data.labels.min() >= 0 else None, mesh=mesh,
      batch_size=eval_cfg.batch_size, mean=mean, std=std)
  train_data = sources.load_split(info.name, info.train_split, data_dir=config.get('data_dir'))
  ood = {name: extract(load_ood_set(config, info, name)) for name in eval_cfg.ood_sets}
  block = embedding_eval.evaluate_embeddings(extract(train_data), extract(test), ood, num_classes=info.num_classes,
                                             k=min(eval_cfg.get('knn_k', 50), len(train_data)))
  results = {'dataset': info.name, 'model': config.model, 'method': method.name,
             'default_score': method.scores[0], **block}
  if block['ood']:
    results['ood_mean'] = _ood_mean(block['ood'], method.scores)
  return results


def markdown(results: dict[str, Any]) -> str:
  """The readable tables of `results`."""
  idm = results['in_distribution']
  lines = [
      f"# {results['method']} · {results['model']} · {results['dataset']}", '',
      '| accuracy | NLL | ECE | test examples |', '|---:|---:|---:|---:|',
      f"| {100 * idm['accuracy']:.2f} % | {idm['nll']:.4f} | {idm['ece']:.4f} | {idm['num_examples']} |", '',
  ]
  if 'mes_radius_mean' in idm:
    lines += ['Accuracy and calibration of a linear probe on the frozen features. Embedding statistics '
              '(paper 003): mean MES radius {:.4f}, mean centroid cosine similarity {:.4f}.'.format(
                  idm['mes_radius_mean'], idm['dispersion_mean']), '']
  if results.get('ood'):
    lines += [f"OOD detection (ID positive; default score `{results['default_score']}`), percentages:", '',
              '| OOD set | score | AUROC | AUPR-In | AUPR-Out | FPR@95 | TNR@95 | DTACC |',
              '|---|---|---:|---:|---:|---:|---:|---:|']
    rows = [(name, per_score) for name, per_score in results['ood'].items()]
    rows.append(('**mean**', results['ood_mean']))
    for name, per_score in rows:
      for score, m in per_score.items():
        lines.append(f"| {name} | {score} | " + ' | '.join(f'{100 * m[k]:.2f}' for k in OOD_METRICS) + ' |')
    lines.append('')
  if results.get('corrupted'):
    lines += ['Under corruption (mean over corruptions per severity):', '',
              '| severity | accuracy | ECE | NLL |', '|---:|---:|---:|---:|']
    for severity, m in results['corrupted']['per_severity'].items():
      lines.append(f"| {severity} | {100 * m['accuracy']['mean']:.2f} % | {m['ece']['mean']:.4f} | {m['nll']['mean']:.4f} |")
    mean = results['corrupted']['mean']
    lines += [f"| all | {100 * mean['accuracy']:.2f} % | {mean['ece']:.4f} | {mean['nll']:.4f} |", '']
  return '\n'.join(lines)


def load_results(workdirs) -> dict[str, dict[str, Any]]:
  """workdir → its results.json, in order; a missing one fails naming the command that writes it."""
  runs = {}
  for workdir in workdirs:
    path = os.path.join(workdir, 'results.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: train the run first, or evaluate its checkpoint with '
                              f'`python -m experiments.evaluate --workdir={workdir}`.')
    with open(path, encoding='utf-8') as f:
      runs[workdir] = json.load(f)
  return runs


def comparison_markdown(runs: dict[str, dict[str, Any]]) -> str:
  """One table comparing runs (e.g. SoftMax, OE, Energy and ICE), each by its own default score.

  Args:
    runs: label → results (`evaluate_model`'s dict, or a run's results.json), in display order.

  Returns:
    Markdown: per run its method, accuracy, ECE and default score, then AUROC / FPR@95 (%) on every
    OOD set any run evaluated (– where a run did not), their mean over the run's sets, and the mean
    accuracy / ECE under corruption where present. Means are over each run's own sets, so compare
    runs evaluated on the same sets.
  """
  if not runs:
    raise ValueError('comparison_markdown needs at least one run.')
  ood_names = list(dict.fromkeys(name for r in runs.values() for name in r.get('ood', {})))
  corrupted = any(r.get('corrupted') for r in runs.values())
  header = ['run', 'method', 'accuracy', 'ECE', 'score', *(f'{n} AUROC / FPR95' for n in ood_names)]
  header += ['mean AUROC / FPR95'] if ood_names else []
  header += ['shifted accuracy', 'shifted ECE'] if corrupted else []
  align = ['---', '---', '---:', '---:', '---'] + ['---:'] * (len(header) - 5)  # text left, numbers right
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
  pair = lambda m: f"{100 * m['auroc']:.1f} / {100 * m['fpr95']:.1f}"
  for label, r in runs.items():
    score, idm = r['default_score'], r['in_distribution']
    row = [label, r['method'], f"{100 * idm['accuracy']:.2f} %", f"{idm['ece']:.4f}", score]
    row += [pair(r['ood'][n][score]) if n in r.get('ood', {}) else '–' for n in ood_names]
    row += [pair(r['ood_mean'][score]) if r.get('ood_mean') else '–'] if ood_names else []
    if corrupted:
      mean = (r.get('corrupted') or {}).get('mean')
      row += [f"{100 * mean['accuracy']:.2f} %", f"{mean['ece']:.4f}"] if mean else ['–', '–']
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


def write_results(results: dict[str, Any], workdir: str) -> None:
  """<workdir>/results.json and <workdir>/results.md (process 0 only)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(results))


def evaluate(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of a training run, with its saved config unless one is given."""
  from ood_jax import train  # pylint: disable=g-import-not-at-top

  config = train.load_config(workdir) if config is None else config
  model, method, info = train.build(config)
  mesh = pipeline.make_mesh()
  variables = train.restore_variables(workdir, mesh)
  results = evaluate_model(config, model, method, info, variables, mesh)
  write_results(results, workdir)
  return results
