"""Results files and the tables people read: results.json, results.md, comparison tables."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from ood_jax.evaluation import leaderboard
from ood_jax import metrics

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'


def _percent_row(values: dict[str, float]) -> str:
  return ' | '.join(f'{100 * values[name]:.2f}' for name in metrics.OOD_METRICS)


def _calibration_row(label: str, block: dict[str, Any], examples: str) -> str:
  return (f"| {label} | {100 * block['accuracy']:.2f} % | {block['nll']:.4f} | {block['ece']:.4f} | "
          f"{block['brier']:.4f} | {block['aurc']:.4f} | {examples} |")


def _calibrated_label(results: dict[str, Any]) -> str:
  info = results.get('calibration', {})
  if info.get('calibrator') == 'temperature':
    return f"+ temperature (T = {info['temperature']:.3f})"
  return '+ Platt (per class)'


def _ood_table(title: str, per_set: dict, mean: dict | None, first: str) -> list[str]:
  lines = [title, '', f'| OOD set | {first} | AUROC | AUPR-In | AUPR-Out | FPR@95 (ID+) | FPR@95 (OOD+) '
           '| TNR@95 (ID+) | DTACC |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
  rows = list(per_set.items()) + ([('**mean**', mean)] if mean else [])
  for set_name, per_score in rows:
    for score, values in per_score.items():
      lines.append(f'| {set_name} | {score} | {_percent_row(values)} |')
  return lines + ['']


def _detector_table(block: dict[str, Any]) -> list[str]:
  """One row per detector: AUROC / FPR@95 (%) on every OOD set and their mean."""
  sets = list(block['ood'])
  names = list(block.get('ood_mean', {}))
  lines = ['Post-hoc detectors (fitted on the training features; AUROC / FPR@95 with ID positive, %):', '',
           '| detector | ' + ' | '.join(sets) + ' | mean |', '|---|' + '---:|' * (len(sets) + 1)]
  pair = lambda values: f"{100 * values['auroc']:.2f} / {100 * values['fpr95_id_positive']:.2f}"
  for name in names:
    cells = [pair(block['ood'][s][name]) for s in sets] + [pair(block['ood_mean'][name])]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  for name, message in block.get('errors', {}).items():
    lines.append(f'| {name} | failed: {message} |')
  return lines + ['']


def markdown(results: dict[str, Any]) -> str:
  """The readable tables of one run's results."""
  in_dist = results['in_distribution']
  lines = [
      f"# {results['method']} · {results['backbone']} · {results['dataset']}", '',
      '| probabilities | accuracy | NLL | ECE | Brier | AURC | test examples |',
      '|---|---:|---:|---:|---:|---:|---:|',
      _calibration_row('model', in_dist, str(in_dist['num_examples'])),
  ]
  if 'calibrated' in in_dist:
    validation = results['calibration']['validation_examples']
    lines.append(_calibration_row(_calibrated_label(results), in_dist['calibrated'],
                                  f'fitted on {validation} validation'))
  lines.append('')
  if results.get('calibration', {}).get('warning'):
    lines += [f"Note: {results['calibration']['warning']}", '']
  if 'mes_radius_mean' in in_dist:
    lines += ['Accuracy and calibration of a linear probe on the frozen features. Embedding statistics '
              '(paper 003): mean MES radius {:.4f}, mean centroid cosine similarity {:.4f}.'.format(
                  in_dist['mes_radius_mean'], in_dist['dispersion_mean']), '']
  if results.get('benchmark'):
    lines += [leaderboard.markdown(results['benchmark'])]
  if results.get('ood'):
    lines += _ood_table(f"OOD detection (default score `{results['default_score']}`), percentages; FPR@95 with "
                        'ID (ID+) or OOD (OOD+) as the positive class:',
                        results['ood'], results.get('ood_mean'), 'score')
  if results.get('detectors', {}).get('ood'):
    lines += _detector_table(results['detectors'])
  if results.get('corrupted'):
    corrupted = results['corrupted']
    calibrated = 'calibrated' in corrupted['mean']
    header = '| severity | accuracy | ECE | NLL | Brier |'
    header += ' ECE calibrated | NLL calibrated |' if calibrated else ''
    lines += ['Under corruption (mean over corruptions per severity):', '', header,
              '|' + '---:|' * (header.count('|') - 1)]
    levels = [(severity, {name: spread[name]['mean'] for name in ('accuracy', 'ece', 'nll', 'brier')},
               {name: spread['calibrated'][name]['mean'] for name in ('ece', 'nll')} if calibrated else None)
              for severity, spread in corrupted['per_severity'].items()]
    levels.append(('all', corrupted['mean'], corrupted['mean'].get('calibrated')))
    for severity, raw, after in levels:
      row = (f"| {severity} | {100 * raw['accuracy']:.2f} % | {raw['ece']:.4f} | {raw['nll']:.4f} | "
             f"{raw['brier']:.4f} |")
      if calibrated:
        row += f" {after['ece']:.4f} | {after['nll']:.4f} |"
      lines.append(row)
    lines.append('')
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
      runs[workdir] = json.load(f, object_hook=_upgrade_metric_names)
  return runs


# ood_jax 0.1 wrote FPR@95 / TNR@95 (ID positive) under these names.
_OLD_METRIC_NAMES = {'fpr95': 'fpr95_id_positive', 'tnr95': 'tnr95_id_positive'}


def _upgrade_metric_names(block: dict) -> dict:
  if 'auroc' in block:
    block = {_OLD_METRIC_NAMES.get(key, key): value for key, value in block.items()}
  return block


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
  header += ['mean AUROC / FPR95'] if ood_names else []  # FPR95: ID positive, as the papers
  header += ['shifted accuracy', 'shifted ECE'] if corrupted else []
  align = ['---', '---', '---:', '---:', '---'] + ['---:'] * (len(header) - 5)  # text left, numbers right
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
  pair = lambda values: f"{100 * values['auroc']:.1f} / {100 * values['fpr95_id_positive']:.1f}"
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
