r"""One table comparing finished runs: python -m experiments.compare <workdir> [<workdir> ...].

  python -m experiments.compare runs/softmax_c10_wrn runs/oe_c10_wrn runs/energy_c10_wrn runs/ice_c10_wrn \
      --output=runs/c10_wrn_comparison.md

Reads each run's results.json (written by experiments.train / experiments.evaluate) and prints, per
run, accuracy, ECE and AUROC / FPR@95 of its default score on every OOD set, as
`ood_jax.evaluation.report.comparison_markdown`; when every run was evaluated on a benchmark protocol
(--benchmark), also the methods × detectors leaderboard (`ood_jax.evaluation.leaderboard.compare_markdown`).
--output also writes the tables to a file. A missing results.json exits with status 2 and one line (`experiments.cli`).
"""

from experiments import cli

from absl import app
from absl import flags

from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Usage: python -m experiments.compare <workdir> [<workdir> ...] [--output=FILE]')
  runs = report.load_results(argv[1:])
  table = report.comparison_markdown(runs)
  if all('benchmark' in results for results in runs.values()):
    table += '\n' + leaderboard.compare_markdown(runs)
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, 'w', encoding='utf-8') as f:
      f.write(table)
  print(table)


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_string('output', None, 'Optional Markdown file for the table.')
  cli.run(main, load_quietly=())
