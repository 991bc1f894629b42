r"""One table comparing finished runs: python -m experiments.compare <workdir> [<workdir> ...].

  python -m experiments.compare runs/softmax_c10_wrn runs/oe_c10_wrn runs/energy_c10_wrn runs/ice_c10_wrn \
      --output=runs/c10_wrn_comparison.md

Reads each run's results.json (written by experiments.train / experiments.evaluate) and prints, per
run, accuracy, ECE and AUROC / FPR@95 of its default score on every OOD set, as
`ood_jax.evaluate.comparison_markdown`; --output also writes the table to a file.
"""

import json
import os

from absl import app
from absl import flags

from ood_jax import evaluate

_OUTPUT = flags.DEFINE_string('output', None, 'Optional Markdown file for the table.')


def load_runs(workdirs) -> dict:
  """workdir → its results.json; a missing one fails naming the command that writes it."""
  runs = {}
  for workdir in workdirs:
    path = os.path.join(workdir, 'results.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: train the run first, or evaluate its checkpoint with '
                              f'`python -m experiments.evaluate --workdir={workdir}`.')
    with open(path, encoding='utf-8') as f:
      runs[workdir] = json.load(f)
  return runs


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Usage: python -m experiments.compare <workdir> [<workdir> ...] [--output=FILE]')
  table = evaluate.comparison_markdown(load_runs(argv[1:]))
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
      f.write(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
