r"""Evaluate the latest checkpoint of a run: python -m experiments.evaluate --workdir=<dir>.

Uses the config the run saved in <workdir>/config.json; --config.eval.* style changes are made by
passing --config=<file> explicitly. Writes <workdir>/results.json and results.md and prints the tables.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from ood_jax import evaluate
from ood_jax import report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  # Orbax narrates every save at INFO; keep the progress lines readable.
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  print(report.markdown(evaluate.evaluate(flags.FLAGS.workdir, flags.FLAGS.config)))


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  config_flags.DEFINE_config_file('config', None, 'Optional config file (default: the saved one).')
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
