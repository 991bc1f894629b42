"""Results files and the tables people read: results.json, results.md, comparison tables."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from ood_jax import _extras
from ood_jax.evaluation import leaderboard
from ood_jax import metrics

RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'


def _percent_row(values: dict[str, float]) -> str:
  return ' | '.join(f'{100 * values[name]:.2f}' for name in metrics.OOD_METRICS)


def calibration_row(label: str, block: dict[str, Any], examples: str) -> str:
  """One row of the probabilities table: accuracy, NLL, ECE, Brier, AURC, the examples."""
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
  lines = ['Post-hoc detectors (fitted on the training features), AUROC % / FPR@95 % (fpr95_ood_positive: OOD '
           'positive; docs/conventions.md):', '',
           '| detector | ' + ' | '.join(sets) + ' | mean |', '|---|' + '---:|' * (len(sets) + 1)]
  for name in names:
    cells = [_pair(block['ood'][s][name]) for s in sets] + [_pair(block['ood_mean'][name])]
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
      calibration_row('model', in_dist, str(in_dist['num_examples'])),
  ]
  if 'calibrated' in in_dist:
    validation = results['calibration']['validation_examples']
    lines.append(calibration_row(_calibrated_label(results), in_dist['calibrated'],
                                  f'fitted on {validation} validation'))
  lines.append('')
  if results.get('calibration', {}).get('warning'):
    lines += [f"Note: {results['calibration']['warning']}", '']
  if 'mes_radius_mean' in in_dist:
    lines += ['Accuracy and calibration of a linear probe on the frozen features. Embedding statistics '
              '(Regmi et al. 2024): mean MES radius {:.4f}, mean centroid cosine similarity {:.4f}.'.format(
                  in_dist['mes_radius_mean'], in_dist['dispersion_mean']), '']
  if results.get('benchmark'):
    lines += [leaderboard.markdown(results['benchmark'])]
  if results.get('ood'):
    lines += _ood_table(f"The method's scores per OOD set (default `{results['default_score']}`), %; FPR@95 and "
                        'TNR@95 with ID (ID+) or OOD (OOD+) as the positive class, AUPR-In / -Out with ID / OOD '
                        'positive (docs/conventions.md):',
                        results['ood'], results.get('ood_mean'), 'score')
  if results.get('detectors', {}).get('ood') and not results.get('benchmark'):
    lines += _detector_table(results['detectors'])  # the leaderboard holds them otherwise
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


def _pair(values: dict[str, float]) -> str:
  return f"{100 * values['auroc']:.2f} / {100 * values['fpr95_ood_positive']:.2f}"


def summary(results: dict[str, Any], *, results_dir: str | None = None, best: int = 3) -> str:
  """The few lines a person reads after a run; the tables are in results.md.

  ID accuracy and calibration (raw and after the calibrator), the method's default score and the `best`
  detectors per OOD group (AUROC % / FPR@95 % with OOD as the positive class, as the leaderboard), the
  shift summary when corrupted sets were evaluated, and where the full tables and figures are.
  """
  in_dist = results['in_distribution']
  head = (f"{results['method']} · {results['backbone']} · {results['dataset']}: "
          f"ID accuracy {100 * in_dist['accuracy']:.2f} %")
  if 'ece' in in_dist:
    head += f", ECE {in_dist['ece']:.4f}"
  if 'calibrated' in in_dist:
    head += f" ({_calibrated_label(results).lstrip('+ ')}: {in_dist['calibrated']['ece']:.4f})"
  lines = [head]
  if results.get('calibration', {}).get('warning'):
    lines.append(f"  note: {results['calibration']['warning']}")
  block = results.get('benchmark')
  if block:
    groups = {g: sets for g, sets in block['groups'].items() if sets}
    lines.append('OOD detection, AUROC % / FPR@95 % (OOD positive): ' + '; '.join(
        f'{g} = {", ".join(sets)}' for g, sets in groups.items()))
    default = next((r for r in block['rows'] if r['kind'] == 'method' and r['name'] == results['default_score']),
                   None)
    if default is not None:
      lines.append(f"  {leaderboard.row_label(default)} (the method's score): " + ', '.join(
          f'{g} {_pair(default["groups"][g])}' for g in groups))
    detectors = [r for r in block['rows'] if r['kind'] == 'post-hoc']
    for g in groups if detectors else ():
      top = sorted(detectors, key=lambda r: (-r['groups'][g]['auroc'], r['groups'][g]['fpr95_ood_positive']))[:best]
      lines.append(f'  best detectors on {g}: ' + ', '.join(f"{r['name']} {_pair(r['groups'][g])}" for r in top))
  elif results.get('ood_mean'):
    score = results['default_score']
    lines.append(f"OOD detection, mean over {len(results['ood'])} set(s), AUROC % / FPR@95 % (OOD positive): "
                 f"{score} {_pair(results['ood_mean'][score])}")
    detector_means = results.get('detectors', {}).get('ood_mean', {})
    top = sorted(detector_means.items(), key=lambda item: -item[1]['auroc'])[:best]
    if top:
      lines.append('  best detectors: ' + ', '.join(f'{name} {_pair(values)}' for name, values in top))
  if results.get('corrupted'):
    mean = results['corrupted']['mean']
    text = f"Under corruption (mean over all): accuracy {100 * mean['accuracy']:.2f} %, ECE {mean['ece']:.4f}"
    if 'calibrated' in mean:
      text += f" (calibrated {mean['calibrated']['ece']:.4f})"
    lines.append(text)
  if results_dir is not None:
    lines.append(f'Full tables: {os.path.join(results_dir, RESULTS_MD)} (figures beside it); every metric: '
                 f'{os.path.join(results_dir, RESULTS_JSON)}.')
  return '\n'.join(lines) + '\n'


def write_figures(results: dict[str, Any], directory: str) -> tuple[list[str], str | None]:
  """The run's figures as PNG files in `directory`: what results.md links.

  Reliability diagram (raw and, with a calibrator, calibrated), the densities of the method's default score
  on the test set and each OOD set, and ECE and accuracy against corruption severity (raw and calibrated)
  when corrupted sets were evaluated. matplotlib is an extra (`ood_jax[plots]`): without it nothing is drawn.

  Returns:
    (file names written, in order; why figures were skipped, or None).
  """
  if not _extras.installed('matplotlib'):
    return [], _extras.missing_message('Drawing the figures of results.md', ['matplotlib'])
  plots = _extras.import_optional('ood_jax.plots', needed_by='Drawing the figures of results.md')
  figures = {}
  in_dist = results.get('in_distribution', {})
  calibrated = 'calibrated' in in_dist
  if 'reliability' in in_dist:
    figures['reliability.png'] = lambda: plots.reliability_diagram(results, title='Reliability (test set)')
    if calibrated and 'reliability' in in_dist['calibrated']:
      figures['reliability_calibrated.png'] = lambda: plots.reliability_diagram(
          plots.calibrated(results), title=f'Reliability after {_calibrated_label(results).lstrip("+ ")}')
  if results.get('score_histogram'):
    figures['scores.png'] = lambda: plots.score_histogram_figure(results['score_histogram'],
                                                                 score_name=results['default_score'])
  if results.get('corrupted'):
    runs = {results['method']: results}
    if calibrated:
      runs[plots.calibrated_label(results['method'], results)] = plots.calibrated(results)
    for metric in ('ece', 'accuracy'):
      figures[f'shift_{metric}.png'] = lambda m=metric: plots.shift_box_plots(runs, metric=m)
  for name, draw in figures.items():
    draw().savefig(os.path.join(directory, name), dpi=100, bbox_inches='tight')
  return list(figures), None


def figures_section(names: list[str], skipped: str | None) -> str:
  """results.md's figures section: an image link per file `write_figures` wrote, or why none was drawn."""
  if skipped:
    return f'Figures: none drawn. {skipped}\n'
  titles = {'reliability.png': 'reliability diagram', 'reliability_calibrated.png': 'reliability, calibrated',
            'scores.png': "the method's score on ID and OOD sets", 'shift_ece.png': 'ECE under shift',
            'shift_accuracy.png': 'accuracy under shift'}
  return '## Figures\n\n' + '\n'.join(f'![{titles.get(n, n)}]({n})' for n in names) + '\n'


def write_results(results: dict[str, Any], workdir: str, *, figures: bool = True) -> None:
  """<workdir>/results.json, <workdir>/results.md and the figures it links (process 0 only)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, RESULTS_JSON), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  text = markdown(results)
  if figures:
    text += '\n' + figures_section(*write_figures(results, workdir))
  with open(os.path.join(workdir, RESULTS_MD), 'w', encoding='utf-8') as f:
    f.write(text)


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
  calibrated = any('calibrated' in run['in_distribution'] for run in runs.values())
  fpr = 'FPR@95 (ID+)'  # ID positive, as the papers of these methods report it
  header = ['run', 'method', 'accuracy', 'ECE (raw)'] + (['ECE (calibrated)'] if calibrated else []) + ['score']
  header += [f'{name} AUROC / {fpr}' for name in ood_names]
  header += [f'mean AUROC / {fpr}'] if ood_names else []
  header += ['shifted accuracy', 'shifted ECE (raw)'] if corrupted else []
  text_columns = 4 + calibrated
  align = ['---', '---'] + ['---:'] * (text_columns - 2) + ['---'] + ['---:'] * (len(header) - text_columns - 1)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(align) + '|']
  pair = lambda values: f"{100 * values['auroc']:.1f} / {100 * values['fpr95_id_positive']:.1f}"
  for label, run in runs.items():
    score, in_dist = run['default_score'], run['in_distribution']
    row = [label, run['method'], f"{100 * in_dist['accuracy']:.2f} %", f"{in_dist['ece']:.4f}"]
    if calibrated:
      row += [f"{in_dist['calibrated']['ece']:.4f}" if 'calibrated' in in_dist else '–']
    row += [score]
    row += [pair(run['ood'][name][score]) if name in run.get('ood', {}) else '–' for name in ood_names]
    row += [pair(run['ood_mean'][score]) if run.get('ood_mean') else '–'] if ood_names else []
    if corrupted:
      mean = (run.get('corrupted') or {}).get('mean')
      row += [f"{100 * mean['accuracy']:.2f} %", f"{mean['ece']:.4f}"] if mean else ['–', '–']
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'
