"""Results files and the tables people read: results.json, results.md, comparison tables."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from ood_jax import metrics

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'


def _percent_row(values: dict[str, float]) -> str:
  return ' | '.join(f'{100 * values[name]:.2f}' for name in metrics.OOD_METRICS)


def markdown(results: dict[str, Any]) -> str:
  """The readable tables of one run's results."""
  in_dist = results['in_distribution']
  lines = [
      f"# {results['method']} · {results['backbone']} · {results['dataset']}", '',
      '| accuracy | NLL | ECE | test examples |', '|---:|---:|---:|---:|',
      f"| {100 * in_dist['accuracy']:.2f} % | {in_dist['nll']:.4f} | {in_dist['ece']:.4f} | "
      f"{in_dist['num_examples']} |", '',
  ]
  if 'mes_radius_mean' in in_dist:
    lines += ['Accuracy and calibration of a linear probe on the frozen features. Embedding statistics '
              '(paper 003): mean MES radius {:.4f}, mean centroid cosine similarity {:.4f}.'.format(
                  in_dist['mes_radius_mean'], in_dist['dispersion_mean']), '']
  if results.get('ood'):
    lines += [f"OOD detection (ID positive; default score `{results['default_score']}`), percentages:", '',
              '| OOD set | score | AUROC | AUPR-In | AUPR-Out | FPR@95 | TNR@95 | DTACC |',
              '|---|---|---:|---:|---:|---:|---:|---:|']
    rows = list(results['ood'].items()) + [('**mean**', results['ood_mean'])]
    for set_name, per_score in rows:
      for score, values in per_score.items():
        lines.append(f'| {set_name} | {score} | {_percent_row(values)} |')
    lines.append('')
  if results.get('corrupted'):
    lines += ['Under corruption (mean over corruptions per severity):', '',
              '| severity | accuracy | ECE | NLL |', '|---:|---:|---:|---:|']
    for severity, spread in results['corrupted']['per_severity'].items():
      lines.append(f"| {severity} | {100 * spread['accuracy']['mean']:.2f} % | {spread['ece']['mean']:.4f} | "
                   f"{spread['nll']['mean']:.4f} |")
    mean = results['corrupted']['mean']
    lines += [f"| all | {100 * mean['accuracy']:.2f} % | {mean['ece']:.4f} | {mean['nll']:.4f} |", '']
  return '\n'.join(lines)


def write_results(results: dict[str, Any], workdir: str) -> None:
  """<workdir>/results.json and <workdir>/results.md (process 0 only)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, RESULTS_JSON), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, RESULTS_MD), 'w', encoding='utf-8') as f:
    f.write(markdown(results))


def load_results(workdirs) -> dict[str, dict[str, Any]]:
  """workdir → its results.json, in order; a missing one fails naming the command that writes it."""
  runs = {}
  for workdir in workdirs:
    path = os.path.join(workdir, RESULTS_JSON)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: train the run first, or evaluate its checkpoint with '
                              f'`python -m experiments.evaluate --workdir={workdir}`.')
    with open(path, encoding='utf-8') as f:
      runs[workdir] = json.load(f)
  return runs


def comparison_markdown(runs: dict[str, dict[str, Any]]) -> str:
  """One table comparing runs (e.g. SoftMax, OE, Energy and ICE), each by its own default score.

  Args:
    runs: label → results (`evaluate.evaluate_model`'s dict, or a run's results.json), in display order.

  Returns:
    Markdown: per run its method, accuracy, ECE and default score, then AUROC / FPR@95 (%) on every
    OOD set any run evaluated (– where a run did not), their mean over the run's sets, and the mean
    accuracy / ECE under corruption where present. Means are over each run's own sets, so compare
    runs evaluated on the same sets.
  """
  if not runs:
    raise ValueError('comparison_markdown needs at least one run.')
  ood_names = list(dict.fromkeys(name for run in runs.values() for name in run.get('ood', {})))
  corrupted = any(run.get('corrupted') for run in runs.values())
  header = ['run', 'method', 'accuracy', 'ECE', 'score', *(f'{name} AUROC / FPR95' for name in ood_names)]
  header += ['mean AUROC / FPR95'] if ood_names else []
  header += ['shifted accuracy', 'shifted ECE'] if corrupted else []
  align = ['---', '---', '---:', '---:', '---'] + ['---:'] * (len(header) - 5)  # text left, numbers right
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
  pair = lambda values: f"{100 * values['auroc']:.1f} / {100 * values['fpr95']:.1f}"
  for label, run in runs.items():
    score, in_dist = run['default_score'], run['in_distribution']
    row = [label, run['method'], f"{100 * in_dist['accuracy']:.2f} %", f"{in_dist['ece']:.4f}", score]
    row += [pair(run['ood'][name][score]) if name in run.get('ood', {}) else '–' for name in ood_names]
    row += [pair(run['ood_mean'][score]) if run.get('ood_mean') else '–'] if ood_names else []
    if corrupted:
      mean = (run.get('corrupted') or {}).get('mean')
      row += [f"{100 * mean['accuracy']:.2f} %", f"{mean['ece']:.4f}"] if mean else ['–', '–']
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'
