"""The leaderboard view of a run's results: one row per score or detector, near / far means, per set.

`benchmark_block` builds the results' 'benchmark' entry from the per-set metrics the evaluator has
already computed (the method's own scores under results['ood'], post-hoc detectors under
results['detectors']['ood']), so every leaderboard number is a `metrics.ood_metrics` value or the
plain mean of such values over a group's sets, as OpenOOD averages (per set first, then the mean;
not one concatenated set, which would let set sizes pick the weights).

A method's own score and the post-hoc detector that computes the same number from the same logits
(`METHOD_SCORE_DETECTORS`: max_softmax / msp, energy / energy, ...) are one row, labelled as the method's
score and naming the detector; the evaluator does not fit such a twin at all (`twin_detectors`).

`markdown` renders one run's leaderboard and `compare_markdown` the methods × detectors matrix of
several runs. Tables show AUROC and FPR@95 with OOD as the positive class (OpenOOD v1.5's
convention); results.json holds every metric of both conventions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ['METHOD_SCORE_DETECTORS', 'benchmark_block', 'compare_markdown', 'markdown', 'row_label',
           'twin_detectors']

_TABLE_FPR = 'fpr95_ood_positive'

# A method's score (`ood_jax.scores`, on the model's logits) → the post-hoc detector that returns the same
# value on the same logits, and the detector hyperparameters under which it does.
METHOD_SCORE_DETECTORS = {
    'max_softmax': ('msp', {}),
    'max_logit': ('max_logit', {}),
    'energy': ('energy', {'temperature': 1.0}),
    'entropic_score': ('entropy', {}),
}


def twin_detectors(method_scores, detectors) -> dict[str, str]:
  """{detector name: method score} for the detectors of `detectors` that a method score already computes.

  A detector is a twin when it is `METHOD_SCORE_DETECTORS[score]` for one of `method_scores` with the same
  hyperparameters and nothing to tune (a pinned energy temperature other than 1 is not a twin).

  Args:
    method_scores: the method's score names (`method.scores`).
    detectors: `ood_jax.detectors.Detector` records (with `name`, `defaults`, `grid`).
  """
  twins = {}
  for score in method_scores:
    name, hparams = METHOD_SCORE_DETECTORS.get(score, (None, None))
    for det in detectors:
      if det.name == name and not det.grid and all(det.defaults.get(k) == v for k, v in hparams.items()):
        twins[det.name] = score
  return twins


def _group_mean(per_set: dict[str, dict[str, float]], sets) -> dict[str, float]:
  return {metric: float(np.mean([per_set[s][metric] for s in sets])) for metric in per_set[sets[0]]}


def _same(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> bool:
  # The two computations may round the scores differently in the last float32 bit.
  return a.keys() == b.keys() and all(a[s].keys() == b[s].keys() and np.allclose(
      [a[s][m] for m in a[s]], [b[s][m] for m in a[s]], rtol=0, atol=1e-6) for s in a)


def benchmark_block(results: dict[str, Any], *, protocol: str, groups: dict[str, tuple[str, ...]],
                    validation: tuple[str, ...]) -> dict[str, Any]:
  """The results' 'benchmark' entry.

  Args:
    results: the evaluator's results so far ('ood', optionally 'detectors', 'in_distribution').
    protocol: protocol name, or '' for plain eval.ood_sets.
    groups: group name ('near', 'far', 'other') → its OOD sets, in display order.
    validation: the validation OOD sets hyperparameters were tuned on.

  Returns:
    {'protocol', 'groups', 'validation', 'id_accuracy', 'rows': [{'name', 'kind' ('method' for the
    method's own scores, 'post-hoc' for detectors), 'per_set': {set: metrics}, 'groups': {group:
    mean metrics}, 'hparams' (tuned values, or {} at the defaults), 'validation_auroc' (or None), 'same_as'
    (the post-hoc detector a method score equals, or None)}]}. A post-hoc row whose numbers equal a method
    score's twin (`METHOD_SCORE_DETECTORS`) is merged into the method's row.
  """
  rows = []
  method_sets = results.get('ood', {})
  score_names = list(next(iter(method_sets.values()), {}))
  sources = [('method', name, {s: method_sets[s][name] for s in method_sets}, None) for name in score_names]
  detector_block = results.get('detectors', {})
  tuning = detector_block.get('tuning', {})
  twins = {METHOD_SCORE_DETECTORS[name][0]: name for name in score_names if name in METHOD_SCORE_DETECTORS}
  merged = {}
  for name in detector_block.get('ood_mean', {}):
    per_set = {s: detector_block['ood'][s][name] for s in detector_block['ood']}
    if name in twins and name not in tuning and _same(per_set, sources[score_names.index(twins[name])][2]):
      merged[twins[name]] = name  # results of an older run, or one that fitted the twin anyway: the same row
      continue
    sources.append(('post-hoc', name, per_set, tuning.get(name)))
  for kind, name, per_set, tuned in sources:
    same_as = (merged.get(name) or METHOD_SCORE_DETECTORS.get(name, (None,))[0]) if kind == 'method' else None
    rows.append({
        'name': name, 'kind': kind, 'per_set': per_set, 'same_as': same_as,
        'groups': {group: _group_mean(per_set, sets) for group, sets in groups.items() if sets},
        'hparams': dict(tuned['hparams']) if tuned else {},
        'validation_auroc': tuned['validation_auroc'] if tuned else None,
    })
  in_dist = results.get('in_distribution', {})
  return {'protocol': protocol, 'groups': {g: list(s) for g, s in groups.items()}, 'validation': list(validation),
          'id_accuracy': in_dist.get('accuracy'), 'rows': rows}


def _sort_key(row: dict[str, Any], groups) -> float:
  first = next(iter(groups), None)
  return -row['groups'][first]['auroc'] if first else 0.0


def _hparams_text(row: dict[str, Any]) -> str:
  if not row['hparams']:
    return '–' if row['kind'] == 'method' else 'defaults'
  return ', '.join(f'{key}={value}' for key, value in row['hparams'].items())


def row_label(row: dict[str, Any]) -> str:
  """A row's name, with the post-hoc detector it equals for a method score: 'max_softmax (= msp)'."""
  twin = row.get('same_as')
  return f"{row['name']} (= {twin})" if twin and twin != row['name'] else row['name']


def markdown(block: dict[str, Any]) -> str:
  """One run's leaderboard: rows by the first group's AUROC, best first; numbers in %."""
  groups = {g: s for g, s in block['groups'].items() if s}
  sets = [s for group_sets in groups.values() for s in group_sets]
  header = ['#', 'score / detector', 'kind']
  header += [f'{g} AUROC' for g in groups] + [f'{g} FPR@95' for g in groups]
  header += [f'{s} AUROC' for s in sets] + ['hyperparameters (validation AUROC)']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---:|' + '---|---|' + '---:|' * (2 * len(groups) + len(sets))
           + '---|']
  for rank, row in enumerate(sorted(block['rows'], key=lambda r: _sort_key(r, groups)), 1):
    cells = [str(rank), row_label(row), row['kind']]
    cells += [f"{100 * row['groups'][g]['auroc']:.2f}" for g in groups]
    cells += [f"{100 * row['groups'][g][_TABLE_FPR]:.2f}" for g in groups]
    cells += [f"{100 * row['per_set'][s]['auroc']:.2f}" for s in sets]
    tuned = _hparams_text(row)
    if row['validation_auroc'] is not None:
      tuned += f" ({100 * row['validation_auroc']:.2f})"
    lines.append('| ' + ' | '.join(cells + [tuned]) + ' |')
  accuracy = block.get('id_accuracy')
  title = (f"Leaderboard{' ' + block['protocol'] if block['protocol'] else ''}: "
           + '; '.join(f'{g}-OOD = {", ".join(s)}' for g, s in groups.items())
           + (f"; tuned on {', '.join(block['validation'])}" if block['validation'] else '; untuned (defaults)')
           + (f'; ID accuracy {100 * accuracy:.2f} %' if accuracy is not None else '')
           + '. AUROC and FPR@95 in %; FPR@95 is fpr95_ood_positive (OOD positive, as OpenOOD v1.5; '
           'docs/conventions.md); group = mean over its sets.')
  return '\n'.join([title, '', *lines]) + '\n'


def compare_markdown(runs: dict[str, dict[str, Any]]) -> str:
  """Methods × detectors: one row per score / detector, one column per run, cells 'near / far' AUROC.

  Args:
    runs: label → results with a 'benchmark' entry, in display order (all on the same protocol).

  Returns:
    Markdown; '–' where a run lacks a row. The second line gives each run's ID accuracy.
  """
  blocks = {}
  for label, results in runs.items():
    if 'benchmark' not in results:
      raise ValueError(f'run {label!r} has no benchmark results: evaluate it with --benchmark=<protocol>.')
    blocks[label] = results['benchmark']
  protocols = {b['protocol'] for b in blocks.values()}
  if len(protocols) > 1:
    raise ValueError(f'runs use different protocols {sorted(protocols)}: their group means do not compare.')
  groups = [g for g, s in next(iter(blocks.values()))['groups'].items() if s]
  key = lambda row: f"{row_label(row)} ({row['kind']})"
  names = list(dict.fromkeys(key(row) for b in blocks.values() for row in b['rows']))
  header = ['score / detector'] + list(blocks)
  accuracy = lambda b: f"{100 * b['id_accuracy']:.2f} %" if b.get('id_accuracy') is not None else '–'
  lines = [f"AUROC (%) {' / '.join(groups)}-OOD, protocol {protocols.pop() or '(eval.ood_sets)'}.", '',
           '| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * len(blocks),
           '| *ID accuracy* | ' + ' | '.join(accuracy(b) for b in blocks.values()) + ' |']
  for name in names:
    cells = [name]
    for block in blocks.values():
      row = next((r for r in block['rows'] if key(r) == name), None)
      cells.append(' / '.join(f"{100 * row['groups'][g]['auroc']:.1f}" for g in groups) if row else '–')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
